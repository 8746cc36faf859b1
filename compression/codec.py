"""What a codec is, and the framing every codec shares.

A codec turns a KV tensor (a block ``[L, P, T, H, D]``, one layer
``[P, T, H, D]``, or for the per-vector codecs any shape whose last dim is the
head dim) into a self-describing frame (``kvstore.compression.frame``) and
back. ``FrameCodec`` does the framing, the optional zstd pass over the
payload and the device moves; a codec class only turns a tensor into payload
parts and payload bytes back into a tensor.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import ClassVar, Protocol, runtime_checkable

import torch
import zstandard

from kvstore.blockformat import max_stored_bytes
from kvstore.compression.frame import (
    BadParamsError,
    FrameHeader,
    UnknownCodecError,
    pack_frame,
    parse_frame,
)

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Rows of input processed at once: temporaries stay in the CPU cache and are
# reused by the allocator instead of faulting in fresh pages for every pass.
CHUNK_BYTES = 1 << 20
# Largest tensor a frame may describe (2^40 elements): refuse absurd shapes before allocating.
MAX_ELEMENTS = 1 << 40

# Dtypes whose lossy decodes are clamped to their finite range (NaN stays NaN).
_CLAMPED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@runtime_checkable
class Codec(Protocol):
    """Encodes KV tensors into frames and decodes frames; ``lossless`` says whether bytes survive."""

    name: str
    codec_id: int
    lossless: bool

    def params(self) -> tuple[int, ...]: ...

    def encode(self, tensor: torch.Tensor) -> bytearray: ...

    def decode(self, frame: object, out: torch.Tensor | None = None,
               device: torch.device | str | None = None) -> torch.Tensor: ...


def param_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype scales, minimums and norms are stored in: the input's if 16-bit, else float32."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32


def row_chunks(rows: int, row_elems: int, element_size: int = 4, chunk_bytes: int = CHUNK_BYTES) -> Iterator[slice]:
    """Slices of about ``chunk_bytes`` (of ``element_size``-byte elements) over ``rows`` rows."""
    step = max(1, chunk_bytes // max(1, row_elems * element_size))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def check_int(name: str, value: object, low: int, high: int) -> int:
    """``value`` as an int in [low, high], or a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name}: expected an integer from {low} to {high}, got {value!r}")
    return value


