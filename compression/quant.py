"""Scalar quantizers without rotation: ``int8`` (per-vector absmax) and KIVI-style ``kivi`` (2-8 bits).

Scales and minimums are stored in the input's dtype when it is 16-bit
(float32 otherwise), rounded outward (minimum down, scale up) before codes
are computed against the stored values, so no value is clipped by the
rounding of its own parameters.
"""

from __future__ import annotations

import torch

from kvstore.compression.bitpack import pack, packed_bytes, unpack
from kvstore.compression.codec import FrameCodec, check_int, expect_end, param_dtype, row_chunks, take
from kvstore.compression.frame import BadParamsError, FrameHeader


def round_outward(values: torch.Tensor, dtype: torch.dtype, up: bool) -> torch.Tensor:
    """``values`` (float32) in ``dtype``, rounded up (``up``) or down instead of to nearest."""
    stored = values.to(dtype)
    wrong = stored.float() < values if up else stored.float() > values
    if bool(wrong.any()):
        limit = torch.full_like(stored, float("inf") if up else float("-inf"))
        stored = torch.where(wrong, torch.nextafter(stored, limit), stored)
    return stored


def rows_of(out: torch.Tensor, width: int) -> tuple[torch.Tensor, bool]:
    """``out`` as ``[-1, width]`` rows to write into, and whether it is a temporary to copy back."""
    if out.is_contiguous():
        return out.view(-1, width), False
    return torch.empty(out.shape, dtype=out.dtype, device=out.device).view(-1, width), True


