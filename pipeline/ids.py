"""Deterministic identifiers for reproducible images.

Every UUID, GUID, serial number and seed that ends up in an image is derived from a key
string the caller passes (one per artifact, e.g. the recipe name plus its cache key) and a
purpose ("root-fs", "gpt-disk", …), so two builds from the same inputs are byte-identical
and different purposes never collide.
"""

from __future__ import annotations

import hashlib
import uuid

# Namespace for uuid5(); fixed forever, changing it changes every derived id.
NAMESPACE = uuid.UUID("6d2c1b0e-5f3a-5e27-9a3c-4c6f2d8e1b7a")


def _digest(key: str, purpose: str) -> bytes:
    return hashlib.sha256(f"ldt\0{purpose}\0{key}".encode()).digest()


def derive_uuid(key: str, purpose: str) -> uuid.UUID:
    """A stable RFC 4122 (version 5) UUID for `purpose` within artifact `key`."""
    return uuid.uuid5(NAMESPACE, f"{purpose}\0{key}")


def derive_u32(key: str, purpose: str) -> int:
    """A stable non-zero 32-bit number (MBR disk id, FAT volume serial)."""
    value = int.from_bytes(_digest(key, purpose)[:4], "little")
    return value or 1


def source_date_env(epoch: int) -> dict[str, str]:
    """Environment that pins the clock of e2fsprogs and mtools to `epoch`."""
    return {"SOURCE_DATE_EPOCH": str(epoch), "E2FSPROGS_FAKE_TIME": str(epoch)}
