"""pipeline/docker.py against a fake SDK client (passed in, the docker-py way): no daemon needed."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from docker.errors import APIError, ImageNotFound

from pipeline import docker
from pipeline.errors import UserError

# -- a fake client ------------------------------------------------------------------------------------


class FakeAPI:
    def __init__(self, items=(), error: Exception | None = None) -> None:
        self.items = list(items)
        self.error = error
        self.build_kwargs: dict = {}
        self.imports: list = []

    def build(self, **kwargs):
        self.build_kwargs = kwargs
        if "fileobj" in kwargs:  # the uploaded context, as the engine would see it
            import tarfile

            with tarfile.open(fileobj=kwargs["fileobj"]) as t:
                self.context_members = sorted(t.getnames())

        def stream():
            yield from self.items
            if self.error is not None:
                raise self.error

        return stream()

    def import_image_from_file(self, path, repository, tag, changes):
        self.imports.append((path, repository, tag, changes))
        self.client.images.ids[f"{repository}:{tag}"] = "sha256:imported"


class FakeImage:
    def __init__(self, images: FakeImages, ref: str) -> None:
        self.images, self.id = images, images.ids[ref]
        self.attrs = {"Config": images.configs.get(ref, {})}

    def tag(self, repo, tag):
        self.images.ids[f"{repo}:{tag}"] = self.id

    @property
    def tags(self):
        return [ref for ref, i in self.images.ids.items() if i == self.id]


class FakeImages:
    def __init__(self, ids=None, pullable=None, configs=None) -> None:
        self.ids = dict(ids or {})
        self.pullable = dict(pullable or {})
        self.configs = dict(configs or {})
        self.pulls: list[str] = []

    def get(self, ref):
        if ref not in self.ids:
            raise ImageNotFound(f"No such image: {ref}")
        return FakeImage(self, ref)

    def remove(self, ref, noprune=False):
        assert noprune and len(self.get(ref).tags) > 1, "only a tag may go, never an image"
        del self.ids[ref]

    def pull(self, ref):
        self.pulls.append(ref)
        if ref not in self.pullable:
            raise APIError("500 Server Error", explanation=f"pull access denied for {ref}, repository does not exist")
        self.ids[ref] = self.pullable[ref]
        return FakeImage(self, ref)


class FakeContainer:
    def __init__(self, name: str = "c", labels: dict | None = None) -> None:
        self.removed: list[dict] = []
        self.exported = False
        self.name = name
        self.labels = labels or {}

    def export(self, chunk_size):
        self.exported = True
        return iter([b"a" * chunk_size, b"b"])

    def remove(self, **kwargs):
        self.removed.append(kwargs)


class FakeContainers:
    def __init__(self) -> None:
        self.created: list[tuple[str, dict]] = []
        self.container = FakeContainer()
        self.existing: list[FakeContainer] = []
        self.filters: list[dict] = []

    def create(self, image, **kwargs):
        self.created.append((image, kwargs))
        return self.container

    def list(self, all=False, filters=None):
        self.filters.append(filters)
        return self.existing


class FakeClient:
    def __init__(self, api=None, images=None) -> None:
        self.api = api or FakeAPI()
        self.api.client = self
        self.images = images or FakeImages()
        self.containers = FakeContainers()


def stream(*lines: str):
    return [{"stream": line + "\n"} for line in lines]


def run_build(c, echo=None, **kw):
    import tempfile

    args = dict(buildargs={"A": "1"}, platform="linux/amd64", recipe="app", known_recipes=["debian-bookworm"],
                echo=echo if echo is not None else (lambda line: None))
    args.update(kw)
    with tempfile.TemporaryDirectory() as tmp:
        ctx = Path(tmp) / "recipes" / "app"
        ctx.mkdir(parents=True)
        (ctx / "Dockerfile").write_text("FROM ldt/debian-bookworm\n")
        (ctx / "recipe.toml").write_text("[vm]\ncpus = 1\n")
        (ctx / "data.txt").write_text("x")
        return docker.build(c, ctx, "ldt/app:k1", **args)


# -- build ---------------------------------------------------------------------------------------------

OK_LOG = ["Step 1/2 : FROM ldt/debian-bookworm", " ---> 028afacca20a", "Step 2/2 : RUN echo hi", " ---> Running in 1",
          "hi", " ---> 5f5f5f", "Successfully built 5f5f5f", "Successfully tagged ldt/app:k1"]


def test_build_streams_the_log_and_returns_the_aux_image_id():
    items = stream(*OK_LOG[:6]) + [{"aux": {"ID": "sha256:5f5f5f"}}] + stream(*OK_LOG[6:])
    c = FakeClient(FakeAPI(items))
    echoed: list[str] = []
    assert run_build(c, echo=echoed.append) == "sha256:5f5f5f"
    assert echoed == OK_LOG
    kw = c.api.build_kwargs
    assert kw["custom_context"] is True and kw["tag"] == "ldt/app:k1"
    assert c.api.context_members == ["Dockerfile", "data.txt"]  # recipe.toml is pipeline settings, not context
    assert kw["buildargs"] == {"A": "1"} and kw["platform"] == "linux/amd64"
    assert kw["decode"] is True and kw["pull"] is False and kw["rm"] is True and kw["forcerm"] is True


def test_build_splits_multi_line_stream_items():
    c = FakeClient(FakeAPI([{"stream": "Step 1/1 : FROM ldt/x\n ---> 1\n"}, {"aux": {"ID": "sha256:1"}}]))
    echoed: list[str] = []
    run_build(c, echo=echoed.append)
    assert echoed == ["Step 1/1 : FROM ldt/x", " ---> 1"]


def test_build_without_aux_asks_the_engine_for_the_tag():
    c = FakeClient(FakeAPI(stream(*OK_LOG)), FakeImages({"ldt/app:k1": "sha256:tagged"}))
    assert run_build(c) == "sha256:tagged"


def test_build_without_any_image_is_a_user_error():
    c = FakeClient(FakeAPI(stream(*OK_LOG)))
    with pytest.raises(UserError, match="without an image"):
        run_build(c)


def test_failing_step_names_the_step_with_the_log_tail():
    items = stream("Step 1/4 : FROM ldt/debian-bookworm", " ---> 028a", "Step 2/4 : RUN echo early",
                   "early", " ---> 1234", "Step 3/4 : RUN false", " ---> Running in abc", "some output of false")
    items.append({"errorDetail": {"code": 1, "message": "The command '/bin/sh -c false' returned a non-zero code: 1"},
                  "error": "The command '/bin/sh -c false' returned a non-zero code: 1"})
    items += stream("Step 4/4 : RUN never")
    echoed: list[str] = []
    with pytest.raises(UserError) as info:
        run_build(FakeClient(FakeAPI(items)), echo=echoed.append)
    e = info.value
    first = e.message.splitlines()[0]
    assert first == ("recipe 'app': step `RUN false` failed: "
                     "The command '/bin/sh -c false' returned a non-zero code: 1")
    tail = e.message.splitlines()[1:]
    assert tail == ["    Step 3/4 : RUN false", "     ---> Running in abc", "    some output of false"]
    assert "recipes/app/Dockerfile" in e.hint
    assert "Step 4/4 : RUN never" not in echoed  # the build stops at the error


def test_log_tail_is_bounded():
    items = stream("Step 1/1 : RUN seq 100", *[str(i) for i in range(100)]) + [{"error": "boom"}]
    with pytest.raises(UserError) as info:
        run_build(FakeClient(FakeAPI(items)))
    lines = info.value.message.splitlines()
    assert len(lines) == 1 + 20 and lines[-1] == "    99"


def test_api_error_during_build_is_a_user_error():
    error = APIError("400 Client Error", explanation="dockerfile parse error line 3: unknown instruction: RUNN")
    with pytest.raises(UserError) as info:
        run_build(FakeClient(FakeAPI(stream("Step 1/2 : FROM ldt/x"), error=error)))
    assert "unknown instruction: RUNN" in info.value.message
    assert info.value.hint


def test_from_step_error_says_neither_local_nor_pullable():
    items = stream("Step 1/2 : FROM debian:bookworm") + [
        {"error": "pull access denied for debian, repository does not exist or may require 'docker login'"}]
    with pytest.raises(UserError) as info:
        run_build(FakeClient(FakeAPI(items)))
    assert "base image debian:bookworm is neither local nor pullable" in info.value.message
    assert "FROM ldt/debian-bookworm" in info.value.hint


def test_pull_error_before_any_step_says_neither_local_nor_pullable():
    items = [{"error": "Get \"https://registry-1.docker.io/v2/\": dial tcp: lookup registry-1.docker.io: no such host"}]
    with pytest.raises(UserError) as info:
        run_build(FakeClient(FakeAPI(items)))
    assert "neither local nor pullable" in info.value.message
    assert "FROM ldt/debian-bookworm" in info.value.hint


# -- ensure_base ---------------------------------------------------------------------------------------


def test_ensure_base_local_image_is_not_pulled():
    images = FakeImages({"debian:bookworm": "sha256:local"})
    assert docker.ensure_base(FakeClient(images=images), "debian:bookworm", "app", []) == "sha256:local"
    assert images.pulls == []


def test_ensure_base_pulls_a_missing_image():
    images = FakeImages(pullable={"debian:bookworm": "sha256:pulled"})
    assert docker.ensure_base(FakeClient(images=images), "debian:bookworm", "app", []) == "sha256:pulled"
    assert images.pulls == ["debian:bookworm"]


def test_ensure_base_neither_local_nor_pullable_names_the_bootstrap_recipe():
    with pytest.raises(UserError) as info:
        docker.ensure_base(FakeClient(), "debian:bookworm", "app", ["debian-bookworm"])
    e = info.value
    assert e.message.startswith("recipe 'app': base image debian:bookworm is neither local nor pullable")
    assert "pull access denied" in e.message
    assert "FROM ldt/debian-bookworm" in e.hint


def test_ensure_base_without_bootstrap_recipes_says_how_to_add_one():
    with pytest.raises(UserError) as info:
        docker.ensure_base(FakeClient(), "debian:bookworm", "app", [])
    assert "[bootstrap]" in info.value.hint


# -- image config and import ------------------------------------------------------------------------------


def test_config_changes_renders_dockerfile_instructions():
    cfg = {"Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "GREETING=hello world", "EMPTY=", "EQ=a=b"],
           "Cmd": ["/bin/bash", "-l"], "Entrypoint": ["/init"], "WorkingDir": "/srv/app", "User": "app",
           "Labels": {"org.example": "x y"}, "ExposedPorts": {"80/tcp": {}}, "StopSignal": "SIGRTMIN+3"}
    assert docker.config_changes(cfg) == [
        'ENV PATH="/usr/local/bin:/usr/bin:/bin"',
        'ENV GREETING="hello world"',
        'ENV EMPTY=""',
        'ENV EQ="a=b"',
        'CMD ["/bin/bash", "-l"]',
        'ENTRYPOINT ["/init"]',
        "WORKDIR /srv/app",
        "USER app",
        'LABEL "org.example"="x y"',
        "EXPOSE 80/tcp",
        "STOPSIGNAL SIGRTMIN+3",
    ]
    assert docker.config_changes({}) == []


def test_image_config_keeps_what_import_can_restore():
    cfg = {"Env": ["A=1"], "Cmd": ["bash"], "WorkingDir": "", "Hostname": "abc", "Image": "sha256:x", "User": ""}
    c = FakeClient(images=FakeImages({"img": "sha256:1"}, configs={"img": cfg}))
    assert docker.image_config(c, "img") == {"Env": ["A=1"], "Cmd": ["bash"]}


def test_import_tgz_and_tag():
    c = FakeClient()
    changes = ["CMD [\"bash\"]"]
    assert docker.import_tgz(c, Path("/x/rootfs.tgz"), "ldt/app:k1", changes) == "sha256:imported"
    assert c.api.imports == [("/x/rootfs.tgz", "ldt/app", "k1", changes)]
    docker.tag(c, "ldt/app:k1", "ldt/app:latest")
    assert c.images.ids["ldt/app:latest"] == "sha256:imported"


def test_untag_takes_a_tag_off_but_never_an_image():
    c = FakeClient(images=FakeImages({"ldt/a:k1": "sha256:1", "ldt/a:latest": "sha256:1", "ldt/b:latest": "sha256:2"}))
    assert docker.untag(c, "ldt/a:latest")
    assert "ldt/a:latest" not in c.images.ids and c.images.ids["ldt/a:k1"] == "sha256:1"
    assert not docker.untag(c, "ldt/b:latest")  # its only tag: the image would go with it
    assert c.images.ids["ldt/b:latest"] == "sha256:2"
    assert not docker.untag(c, "ldt/c:latest")


@pytest.fixture
def pulled_tgz(tmp_path, monkeypatch):
    """tgz_after on a recipe 'a' whose current entry is k2, with a fake engine."""
    from pipeline import builders

    recipe = type("R", (), {"name": "a", "image": "ldt/a"})()
    entry = tmp_path / "store" / "tgz" / "k2"
    entry.mkdir(parents=True)
    c = FakeClient(images=FakeImages({"ldt/a:k1": "sha256:1", "ldt/a:latest": "sha256:1"}))
    monkeypatch.setattr(docker, "client", lambda: c)
    return lambda: builders.tgz_after(None, recipe, entry), c


def test_a_pulled_tgz_is_not_imported_and_the_stale_latest_goes(pulled_tgz, capsys):
    after, c = pulled_tgz
    after()
    assert c.api.imports == []  # imported when a FROM or suco needs it (ensure_image), not now
    assert "ldt/a:latest" not in c.images.ids and "ldt/a:k1" in c.images.ids
    assert "the engine gets ldt/a when a FROM or suco needs it (ldt/a:latest, an older image, untagged)" \
        in capsys.readouterr().err


def test_a_tgz_whose_image_the_engine_holds_becomes_latest(pulled_tgz):
    after, c = pulled_tgz
    c.images.ids["ldt/a:k2"] = "sha256:2"  # built here: docker build tagged it with its key
    after()
    assert c.images.ids["ldt/a:latest"] == "sha256:2" and c.api.imports == []


def test_without_an_engine_a_pulled_tgz_needs_none(tmp_path, monkeypatch):
    from pipeline import builders

    def no_engine():
        raise UserError("the Docker daemon is not reachable: no answer")

    monkeypatch.setattr(docker, "client", no_engine)
    builders.tgz_after(None, type("R", (), {"name": "a", "image": "ldt/a"})(), tmp_path)  # no error


def test_import_without_result_is_a_user_error():
    c = FakeClient()
    c.api.import_image_from_file = lambda *a, **k: None
    with pytest.raises(UserError, match="did not produce ldt/app:k1"):
        docker.import_tgz(c, Path("/x/rootfs.tgz"), "ldt/app:k1")


# -- exported -------------------------------------------------------------------------------------------


def test_exported_streams_and_removes_the_container():
    c = FakeClient()
    with docker.exported(c, "sha256:img", chunk_size=4) as chunks:
        assert list(chunks) == [b"aaaa", b"b"]
    (image, kwargs), = c.containers.created
    assert image == "sha256:img" and kwargs["network_disabled"] is True
    assert kwargs["labels"] == {docker.LABEL: f"{socket.gethostname()}:{os.getpid()}"}
    assert c.containers.container.removed == [{"force": True}]


def test_leftovers_of_dead_runs_are_removed_and_live_ones_kept():
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    c = FakeClient()
    gone = FakeContainer("gone", {docker.LABEL: f"{host}:{dead.pid}"})
    live = FakeContainer("live", {docker.LABEL: f"{host}:{os.getpid()}"})
    elsewhere = FakeContainer("elsewhere", {docker.LABEL: f"other-host:{dead.pid}"})
    c.containers.existing = [gone, live, elsewhere]
    assert docker.remove_leftovers(c) == ["gone"]
    assert gone.removed == [{"force": True}] and live.removed == [] and elsewhere.removed == []
    assert c.containers.filters == [{"label": docker.LABEL}]
    with docker.exported(c, "sha256:img") as chunks:  # the next export sweeps them too
        next(chunks)
    assert len(c.containers.filters) == 2


@pytest.mark.parametrize("exc", [RuntimeError("export failed"), KeyboardInterrupt(), UserError("truncated")])
def test_exported_removes_the_container_on_failure_and_interrupt(exc):
    c = FakeClient()
    with pytest.raises(type(exc)):
        with docker.exported(c, "sha256:img") as chunks:
            next(chunks)
            raise exc
    assert c.containers.container.removed == [{"force": True}]


def test_exported_removal_failure_does_not_hide_the_result():
    c = FakeClient()

    def fail(**kwargs):
        raise APIError("409 Conflict")

    c.containers.container.remove = fail
    with docker.exported(c, "sha256:img") as chunks:
        assert next(chunks)


# -- client ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["unix:///nonexistent.sock", "tcp://127.0.0.1:9"])
def test_client_unreachable_daemon_is_one_line_with_a_hint(monkeypatch, host):
    monkeypatch.setenv("DOCKER_HOST", host)
    monkeypatch.delenv("DOCKER_TLS_VERIFY", raising=False)
    with pytest.raises(UserError) as info:
        docker.client()
    e = info.value
    assert e.message.startswith("the Docker daemon is not reachable")
    assert "\n" not in e.message
    assert "systemctl start docker" in e.hint and "dockerd" in e.hint


# -- build context ------------------------------------------------------------------------------------


def test_context_files_follow_dockerignore(tmp_path):
    (tmp_path / "Dockerfile").write_text("FROM scratch\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "kept.txt").write_text("")
    (tmp_path / "sub" / "skip.log").write_text("")
    (tmp_path / "secret").write_text("")
    (tmp_path / "link").symlink_to("sub")
    (tmp_path / ".dockerignore").write_text("# comment\nsecret\n**/*.log\n")
    assert docker.context_files(tmp_path) == [".dockerignore", "Dockerfile", "link", "sub/kept.txt"]


def test_context_files_without_a_dockerignore_are_what_dockers_matcher_gives(tmp_path):
    """Our walk (no .dockerignore: the SDK is not imported) against the SDK's exclude_paths."""
    from docker.utils.build import exclude_paths

    (tmp_path / "Dockerfile").write_text("FROM scratch\n")
    (tmp_path / "recipe.toml").write_text("")  # NOT_CONTEXT: left out
    (tmp_path / "sub" / "deep").mkdir(parents=True)
    (tmp_path / "sub" / "recipe.toml").write_text("")  # not top-level: kept
    (tmp_path / "sub" / "deep" / "a.txt").write_text("")
    (tmp_path / "empty").mkdir()
    (tmp_path / "link").symlink_to("sub")
    (tmp_path / "dangling").symlink_to("nowhere")
    ours = docker.context_files(tmp_path)
    sdk = exclude_paths(str(tmp_path), list(docker.NOT_CONTEXT), dockerfile="Dockerfile")
    assert ours == sorted(p for p in sdk if not (tmp_path / p).is_dir() or (tmp_path / p).is_symlink())
    assert ours == ["Dockerfile", "dangling", "link", "sub/deep/a.txt", "sub/recipe.toml"]


def test_image_id_of_a_missing_image_is_none():
    c = FakeClient(images=FakeImages({"a": "sha256:a"}))
    assert docker.image_id(c, "a") == "sha256:a"
    assert docker.image_id(c, "b") is None


def test_docker_module_imports_no_sdk_at_import_time():
    import subprocess
    import sys

    code = "import sys, pipeline.docker, pipeline.stages; print('docker' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_a_context_without_a_dockerignore_is_listed_without_the_sdk(tmp_path):
    """What a no-op doit does per recipe: the SDK (0.1 s to import) is not loaded for it."""
    import subprocess
    import sys

    (tmp_path / "Dockerfile").write_text("FROM scratch\n")
    code = (f"import sys, pathlib, pipeline.docker as d; print(d.context_files(pathlib.Path({str(tmp_path)!r}))); "
            "print('docker' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["['Dockerfile']", "False"]
