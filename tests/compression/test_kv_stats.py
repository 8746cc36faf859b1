"""The synthetic KV generator against a trained model: statistics measured, a spec fitted to them, and the
fitted spec (``fidelity.SMOLLM2_SPEC``) still matching SmolLM2's KV when measured again."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kvstore.compression import fidelity
from kvstore.compression.kv_stats import KVStatistics, fit_spec, kv_statistics, value_df_for


def close(measured: KVStatistics, target: KVStatistics) -> None:
    """The tolerances within which a generator 'shows' a model's statistics."""
    assert abs(measured.outlier_channels - target.outlier_channels) <= 1.5, (measured, target)
    low, high = target.outlier_ratio
    assert low / 1.5 <= measured.outlier_ratio[0] <= measured.outlier_ratio[1] <= high * 1.5, (measured, target)
    assert abs(measured.channel_spread - target.channel_spread) <= 0.1, (measured, target)
    assert abs(measured.key_rho - target.key_rho) <= 0.1 and abs(measured.value_rho - target.value_rho) <= 0.1
    assert abs(measured.value_kurtosis - target.value_kurtosis) <= 0.6, (measured, target)
    assert abs(measured.value_outlier_tokens - target.value_outlier_tokens) <= 0.005
    for name in ("key_sink", "value_sink", "outlier_jitter"):
        assert abs(getattr(measured, name) / getattr(target, name) - 1) <= 0.25, (name, measured, target)


# Student-t values with df <= 4 have no finite kurtosis to fit (the default spec's df 4 is a stress case).
SPECS = {"smollm2": fidelity.SMOLLM2_SPEC,
         "outliers": fidelity.SyntheticSpec(value_df=8, value_outlier_tokens=0.0, key_rho=0.7, sink_scale=2.0)}


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_a_spec_fitted_to_synthetic_kv_generates_the_same_statistics(spec):
    stats = kv_statistics(fidelity.synthetic_kv(8, 4, 256, 64, torch.float32, spec=spec))
    refit = fit_spec(stats, spec.rope_base)
    again = kv_statistics(fidelity.synthetic_kv(8, 4, 256, 64, torch.float32, seed=1, spec=refit))
    close(again, stats)


def test_the_default_spec_differs_from_the_trained_model():
    """The reason for the fit: the default spec's KV is far from SmolLM2's (a test that can fail)."""
    default = kv_statistics(fidelity.synthetic_kv(8, 3, 256, 64, torch.float32))
    fitted = kv_statistics(fidelity.synthetic_kv(8, 3, 256, 64, torch.float32, spec=fidelity.SMOLLM2_SPEC))
    assert default.key_sink > 5 * fitted.key_sink and default.value_kurtosis > 2 * fitted.value_kurtosis
    with pytest.raises(AssertionError):
        close(default, fitted)


def test_value_df_inverts_student_t_kurtosis():
    for df in (5, 6, 10, 16, 40):
        assert value_df_for(3 + 6 / (df - 4)) == df
    assert value_df_for(3.0) == 100 and value_df_for(50.0) == 5


def test_key_sink_scale_sets_the_first_keys_norm():
    spec = dataclasses.replace(fidelity.SyntheticSpec(), key_sink_scale=0.5)
    stats = kv_statistics(fidelity.synthetic_kv(4, 2, 64, 32, torch.float32, spec=spec))
    assert stats.key_sink == pytest.approx(0.5, rel=0.01)
    with pytest.raises(ValueError, match="key_sink_scale"):
        dataclasses.replace(fidelity.SyntheticSpec(), key_sink_scale=0.0)


def test_bad_shapes_are_refused():
    for shape in ((2, 2, 4, 1, 8), (2, 3, 16, 1, 8), (16, 1, 8)):
        with pytest.raises(ValueError, match="kv"):
            kv_statistics(torch.zeros(shape))


@pytest.mark.slow
def test_smollm2_spec_still_matches_the_model():
    """SmolLM2 reads 2 windows of real text; its KV's statistics and SMOLLM2_SPEC's agree."""
    pytest.importorskip("transformers")
    from conftest import real_model
    from kvstore.compression.text_check import TextCheck, TextCheckSettings

    check = TextCheck(*real_model(), TextCheckSettings(sequences=2, continuation_tokens=2))
    real = kv_statistics(check.stored_kv)
    config = real_model()[0].config
    synthetic = fidelity.synthetic_kv(config.num_hidden_layers, config.num_key_value_heads, 512,
                                      config.hidden_size // config.num_attention_heads, torch.float32,
                                      spec=fidelity.SMOLLM2_SPEC)
    close(kv_statistics(synthetic), real)
