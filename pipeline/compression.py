"""Compressed streams told by their magic bytes (kernel payloads, initrds, .ko.xz modules):
gzip, xz, lzma and bzip2 in-process, zstd and lz4 through their tools."""

from __future__ import annotations

import bz2
import lzma
import zlib

from pipeline.run import run

_MAGICS: tuple[tuple[bytes, str], ...] = (
    (b"\x1f\x8b", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x02\x21\x4c\x18", "lz4"),
    (b"BZh", "bzip2"),
    (b"\x5d\x00\x00", "lzma"),
)


def compression_of(data: bytes) -> str | None:
    return next((name for magic, name in _MAGICS if data.startswith(magic)), None)


def decompress(data: bytes, method: str) -> bytes:
    """One compressed stream (trailing bytes ignored); zstd and lz4 through their tools."""
    if method == "gzip":
        return zlib.decompressobj(wbits=31).decompress(data)
    if method in ("xz", "lzma"):
        fmt = lzma.FORMAT_XZ if method == "xz" else lzma.FORMAT_ALONE
        return lzma.LZMADecompressor(format=fmt).decompress(data)
    if method == "bzip2":
        return bz2.BZ2Decompressor().decompress(data)
    if method in ("zstd", "lz4"):
        return run([method, "-dcq"], input=data, capture=True).stdout
    raise ValueError(f"unknown compression {method}")
