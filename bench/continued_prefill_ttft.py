"""TTFT of a request whose first tokens are loaded from the store, against prefilling the whole prompt cold.

The demo's RAG request in miniature: ``--prefix`` tokens (a system prompt)
are stored, then a ``--tokens``-token prompt that starts with them arrives.
Each round times, one after the other on fresh random ids: the bare model
over the whole prompt; ``CachedModel`` loading the prefix and prefilling the
rest with kvstore's continued-prefill attention
(``integrations/continued_attention.py``); and the same with the model put
back on transformers' ``sdpa``, whose explicit mask makes that prefill
compute the whole rectangle. The median over rounds (the first round is a
warm-up) of cold TTFT / cached TTFT is printed for each. Run from the
checkout::

    python bench/continued_prefill_ttft.py --rounds 5

(SmolLM2-135M on 2 cores, 256 + 1,587 tokens: 1.13x with the variant,
0.96x with sdpa's mask.)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import torch

from kvstore import KVStore, StoreConfig
from kvstore.integrations.continued_attention import NAME
from kvstore.integrations.transformers import CachedModel, layout_for
from kvstore.models import load_model

MODES = ("continued attention", "sdpa mask")


def speedups(model: Any, prefix: int, tokens: int, rounds: int, vocab: int) -> dict[str, list[float]]:
    """Per mode, each round's cold TTFT over the cached TTFT (the warm-up round left out)."""
    ratios: dict[str, list[float]] = {mode: [] for mode in MODES}
    generator = torch.Generator().manual_seed(0)
    config = StoreConfig(model_id="continued-prefill", host_bytes="256MiB")
    with KVStore(layout_for(model, block_tokens=64), config) as store:
        cached = CachedModel(model, store)
        try:
            for round_ in range(rounds + 1):
                ids = torch.randint(0, vocab, (1, tokens), generator=generator)
                with torch.inference_mode():
                    start = time.perf_counter()
                    model(ids)
                    cold = time.perf_counter() - start
                    cached.forward(ids[:, :prefix])  # the prefix is stored
                    for mode in MODES:
                        model.set_attn_implementation(NAME if mode == MODES[0] else "sdpa")
                        _, info = cached.forward(ids, save=False)
                        if info.loaded_tokens != prefix:
                            raise RuntimeError(f"expected {prefix} tokens loaded, got {info.loaded_tokens}")
                        if round_:
                            ratios[mode].append(cold / info.ttft_seconds)
        finally:  # the model leaves as CachedModel set it up
            model.set_attn_implementation(NAME if cached.continued_attention else "sdpa")
    return ratios

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefix", type=int, default=256, help="tokens loaded from the store (default 256)")
    parser.add_argument("--tokens", type=int, default=1843, help="tokens of the prompt (default 1843)")
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds after one warm-up (default 5)")
    args = parser.parse_args(argv)
    if not 0 < args.prefix < args.tokens or args.rounds < 1:
        parser.error(f"expected 0 < --prefix < --tokens and --rounds >= 1, got {args.prefix}, {args.tokens}, "
                     f"{args.rounds}")
    model, _ = load_model(dtype=torch.float32)
    if model.config._attn_implementation != "sdpa":
        parser.error(f"expected a model on sdpa, got {model.config._attn_implementation}")
    ratios = speedups(model.eval(), args.prefix, args.tokens, args.rounds, model.config.vocab_size)
    for mode, values in ratios.items():
        print(f"{mode:<20} cold TTFT / cached TTFT: median {statistics.median(values):.3f}  "
              f"rounds {[round(v, 3) for v in values]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
