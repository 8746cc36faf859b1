"""Fidelity harness: synthetic KV structure, metrics, the tiny-Llama logit check, the quanto peer."""

from __future__ import annotations

import math

import pytest
import torch

from kvstore.compression import fidelity as F

SMALL = dict(layers=2, heads=4, tokens=256, head_dim=64)


def identity(kv: torch.Tensor) -> torch.Tensor:
    return kv.clone()


def noisy(rel: float, seed: int = 7):
    """Add Gaussian noise of RMS ``rel`` x the RMS of each kv part (so each part's rel err ~ rel)."""
    def roundtrip(kv: torch.Tensor) -> torch.Tensor:
        x = kv.float()
        rms = x.square().mean(dim=tuple(d for d in range(x.dim()) if d != 1), keepdim=True).sqrt()
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
        return (x + rel * rms * noise).to(kv.dtype)
    return roundtrip


def int8_per_token(kv: torch.Tensor) -> torch.Tensor:
    """Symmetric int8, one absmax scale per (layer, part, token, head) over head_dim."""
    x = kv.float()
    scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127
    return (torch.round(x / scale).clamp(-127, 127) * scale).to(kv.dtype)


def two_significant_bits(kv: torch.Tensor) -> torch.Tensor:
    mantissa, exponent = torch.frexp(kv.float())
    return torch.ldexp(torch.round(mantissa * 4) / 4, exponent).to(kv.dtype)


def channel_rms(kv: torch.Tensor) -> torch.Tensor:
    """RMS over non-sink tokens of the first kv part: ``[L, H, D]``."""
    return kv[:, 0, 1:].float().square().mean(dim=1).sqrt()


# ---------------------------------------------------------------- generator


def test_generator_is_deterministic_and_seed_dependent():
    a = F.synthetic_kv(**SMALL, seed=3)
    b = F.synthetic_kv(**SMALL, seed=3)
    c = F.synthetic_kv(**SMALL, seed=4)
    assert a.shape == (2, 2, 256, 4, 64) and a.dtype == torch.bfloat16
    assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    assert not torch.equal(a, c)
    latent = F.synthetic_kv(layers=2, heads=1, tokens=128, head_dim=96, kv_parts=1, dtype=torch.float16)
    assert latent.shape == (2, 1, 128, 1, 96) and latent.dtype == torch.float16
    assert torch.isfinite(a.float()).all() and torch.isfinite(latent.float()).all()


@pytest.mark.parametrize("kv_parts", [2, 1])
def test_key_outlier_channels_are_10_to_20x_with_one_sign(kv_parts):
    kv = F.synthetic_kv(**SMALL, kv_parts=kv_parts, dtype=torch.float32)
    rms = channel_rms(kv)  # [L, H, D]
    top = rms.topk(4, dim=-1)
    ratio = top.values / rms.median(dim=-1, keepdim=True).values
    assert ratio.min() > 8.5 and ratio.max() < 22, ratio
    # The fifth channel is an ordinary one.
    assert (rms.topk(5, dim=-1).values[..., 4] / rms.median(dim=-1).values).max() < 2.5
    body = kv[:, 0, 1:].float()  # [L, T, H, D]
    chans = torch.gather(body, 3, top.indices[:, None].expand(-1, body.shape[1], -1, -1))
    majority = chans.sign().sum(dim=1, keepdim=True).sign()
    assert (chans.sign() == majority).float().mean() == 1.0
    if kv_parts == 2:  # whole rotary pairs: channel c and c + D/2
        idx = top.indices.sort(-1).values
        assert torch.equal(idx[..., 2:], idx[..., :2] + 32)


def test_neighbouring_tokens_are_correlated_and_values_heavy_tailed():
    kv = F.synthetic_kv(**SMALL, dtype=torch.float32)
    v = kv[:, 1, 1:]
    v = (v - v.mean(1, keepdim=True)) / v.std(1, keepdim=True)
    lag1 = (v[:, 1:] * v[:, :-1]).mean().item()
    assert 0.3 < lag1 < 0.7  # value_rho = 0.5
    assert (v ** 4).mean() > 5  # Gaussian kurtosis is 3
    assert v.abs().amax() > 8  # outlier tokens


