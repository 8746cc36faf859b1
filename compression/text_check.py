"""What a lossy codec costs on a real trained model reading real English text.

The random-initialised model of ``fidelity.ModelCheck`` ranks codecs
differently from a trained one (its KV has other statistics), so the advice
kvstore gives comes from here: SmolLM2-135M-Instruct (``kvstore.models``)
reads real text, its prefix KV is stored as kvstore stores it (``kv_dtype``,
bf16 by default) and round-tripped through a codec block by block
(``block_tokens`` per block, as the store encodes it), and the continuation
is scored with the exact and with the decoded prefix:

- ``delta_ppl``: perplexity of the continuation's tokens with the decoded
  prefix over that with the exact one, minus 1 (0.01 = +1 %);
- ``top1_agree``: share of continuation positions whose most likely next
  token is unchanged; ``top1_confident``: the same, only where the exact
  model's top token leads the second by at least ``margin_nats``;
- ``kl_mean``: KL(exact || decoded) of the next-token distribution, nats.

The text is the Python language reference that ships with CPython
(``pydoc_data.topics``): English prose present on every machine that runs
kvstore, nothing downloaded. Its first ``sequences`` windows of
``prefix_tokens + continuation_tokens`` tokens are used.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kvstore.compression.fidelity import ModelCheck, cache_argument, canonical_to_cache
from kvstore.validation import check_counts

Roundtrip = Callable[[torch.Tensor], torch.Tensor]


def reference_text() -> str:
    """English prose every CPython install has: the language reference's topics, in a fixed order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name].strip() for name in sorted(topics))


@dataclass(frozen=True)
class TextCheckSettings:
    """Windows of real text: ``sequences`` of ``prefix_tokens`` (stored, round-tripped) followed by
    ``continuation_tokens`` (scored); the codec runs on blocks of ``block_tokens``."""

    sequences: int = 16  # 2,032 scored positions: with 4, a codec's ΔPPL swung by half a point between texts
    prefix_tokens: int = 512
    continuation_tokens: int = 128
    block_tokens: int = 256
    kv_dtype: torch.dtype = torch.bfloat16
    margin_nats: float = 1.0

    def __post_init__(self) -> None:
        check_counts(self, ("sequences", "prefix_tokens", "continuation_tokens", "block_tokens"))
        if self.continuation_tokens < 2:
            raise ValueError(f"continuation_tokens: expected at least 2, got {self.continuation_tokens}")
        if not self.kv_dtype.is_floating_point:
            raise ValueError(f"kv_dtype: expected a floating-point dtype, got {self.kv_dtype}")


class TextCheck:
    """Built once (the model's exact prefix KV and reference logits); ``run(roundtrip)`` scores a codec."""

    def __init__(self, model: Any, tokenizer: Any, settings: TextCheckSettings | None = None) -> None:
        s = self.settings = settings or TextCheckSettings()
        self.model = model
        window = s.prefix_tokens + s.continuation_tokens
        ids = tokenizer(reference_text(), return_tensors="pt").input_ids[0]
        if ids.numel() < s.sequences * window:
            raise ValueError(f"sequences: the text holds {ids.numel() // window} windows of {window} tokens, "
                             f"expected {s.sequences}")
        ids = ids[: s.sequences * window].view(s.sequences, window)
        self.prefix_ids, self.continuation_ids = ids[:, : s.prefix_tokens], ids[:, s.prefix_tokens:]
        with torch.inference_mode():
            cache = model(input_ids=self.prefix_ids, use_cache=True).past_key_values
        self.stored_kv = ModelCheck.cache_to_canonical(cache).to(s.kv_dtype)  # [S, L, 2, T, H, D]
        self.reference_logits = self._continue(self.stored_kv)
        lp = torch.log_softmax(self.reference_logits, -1)
        top2 = lp.topk(2, dim=-1).values
        self.confident = (top2[..., 0] - top2[..., 1]) >= s.margin_nats
        self.reference_nll = self._nll(self.reference_logits)

    def _continue(self, kv: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            cache = canonical_to_cache(kv, self.model.config)
            out = self.model(input_ids=self.continuation_ids, use_cache=True, **{cache_argument(self.model): cache})
        return out.logits[:, :-1].float()  # position i predicts continuation token i + 1

    def _nll(self, logits: torch.Tensor) -> float:
        targets = self.continuation_ids[:, 1:]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)).item()

    def decode_blocks(self, roundtrip: Roundtrip, kv: torch.Tensor) -> torch.Tensor:
        """``kv`` ([L, 2, T, H, D]) round-tripped block by block along the tokens, as the store encodes it."""
        step = self.settings.block_tokens
        parts = [roundtrip(kv[:, :, a:a + step].contiguous()) for a in range(0, kv.shape[2], step)]
        return torch.cat(parts, dim=2)

    def stored_ratio(self, stored_bytes: Callable[[torch.Tensor], int]) -> float:
        """16-bit bytes of the real prefix KV over what a codec stores for it, block by block
        (``stored_bytes(block)``: the bytes kept for one ``[L, 2, T, H, D]`` block)."""
        step = self.settings.block_tokens
        kept = sum(stored_bytes(kv[:, :, a:a + step].contiguous())
                   for kv in self.stored_kv for a in range(0, kv.shape[2], step))
        return self.stored_kv.numel() * 2 / kept

    def run(self, roundtrip: Roundtrip) -> dict[str, float]:
        """``delta_ppl``, ``ppl``, ``top1_agree``, ``top1_confident``, ``kl_mean`` (see the module)."""
        decoded = torch.stack([self.decode_blocks(roundtrip, kv) for kv in self.stored_kv])
        logits = self._continue(decoded)
        nll = self._nll(logits)
        lp, lq = torch.log_softmax(self.reference_logits, -1), torch.log_softmax(logits, -1)
        same = self.reference_logits.argmax(-1) == logits.argmax(-1)
        return {
            "delta_ppl": math.exp(nll - self.reference_nll) - 1.0,
            "ppl": math.exp(nll),
            "top1_agree": same.float().mean().item(),
            "top1_confident": same[self.confident].float().mean().item() if self.confident.any() else float("nan"),
            "kl_mean": (lp.exp() * (lp - lq)).sum(-1).mean().item(),
        }
