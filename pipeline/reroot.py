"""Re-rooting a tar stream: a folder of the image (recipe.toml's [build] rootfs, e.g. /mnt)
becomes the archive's root, and nothing of the container around it is kept.

A sibling of tgz.filter_tar, with the same signature, so write_tgz streams through either.
Members come from the one tar walker (tarstream.TarStream); the headers of each kept member
are written anew as PAX with the re-rooted name, every other field and PAX record (xattrs,
sub-second times, big ids) kept. Data blocks are copied byte for byte and never buffered
whole.

The engine-injected files (tgz.Fixups: /.dockerenv, the engine's resolv.conf and hosts)
live at the container's root, outside the folder, so they are gone with the rest of it.
Inside the folder only the hostname fixup applies (INSIDE_FIXUPS): debootstrap and
mmdebstrap copy the build container's hostname, a random container id, into etc/hostname.
"""

from __future__ import annotations

import functools
import tarfile
from collections.abc import Callable, Iterable

from pipeline.errors import UserError
from pipeline.tarstream import BLOCK, ENCODING, ERRORS, TarStream, norm_name
from pipeline.tgz import Fixups

TarFilter = Callable[[Iterable[bytes], Callable[[bytes], object], Fixups], int]
INSIDE_FIXUPS = frozenset({"etc/hostname"})  # the tgz.Fixups paths that still apply inside the folder


def rerooted(name: str, prefix: str) -> str | None:
    """An archive name inside `prefix` (no leading or trailing slash) as a name inside the new root:
    'mnt/etc/passwd' -> './etc/passwd', 'mnt' -> '.'; None outside it ('mntx/a', 'etc/passwd')."""
    path = norm_name(name).rstrip("/")
    if path == prefix:
        return "."
    if path.startswith(prefix + "/"):
        return "./" + path[len(prefix) + 1:]
    return None


def header_bytes(ti: tarfile.TarInfo, pax_headers: dict[str, str] | None = None) -> bytes:
    """The member's headers as PAX, with its own records (pax_headers, default ti's; a global
    header's are not repeated); name, link target and size from ti, not from stale PAX records."""
    records = ti.pax_headers if pax_headers is None else pax_headers
    ti.pax_headers = {k: v for k, v in records.items() if k not in ("path", "linkpath", "size")}
    return ti.tobuf(format=tarfile.PAX_FORMAT, encoding=ENCODING, errors=ERRORS)


def reroot_tar(chunks: Iterable[bytes], write: Callable[[bytes], object], fixups: Fixups, *, root: str) -> int:
    """Copy the part of a tar stream under `root` (an absolute folder) to write(), re-rooted at ./;
    returns the bytes read. Hard links are re-rooted too; one to a file outside `root` is an error."""
    prefix = root.strip("/")
    stream = TarStream.of_chunks(chunks)
    written_globals: dict[str, str] = {}
    kept = 0
    for ti in stream:
        if stream.global_headers != written_globals:  # a global PAX header: the whole archive's, kept as it is
            written_globals = dict(stream.global_headers)
            write(tarfile.TarInfo.create_pax_global_header(written_globals))
        name = rerooted(ti.name, prefix)
        if name is None:
            continue
        if ti.sparse is not None or ti.type == tarfile.GNUTYPE_SPARSE:
            raise UserError(f"{ti.name}: a sparse file in the image (a tar format this filter does not rewrite)")
        if name == "." and not ti.isdir():
            raise UserError(f"[build] rootfs {root} is not a folder in the image", hint="point rootfs at a folder")
        ti.name = name
        if ti.islnk():
            target = rerooted(ti.linkname, prefix)
            if target is None or target == ".":
                raise UserError(f"/{norm_name(ti.linkname)} is hard-linked from /{norm_name(ti.name)}: the link "
                                f"crosses the edge of {root}", hint=f"copy the file into {root} instead of linking it")
            ti.linkname = target
        local = {k: v for k, v in ti.pax_headers.items() if stream.global_headers.get(k) != v}
        decision = fixups.decide(name[2:], ti.size) if ti.isreg() and name[2:] in INSIDE_FIXUPS else True
        kept += 1
        if decision is True:
            write(header_bytes(ti, local))
            stream.copy_data(ti, write)
        elif isinstance(decision, bytes):  # new content, the member's own metadata
            ti.size = len(decision)
            write(header_bytes(ti, local) + decision + bytes(-len(decision) % BLOCK))
    if not kept:
        raise UserError(f"the image has nothing in {root}",
                        hint=f"bootstrap the root filesystem into {root} in the Dockerfile, "
                             "or fix [build] rootfs in recipe.toml")
    write(bytes(2 * BLOCK))
    return stream.total


def reroot_filter(root: str) -> TarFilter:
    """write_tgz's tar filter for a recipe with [build] rootfs = root."""
    return functools.partial(reroot_tar, root=root)
