"""Published images: a recipe's final artifacts as one OCI artifact (`doit publish:<recipe>`),
and `oci://` references that the run commands boot (pulled, verified, kept in the store).

The layout is remote.py's "published images"; a standard OCI client (oras, skopeo, crane) can
pull it: each layer is one file, zstd-compressed, titled "<name>.zst".
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pipeline.artifacts import Artifact
from pipeline.cache import MANIFEST, key_of
from pipeline.errors import UserError
from pipeline.project import Project
from pipeline.recipes import Recipe
from pipeline.run import log

A = Artifact
PUBLISHED = (A.BIOS_IMG, A.UEFI_IMG, A.BIOS_QCOW2, A.UEFI_QCOW2, A.KERNEL, A.INITRD, A.TGZ)
PULLED_STAGE = "published"  # store entries of pulled images: cache/store/published/<digest>/
REMOTE_HINT = "set LDT_REMOTE=oci://HOST[:PORT]/PREFIX (the registry the fleet shares), e.g. oci://127.0.0.1:5000/ldt"


def content_tag(keys: dict[str, str]) -> str:
    """A tag that names exactly these artifacts: the same keys, the same tag, on every runner."""
    return "k-" + key_of(keys)


def published_files(p: Project, r: Recipe) -> dict[str, tuple[Path, dict[str, Any]]]:
    """{name: (path, its {size, sha256} record)} of the recipe's current final artifacts (verified)."""
    from pipeline import stages

    files = {}
    for a in PUBLISHED:
        if not stages.wanted(a, r) or (a in (A.BIOS_QCOW2, A.UEFI_QCOW2) and not r.qcow2):
            continue
        path = stages.current(p, r, (a,))[a]
        record = json.loads((path.parent / MANIFEST).read_text())["files"][a]
        files[str(a)] = (path, record)
    return files


def annotations(p: Project, r: Recipe, keys: dict[str, str], epoch: int) -> dict[str, str]:
    from pipeline import rootfs, stages
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
    from pipeline import remote, stages

    if not p.store.remote_url:
        raise UserError("publish needs a registry", hint=REMOTE_HINT)
    files = published_files(p, r)
    keys = {name: path.parent.name for name, (path, _) in files.items()}
    epoch = stages.tgz_epoch(stages.entry_of(p, r, stages.STAGE["tgz"]))
    base = remote.Remote.parse(p.store.remote_url)
    ref = remote.ImageRef(base, f"{base.prefix}/{r.name}" if base.prefix else r.name, tag)
    tags = [content_tag(keys), tag]
    config = {"recipe": r.name, "keys": keys, "files": {n: rec for n, (_, rec) in files.items()}}
    p.store.tmp.mkdir(parents=True, exist_ok=True)
    digest = remote.push_image(ref, files, config, annotations(p, r, keys, epoch), tags, tmp_dir=p.store.tmp)
    refs = [f"oci://{base.host}/{ref.repository}:{t}" for t in tags]
    for line in refs:
        print(line, flush=True)
    log(f"{r.name}: published {', '.join(files)} as {digest[:19]}…")
    return refs


def fetch(p: Project, ref_text: str) -> Path:
    """The store entry holding the image `ref_text` names (oci://…): pulled once, every byte checked."""
    from pipeline import remote

    ref = remote.ImageRef.parse(ref_text)
    try:
        digest = remote.image_digest(ref)
    except remote.RemoteUnavailable as e:
        raise UserError(f"cannot reach {ref.remote.host} for {ref}: {e.message}") from None
    if digest is None:
        raise UserError(f"{ref}: no such image", hint="publish it with `doit publish:<recipe>`, or check the tag")
    key = digest.removeprefix("sha256:")
    m = {"stage": PULLED_STAGE, "image": str(ref.repository), "digest": digest}
    entry = p.store.lookup(PULLED_STAGE, key)
    if entry is not None:
        return entry
    log(f"pulling {ref} ({digest[:19]}…)")
    with p.store.build(PULLED_STAGE, key, m) as work:
        remote.pull_image(ref, digest, work)
    return p.store.entry(PULLED_STAGE, key)
