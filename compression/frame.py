"""The self-describing frame every codec writes: decoding needs nothing out of band.

Layout, little-endian (see ``docs/frame.md``)::

    magic        4s   b"KVCF"
    version      u8   FRAME_VERSION
    codec_id     u8   CODEC_IDS in kvstore.compression.codec
    dtype_id     u8   DTYPE_IDS below
    ndim         u8   0..8
    param_count  u8   number of codec parameters
    reserved     3x   zero
    payload_len  u64  bytes after the header
    shape        ndim x u64
    params       param_count x i64, in the codec's PARAMS order
    checksum     u64  xxh3-64 of every header byte before it and of the payload
    payload      payload_len bytes, codec-specific

A reader checks, in this order: length for the fixed part, magic, version,
lengths (header and payload present, nothing after), checksum, then the
codec id and dtype. Each failure raises its own ``FrameError`` subclass, so a
frame is either decoded exactly as written or refused.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import torch
import xxhash

MAGIC = b"KVCF"
FRAME_VERSION = 1
MAX_NDIM = 8
MAX_PARAMS = 16
_FIXED = struct.Struct("<4sBBBBB3xQ")
_U64 = struct.Struct("<Q")

# Stable on-disk numbers for dtypes: never renumber, only append.
DTYPE_IDS: dict[torch.dtype, int] = {
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.float32: 3,
    torch.float64: 4,
    torch.uint8: 5,
    torch.int8: 6,
    torch.int16: 7,
    torch.int32: 8,
    torch.int64: 9,
    torch.float8_e4m3fn: 10,
    torch.float8_e5m2: 11,
    torch.float8_e4m3fnuz: 12,  # ROCm's fp8 formats (KVLayout takes them)
    torch.float8_e5m2fnuz: 13,
}
_DTYPES_BY_ID = {v: k for k, v in DTYPE_IDS.items()}


class FrameError(ValueError):
    """A frame that cannot be decoded; the subclass names the problem."""


class BadMagicError(FrameError):
    """The bytes do not start with a kvstore frame."""


class UnsupportedVersionError(FrameError):
    """The frame was written by a format version this kvstore does not read."""


class UnknownCodecError(FrameError):
    """The frame names a codec id (or dtype) this kvstore does not have."""


class TruncatedFrameError(FrameError):
    """The frame is shorter (or longer) than its header says."""


class ChecksumError(FrameError):
    """The header or payload bytes changed after the frame was written."""


class BadParamsError(FrameError):
    """The codec parameters or shape in the frame are not ones the codec accepts."""


@dataclass(frozen=True)
class FrameHeader:
    codec_id: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    params: tuple[int, ...]
    payload_len: int

    @property
    def numel(self) -> int:
        n = 1
        for size in self.shape:
            n *= size
        return n


def header_size(ndim: int, param_count: int) -> int:
    """Bytes of a header (checksum included) for a shape of ``ndim`` dims and ``param_count`` parameters."""
    return _FIXED.size + 8 * (ndim + param_count) + _U64.size


def frame_codec_id(frame: object) -> int:
    """The codec id of a frame ``pack_frame`` made (its writer's own bytes: nothing read is taken on trust)."""
    return _FIXED.unpack_from(frame)[2]


def pack_frame(codec_id: int, dtype: torch.dtype, shape: tuple[int, ...], params: tuple[int, ...],
               payload_parts: list[object]) -> bytearray:
    """A frame: header, then the concatenation of ``payload_parts`` (bytes-like), in one buffer."""
    if dtype not in DTYPE_IDS:
        raise ValueError(f"dtype: expected one of {sorted(str(d) for d in DTYPE_IDS)}, got {dtype}")
    if len(shape) > MAX_NDIM:
        raise ValueError(f"shape: expected at most {MAX_NDIM} dims, got {len(shape)}")
    if len(params) > MAX_PARAMS:
        raise ValueError(f"params: expected at most {MAX_PARAMS}, got {len(params)}")
    views = [memoryview(p).cast("B") for p in payload_parts]
    payload_len = sum(v.nbytes for v in views)
    head = len(shape) + len(params)
    start = header_size(len(shape), len(params))
    frame = bytearray(start + payload_len)
    _FIXED.pack_into(frame, 0, MAGIC, FRAME_VERSION, codec_id, DTYPE_IDS[dtype], len(shape), len(params), payload_len)
    struct.pack_into(f"<{len(shape)}Q{len(params)}q", frame, _FIXED.size, *shape, *params)
    at = start
    for view in views:
        frame[at:at + view.nbytes] = view
        at += view.nbytes
    digest = xxhash.xxh3_64()
    digest.update(memoryview(frame)[:_FIXED.size + 8 * head])
    digest.update(memoryview(frame)[start:])
    _U64.pack_into(frame, start - _U64.size, digest.intdigest())
    return frame


def parse_frame(frame: object) -> tuple[FrameHeader, memoryview]:
    """Check a frame and return its header and a view of its payload; raises a ``FrameError``."""
    view = memoryview(frame).cast("B")
    if view.nbytes < _FIXED.size:
        if bytes(view[:4]) != MAGIC[:view.nbytes] or view.nbytes == 0:
            raise BadMagicError(f"frame: expected magic {MAGIC!r}, got {bytes(view[:4])!r}")
        raise TruncatedFrameError(f"frame: expected at least {_FIXED.size} header bytes, got {view.nbytes}")
    magic, version, codec_id, dtype_id, ndim, param_count, payload_len = _FIXED.unpack_from(view)
    if magic != MAGIC:
        raise BadMagicError(f"frame: expected magic {MAGIC!r}, got {magic!r}")
    if version != FRAME_VERSION:
        raise UnsupportedVersionError(f"frame: expected format version {FRAME_VERSION}, got {version}")
    if ndim > MAX_NDIM or param_count > MAX_PARAMS:
        raise BadParamsError(f"frame: expected at most {MAX_NDIM} dims and {MAX_PARAMS} params, "
                             f"got {ndim} and {param_count}")
    start = header_size(ndim, param_count)
    if view.nbytes != start + payload_len:
        raise TruncatedFrameError(f"frame: expected {start + payload_len} bytes "
                                  f"({start} header + {payload_len} payload), got {view.nbytes}")
    digest = xxhash.xxh3_64()
    digest.update(view[:start - _U64.size])
    digest.update(view[start:])
    (stored,) = _U64.unpack_from(view, start - _U64.size)
    if digest.intdigest() != stored:
        raise ChecksumError(f"frame: checksum {stored:#018x} does not match the bytes ({digest.intdigest():#018x})")
    values = struct.unpack_from(f"<{ndim}Q{param_count}q", view, _FIXED.size)
    dtype = _DTYPES_BY_ID.get(dtype_id)
    if dtype is None:
        raise UnknownCodecError(f"frame: expected a dtype id in {sorted(_DTYPES_BY_ID)}, got {dtype_id}")
    header = FrameHeader(codec_id, dtype, tuple(values[:ndim]), tuple(values[ndim:]), payload_len)
    return header, view[start:]