def test_sink_token_is_large_and_points_elsewhere():
    k = F.synthetic_kv(**SMALL, dtype=torch.float32)[:, 0]  # [L, T, H, D]
    norms = k.norm(dim=-1)
    assert (norms[:, 0] / norms[:, 1:].median(dim=1).values).min() > 2.5
    mean = k[:, 1:].mean(dim=1)
    cos = torch.nn.functional.cosine_similarity
    assert cos(k[:, 0], mean, dim=-1).max() < 0.6
    assert cos(k[:, 1:], mean[:, None], dim=-1).mean() > 0.85


def test_rope_is_applied_to_keys():
    """Keys equal the RoPE-free keys rotated the way transformers' Llama does (rotate_half pairing)."""
    plain = F.synthetic_kv(**SMALL, dtype=torch.float32, spec=F.SyntheticSpec(rope_base=None))
    roped = F.synthetic_kv(**SMALL, dtype=torch.float32)
    assert torch.equal(plain[:, 1], roped[:, 1])  # values untouched
    d = SMALL["head_dim"]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    freqs = torch.outer(torch.arange(SMALL["tokens"], dtype=torch.float64), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None, :]  # [T, 1, D]
    k = plain[:, 0].double()
    rotated = k * emb.cos() + torch.cat([-k[..., d // 2:], k[..., : d // 2]], dim=-1) * emb.sin()
    torch.testing.assert_close(roped[:, 0], rotated.float(), atol=1e-4, rtol=1e-5)
    assert not torch.allclose(plain[:, 0, 1:], roped[:, 0, 1:])


def test_settings_are_validated():
    with pytest.raises(ValueError):
        F.SyntheticSpec(outlier_scale=(20.0, 10.0))
    with pytest.raises(ValueError):
        F.SyntheticSpec(value_df=2)
    with pytest.raises(ValueError):
        F.QuerySpec(peak_mass=1.0)
    with pytest.raises(ValueError):
        F.synthetic_kv(kv_parts=3)
    with pytest.raises(ValueError):
        F.synthetic_kv(**SMALL, spec=F.SyntheticSpec(outlier_channels=3))
    with pytest.raises(ValueError):
        F.ModelCheckSettings(heads=3, kv_heads=2)
    with pytest.raises(ValueError):
        F.QuantoSettings(bits=3)
    with pytest.raises(ValueError):
        F.evaluate_codec(lambda kv: kv[:, :, :-1], **SMALL)


# ---------------------------------------------------------------- queries and metrics


def test_peaked_queries_focus_and_diffuse_queries_spread():
    kv = F.synthetic_kv(**SMALL)
    diffuse = F.synthetic_queries(kv, 32, seed=1)
    peaked = F.synthetic_queries(kv, 32, seed=1, peaked=True)
    assert diffuse.shape == peaked.shape == (2, 4, 32, 64) and diffuse.dtype == torch.float32
    assert torch.equal(diffuse, F.synthetic_queries(kv, 32, seed=1))
    _, w_diffuse = F.attention(kv, diffuse)
    _, w_peaked = F.attention(kv, peaked)
    assert w_peaked.max(-1).values.mean() > 0.7  # peak_mass = 0.8 on one key
    assert w_diffuse[..., 1:].max(-1).values.mean() < 0.1
    assert (w_diffuse > 1e-3).sum(-1).float().median() > 50  # many tokens matter


def test_queries_lean_on_the_key_outlier_channels():
    kv = F.synthetic_kv(**SMALL, dtype=torch.float32)
    q = F.synthetic_queries(kv, 32)
    k = kv[:, 0].permute(0, 2, 1, 3)  # [L, H, T, D]
    outliers = torch.zeros_like(k[:, :, 0], dtype=torch.bool).scatter(-1, channel_rms(kv).topk(4, -1).indices, True)
    full = torch.einsum("lhqd,lhtd->lhqt", q, k).var(-1)
    only = torch.einsum("lhqd,lhtd->lhqt", q * outliers[:, :, None], k).var(-1)
    assert (only / full).median() > 0.5  # 4 of 64 channels carry most of the logit variance


def test_identity_roundtrip_is_exact():
    m = F.evaluate_codec(identity, **SMALL)
    assert m["k_rel_err"] == 0.0 and m["v_rel_err"] == 0.0
    assert m["attn_rel_err_diffuse"] == 0.0 and m["attn_rel_err_peaked"] == 0.0
    for key in ("attn_cos_diffuse", "attn_cos_peaked", "attn_cos_min"):
        assert m[key] == pytest.approx(1.0, abs=1e-6)
    assert set(m) == {"k_rel_err", "v_rel_err", "attn_cos_diffuse", "attn_cos_peaked", "attn_cos_min",
                      "attn_rel_err_diffuse", "attn_rel_err_peaked"}


def test_one_percent_noise_gives_one_percent_error():
    m = F.evaluate_codec(noisy(0.01), **SMALL, dtype=torch.float32)
    assert m["k_rel_err"] == pytest.approx(0.01, rel=0.03)
    assert m["v_rel_err"] == pytest.approx(0.01, rel=0.03)
    for name in ("diffuse", "peaked"):
        assert 0.003 < m[f"attn_rel_err_{name}"] < 0.03
        assert 0.999 < m[f"attn_cos_{name}"] < 1.0
    coarse = F.evaluate_codec(noisy(0.1), **SMALL, dtype=torch.float32)
    assert coarse["k_rel_err"] == pytest.approx(0.1, rel=0.03)
    assert coarse["attn_cos_min"] < m["attn_cos_min"]


def test_latent_cache_metrics():
    args = dict(layers=2, heads=1, tokens=128, head_dim=96, kv_parts=1)
    m = F.evaluate_codec(noisy(0.05), **args)
    assert m["k_rel_err"] == m["v_rel_err"] == pytest.approx(0.05, rel=0.1)
    assert 0.99 < m["attn_cos_diffuse"] < 1.0


def test_int8_per_token_is_close():
    m = F.evaluate_codec(int8_per_token, **SMALL)
    assert m["k_rel_err"] < 0.03 and m["v_rel_err"] < 0.02
    assert m["attn_cos_diffuse"] > 0.999 and m["attn_cos_peaked"] > 0.999


# ---------------------------------------------------------------- model check


@pytest.fixture(scope="module")
def model_check():
    pytest.importorskip("transformers", reason="the model check needs transformers")
    return F.ModelCheck()


def test_model_check_identity_is_exact(model_check):
    m = model_check.run(identity)
    assert m["top1_agree"] == 1.0 and m["kl_mean"] < 1e-6 and m["max_abs_logit_diff"] == 0.0
    # The bf16 storage floor itself is harmless at the default settings.
    assert m["storage_top1_agree"] == 1.0 and m["storage_kl_mean"] < 1e-4


@pytest.mark.parametrize("roundtrip", [two_significant_bits, noisy(0.3)], ids=["2-significant-bits", "30%-noise"])
def test_model_check_catches_coarse_roundtrips(model_check, roundtrip):
    m = model_check.run(roundtrip)
    assert m["top1_agree"] < 0.85 and m["kl_mean"] > 1e-2
    fine = model_check.run(int8_per_token)
    assert fine["top1_agree"] > m["top1_agree"] and fine["kl_mean"] < m["kl_mean"] / 10


def test_model_kv_matches_the_cache(model_check):
    mc, s = model_check, model_check.settings
    with torch.inference_mode():
        cache = mc.model(input_ids=mc.prefix_ids, use_cache=True).past_key_values
    kv = F.ModelCheck.cache_to_canonical(cache)
    assert kv.shape == (s.sequences, s.layers, 2, s.prefix_tokens, s.kv_heads, s.head_dim)
    assert torch.equal(kv, mc.prefix_kv)
    b, layer, t, h, d = 1, 2, 17, 1, 5
    assert kv[b, layer, 0, t, h, d] == cache.layers[layer].keys[b, h, t, d]
    assert kv[b, layer, 1, t, h, d] == cache.layers[layer].values[b, h, t, d]
    assert torch.equal(F.ModelCheck.cache_to_canonical(mc.canonical_to_cache(kv)), kv)
    # Keys carry the planted outlier channels (the last rotary pairs).
    rms = kv[:, :, 0].square().mean(dim=(0, 2)).sqrt()  # [L, H, D]
    half = s.head_dim // 2
    planted = torch.tensor([half - 2, half - 1, s.head_dim - 2, s.head_dim - 1])
    assert (rms[..., planted] / rms.median(-1, keepdim=True).values).min() > 8
    # Continuing from the rebuilt cache equals one forward over prefix + continuation.
    with torch.inference_mode():
        full = mc.model(input_ids=torch.cat([mc.prefix_ids, mc.continuation_ids], 1)).logits
    torch.testing.assert_close(mc._continue(kv), full[:, s.prefix_tokens:], atol=2e-4, rtol=1e-4)


# ---------------------------------------------------------------- quanto peer


@pytest.fixture(scope="module")
def quanto():
    pytest.importorskip("transformers", reason="the quanto peer needs transformers")
    pytest.importorskip("optimum.quanto", reason="optimum-quanto is not installed: pip install optimum-quanto")
    return F


def test_quanto_roundtrip_4_and_2_bits(quanto, model_check):
    kv = F.synthetic_kv(**SMALL)
    result = {}
    for bits in (4, 2):
        r = F.quanto_quantize(kv, F.QuantoSettings(bits=bits))
        assert r.decoded.shape == kv.shape and r.decoded.dtype == kv.dtype
        ratio = 2 * kv.numel() / r.stored_bytes
        # packed ints + bf16 scale and shift per 64-element group
        assert ratio == pytest.approx(16 / (bits + 2 * 16 / 64))
        assert ratio == pytest.approx(F.quanto_ratio(kv, bits))
        result[bits] = F.kv_metrics(kv, r.decoded) | model_check.run(F.quanto_roundtrip(bits))
    assert 0 < result[4]["k_rel_err"] < result[2]["k_rel_err"]
    assert 0 < result[4]["v_rel_err"] < result[2]["v_rel_err"]
    assert result[4]["attn_cos_diffuse"] > result[2]["attn_cos_diffuse"]
    assert result[4]["kl_mean"] < result[2]["kl_mean"]
    assert result[4]["top1_agree"] > result[2]["top1_agree"]


def test_quanto_matches_the_cache_it_wraps(quanto):
    """Our roundtrip returns exactly what transformers' quanto cache hands attention on the next step."""
    from transformers import LlamaConfig, QuantizedCache

    kv = F.synthetic_kv(layers=1, heads=2, tokens=128, head_dim=64)
    cache = QuantizedCache(backend="quanto", config=LlamaConfig(num_hidden_layers=1), nbits=4)
    k, v = (kv[0, p].transpose(0, 1)[None].contiguous() for p in (0, 1))  # [1, H, T, D]
    cache.update(k, v, 0)
    step = torch.zeros(1, 2, 1, 64, dtype=kv.dtype)
    keys, values = cache.update(step, step, 0)
    decoded = F.quanto_roundtrip(4)(kv)
    assert torch.equal(keys[0, :, :-1], decoded[0, 0].transpose(0, 1))
    assert torch.equal(values[0, :, :-1], decoded[0, 1].transpose(0, 1))
    # Per-channel key grouping (axis_key=-1) is the KIVI-style alternative; it helps outlier keys.
    per_channel = F.evaluate_codec(F.quanto_roundtrip(4, axis_key=-1), **SMALL)
    per_token = F.evaluate_codec(F.quanto_roundtrip(4), **SMALL)
    assert per_channel["k_rel_err"] < per_token["k_rel_err"] / 2
    assert not math.isnan(per_channel["attn_cos_min"])
