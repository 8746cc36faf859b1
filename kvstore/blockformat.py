"""The header that travels with every block stored below host RAM.

A block read back from disk (or any medium that can tear, rot or be shared)
is trusted only if its header names the same key, the same layout and the
same length, and the payload's checksum matches. Otherwise it is a miss.

Layout of the 72-byte header, little-endian::

    magic      4s   b"KVSB"
    version    u16  FORMAT_VERSION
    key_len    u16  bytes of the key actually used (<= 32)
    layout     16s  KVLayout.fingerprint
    key        32s  the block key, zero padded
    length     u64  payload bytes
    checksum   u64  xxh3-64 of the payload
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import xxhash

MAGIC = b"KVSB"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<4sHH16s32sQQ")
HEADER_BYTES = _HEADER.size


def checksum(payload: object) -> int:
    """xxh3-64 of a bytes-like payload (about 25 GB/s, so it never limits a disk read)."""
    return xxhash.xxh3_64_intdigest(payload)


@dataclass(frozen=True)
class BlockHeader:
    key: bytes
    layout: bytes
    length: int
    checksum: int

    def pack(self) -> bytes:
        return _HEADER.pack(MAGIC, FORMAT_VERSION, len(self.key), self.layout, self.key, self.length, self.checksum)

    @classmethod
    def for_payload(cls, key: bytes, layout: bytes, payload: object) -> "BlockHeader":
        return cls(key, layout, memoryview(payload).nbytes, checksum(payload))

    @classmethod
    def for_parts(cls, key: bytes, layout: bytes, parts: "list[memoryview]") -> "BlockHeader":
        """``for_payload`` of a payload held in several pieces (in order), without joining them."""
        digest = xxhash.xxh3_64()
        for part in parts:
            digest.update(part)
        return cls(key, layout, sum(p.nbytes for p in parts), digest.intdigest())

    @classmethod
    def unpack(cls, data: object) -> "BlockHeader | None":
        """Parse a header; None if it is short, has the wrong magic or an unknown version."""
        view = memoryview(data)
        if len(view) < HEADER_BYTES:
            return None
        magic, version, key_len, layout, key, length, digest = _HEADER.unpack_from(view)
        if magic != MAGIC or version != FORMAT_VERSION or key_len > 32:
            return None
        return cls(key[:key_len], layout, length, digest)

    def verifies_parts(self, key: bytes, layout: bytes, parts: "list[memoryview]") -> bool:
        """``verifies`` for a payload held in several pieces (in order), without joining them."""
        return self == BlockHeader.for_parts(key, layout, parts)

    def verifies(self, key: bytes, layout: bytes, payload: object) -> bool:
        """True if this header describes exactly ``payload`` stored as ``key`` for ``layout``."""
        view = memoryview(payload)
        return (
            self.key == key
            and self.layout == layout
            and self.length == view.nbytes
            and self.checksum == checksum(view)
        )
