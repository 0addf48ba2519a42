"""Published images: a recipe's final artifacts as one OCI artifact (`doit publish:<recipe>`),
and `oci://` references that the run commands boot (pulled, verified, kept in the store as
entries of the `published` row: pull_published).

The layout is below ("published images"); a standard OCI client (oras, skopeo, crane) can pull
it: each layer is one file, zstd-compressed, titled "<name>.zst". The wire is oci.py's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import oci, stages
from pipeline.artifacts import Artifact
from pipeline.entries import MANIFEST, EntryCorrupt, RemoteUnavailable, key_of
from pipeline.errors import UserError
from pipeline.project import Project
from pipeline.recipes import Recipe
from pipeline.run import log

A = Artifact
PUBLISHED = (A.BIOS_IMG, A.UEFI_IMG, A.BIOS_QCOW2, A.UEFI_QCOW2, A.KERNEL, A.INITRD, A.TGZ)
PULLED_STAGE = stages.PUBLISHED.name  # store entries of pulled images: cache/store/published/<digest>/
REMOTE_HINT = "set LDT_REMOTE=oci://HOST[:PORT]/PREFIX (the registry the fleet shares), e.g. oci://127.0.0.1:5000/ldt"


def content_tag(keys: dict[str, str]) -> str:
    """A tag that names exactly these artifacts: the same keys, the same tag, on every runner."""
    return "k-" + key_of(keys)


def published_files(p: Project, r: Recipe) -> dict[str, tuple[Path, dict[str, Any]]]:
    """{name: (path, its {size, sha256} record)} of the recipe's current final artifacts (verified)."""
    files = {}
    for a in PUBLISHED:
        if not stages.wanted(a, r) or (a in (A.BIOS_QCOW2, A.UEFI_QCOW2) and not r.qcow2):
            continue
        path = stages.current(p, r, (a,))[a]
        record = json.loads((path.parent / MANIFEST).read_text())["files"][a]
        files[str(a)] = (path, record)
    return files


def annotations(p: Project, r: Recipe, keys: dict[str, str], epoch: int) -> dict[str, str]:
    from pipeline import rootfs  # (a no-op doit, which makes the publish tasks, does not load it)
    from pipeline.kernel import release_of

    boot = stages.current(p, r, (A.KERNEL, A.OS_RELEASE))
    osr = rootfs.parse_os_release(boot[A.OS_RELEASE].read_text(errors="replace"))
    kernel = release_of(boot[A.KERNEL]) or "unknown"
    return {
        "org.opencontainers.image.title": r.name,
        "org.opencontainers.image.created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch)),
        "vnd.ldt.recipe": r.name,
        "vnd.ldt.keys": json.dumps(keys, sort_keys=True, separators=(",", ":")),
        "vnd.ldt.os-release.name": osr.get("NAME", ""),
        "vnd.ldt.os-release.version": osr.get("VERSION", osr.get("VERSION_ID", "")),
        "vnd.ldt.kernel.version": kernel,
    }


def publish(p: Project, r: Recipe, tag: str = "latest") -> list[str]:
    """Push the recipe's disks, kernel, initrd and tgz as one artifact, under a content tag and `tag`."""
    if p.registry is None:
        raise UserError("publish needs a registry", hint=REMOTE_HINT)
    files = published_files(p, r)
    keys = {name: path.parent.name for name, (path, _) in files.items()}
    epoch = stages.tgz_epoch(stages.entry_of(p, r, stages.STAGE["tgz"]))
    base = p.registry.remote
    ref = ImageRef(base, f"{base.prefix}/{r.name}" if base.prefix else r.name, tag)
    tags = [content_tag(keys), tag]
    config = {"recipe": r.name, "keys": keys, "files": {n: rec for n, (_, rec) in files.items()}}
    p.store.tmp.mkdir(parents=True, exist_ok=True)
    digest = push_image(ref, files, config, annotations(p, r, keys, epoch), tags, tmp_dir=p.store.tmp)
    refs = [f"oci://{base.host}/{ref.repository}:{t}" for t in tags]
    for line in refs:
        print(line, flush=True)
    log(f"{r.name}: published {', '.join(files)} as {digest[:19]}…")
    return refs


def pull_published(p: Project, ref_text: str) -> Path:
    """The store entry holding the image `ref_text` names (oci://…): pulled once, every byte
    checked. The published row's one path: the entry is keyed by the image's digest."""
    ref = ImageRef.parse(ref_text)
    try:
        digest = image_digest(ref)
    except RemoteUnavailable as e:
        raise UserError(f"cannot reach {ref.remote.host} for {ref}: {e.message}") from None
    if digest is None:
        raise UserError(f"{ref}: no such image", hint="publish it with `doit publish:<recipe>`, or check the tag")
    row = stages.PUBLISHED
    m = {**row.head(), "image": str(ref.repository), "digest": digest}

    def build(work: Path, key: str) -> None:
        log(f"pulling {ref} ({digest[:19]}…)")
        pull_image(ref, digest, work)

    got = p.store.obtain(row, m, build, key=digest.removeprefix("sha256:"))
    assert got.entry is not None
    return got.entry


# -- published images: one OCI artifact per recipe revision ------------------------------------------
#
#   <host>/<prefix>/<recipe>:<content tag> and :<moving tag> (latest, or a name the user gives)
#     artifactType  application/vnd.ldt.image.v1
#     config        application/vnd.ldt.image.config.v1+json   {recipe, keys, os_release, kernel, created}
#     layers        application/vnd.ldt.image.file.v1+zstd     one per artifact (bios.img, uefi.img, vmlinuz,
#                   initrd.img, rootfs.tgz, the qcow2 images), titled "<name>.zst" (what `oras pull`
#                   saves), with vnd.ldt.file.size / vnd.ldt.file.sha256 of the file itself
#     annotations   org.opencontainers.image.created (the images' own epoch), .title, vnd.ldt.*