class FrameCodec:
    """Shared encode/decode around a codec's ``_encode`` / ``_decode``.

    Subclasses set ``codec_id``, ``PARAMS`` (names of int attributes written
    into the frame, in order) and ``lossless``, and implement
    ``_encode(tensor) -> list of tensors`` (payload parts, concatenated as
    bytes) and ``_decode(header, payload uint8 tensor, out)``. A lossy codec
    with a ``zstd`` parameter > 0 compresses its payload with that level.
    """

    codec_id: ClassVar[int]
    PARAMS: ClassVar[tuple[str, ...]]
    # Trailing PARAMS added later: written only when not 0 (their default), so that frames which do not use
    # them keep the layout older frames have, and older frames (without them) still read.
    OPTIONAL: ClassVar[tuple[str, ...]] = ()
    lossless: ClassVar[bool]
    # Decoded bytes per second on one CPU core, as `kvstore codecs` measured it: the planner's
    # prior for a tier's load cost before the tier has served a read.
    decode_bytes_per_second: ClassVar[float] = float("inf")
    name: str
    zstd: int = 0

    def params(self) -> tuple[int, ...]:
        values = [getattr(self, name) for name in self.PARAMS]
        while len(values) > len(self.PARAMS) - len(self.OPTIONAL) and values[-1] == 0:
            values.pop()
        return tuple(values)

    @classmethod
    def from_params(cls, values: tuple[int, ...]) -> "FrameCodec":
        """The codec a frame's parameters describe; a ``BadParamsError`` if they are not valid."""
        if not len(cls.PARAMS) - len(cls.OPTIONAL) <= len(values) <= len(cls.PARAMS):
            raise BadParamsError(f"frame: expected {len(cls.PARAMS)} parameters {cls.PARAMS} for codec "
                                 f"{cls.codec_id}, got {len(values)}")
        try:
            return cls(**dict(zip(cls.PARAMS, values)))
        except ValueError as exc:
            raise BadParamsError(f"frame: {exc}") from None

    def __repr__(self) -> str:
        args = ", ".join(f"{n}={getattr(self, n)}" for n in self.PARAMS)
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.params() == self.params()

    def __hash__(self) -> int:
        return hash((type(self), self.params()))

    def check_tensor(self, tensor: torch.Tensor) -> None:
        """Raise ValueError unless ``tensor`` is something this codec encodes."""
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"tensor: expected a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dtype not in FLOAT_DTYPES:
            raise ValueError(f"tensor: expected dtype in {[str(d) for d in FLOAT_DTYPES]}, got {tensor.dtype}")

    def encode(self, tensor: torch.Tensor) -> bytearray:
        """A frame holding ``tensor`` (on any device; the frame is host bytes)."""
        self.check_tensor(tensor)
        tensor = tensor.detach()
        parts = self._encode(tensor) if tensor.numel() else []
        views = [part if isinstance(part, bytes) else host_bytes(part) for part in parts]
        if self.zstd and not self.lossless:
            views = [zstandard.ZstdCompressor(level=self.zstd).compress(b"".join(views))]
        return pack_frame(self.codec_id, tensor.dtype, tuple(tensor.shape), self.params(), views)

    def decode(self, frame: object, out: torch.Tensor | None = None,
               device: torch.device | str | None = None) -> torch.Tensor:
        """The tensor in ``frame``, written into ``out`` if given (same shape and dtype), else a new one.

        A frame of this codec with other parameters decodes too (they travel
        in the frame). Raises a ``FrameError`` for a damaged frame or one of
        another codec, and ValueError if ``out`` does not match the frame.
        """
        header, payload = parse_frame(frame)
        if header.codec_id != self.codec_id:
            raise UnknownCodecError(f"frame: expected codec id {self.codec_id} ({self.name}), "
                                    f"got {header.codec_id}; decode it with kvstore.compression.decode")
        codec = self if header.params == self.params() else self.from_params(header.params)
        return codec.decode_payload(header, payload, out, device)

    def decode_payload(self, header: FrameHeader, payload: memoryview, out: torch.Tensor | None,
                       device: torch.device | str | None) -> torch.Tensor:
        """Decode a payload already checked by ``parse_frame``."""
        if out is None:
            if header.numel > MAX_ELEMENTS:
                raise BadParamsError(f"frame: expected at most {MAX_ELEMENTS} elements, got shape {list(header.shape)}")
            try:
                out = torch.empty(header.shape, dtype=header.dtype, device=device or "cpu")
            except (RuntimeError, TypeError, OverflowError, MemoryError) as exc:
                raise BadParamsError(f"frame: cannot allocate shape {list(header.shape)} ({exc})") from None
        elif tuple(out.shape) != header.shape or out.dtype != header.dtype:
            raise ValueError(f"out: expected shape {list(header.shape)} and dtype {header.dtype} as in the frame, "
                             f"got {list(out.shape)} and {out.dtype}")
        if header.numel == 0:
            return out
        if self.zstd and not self.lossless:  # a lossy payload is never larger than the raw block
            payload = memoryview(decompress_at_most(payload, max_stored_bytes(header.numel * header.dtype.itemsize)))
        data = as_uint8(payload)
        if out.device.type != "cpu":
            data = data.to(out.device, non_blocking=False)
        self._decode(header, data, out)
        if not self.lossless and out.dtype in _CLAMPED_DTYPES:
            # A value decoded a rounding step past the dtype's largest finite one would read back as inf.
            info = torch.finfo(out.dtype)
            out.clamp_(info.min, info.max)
        return out

    def _encode(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def _decode(self, header: FrameHeader, payload: torch.Tensor, out: torch.Tensor) -> None:
        raise NotImplementedError


def take(payload: torch.Tensor, at: int, count: int, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """``count`` elements of ``dtype`` from ``payload`` (uint8) at byte ``at``; returns them and the next offset."""
    nbytes = count * dtype.itemsize
    if at + nbytes > payload.numel():
        raise BadParamsError(f"frame: payload too short: expected at least {at + nbytes} bytes, "
                             f"got {payload.numel()}")
    part = payload[at:at + nbytes]
    if dtype != torch.uint8:
        if part.data_ptr() % dtype.itemsize:
            part = part.clone()  # the frame sits at an odd address; floats need alignment
        part = part.view(dtype)
    return part, at + nbytes


def decompress_at_most(data: object, limit: int) -> bytes:
    """A zstd frame's content, of at most ``limit`` bytes, or a ``BadParamsError``: never more memory.

    ``ZstdDecompressor.decompress`` allocates what a frame declares, and
    ignores ``max_output_size`` when it declares a size: a 101-byte frame
    declaring 2**40 bytes raised MemoryError, and one of 4 KB expanded to
    256 MiB before its length was checked. A frame that declares no size is
    read as a stream, stopping one byte past ``limit``.
    """
    try:
        declared = zstandard.frame_content_size(data)
        if declared > limit:
            raise BadParamsError(f"frame: the zstd payload declares {declared} bytes, expected at most {limit}")
        if declared >= 0:
            return zstandard.ZstdDecompressor().decompress(data, max_output_size=limit)
        chunks, size = [], 0
        with zstandard.ZstdDecompressor().stream_reader(data) as reader:
            while size <= limit:
                chunk = reader.read(min(1 << 20, limit + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
    except zstandard.ZstdError as exc:
        raise BadParamsError(f"frame: the zstd payload does not decompress ({exc})") from None
    if size > limit:
        raise BadParamsError(f"frame: the zstd payload holds more than the {limit} bytes expected")
    return b"".join(chunks)


def expect_end(payload: torch.Tensor, at: int) -> None:
    """A ``BadParamsError`` if bytes are left after the codec read all it expected."""
    if at != payload.numel():
        raise BadParamsError(f"frame: expected a payload of {at} bytes for its shape and parameters, "
                             f"got {payload.numel()}")


def host_bytes(tensor: torch.Tensor) -> object:
    """A flat uint8 numpy view of ``tensor``'s bytes (copied only if strided or on a device)."""
    tensor = tensor.detach().resolve_neg().resolve_conj()  # a lazily negated view's memory holds other values
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    return tensor.contiguous().view(torch.uint8).reshape(-1).numpy()


def as_uint8(payload: object) -> torch.Tensor:
    """A uint8 tensor over a (possibly read-only) bytes-like object, without a copy."""
    payload = memoryview(payload).cast("B")
    if payload.nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a read-only buffer: decoders only read it
        return torch.frombuffer(payload, dtype=torch.uint8)