class Int8Codec(FrameCodec):
    """Symmetric int8 with one absmax scale per vector (per token, head and part): 8 bits + one scale per D."""

    codec_id = 2
    PARAMS = ("zstd",)
    lossless = False
    decode_bytes_per_second = 6.0e9

    def __init__(self, zstd: int = 0):
        self.zstd = check_int("zstd", zstd, 0, 19)
        self.name = "int8"

    def check_tensor(self, tensor: torch.Tensor) -> None:
        super().check_tensor(tensor)
        if tensor.dim() < 1:
            raise ValueError("tensor: expected at least one dim (the head dim), got a scalar")

    def _encode(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        width = tensor.shape[-1]
        flat = tensor.reshape(-1, width)
        pdtype = param_dtype(tensor.dtype)
        scales = torch.empty(flat.shape[0], dtype=pdtype, device=tensor.device)
        codes = torch.empty(flat.shape, dtype=torch.int8, device=tensor.device)
        for rows in row_chunks(flat.shape[0], width):
            x = flat[rows].to(torch.float32, copy=True)  # divided in place below: never the caller's tensor
            scale = round_outward(x.abs().amax(-1) / 127.0, pdtype, up=True)
            scales[rows] = scale
            used = scale.float().unsqueeze(-1)
            used[used == 0] = 1.0
            codes[rows] = x.div_(used).round_().clamp_(-127, 127)
        return [scales, codes]

    def _decode(self, header: FrameHeader, payload: torch.Tensor, out: torch.Tensor) -> None:
        width = header.shape[-1]
        count = header.numel // width
        scales, at = take(payload, 0, count, param_dtype(header.dtype))
        codes, at = take(payload, at, header.numel, torch.int8)
        expect_end(payload, at)
        rows, temporary = rows_of(out, width)
        codes = codes.view(-1, width)
        for sl in row_chunks(count, width):
            rows[sl] = codes[sl].float().mul_(scales[sl].float().unsqueeze(-1))
        if temporary:
            out.copy_(rows.view(out.shape))


def quantize_groups(x: torch.Tensor, bits: int, pdtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Asymmetric min/max quantization of ``x`` ``[R, G, C]`` (float32) over groups along dim 1.

    Returns (minimums ``[R, C]``, scales ``[R, C]`` in ``pdtype``, codes ``[R, G, C]`` uint8).
    """
    qmax = (1 << bits) - 1
    low = round_outward(x.amin(1), pdtype, up=False)
    low_f = low.float()
    scale = round_outward((x.amax(1) - low_f) / qmax, pdtype, up=True)
    used = scale.float()
    used[used == 0] = 1.0
    codes = (x - low_f.unsqueeze(1)).div_(used.unsqueeze(1)).round_().clamp_(0, qmax)
    return low, scale, as_codes(codes, bits)


def as_codes(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Whole-number floats in [0, 2**bits) as uint8 codes (through int8 below 8 bits: 4x faster on CPU)."""
    if bits < 8:
        return values.to(torch.int8).view(torch.uint8)
    return values.to(torch.uint8)


def dequantize_groups(codes: torch.Tensor, low: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The inverse of ``quantize_groups``: float32 ``[R, G, C]``."""
    return codes.float().mul_(scale.float().unsqueeze(1)).add_(low.float().unsqueeze(1))


def _pad(x: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    """``x`` padded along ``dim`` to a multiple of ``multiple`` by repeating its last slice (keeps min/max)."""
    extra = -x.shape[dim] % multiple
    if not extra:
        return x
    last = x.narrow(dim, x.shape[dim] - 1, 1)
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat((x, last.expand(shape)), dim=dim)


class KiviCodec(FrameCodec):
    """KIVI-style asymmetric quantization of a ``[L, P, T, H, D]`` (or ``[P, T, H, D]``) tensor.

    Part 0 (keys, or the latent of a ``kv_parts=1`` cache) is grouped per
    channel over ``min(group, T)`` tokens, because key outliers live in
    fixed channels; the other part (values) per token over ``min(group, D)``
    channels. The last ``residual`` tokens are kept exact (KIVI keeps the
    newest tokens in full precision). Cost per element at bits b and group
    G: b + 2 * 16 / G bits for 16-bit input (b + 1 at G = 32).
    ``value_bits`` (0: the same as ``bits``) quantizes the values with other
    bits than the keys: on a trained model the keys carry the loss (SmolLM2:
    4-bit keys alone +0.76 % perplexity, 4-bit values alone +0.03 %).
    """

    codec_id = 3
    PARAMS = ("bits", "group", "residual", "zstd", "value_bits")
    OPTIONAL = ("value_bits",)
    lossless = False
    decode_bytes_per_second = 2.0e9

    def __init__(self, bits: int = 4, group: int = 32, residual: int = 0, zstd: int = 0, value_bits: int = 0):
        self.bits = check_int("bits", bits, 1, 8)
        self.group = check_int("group", group, 1, 1 << 16)
        self.residual = check_int("residual", residual, 0, 1 << 30)
        self.zstd = check_int("zstd", zstd, 0, 19)
        self.value_bits = 0 if value_bits == self.bits else check_int("value_bits", value_bits, 0, 8)
        self.name = f"kivi{self.bits}" + (f"v{self.value_bits}" if self.value_bits else "")

    @property
    def _vbits(self) -> int:
        return self.value_bits or self.bits

    def _packed(self, k_codes: torch.Tensor, v_codes: torch.Tensor) -> list[torch.Tensor]:
        """The codes, keys then values: one packed run at one width, two runs when the widths differ."""
        if self._vbits == self.bits:
            return [pack(torch.cat((k_codes, v_codes)), self.bits)]
        return [pack(k_codes, self.bits), pack(v_codes, self._vbits)]

    def check_tensor(self, tensor: torch.Tensor) -> None:
        super().check_tensor(tensor)
        if tensor.dim() not in (4, 5):
            raise ValueError(f"tensor: expected [L, P, T, H, D] or [P, T, H, D], got shape {list(tensor.shape)}")

    def _geometry(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """(L, P, T, H, D, quantized tokens, key group, key groups, value group, padded D)."""
        layers, parts, tokens, heads, dim = (1, *shape) if len(shape) == 4 else shape
        quantized = max(0, tokens - self.residual)
        key_group = max(1, min(self.group, quantized))
        value_group = min(self.group, dim)
        return (layers, parts, tokens, heads, dim, quantized, key_group, -(-quantized // key_group),
                value_group, -(-dim // value_group) * value_group)

    def _encode(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        L, P, T, H, D, Tq, gk, nk, gv, Dg = self._geometry(tuple(tensor.shape))
        x = tensor.reshape(L, P, T, H, D)
        pd, dev = param_dtype(tensor.dtype), tensor.device
        k_low = torch.empty((L, nk, H * D), dtype=pd, device=dev)
        k_scale = torch.empty_like(k_low)
        k_codes = torch.empty((L, nk * gk, H * D), dtype=torch.uint8, device=dev)
        v_rows = (P - 1) * Tq * H * (Dg // gv)
        v_low = torch.empty((L, v_rows), dtype=pd, device=dev)
        v_scale = torch.empty_like(v_low)
        v_codes = torch.empty((L, v_rows * gv), dtype=torch.uint8, device=dev)
        if Tq:
            for layer in range(L):
                keys = _pad(x[layer, 0, :Tq].float(), 0, gk).reshape(nk, gk, H * D)
                k_low[layer], k_scale[layer], codes = quantize_groups(keys, self.bits, pd)
                k_codes[layer] = codes.view(nk * gk, H * D)
                if P > 1:
                    values = _pad(x[layer, 1:, :Tq].float(), -1, gv).reshape(-1, gv, 1)
                    low, scale, codes = quantize_groups(values, self._vbits, pd)
                    v_low[layer], v_scale[layer], v_codes[layer] = low.view(-1), scale.view(-1), codes.view(-1)
        residual = x[:, :, Tq:]
        return [k_low, k_scale, v_low, v_scale, residual, *self._packed(k_codes.view(-1), v_codes.view(-1))]

    def _decode(self, header: FrameHeader, payload: torch.Tensor, out: torch.Tensor) -> None:
        if len(header.shape) not in (4, 5):
            raise BadParamsError(f"frame: expected a 4- or 5-dim shape for kivi, got {list(header.shape)}")
        L, P, T, H, D, Tq, gk, nk, gv, Dg = self._geometry(header.shape)
        pd = param_dtype(header.dtype)
        v_rows = (P - 1) * Tq * H * (Dg // gv)
        k_low, at = take(payload, 0, L * nk * H * D, pd)
        k_scale, at = take(payload, at, L * nk * H * D, pd)
        v_low, at = take(payload, at, L * v_rows, pd)
        v_scale, at = take(payload, at, L * v_rows, pd)
        residual, at = take(payload, at, L * P * (T - Tq) * H * D, header.dtype)
        k_count, v_count = L * nk * gk * H * D, L * v_rows * gv
        if self._vbits == self.bits:
            packed, at = take(payload, at, packed_bytes(k_count + v_count, self.bits), torch.uint8)
            codes = unpack(packed, self.bits, k_count + v_count)
            k_flat, v_flat = codes[:k_count], codes[k_count:]
        else:
            k_packed, at = take(payload, at, packed_bytes(k_count, self.bits), torch.uint8)
            v_packed, at = take(payload, at, packed_bytes(v_count, self._vbits), torch.uint8)
            k_flat, v_flat = unpack(k_packed, self.bits, k_count), unpack(v_packed, self._vbits, v_count)
        expect_end(payload, at)
        k_codes = k_flat.view(L, nk, gk, H * D)
        v_codes = v_flat.view(L, v_rows, gv, 1)
        k_low, k_scale = k_low.view(L, nk, H * D), k_scale.view(L, nk, H * D)
        v_low, v_scale = v_low.view(L, v_rows, 1), v_scale.view(L, v_rows, 1)
        y = out if out.dim() == 5 else out.unsqueeze(0)  # a view: strided outputs are written in place
        for layer in range(L):
            keys = dequantize_groups(k_codes[layer], k_low[layer], k_scale[layer])
            y[layer, 0, :Tq] = keys.view(nk * gk, H, D)[:Tq]
            if P > 1:
                values = dequantize_groups(v_codes[layer], v_low[layer], v_scale[layer])
                y[layer, 1:, :Tq] = values.view(P - 1, Tq, H, Dg)[..., :D]
        y[:, :, Tq:] = residual.view(L, P, T - Tq, H, D)