IMAGE_TYPE = "application/vnd.ldt.image.v1"
IMAGE_CONFIG_TYPE = "application/vnd.ldt.image.config.v1+json"
IMAGE_FILE_TYPE = "application/vnd.ldt.image.file.v1+zstd"
ZST = ".zst"


@dataclass(frozen=True)
class ImageRef:
    remote: oci.Remote
    repository: str  # the full repository path on the registry
    tag: str

    @classmethod
    def parse(cls, ref: str) -> ImageRef:
        """oci://HOST[:PORT]/REPO[/…]:TAG (the tag defaults to latest)."""
        scheme, sep, rest = ref.partition("://")
        host, _, path = rest.partition("/")
        repo, _, tag = path.rpartition(":") if ":" in path else (path, "", "latest")
        if not sep or not scheme.startswith("oci") or not host or not repo or not oci.TAG.fullmatch(tag) \
                or not all(oci.COMPONENT.fullmatch(c) for c in repo.split("/")):
            raise UserError(f"{ref!r} is not an image reference", hint="write oci://HOST[:PORT]/REPOSITORY:TAG, "
                            "e.g. oci://127.0.0.1:5000/ldt/hello:latest")
        return cls(oci.Remote.parse(f"{scheme}://{host}"), repo, tag)

    def __str__(self) -> str:
        return f"oci://{self.remote.host}/{self.repository}:{self.tag}"


def image_artifact_manifest(config: oci.Blob, layers: Mapping[str, tuple[oci.Blob, Mapping[str, Any]]],
                            annotations: Mapping[str, str]) -> bytes:
    return oci.image_manifest(IMAGE_TYPE, IMAGE_CONFIG_TYPE, config,
                              [oci.file_descriptor(IMAGE_FILE_TYPE, blob, name + ZST, rec)
                               for name, (blob, rec) in sorted(layers.items())], annotations)


def push_image(ref: ImageRef, files: Mapping[str, tuple[Path, Mapping[str, Any]]], config: Mapping[str, Any],
               annotations: Mapping[str, str], tags: Sequence[str], *, tmp_dir: str | os.PathLike[str] | None = None,
               env: Mapping[str, str] | None = None) -> str:
    """Push files ({name: (path, its {size, sha256} record)}) as one artifact under every tag; its digest."""
    for t in tags:
        if not oci.TAG.fullmatch(t):
            raise UserError(f"{t!r} is not a valid tag", hint="letters, digits, '_', '.', '-'; at most 128")
    config_raw = json.dumps(dict(config), sort_keys=True, separators=(",", ":")).encode()
    with oci.client(ref.remote, env) as c:
        repo = ref.repository
        cblob, layers = oci.push_blobs(c, repo, config_raw, files, tmp_dir)
        raw = image_artifact_manifest(cblob, layers, annotations)
        for t in tags:
            c.request("PUT", f"/{repo}/manifests/{t}", ok=(200, 201), data=raw,
                      headers={"Content-Type": oci.OCI_MANIFEST}).close()
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def image_digest(ref: ImageRef, *, env: Mapping[str, str] | None = None) -> str | None:
    """The digest the tag names now (None: no such tag)."""
    with oci.client(ref.remote, env) as c:
        raw = oci.get_manifest(c, ref.repository, ref.tag, f"manifest {ref}")
    return None if raw is None else "sha256:" + hashlib.sha256(raw).hexdigest()


def pull_image(ref: ImageRef, digest: str, work_dir: str | os.PathLike[str], *,
               env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The artifact `digest` of ref's repository into work_dir, every byte checked; its config."""
    work = Path(work_dir)
    with oci.client(ref.remote, env) as c:
        repo = ref.repository
        r = c.request("GET", f"/{repo}/manifests/{digest}", ok=(200,), headers={"Accept": oci.OCI_MANIFEST},
                      stream=True)
        with contextlib.closing(r):
            raw = oci.read_limited(r, f"manifest {ref}")
        if "sha256:" + hashlib.sha256(raw).hexdigest() != digest:
            raise EntryCorrupt(f"the manifest of {ref} does not match its digest")
        try:
            doc = json.loads(raw)
            if doc.get("artifactType") != IMAGE_TYPE:
                raise EntryCorrupt(f"{ref} is not an image published by LDT (artifactType "
                                   f"{doc.get('artifactType')!r})")
            config = oci.parse_blob(doc["config"])
            layers = [(d["annotations"][oci.TITLE], oci.parse_blob(d), {"size": int(d["annotations"][oci.A_SIZE]),
                                                           "sha256": d["annotations"][oci.A_SHA256]})
                      for d in doc["layers"]]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise EntryCorrupt(f"the manifest of {ref} is malformed ({type(e).__name__})") from None
        with contextlib.closing(c.request("GET", f"/{repo}/blobs/{config.digest}", ok=(200,), stream=True)) as r:
            config_raw = oci.read_limited(r, f"config of {ref}")
        if "sha256:" + hashlib.sha256(config_raw).hexdigest() != config.digest:
            raise EntryCorrupt(f"the config of {ref} does not match its digest")
        for title, blob, record in layers:
            name = oci.check_name(title.removesuffix(ZST))
            oci.download_file(c, repo, blob, record, work / name, f"{ref} {name}")
    return json.loads(config_raw)
