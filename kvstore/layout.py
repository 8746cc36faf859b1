"""KVLayout: what one block of KV looks like for one model and one TP shard."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

# Stable names for dtypes: they go into the fingerprint, so they must never
# depend on torch's repr. Extend by adding a row.
DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float32: "float32",
    torch.float8_e4m3fn: "float8_e4m3fn",
    torch.float8_e5m2: "float8_e5m2",
    torch.float8_e4m3fnuz: "float8_e4m3fnuz",  # ROCm's (MI300) fp8 formats: other values for the same bytes
    torch.float8_e5m2fnuz: "float8_e5m2fnuz",
    torch.int8: "int8",
    torch.uint8: "uint8",
}
_DTYPE_BY_NAME: dict[str, torch.dtype] = {name: dt for dt, name in DTYPE_NAMES.items()}
_DTYPE_BY_NAME.update({"fp16": torch.float16, "half": torch.float16, "bf16": torch.bfloat16,
                       "fp32": torch.float32, "float": torch.float32})

LAYOUT_FORMAT_VERSION = 1
# The largest block taken, in bytes: far past any model's (a 405B model's 256 tokens are 132 MB), so that a
# typo in a dimension is an error here, not an allocation of exabytes later.
MAX_BLOCK_BYTES = 1 << 40


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """Map a torch dtype or its name ("bfloat16", "bf16", ...) to a supported torch dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPE_NAMES:
            return dtype
    elif isinstance(dtype, str):
        found = _DTYPE_BY_NAME.get(dtype.lower().removeprefix("torch."))
        if found is not None:
            return found
    raise ValueError(f"dtype: expected one of {sorted(DTYPE_NAMES.values())}, got {dtype!r}")


def _positive_int(name: str, value: object, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class KVLayout:
    """Shape of the KV cache of one model shard, and the block size it is stored in.

    A block holds ``block_tokens`` consecutive tokens of KV for every layer,
    as the canonical tensor ``[num_layers, kv_parts, tokens, num_kv_heads,
    head_dim]``. That order is layer-major: one layer's bytes are one
    contiguous slice of the block.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype = torch.bfloat16
    block_tokens: int = 256
    kv_parts: int = 2
    tp_rank: int = 0
    tp_size: int = 1
    first_layer: int = 0  # model index of this shard's layer 0 (a pipeline stage); part of the fingerprint

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", resolve_dtype(self.dtype))
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_tokens", "tp_size"):
            _positive_int(name, getattr(self, name))
        if isinstance(self.kv_parts, bool) or not isinstance(self.kv_parts, int) or self.kv_parts not in (1, 2):
            raise ValueError(f"kv_parts: expected 2 (K and V) or 1 (latent/MLA), got {self.kv_parts!r}")
        _positive_int("tp_rank", self.tp_rank, minimum=0)
        _positive_int("first_layer", self.first_layer, minimum=0)
        if self.tp_rank >= self.tp_size:
            raise ValueError(f"tp_rank: expected 0 <= tp_rank < tp_size={self.tp_size}, got {self.tp_rank}")
        if self.block_bytes > MAX_BLOCK_BYTES:
            raise ValueError(f"layout: expected a block of at most {MAX_BLOCK_BYTES} bytes (1 TiB), got "
                             f"{self.block_bytes} ({self.num_layers} layers x {self.kv_parts} x {self.block_tokens} "
                             f"tokens x {self.num_kv_heads} heads x {self.head_dim} x {self.element_bytes} bytes)")

    @property
    def element_bytes(self) -> int:
        """Bytes per element of ``dtype``."""
        return self.dtype.itemsize

    @property
    def token_bytes(self) -> int:
        """Bytes of KV per token across all layers."""
        return self.num_layers * self.kv_parts * self.num_kv_heads * self.head_dim * self.element_bytes

    @property
    def block_bytes(self) -> int:
        """Bytes of one full block (``block_tokens`` tokens)."""
        return self.token_bytes * self.block_tokens

    def shape(self, num_tokens: int) -> tuple[int, int, int, int, int]:
        """Canonical tensor shape ``[L, P, num_tokens, H, D]``."""
        return (self.num_layers, self.kv_parts, num_tokens, self.num_kv_heads, self.head_dim)

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        """Canonical shape of one full block."""
        return self.shape(self.block_tokens)

    def layer_bytes(self, num_tokens: int) -> int:
        """Bytes of one layer's slice of a block holding ``num_tokens`` tokens."""
        return self.token_bytes // self.num_layers * num_tokens

    def describe(self) -> str:
        """The canonical text the fingerprint is the hash of (stable across versions)."""
        return (
            f"kvstore-layout/v{LAYOUT_FORMAT_VERSION};layers={self.num_layers};parts={self.kv_parts};"
            f"heads={self.num_kv_heads};head_dim={self.head_dim};dtype={DTYPE_NAMES[self.dtype]};"
            f"block_tokens={self.block_tokens};tp={self.tp_rank}/{self.tp_size}"
            + (f";first_layer={self.first_layer}" if self.first_layer else "")  # fingerprints before it unchanged
        )

    @property
    def fingerprint(self) -> bytes:
        """16-byte digest of every field: KV of another shape, dtype or shard never matches."""
        return hashlib.sha256(self.describe().encode()).digest()[:16]

    def check_kv(self, kv: torch.Tensor, num_tokens: int, name: str = "kv") -> None:
        """Raise ``ValueError`` unless ``kv`` is a dense tensor ``[L, P, num_tokens, H, D]`` of ``dtype``
        holding data (not on the ``meta`` device)."""
        if not isinstance(kv, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(kv).__name__}")
        if kv.layout != torch.strided:
            raise ValueError(f"{name}: expected a dense (strided) tensor, got layout {kv.layout}")
        if kv.device.type == "meta":
            raise ValueError(f"{name}: expected a tensor that holds data, got one on the 'meta' device")
        expected = self.shape(num_tokens)
        if tuple(kv.shape) != expected:
            raise ValueError(
                f"{name}: expected shape {list(expected)} ([layers, kv_parts, tokens, heads, head_dim] "
                f"for {num_tokens} tokens), got {list(kv.shape)}"
            )
        if kv.dtype != self.dtype:
            raise ValueError(f"{name}: expected dtype {self.dtype}, got {kv.dtype}")
        if kv.is_neg() or kv.is_conj():  # its bytes are not its values: tiers that copy bytes would drop the bit
            raise ValueError(f"{name}: expected a tensor without a pending negation or conjugation, got a view "
                             f"with one (call .resolve_neg() / .resolve_conj() first)")
