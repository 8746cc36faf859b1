"""``ec``: uniform steps chosen per channel (keys) and per vector (values), codes entropy-coded.

Measured on a trained model (SmolLM2-135M reading English, ``kvstore codecs
--real-model``), three things set a KV codec's size at a given perplexity
cost, and KIVI's min/max groups get all three wrong:

- Parameters. Min and scale per group of 32 cost a whole bit per element
  (20 % of kivi4). Here a key channel has one mean and one step per block
  (``32 / T`` bits) and a value vector one step (``16 / D`` bits).
- Fixed code widths. A min/max group spends its 2^b levels on its own
  range, outliers included. A uniform step set from the spread, with the
  codes entropy-coded (zstd tuned down to its Huffman stage, on the int8
  codes), spends bits where the values are: an entropy-coded uniform
  quantizer is within a quarter bit of the rate-distortion bound.
- The attention sink. A block's first tokens (the sequence's first token
  draws most of every head's attention) stay exact (``sinks``): with them
  quantized, the KL the keys cost on SmolLM2 rose by 44 % (kivi4) to 87 % (ec).

Keys (part 0) are coded per channel over the block's tokens around the
channel's mean (a mean common to all tokens shifts every attention logit of
a query equally, which softmax ignores). The step is ``key_step / 1000``
times ``spread_c ** p * spread_head ** (1 - p)``, ``p = key_power / 1000``:
p = 1 is KIVI's per-channel precision, p = 0 one step for the whole head;
p = 0.5 measured best (SmolLM2, keys alone, RoPE undone, about 4 bits: KL
2.4 e-3 against 3.6 e-3 for p = 1).
``rope`` (RoPE's theta, 0 for none) first undoes the rotary rotation by each
token's position within the block, so that a channel's slow drift is not
turned into an oscillation between two channels (KL a fifth lower on
SmolLM2, theta 100000); it is a plain rotation, so a wrong theta costs
size, never exactness.

Values (parts 1..) are coded per vector with a step of ``value_step / 1000``
times the vector's RMS. (A Hadamard rotation first, as ``rq`` does, changed
SmolLM2's KL by 3 % and cost half the codec's time.)

Every step is at least the part's largest deviation / 127, so every code
fits an int8: nothing is clipped, whatever the input.
"""

from __future__ import annotations

import functools

import torch
import zstandard

from kvstore.compression.codec import FrameCodec, check_int, expect_end, param_dtype, row_chunks, take
from kvstore.compression.frame import BadParamsError, FrameHeader
from kvstore.compression.quant import round_outward

_CODE_LIMIT = 127
# Named (key_step, value_step): about 4x and 5x smaller than 16-bit on SmolLM2's KV (``kvstore codecs``).
PRESETS = {"ec4": (250, 500), "ec5": (450, 800)}
# zstd tuned as an order-0 entropy coder: the fast strategy with long minimum matches skips
# match searching on noise-like codes (1 G codes/s here against 0.3-0.4 for level 1 on low-entropy codes)
# and leaves the literals to its Huffman stage, within 1-3 % of the codes' order-0 entropy.
_ZSTD = zstandard.ZstdCompressionParameters(window_log=17, hash_log=10, chain_log=6, search_log=1,
                                            min_match=7, strategy=zstandard.STRATEGY_FAST,
                                            write_content_size=True)
# float32 temporaries of whole layers coded at once: measured best on one core for a 256-token SmolLM2
# block, 4 MiB when encoding (fewer, larger ops); decoding takes row_chunks' default, 1 MiB.
_ENCODE_CHUNK_BYTES = 4 << 20


@functools.lru_cache(maxsize=32)
def rope_tables(tokens: int, dim: int, theta: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), float32 ``[tokens, dim / 2]``: RoPE's angles for positions 0..tokens-1 (pairs c, c + dim/2)."""
    inverse = float(theta) ** (-torch.arange(0, dim - 1, 2, dtype=torch.float64) / dim)
    angles = torch.arange(tokens, dtype=torch.float64).unsqueeze(1) * inverse.unsqueeze(0)
    return angles.cos().float().to(device), angles.sin().float().to(device)


def rope_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    """``x`` ``[..., T, H, D]`` rotated (or back, ``inverse``) by RoPE at positions 0..T-1, rotate-half layout."""
    half = cos.shape[-1]
    a, b = x[..., :half], x[..., half:2 * half]
    c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)
    if inverse:
        s = -s
    out = torch.empty_like(x)
    out[..., :half] = a * c - b * s
    out[..., half:2 * half] = b * c + a * s
    if x.shape[-1] > 2 * half:
        out[..., 2 * half:] = x[..., 2 * half:]
    return out


