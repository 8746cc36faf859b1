"""The statistics of a KV cache that ``fidelity.SyntheticSpec`` plants, measured, and a spec fitted to them.

``kvstore codecs`` rates codecs on synthetic KV beside the real model's; the
synthetic columns only mean something if the generator's structure matches
a trained model's. ``kv_statistics`` measures, on ``[L, 2, T, H, D]`` KV
(keys as the cache holds them, after RoPE), the quantities each
``SyntheticSpec`` field sets; ``fit_spec`` turns them back into a spec. The
spec fitted to SmolLM2-135M reading English is ``fidelity.SMOLLM2_SPEC``,
and a test measures the model again and checks both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvstore.compression.fidelity import SyntheticSpec

OUTLIER_RATIO = 4.0  # a key channel with RMS above this multiple of its head's median is an outlier channel


@dataclass(frozen=True)
class KVStatistics:
    """Medians over layers and heads (ratios are to the head's median ordinary channel or token).

    outlier_channels: mean number of key channels per head with RMS > ``OUTLIER_RATIO`` x the median;
    outlier_ratio: (25th, 75th percentile) RMS ratio of those channels;
    outlier_jitter: their per-token std over |mean|; channel_spread: std of log RMS of
    ordinary channels (keys and values); key_rho / value_rho: lag-1 correlation along
    tokens of an ordinary channel; value_kurtosis: of unit-scaled value elements;
    value_outlier_tokens: share of tokens whose value norm exceeds 3x the median;
    key_sink / value_sink: the first token's norm over the median token's.
    """

    outlier_channels: float
    outlier_ratio: tuple[float, float]
    outlier_jitter: float
    channel_spread: float
    key_rho: float
    value_rho: float
    value_kurtosis: float
    value_outlier_tokens: float
    key_sink: float
    value_sink: float


def _lag1(x: torch.Tensor) -> torch.Tensor:
    """Lag-1 correlation along dim 0 (tokens) of each column of ``x`` ``[T, N]``."""
    x = x - x.mean(0)
    return (x[1:] * x[:-1]).sum(0) / x.square().sum(0).clamp_min(1e-30)


def kv_statistics(kv: torch.Tensor) -> KVStatistics:
    """Statistics of ``kv`` ``[L, 2, T, H, D]`` or ``[S, L, 2, T, H, D]`` (S sequences: pooled), T >= 8."""
    if kv.dim() == 5:
        kv = kv.unsqueeze(0)
    if kv.dim() != 6 or kv.shape[2] != 2 or kv.shape[3] < 8:
        raise ValueError(f"kv: expected [L, 2, T, H, D] or [S, L, 2, T, H, D] with T >= 8, got {list(kv.shape)}")
    kv = kv.float()
    S, L, _, T, H, D = kv.shape
    keys, values = kv[:, :, 0], kv[:, :, 1]  # [S, L, T, H, D]
    body_k, body_v = keys[:, :, 1:], values[:, :, 1:]  # without the sink
    rms = body_k.square().mean(2).sqrt()  # [S, L, H, D]
    ratio = rms / rms.median(-1, keepdim=True).values
    outlier = ratio > OUTLIER_RATIO
    jitter = body_k.std(2) / body_k.mean(2).abs().clamp_min(1e-30)
    ordinary_k = torch.log(rms[~outlier])
    v_rms = body_v.square().mean(2).sqrt()
    spreads = [float(ordinary_k.std()), float(torch.log(v_rms).std())]
    k_cols = body_k.permute(2, 0, 1, 3, 4).reshape(T - 1, -1)[:, (~outlier).reshape(-1)]
    v_cols = body_v.permute(2, 0, 1, 3, 4).reshape(T - 1, -1)
    unit = (body_v - body_v.mean(2, keepdim=True)) / body_v.std(2, keepdim=True).clamp_min(1e-30)
    k_norm, v_norm = keys.norm(dim=-1), values.norm(dim=-1)  # [S, L, T, H]
    v_median = v_norm[:, :, 1:].median(2).values
    ratios = ratio[outlier]
    quartiles = (float(ratios.quantile(0.25)), float(ratios.quantile(0.75))) if ratios.numel() else (1.0, 1.0)
    return KVStatistics(
        outlier_channels=float(outlier.sum(-1).float().mean()),
        outlier_ratio=quartiles,
        outlier_jitter=float(jitter[outlier].median()) if ratios.numel() else 0.0,
        channel_spread=sum(spreads) / 2,
        key_rho=float(_lag1(k_cols).median()),
        value_rho=float(_lag1(v_cols).median()),
        value_kurtosis=float(unit.pow(4).mean()),
        value_outlier_tokens=float((v_norm[:, :, 1:] > 3 * v_median.unsqueeze(2)).float().mean()),
        key_sink=float((k_norm[:, :, 0] / k_norm[:, :, 1:].median(2).values).median()),
        value_sink=float((v_norm[:, :, 0] / v_median).median()),
    )


def value_df_for(kurtosis: float) -> int:
    """Student-t degrees of freedom with this kurtosis (3 + 6 / (df - 4)), at least 5, at most 100."""
    if kurtosis <= 3.06:
        return 100
    return max(5, min(100, round(4 + 6 / (kurtosis - 3))))


def fit_spec(stats: KVStatistics, rope_base: float | None) -> SyntheticSpec:
    """The ``fidelity.SyntheticSpec`` whose KV shows ``stats`` (outlier channels rounded to whole RoPE pairs)."""
    pairs = math.ceil(stats.outlier_channels / 2 - 0.25)  # RoPE pairs: 1.6 channels a head -> one pair
    q25, q75 = stats.outlier_ratio
    low = max(1.0, q25 - (q75 - q25) / 2)  # the uniform draw whose quartiles are q25 and q75
    return SyntheticSpec(
        outlier_channels=2 * pairs,
        outlier_scale=(low, max(low, q75 + (q75 - q25) / 2)),
        outlier_jitter=min(0.99, stats.outlier_jitter),
        key_rho=min(0.99, max(0.0, stats.key_rho)),
        value_rho=min(0.99, max(0.0, stats.value_rho)),
        value_df=value_df_for(stats.value_kurtosis),
        value_outlier_tokens=stats.value_outlier_tokens,
        channel_spread=stats.channel_spread,
        sink_scale=max(1e-3, stats.value_sink),
        key_sink_scale=max(1e-3, stats.key_sink),
        rope_base=rope_base,
    )


def describe(stats: KVStatistics) -> str:
    """One line per statistic, for the codecs table's context."""
    return "; ".join(f"{name} {value:.3g}" if isinstance(value, float) else
                     f"{name} {value[0]:.3g}-{value[1]:.3g}" for name, value in vars(stats).items()
                     if not (isinstance(value, float) and math.isnan(value)))
