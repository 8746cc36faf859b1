"""Lossless codecs: ``raw`` (the bytes as they are) and ``zstd`` over byte planes.

The high byte of a 16-bit float is sign and exponent (plus one or three
mantissa bits): in KV caches it takes few distinct values and compresses
well. The low byte is nearly random. Interleaved, they defeat an LZ
compressor; split into planes (all high bytes, then all low bytes), the high
plane shrinks to about a third and the low plane passes through zstd's raw
blocks at memory speed. 32-bit floats are split into four planes.
"""

from __future__ import annotations

import torch
import zstandard

from kvstore.compression.codec import FrameCodec, as_uint8, check_int, decompress_at_most, expect_end
from kvstore.compression.frame import DTYPE_IDS, BadParamsError, FrameHeader


class RawCodec(FrameCodec):
    """No transformation: a frame around the tensor's bytes (for uniformity, and for its checksum)."""

    codec_id = 0
    PARAMS = ()
    lossless = True
    name = "raw"

    def check_tensor(self, tensor: torch.Tensor) -> None:
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"tensor: expected a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dtype not in DTYPE_IDS:  # a frame names its dtype: refused when the tier opens, not per put
            raise ValueError(f"tensor: expected dtype in {sorted(str(d) for d in DTYPE_IDS)}, got {tensor.dtype}")

    def _encode(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        return [tensor]

    def _decode(self, header: FrameHeader, payload: torch.Tensor, out: torch.Tensor) -> None:
        expect_end(payload, header.numel * out.element_size())
        out.copy_(payload.view(out.dtype).view(out.shape))


class ZstdCodec(FrameCodec):
    """zstd at ``level`` (1-19) over the byte planes of the tensor (``planes=0``: the bytes as they are)."""

    codec_id = 1
    PARAMS = ("level", "planes")
    lossless = True
    decode_bytes_per_second = 1.3e9

    def __init__(self, level: int = 1, planes: int = 1):
        self.level = check_int("level", level, 1, 19)
        self.planes = check_int("planes", planes, 0, 1)
        self.name = "zstd"

    check_tensor = RawCodec.check_tensor

    def _encode(self, tensor: torch.Tensor) -> list[bytes]:
        width = tensor.element_size()
        data = tensor.contiguous().view(torch.uint8).reshape(-1, width).cpu()
        if self.planes and width > 1:  # one column copy per plane: far faster than a transposed copy
            planes = torch.empty((width, data.shape[0]), dtype=torch.uint8)
            for plane in range(width):
                planes[plane].copy_(data[:, plane])
            data = planes
        return [zstandard.ZstdCompressor(level=self.level).compress(data.reshape(-1).numpy())]

    def _decode(self, header: FrameHeader, payload: torch.Tensor, out: torch.Tensor) -> None:
        width = out.element_size()
        expected = header.numel * width
        raw = decompress_at_most(payload.cpu().numpy(), expected)
        if len(raw) != expected:
            raise BadParamsError(f"frame: expected {expected} bytes after zstd, got {len(raw)}")
        data = as_uint8(raw)
        target = out.view(torch.uint8).view(-1, width) if out.is_contiguous() else None
        if self.planes and width > 1:
            planes = data.view(width, -1).to(out.device)
            if target is None:
                target = torch.empty((header.numel, width), dtype=torch.uint8, device=out.device)
            for plane in range(width):
                target[:, plane].copy_(planes[plane])
            if target.data_ptr() != out.data_ptr():
                out.copy_(target.view(out.dtype).view(out.shape))
            return
        out.copy_(data.to(out.device).view(out.dtype).view(out.shape))
