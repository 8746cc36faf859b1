"""The header that travels with every block stored below host RAM.

A block read back from disk (or any medium that can tear, rot or be shared)
is trusted only if its header names the same key, the same layout and the
same length, and the payload's checksum matches. Otherwise it is a miss.

The header also says how the payload is encoded (``encoding``): nothing
is ever guessed from the payload's bytes, so raw KV that happens to look
like a codec frame is still served as the raw KV it is.

Layout of the 72-byte header, little-endian::

    magic      4s   b"KVSB"
    version    u16  FORMAT_VERSION
    key_len    u8   bytes of the key actually used (<= 32)
    encoding   u8   ENCODING_RAW (0): the payload is the block's raw bytes;
                    n > 0: the payload is a codec frame of codec id n - 1
    layout     16s  KVLayout.fingerprint
    key        32s  the block key, zero padded
    length     u64  payload bytes
    checksum   u64  xxh3-64 of the payload, seeded with ``encoding``
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import xxhash

MAGIC = b"KVSB"
# Version 2 added ``encoding`` (version 1 had a u16 key length there); version 3 seeds the checksum with it.
# A block of an older version reads as a miss.
FORMAT_VERSION = 3
_HEADER = struct.Struct("<4sHBB16s32sQQ")
ENCODING_RAW = 0
HEADER_BYTES = _HEADER.size


FRAME_SLACK = 4096  # bytes a codec's frame may exceed the raw block by (frame header, zstd block headers)


def max_stored_bytes(raw_bytes: int) -> int:
    """The most a stored block of ``raw_bytes`` can take, header included, raw or as any codec's frame (an
    incompressible block grows a little under a lossless codec). Anything larger under a block's key is
    another writer's and is never read whole: reads of shared stores stay bounded by the block size."""
    return HEADER_BYTES + raw_bytes + raw_bytes // 1024 + FRAME_SLACK


def checksum(payload: object, encoding: int = ENCODING_RAW) -> int:
    """xxh3-64 of a bytes-like payload (about 25 GB/s, so it never limits a disk read), seeded with the
    header's ``encoding``: the other fields are compared with what the reader expects, but the encoding is
    read from the header, and a bit flipped there (frame -> raw) would otherwise serve a frame's bytes as KV."""
    return xxhash.xxh3_64_intdigest(payload, seed=encoding)


@dataclass(frozen=True)
class BlockHeader:
    key: bytes
    layout: bytes
    length: int
    checksum: int
    encoding: int = ENCODING_RAW

    def pack(self) -> bytes:
        return _HEADER.pack(MAGIC, FORMAT_VERSION, len(self.key), self.encoding, self.layout, self.key, self.length,
                            self.checksum)

    @classmethod
    def for_payload(cls, key: bytes, layout: bytes, payload: object, encoding: int = ENCODING_RAW) -> "BlockHeader":
        return cls(key, layout, memoryview(payload).nbytes, checksum(payload, encoding), encoding)

    @classmethod
    def for_parts(cls, key: bytes, layout: bytes, parts: "list[memoryview]",
                  encoding: int = ENCODING_RAW) -> "BlockHeader":
        """``for_payload`` of a payload held in several pieces (in order), without joining them."""
        digest = xxhash.xxh3_64(seed=encoding)
        for part in parts:
            digest.update(part)
        return cls(key, layout, sum(p.nbytes for p in parts), digest.intdigest(), encoding)

    @classmethod
    def unpack(cls, data: object) -> "BlockHeader | None":
        """Parse a header; None if it is short, has the wrong magic or an unknown version."""
        view = memoryview(data)
        if len(view) < HEADER_BYTES:
            return None
        magic, version, key_len, encoding, layout, key, length, digest = _HEADER.unpack_from(view)
        if magic != MAGIC or version != FORMAT_VERSION or key_len > 32:
            return None
        return cls(key[:key_len], layout, length, digest, encoding)

    def verifies_parts(self, key: bytes, layout: bytes, parts: "list[memoryview]") -> bool:
        """``verifies`` for a payload held in several pieces (in order), without joining them."""
        return self == BlockHeader.for_parts(key, layout, parts, self.encoding)

    def verifies(self, key: bytes, layout: bytes, payload: object) -> bool:
        """True if this header describes exactly ``payload`` stored as ``key`` for ``layout``."""
        view = memoryview(payload)
        return (
            self.key == key
            and self.layout == layout
            and self.length == view.nbytes
            and self.checksum == checksum(view, self.encoding)
        )
