"""Trees made rootless, read the way they were made: inside a user namespace with the same mapping.

A tool that installs a system as a user (mmdebstrap's unshare mode, pacstrap -N) runs inside a user
namespace mapped through the user's /etc/subuid and /etc/subgid ranges, so seen from outside the tree
belongs to sub-ids: files only "root" may read are unreadable, and a tar made outside records the
sub-ids as owners. The two tools map differently, and the owner of the tree's top folder says which:

- mmdebstrap --mode=unshare: inside uid 0 is the first sub-id (the top folder belongs to it);
  `unshare --user --map-auto --setuid 0 --setgid 0` maps it back (as `mmdebstrap --unshare-helper`);
- pacstrap -N (`unshare --map-auto --map-root-user`): inside uid 0 is the user, 1… the sub-ids (the top
  folder, and every file of a package, belongs to the user); the same command maps it back. So a user's
  tree of their own files is read as root's too, which is what booting it as a root filesystem needs.

Root reads every tree as it is; so does a user without sub-ids (as before).
"""

from __future__ import annotations

import enum
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


class Mapping(enum.StrEnum):
    """How a tree's owners were mapped when it was made; each member wraps a reading command."""

    NONE = "none"  # read it as it is
    ROOT_IS_SUBID = "root-is-subid"  # mmdebstrap --mode=unshare
    ROOT_IS_USER = "root-is-user"  # pacstrap -N, arch-install as a user

    def wrap(self, cmd: Sequence[str]) -> list[str]:
        """cmd running where the tree has its real owners (uid 0 inside)."""
        if self is Mapping.ROOT_IS_SUBID:
            return ["unshare", "--user", "--map-auto", "--setuid", "0", "--setgid", "0", *cmd]
        if self is Mapping.ROOT_IS_USER:
            return ["unshare", "--user", "--map-auto", "--map-root-user", *cmd]
        return list(cmd)


@dataclass(frozen=True)
class Range:
    """One /etc/subuid (or subgid) entry: ids start … start+count-1."""

    start: int
    count: int

    def __contains__(self, uid: object) -> bool:
        return isinstance(uid, int) and self.start <= uid < self.start + self.count


def first_range(text: str | None, user: str, uid: int) -> Range | None:
    """The user's first range in /etc/subuid-style text (what --map-auto maps), or None."""
    for line in (text or "").splitlines():
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[0] in (user, str(uid)) and parts[1].isdigit() and parts[2].isdigit():
            if int(parts[2]) > 0:
                return Range(int(parts[1]), int(parts[2]))
    return None


def mapping_of(top_uid: int, *, uid: int, subids: Range | None) -> Mapping:
    """Pure decision: the owner of the tree's top folder, our uid and our first sub-id range -> how to
    read the tree."""
    if uid == 0 or subids is None:
        return Mapping.NONE
    if top_uid == subids.start:
        return Mapping.ROOT_IS_SUBID
    if top_uid == uid:
        return Mapping.ROOT_IS_USER
    return Mapping.NONE


def probe(tree: Path) -> Mapping:
    """How to read `tree` on this host, as this user."""
    import pwd

    uid = os.geteuid()
    if uid == 0:
        return Mapping.NONE
    try:
        user = pwd.getpwuid(uid).pw_name
        text = Path("/etc/subuid").read_text()
    except (KeyError, OSError):
        return Mapping.NONE
    return mapping_of(tree.lstat().st_uid, uid=uid, subids=first_range(text, user, uid))


# find's view of a tree (path, mode, owners, size, mtime, link target): a shifted tree's key, since files
# only its root may read cannot be hashed from outside the namespace
STAT_FORMAT = r"%P\0%m\0%U\0%G\0%s\0%T@\0%l\0"


def stat_manifest_cmd(tree: Path, mapping: Mapping) -> list[str]:
    return mapping.wrap(["find", os.fspath(tree), "-mindepth", "1", "-printf", STAT_FORMAT])


def parse_stat_manifest(out: bytes) -> list[list[str]]:
    """find's NUL-separated output -> sorted rows of 7 fields."""
    fields = out.split(b"\0")[:-1]
    rows = [[f.decode(errors="surrogateescape") for f in fields[i:i + 7]] for i in range(0, len(fields), 7)]
    return sorted(rows)


def stat_manifest(tree: Path, mapping: Mapping) -> list[list[str]]:
    """The tree's stat manifest, read through the mapping (the key of a shifted tree's tgz)."""
    from pipeline.run import run

    return parse_stat_manifest(run(stat_manifest_cmd(tree, mapping), capture=True).stdout)
