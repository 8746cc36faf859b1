"""``bench/continued_prefill_ttft.py``: a loaded prefix's TTFT against cold, with both attention paths."""

from __future__ import annotations

import math

import pytest
from continued_prefill_ttft import MODES, main, speedups

from kvstore.integrations.continued_attention import NAME
from kvstore.integrations.demo import RANDOM, DemoSettings, build_model


def test_each_mode_gets_a_ratio_a_round_and_the_model_is_left_on_the_variant():
    model, _ = build_model(DemoSettings.quick(RANDOM))
    assert model.config._attn_implementation == "sdpa"
    ratios = speedups(model, prefix=64, tokens=100, rounds=2, vocab=model.config.vocab_size)
    assert list(ratios) == list(MODES)
    # a ratio each round, whatever the machine's load (a bound on its value failed on a busy CI machine)
    assert all(len(values) == 2 and all(v > 0 and math.isfinite(v) for v in values) for values in ratios.values())
    assert model.config._attn_implementation == NAME  # CachedModel switched it; the sdpa rounds put it back


@pytest.mark.parametrize("argv", [["--prefix", "0"], ["--prefix", "2000"], ["--rounds", "0"]])
def test_a_bad_choice_is_refused(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2 and "expected 0 < --prefix < --tokens" in capsys.readouterr().err