def _inverse(step: torch.Tensor) -> torch.Tensor:
    """1 / step, and 0 where the step is 0 (all values equal the centre: every code is 0)."""
    return torch.where(step == 0, torch.zeros_like(step), step.reciprocal())



def _capped(step: torch.Tensor, largest: torch.Tensor) -> torch.Tensor:
    """``step`` no larger than twice the largest deviation it codes: past that every code is 0 all the same,
    and a large ``key_step``/``value_step`` (up to 100,000) made fp16 steps round up to inf, decoded as NaN
    (0 x inf) from finite KV."""
    return torch.minimum(step, largest * 2)

class EntropyCodec(FrameCodec):
    """Keys per channel and values per vector on uniform steps, codes entropy-coded; sink tokens exact."""

    codec_id = 5
    PARAMS = ("key_step", "value_step", "key_power", "sinks", "rope")
    lossless = False
    decode_bytes_per_second = 1.5e9

    def __init__(self, key_step: int = 250, value_step: int = 500, key_power: int = 500, sinks: int = 1,
                 rope: int = 0):
        self.key_step = check_int("key_step", key_step, 1, 100_000)
        self.value_step = check_int("value_step", value_step, 1, 100_000)
        self.key_power = check_int("key_power", key_power, 0, 1000)
        self.sinks = check_int("sinks", sinks, 0, 1 << 20)
        self.rope = check_int("rope", rope, 0, 1 << 40)
        self.name = next((name for name, steps in PRESETS.items() if steps == (self.key_step, self.value_step)), "ec")

    def check_tensor(self, tensor: torch.Tensor) -> None:
        super().check_tensor(tensor)
        if tensor.dim() not in (4, 5):
            raise ValueError(f"tensor: expected [L, P, T, H, D] or [P, T, H, D], got shape {list(tensor.shape)}")
        if self.rope and tensor.shape[-1] < 2:
            raise ValueError(f"tensor: rope needs a head dim of at least 2, got shape {list(tensor.shape)}")

    @staticmethod
    def _dims(shape: tuple[int, ...]) -> tuple[int, int, int, int, int]:
        return (1, *shape) if len(shape) == 4 else shape  # type: ignore[return-value]

    def _quantized(self, tokens: int) -> tuple[int, int]:
        """(sink tokens kept exact, tokens coded)."""
        sinks = min(self.sinks, tokens)
        return sinks, tokens - sinks

    def _encode(self, tensor: torch.Tensor) -> list[object]:
        L, P, T, H, D = self._dims(tuple(tensor.shape))
        S, Tq = self._quantized(T)
        x = tensor.reshape(L, P, T, H, D)
        pd, dev = param_dtype(tensor.dtype), tensor.device
        k_mean = torch.empty((L, H, D), dtype=pd, device=dev)
        k_step = torch.empty((L, H, D), dtype=pd, device=dev)
        v_step = torch.empty((L, P - 1, Tq, H), dtype=pd, device=dev)
        codes = torch.empty((L, P, Tq, H, D), dtype=torch.int8, device=dev)
        if Tq:
            for rows in row_chunks(L, P * Tq * H * D, chunk_bytes=_ENCODE_CHUNK_BYTES):
                self._encode_keys(x[rows, 0, S:], k_mean[rows], k_step[rows], codes[rows, 0], pd)
                if P > 1:
                    self._encode_values(x[rows, 1:, S:], v_step[rows], codes[rows, 1:], pd)
        packed = zstandard.ZstdCompressor(compression_params=_ZSTD).compress(
            codes.view(torch.uint8).view(-1).cpu().numpy().data)
        return [k_mean, k_step, v_step, x[:, :, :S], len(packed).to_bytes(8, "little"), packed]

    def _encode_keys(self, keys: torch.Tensor, mean_out: torch.Tensor, step_out: torch.Tensor,
                     codes_out: torch.Tensor, pd: torch.dtype) -> None:
        tokens = keys.shape[1]  # keys: [l, Tq, H, D]
        if self.rope:
            y = rope_rotate(keys.float(), *rope_tables(tokens, keys.shape[-1], self.rope, str(keys.device)),
                            inverse=True)
        else:
            y = keys.float()  # only read below: may be the caller's tensor
        mean_out.copy_(y.mean(1))
        # Centred on the stored mean before any square: E[y^2] - m^2 cancels catastrophically when a
        # channel's mean dwarfs its spread (float32 keeps 7 digits of y^2, not of the spread).
        centred = y - mean_out.float().unsqueeze(1)
        spread = centred.square().mean(1).sqrt_()  # [l, H, D]
        if self.key_power != 1000:
            head = spread.square().mean(-1, keepdim=True).sqrt_()
            power = self.key_power / 1000
            spread = spread.pow_(power).mul_(head.pow_(1 - power))
        largest = centred.abs().amax(1)
        step = _capped(torch.maximum(spread.mul_(self.key_step / 1000), largest / _CODE_LIMIT), largest)
        step_out.copy_(round_outward(step, pd, up=True))
        codes_out.copy_(centred.mul_(_inverse(step_out.float()).unsqueeze(1)).round_())

    def _encode_values(self, values: torch.Tensor, step_out: torch.Tensor, codes_out: torch.Tensor,
                       pd: torch.dtype) -> None:
        y = values.float()  # [l, P-1, Tq, H, D]; only read below
        rms = y.square().mean(-1).sqrt_().mul_(self.value_step / 1000)
        largest = torch.maximum(y.amax(-1), y.amin(-1).neg_())
        step_out.copy_(round_outward(_capped(torch.maximum(rms, largest / _CODE_LIMIT), largest), pd, up=True))
        codes_out.copy_(y.mul(_inverse(step_out.float()).unsqueeze(-1)).round_())

    def _decode(self, header: FrameHeader, payload: torch.Tensor, out: torch.Tensor) -> None:
        if len(header.shape) not in (4, 5):
            raise BadParamsError(f"frame: expected a 4- or 5-dim shape for ec, got {list(header.shape)}")
        L, P, T, H, D = self._dims(header.shape)
        if self.rope and D < 2:
            raise BadParamsError(f"frame: rope needs a head dim of at least 2, got {list(header.shape)}")
        S, Tq = self._quantized(T)
        pd = param_dtype(header.dtype)
        k_mean, at = take(payload, 0, L * H * D, pd)
        k_step, at = take(payload, at, L * H * D, pd)
        v_step, at = take(payload, at, L * (P - 1) * Tq * H, pd)
        sinks, at = take(payload, at, L * P * S * H * D, header.dtype)
        length, at = take(payload, at, 8, torch.uint8)
        length = int.from_bytes(bytes(length.cpu().numpy()), "little")
        if length != payload.numel() - at:
            raise BadParamsError(f"frame: the codes' length says {length} bytes, {payload.numel() - at} follow")
        packed, at = take(payload, at, length, torch.uint8)
        expect_end(payload, at)
        codes = self._decompress(packed, L * P * Tq * H * D).view(torch.int8).view(L, P, Tq, H, D)
        y = out if out.dim() == 5 else out.unsqueeze(0)
        y[:, :, :S] = sinks.view(L, P, S, H, D)
        if not Tq:
            return
        k_mean, k_step = k_mean.view(L, 1, H, D), k_step.view(L, 1, H, D)
        v_step = v_step.view(L, P - 1, Tq, H, 1)
        for rows in row_chunks(L, P * Tq * H * D):
            keys = torch.addcmul(k_mean[rows].float(), codes[rows, 0].float(), k_step[rows].float())
            if self.rope:
                keys = rope_rotate(keys, *rope_tables(Tq, D, self.rope, str(keys.device)), inverse=False)
            y[rows, 0, S:] = keys
            if P > 1:
                y[rows, 1:, S:] = codes[rows, 1:].float().mul_(v_step[rows].float())

    @staticmethod
    def _decompress(data: torch.Tensor, count: int) -> torch.Tensor:
        """The ``count`` code bytes of a frame's zstd part, or a ``BadParamsError``; never more than ``count``."""
        raw = data.cpu().numpy().tobytes()
        try:
            declared = zstandard.frame_content_size(raw)
        except zstandard.ZstdError as exc:
            raise BadParamsError(f"frame: the codes do not decompress ({exc})") from None
        if declared != count:
            raise BadParamsError(f"frame: expected {count} code bytes, the codes declare {declared}")
        try:
            codes = zstandard.ZstdDecompressor().decompress(raw, max_output_size=count)
        except zstandard.ZstdError as exc:
            raise BadParamsError(f"frame: the codes do not decompress ({exc})") from None
        if len(codes) != count:
            raise BadParamsError(f"frame: expected {count} code bytes, got {len(codes)}")
        return torch.frombuffer(bytearray(codes), dtype=torch.uint8).to(data.device) if count else \
            torch.empty(0, dtype=torch.uint8, device=data.device)
