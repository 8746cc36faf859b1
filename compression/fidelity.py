"""Fidelity harness: what a lossy KV-cache codec costs, measured three ways.

A codec is seen here only as ``roundtrip(kv) -> kv'``: a callable taking a
tensor in the canonical layout ``[L, P, T, H, D]`` (layers; kv parts, 2 = K
and V, 1 = an MLA-style latent; tokens; kv heads; head dim) and returning the
decoded tensor of the same shape and dtype. Nothing here depends on a codec.

1. ``synthetic_kv`` builds KV with the structure that makes real caches hard
   to quantize (key outlier channels of consistent sign, RoPE, heavy-tailed
   values, token correlation, an attention-sink token), and
   ``synthetic_queries`` builds queries that attend to it the way real heads
   do. ``kv_metrics`` / ``evaluate_codec`` report relative error of K and V
   and the error of the attention output.
2. ``ModelCheck`` runs a small random-initialised ``transformers`` Llama with
   the exact prefix cache and with the decoded one and compares next-token
   logits (KL, top-1 agreement).
3. ``quanto_roundtrip`` / ``quanto_bytes`` are the peer: transformers' own
   ``QuantizedCache(backend="quanto")``, driven on the same tensors.

``transformers`` and ``optimum-quanto`` are imported lazily, only by (2) and
(3); the rest needs torch alone. Everything is seeded through explicit
``torch.Generator`` objects (or a forked global RNG for model init), so equal
arguments give identical bytes and no caller's RNG state is touched.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "SyntheticSpec",
    "QuerySpec",
    "synthetic_kv",
    "synthetic_queries",
    "attention",
    "relative_error",
    "kv_metrics",
    "evaluate_codec",
    "ModelCheckSettings",
    "ModelCheck",
    "canonical_to_cache",
    "cache_argument",
    "QuantoSettings",
    "quanto_quantize",
    "quanto_roundtrip",
    "quanto_bytes",
    "quanto_ratio",
]

Roundtrip = Callable[[torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------- helpers


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _ar1(innov: torch.Tensor, rho: float, dim: int) -> torch.Tensor:
    """Stationary AR(1) along ``dim``: x_t = rho*x_{t-1} + sqrt(1-rho^2)*e_t, x_0 = e_0.

    Unit-variance innovations give unit-variance output and lag-k correlation
    rho**k. Computed as a Hillis-Steele scan: log2(T) vectorized steps, no
    Python loop over tokens.
    """
    x = innov.movedim(dim, 0).clone()
    x[1:] *= math.sqrt(1.0 - rho * rho)
    n, step = x.shape[0], 1
    while step < n:
        shifted = torch.zeros_like(x)
        shifted[step:] = x[:-step] * (rho ** step)
        x = x + shifted
        step *= 2
    return x.movedim(0, dim)


def _rope(x: torch.Tensor, base: float) -> torch.Tensor:
    """Llama RoPE on ``[..., T, H, D]`` at positions 0..T-1 (pairs channel i with i + D/2)."""
    t, d = x.shape[-3], x.shape[-1]
    inv_freq = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(t, dtype=torch.float64)[:, None] * inv_freq[None, :]
    ang = torch.cat([ang, ang], dim=-1)[:, None, :]  # [T, 1, D]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    rot = torch.cat([-x[..., d // 2:], x[..., : d // 2]], dim=-1)
    return x * cos + rot * sin


def relative_error(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Frobenius ``||ref - approx|| / ||ref||`` in fp32 (dimensionless; 0.01 = 1 %).

    0 if both are equal, inf if the reference is zero and the approximation is not.
    """
    ref, app = reference.float(), approx.float()
    num, den = torch.linalg.vector_norm(ref - app).item(), torch.linalg.vector_norm(ref).item()
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


# --------------------------------------------------------------------------- synthetic KV


@dataclass(frozen=True)
class SyntheticSpec:
    """Shape of the structure ``synthetic_kv`` plants (all magnitudes relative to a unit-RMS channel).

    outlier_channels: key channels per (layer, head) with large magnitude; even with RoPE
        (whole rotary pairs c, c + D/2, taken among the lowest-frequency pairs so the sign
        survives rotation, as in real post-RoPE keys).
    outlier_scale: (low, high) RMS of an outlier channel, drawn uniformly per channel.
    outlier_jitter: per-token std of an outlier channel as a fraction of its mean; small,
        so the sign is the same on every token.
    key_rho / value_rho: lag-1 correlation between neighbouring tokens (AR(1)).
    value_df: Student-t degrees of freedom of value innovations (heavy tails; integer >= 3).
    value_outlier_tokens / value_outlier_scale: fraction of tokens whose whole value vector
        is scaled up, and by how much.
    channel_spread: std of log per-channel scale of the ordinary channels.
    sink_scale: norm of the first (sink) token's key/value relative to the median token's,
        in a random direction of the ordinary channels (its key also keeps the outlier-channel
        means, so it is not trivially out-scored; its norm is ~sqrt(sink_scale^2 + 1)x).
    key_sink_scale: if set, the first token's key norm relative to the median token's (the
        direction as above); None keeps the construction above. Trained models differ:
        SmolLM2's first key is 0.3x the median norm, not several times it.
    rope_base: RoPE theta; None disables RoPE (latent caches never get it).
    """

    outlier_channels: int = 4
    outlier_scale: tuple[float, float] = (10.0, 20.0)
    outlier_jitter: float = 0.15
    key_rho: float = 0.8
    value_rho: float = 0.5
    value_df: int = 4
    value_outlier_tokens: float = 0.01
    value_outlier_scale: float = 6.0
    channel_spread: float = 0.2
    sink_scale: float = 3.0
    rope_base: float | None = 10000.0
    key_sink_scale: float | None = None

    def __post_init__(self) -> None:
        _check(self.outlier_channels >= 0, "outlier_channels must be >= 0")
        lo, hi = self.outlier_scale
        _check(0 < lo <= hi, "outlier_scale must be (low, high) with 0 < low <= high")
        _check(0 <= self.outlier_jitter < 1, "outlier_jitter must be in [0, 1)")
        for name in ("key_rho", "value_rho"):
            _check(0 <= getattr(self, name) < 1, f"{name} must be in [0, 1)")
        _check(isinstance(self.value_df, int) and self.value_df >= 3, "value_df must be an int >= 3")
        _check(0 <= self.value_outlier_tokens <= 1, "value_outlier_tokens must be in [0, 1]")
        _check(self.value_outlier_scale >= 1, "value_outlier_scale must be >= 1")
        _check(self.channel_spread >= 0, "channel_spread must be >= 0")
        _check(self.sink_scale > 0, "sink_scale must be > 0")
        _check(self.key_sink_scale is None or self.key_sink_scale > 0, "key_sink_scale must be > 0 or None")
        _check(self.rope_base is None or self.rope_base > 1, "rope_base must be > 1 or None")


def _outlier_mask(gen: torch.Generator, layers: int, heads: int, d: int, n: int, paired: bool) -> torch.Tensor:
    """Boolean ``[L, H, D]``: which channels are outliers (whole low-frequency rotary pairs if ``paired``)."""
    scores = torch.rand(layers, heads, d, generator=gen)  # same draw either way: streams stay aligned
    mask = torch.zeros(layers, heads, d, dtype=torch.bool)
    if n == 0:
        return mask
    if paired:
        pairs, half = n // 2, d // 2
        cand = min(half, max(pairs, d // 32))  # the lowest-frequency pairs only
        pick = scores[..., :cand].argsort(-1)[..., :pairs] + (half - cand)
        idx = torch.cat([pick, pick + half], dim=-1)
    else:
        idx = scores.argsort(-1)[..., :n]
    return mask.scatter(-1, idx, True)


# SyntheticSpec fitted (``kv_stats.fit_spec``) to SmolLM2-135M-Instruct's KV reading CPython's language
# reference (4 x 512 tokens, bf16; tests/compression/test_kv_stats.py measures it again). Against the default
# spec: fewer and smaller key outliers (1.4 channels a head at 4.8-9.2x the median, not 4 at 12-17x), a first
# token 0.3x the median norm instead of 3x, near-Gaussian values (kurtosis 3.6, not 24) with almost no outlier
# tokens, and less correlation along tokens (lag-1 0.48 keys, 0.19 values).
SMOLLM2_SPEC = SyntheticSpec(outlier_channels=2, outlier_scale=(2.66, 11.36), outlier_jitter=0.182, key_rho=0.485,
                             value_rho=0.191, value_df=14, value_outlier_tokens=1.6e-5, channel_spread=0.61,
                             sink_scale=0.25, key_sink_scale=0.326, rope_base=100000.0)


def _keys(gen: torch.Generator, L: int, T: int, H: int, D: int, spec: SyntheticSpec, paired: bool) -> torch.Tensor:
    """Keys (or a latent) ``[L, T, H, D]`` fp32: unit-RMS AR(1) channels plus consistent-sign outliers and a sink."""
    chan_scale = torch.exp(spec.channel_spread * torch.randn(L, 1, H, D, generator=gen))
    base = _ar1(torch.randn(L, T, H, D, generator=gen), spec.key_rho, dim=1)
    mask = _outlier_mask(gen, L, H, D, spec.outlier_channels, paired)[:, None]  # [L,1,H,D]
    lo, hi = spec.outlier_scale
    rms = lo + (hi - lo) * torch.rand(L, 1, H, D, generator=gen)
    sign = torch.where(torch.rand(L, 1, H, D, generator=gen) < 0.5, -1.0, 1.0)
    mean = sign * rms / math.sqrt(1 + spec.outlier_jitter ** 2)  # RMS over tokens == rms
    outlier = mean + spec.outlier_jitter * mean.abs() * base
    k = torch.where(mask, outlier, base * chan_scale)
    # Sink: outlier channels at their mean, ordinary channels in a fresh direction, large norm.
    typical = torch.linalg.vector_norm(k, dim=-1, keepdim=True).median(dim=1).values  # [L,H,1]
    direction = torch.where(mask[:, 0], 0.0, torch.randn(L, H, D, generator=gen))
    direction = direction / torch.linalg.vector_norm(direction, dim=-1, keepdim=True)
    k[:, 0] = torch.where(mask[:, 0], mean[:, 0], spec.sink_scale * typical * direction)
    if spec.key_sink_scale is not None:
        k[:, 0] *= spec.key_sink_scale * typical / torch.linalg.vector_norm(k[:, 0], dim=-1, keepdim=True)
    if paired and spec.rope_base is not None:
        k = _rope(k, spec.rope_base)
    return k


def _values(gen: torch.Generator, L: int, T: int, H: int, D: int, spec: SyntheticSpec) -> torch.Tensor:
    """Values ``[L, T, H, D]`` fp32: unit-variance Student-t AR(1) channels, outlier tokens, a sink."""
    df = spec.value_df
    z = torch.randn(L, T, H, D, generator=gen)
    chi2 = torch.randn(df, L, T, H, D, generator=gen).square().sum(0)
    t = z / torch.sqrt(chi2 / df) * math.sqrt((df - 2) / df)  # unit variance
    v = _ar1(t, spec.value_rho, dim=1) * torch.exp(spec.channel_spread * torch.randn(L, 1, H, D, generator=gen))
    hit = torch.rand(L, T, 1, 1, generator=gen) < spec.value_outlier_tokens
    hit[:, 0] = False
    v = torch.where(hit, v * spec.value_outlier_scale, v)
    typical = torch.linalg.vector_norm(v, dim=-1, keepdim=True).median(dim=1).values  # [L,H,1]
    direction = torch.randn(L, H, D, generator=gen)
    v[:, 0] = spec.sink_scale * typical * direction / torch.linalg.vector_norm(direction, dim=-1, keepdim=True)
    return v


def synthetic_kv(
    layers: int = 4,
    heads: int = 8,
    tokens: int = 512,
    head_dim: int = 128,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    kv_parts: int = 2,
    *,
    spec: SyntheticSpec | None = None,
) -> torch.Tensor:
    """A KV cache ``[L, P, T, H, D]`` of ``dtype`` with the structure real models show.

    Ordinary channels have RMS ~1 (a per-channel spread of ``spec.channel_spread``
    in log scale). Keys: ``spec.outlier_channels`` channels per (layer, head) with
    RMS 10-20x and one sign on every token, RoPE applied (positions 0..T-1).
    Values: heavy-tailed (Student-t), ~1 % outlier tokens. Both AR(1)-correlated
    along tokens; token 0 is an attention sink (several times the typical norm,
    a different direction). ``kv_parts=1`` gives an MLA-style latent: the key
    recipe without RoPE and without a V part. Same arguments -> identical bytes.
    """
    spec = spec or SyntheticSpec()
    for name, value in (("layers", layers), ("heads", heads), ("tokens", tokens), ("head_dim", head_dim)):
        _check(isinstance(value, int) and value >= 1, f"{name} must be a positive int, got {value!r}")
    _check(kv_parts in (1, 2), f"kv_parts must be 1 or 2, got {kv_parts!r}")
    _check(dtype.is_floating_point, f"dtype must be floating point, got {dtype}")
    paired = kv_parts == 2  # rotary-pair structure (RoPE itself only if spec.rope_base is set)
    if paired:
        _check(head_dim % 2 == 0, "head_dim must be even (rotary pairs)")
        _check(spec.outlier_channels % 2 == 0, "outlier_channels must be even with kv_parts=2 (whole rotary pairs)")
    _check(spec.outlier_channels <= head_dim, "outlier_channels must be <= head_dim")
    gen = torch.Generator().manual_seed(seed)
    k = _keys(gen, layers, tokens, heads, head_dim, spec, paired)
    parts = [k] if kv_parts == 1 else [k, _values(gen, layers, tokens, heads, head_dim, spec)]
    return torch.stack(parts, dim=1).to(dtype)


# --------------------------------------------------------------------------- queries and attention


@dataclass(frozen=True)
class QuerySpec:
    """How ``synthetic_queries`` aims its queries.

    outlier_gain: weight of the consistent-sign component a query puts on each key channel,
        proportional to (channel RMS / median channel RMS - 1); at 0.3 the outlier channels
        carry most of the variance of q.k across tokens, as in real heads.
    diffuse_logit_std: std across tokens of q.k/sqrt(D) for diffuse queries (nats).
    peak_mass: softmax mass a peaked query puts on its focus tokens (found by bisection).
    focus_tokens: how many (non-sink) keys a peaked query is aimed at.
    max_logit_range: cap on (top - median) logit of a peaked query, nats; a query whose
        focus keys nearly tie with others stops there instead of growing without bound.
    """

    outlier_gain: float = 0.3
    diffuse_logit_std: float = 1.0
    peak_mass: float = 0.8
    focus_tokens: int = 1
    max_logit_range: float = 25.0

    def __post_init__(self) -> None:
        _check(self.outlier_gain >= 0, "outlier_gain must be >= 0")
        _check(self.diffuse_logit_std > 0, "diffuse_logit_std must be > 0")
        _check(0 < self.peak_mass < 1, "peak_mass must be in (0, 1)")
        _check(isinstance(self.focus_tokens, int) and self.focus_tokens >= 1, "focus_tokens must be an int >= 1")
        _check(self.max_logit_range > 0, "max_logit_range must be > 0")


def _kv_heads(kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``(K, V)`` as ``[L, H, T, D]``; a latent (P=1) serves as both."""
    _check(kv.dim() == 5 and kv.shape[1] in (1, 2), f"expected [L, P, T, H, D] with P in (1, 2), got {tuple(kv.shape)}")
    k = kv[:, 0].float().permute(0, 2, 1, 3)
    v = k if kv.shape[1] == 1 else kv[:, 1].float().permute(0, 2, 1, 3)
    return k, v


def synthetic_queries(
    kv: torch.Tensor,
    count: int = 64,
    seed: int = 1,
    peaked: bool = False,
    *,
    spec: QuerySpec | None = None,
) -> torch.Tensor:
    """Queries ``[L, H, Q, D]`` fp32 (one set per layer and kv head) for the keys in ``kv``.

    Queries are in the keys' own (post-RoPE) frame, one per kv head (a GQA group
    would share its kv head's statistics anyway). Diffuse: Gaussian plus a
    consistent-sign component on the key outlier channels (read off ``kv``),
    scaled so the logits q.k/sqrt(D) have std ``spec.diffuse_logit_std`` across
    non-sink tokens: attention spreads over many tokens and is dominated by the
    outlier channels. Peaked: aimed at ``spec.focus_tokens`` random non-sink keys
    (their deviation from the mean key, made orthogonal to the sink's), scaled by
    bisection so the keys it ranks first take ``spec.peak_mass`` of the softmax
    (less if that needs a logit range above ``spec.max_logit_range``). Token 0 is never aimed
    at; diffuse queries leave it a share that varies widely from query to query.
    """
    spec = spec or QuerySpec()
    _check(isinstance(count, int) and count >= 1, f"count must be a positive int, got {count!r}")
    k, _ = _kv_heads(kv)
    L, H, T, D = k.shape
    body = k[:, :, 1:] if T > 1 else k
    mean = body.mean(dim=2, keepdim=True)  # [L,H,1,D]
    gen = torch.Generator().manual_seed(seed)
    scale = 1.0 / math.sqrt(D)
    if not peaked:
        rms = body.square().mean(dim=2, keepdim=True).sqrt()
        rel = rms / rms.median(dim=-1, keepdim=True).values.clamp_min(1e-12)
        q = torch.randn(L, H, count, D, generator=gen) + spec.outlier_gain * mean.sign() * (rel - 1).clamp_min(0)
        std = (torch.einsum("lhqd,lhtd->lhqt", q, body) * scale).std(dim=-1, keepdim=True)
        return q * (spec.diffuse_logit_std / std.clamp_min(1e-12))
    n = min(spec.focus_tokens, body.shape[2])
    pick = torch.rand(L, H, count, body.shape[2], generator=gen).argsort(-1)[..., :n] + (1 if T > 1 else 0)
    focus = torch.gather(k, 2, pick.reshape(L, H, count * n, 1).expand(-1, -1, -1, D)).reshape(L, H, count, n, D)
    u = (focus - mean[:, :, :, None]).sum(dim=3)
    if T > 1:  # orthogonal to the sink's deviation, so the sink cannot out-score the focus keys
        sink = k[:, :, :1] - mean
        sink = sink / torch.linalg.vector_norm(sink, dim=-1, keepdim=True).clamp_min(1e-12)
        u = u - (u * sink).sum(-1, keepdim=True) * sink
    u = u / torch.linalg.vector_norm(u, dim=-1, keepdim=True).clamp_min(1e-12)
    logits = torch.einsum("lhqd,lhtd->lhqt", u, k) * scale
    # Focus on the keys u really ranks first (the picked ones unless a correlated neighbour
    # edges one out): the mass on them then rises monotonically with the scale.
    top = (logits[..., 1:] if T > 1 else logits).topk(n, dim=-1).indices + (1 if T > 1 else 0)
    onehot = torch.zeros(L, H, count, T, dtype=torch.bool).scatter(-1, top, True)
    # Bisect log(scale), capped so the top logit sits at most max_logit_range above the median:
    # a near-tie would otherwise be resolved by an enormous, noise-amplifying scale.
    spread = logits.amax(-1, keepdim=True) - logits.median(-1, keepdim=True).values
    hi = torch.log(spec.max_logit_range / spread.clamp_min(1e-12))
    lo = hi - 20.0
    for _ in range(40):
        mid = (lo + hi) / 2
        mass = torch.where(onehot, torch.softmax(logits * mid.exp(), dim=-1), 0.0).sum(-1, keepdim=True)
        low = mass < spec.peak_mass
        lo, hi = torch.where(low, mid, lo), torch.where(low, hi, mid)
    return u * hi.exp()


def attention(kv: torch.Tensor, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax(q K^T / sqrt(D)) V`` in fp32, no mask (queries sit after every cached token).

    Returns ``(output [L, H, Q, D], weights [L, H, Q, T])``. A latent cache (P=1)
    is used as both K and V, as MLA's absorbed attention does.
    """
    k, v = _kv_heads(kv)
    _check(queries.dim() == 4 and queries.shape[:2] == k.shape[:2] and queries.shape[-1] == k.shape[-1],
           f"queries {tuple(queries.shape)} do not fit keys [L, H, T, D] = {tuple(k.shape)}")
    w = torch.softmax(torch.einsum("lhqd,lhtd->lhqt", queries.float(), k) / math.sqrt(k.shape[-1]), dim=-1)
    return torch.einsum("lhqt,lhtd->lhqd", w, v), w


def kv_metrics(
    original: torch.Tensor,
    decoded: torch.Tensor,
    seed: int = 1,
    *,
    query_count: int = 64,
    query_spec: QuerySpec | None = None,
) -> dict[str, float]:
    """Error a codec introduced, as plain floats (dimensionless ratios; 0 = exact).

    k_rel_err / v_rel_err: Frobenius relative error of K and V over the whole tensor
    (for a latent, P=1, both report the latent's error: it plays both roles).
    attn_cos_{diffuse,peaked}: mean cosine between exact and decoded attention outputs
    over (layer, head, query); attn_cos_min: the worst one over both query sets;
    attn_rel_err_{diffuse,peaked}: Frobenius relative error of all outputs of that set.
    Queries come from ``synthetic_queries(original, query_count, seed, ...)``, so both
    caches are probed with the same queries.
    """
    _check(original.shape == decoded.shape, f"decoded shape {tuple(decoded.shape)} != {tuple(original.shape)}")
    k0, v0 = _kv_heads(original)
    k1, v1 = _kv_heads(decoded)
    out: dict[str, float] = {"k_rel_err": relative_error(k0, k1), "v_rel_err": relative_error(v0, v1)}
    cos_min = math.inf
    for name, peaked in (("diffuse", False), ("peaked", True)):
        q = synthetic_queries(original, query_count, seed, peaked, spec=query_spec)
        a, _ = attention(original, q)
        b, _ = attention(decoded, q)
        cos = torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12)
        out[f"attn_cos_{name}"] = cos.mean().item()
        out[f"attn_rel_err_{name}"] = relative_error(a, b)
        cos_min = min(cos_min, cos.min().item())
    out["attn_cos_min"] = cos_min
    return out


def _decode(roundtrip: Roundtrip, kv: torch.Tensor) -> torch.Tensor:
    decoded = roundtrip(kv)
    _check(isinstance(decoded, torch.Tensor) and decoded.shape == kv.shape and decoded.dtype == kv.dtype,
           f"roundtrip must return a tensor of shape {tuple(kv.shape)} and dtype {kv.dtype}, got "
           f"{getattr(decoded, 'shape', type(decoded))} {getattr(decoded, 'dtype', '')}")
    return decoded


def evaluate_codec(
    roundtrip: Roundtrip,
    *,
    query_seed: int = 1,
    query_count: int = 64,
    **generator_kwargs: Any,
) -> dict[str, float]:
    """``kv_metrics`` of ``roundtrip`` on ``synthetic_kv(**generator_kwargs)``."""
    kv = synthetic_kv(**generator_kwargs)
    return kv_metrics(kv, _decode(roundtrip, kv), query_seed, query_count=query_count)


# --------------------------------------------------------------------------- model check


@dataclass(frozen=True)
class ModelCheckSettings:
    """A small random Llama (GQA) and the token sequences it is probed with.

    outlier_pairs: rotary pairs (channels c and c + head_dim/2, the lowest-frequency ones)
        whose k_proj rows are multiplied by ``outlier_scale`` and q_proj rows by
        ``query_outlier_scale`` in every head: the keys get ~15x outlier channels and those
        channels dominate q.k. The query gain is lower than the key gain on purpose: at 15x
        on both, q.k on those channels grows 225x, attention turns near one-hot and the random
        net chaotic (bf16 storage alone then flips ~3 % of top-1 tokens); at 4x the bf16 floor
        is clean (top-1 1.0, KL ~2e-5 nats) while 1 % KV noise already shows (top-1 ~0.96).
    logit_scale: multiplies the final norm's weight; random init gives near-uniform next-token
        distributions (logit std ~0.3); at 8x the logit std is ~2.5 and the top token holds ~0.2
        of the mass on average, enough for KL to mean something (top-1 agreement is unaffected:
        it is invariant to this scale).
    kv_dtype: dtype the prefix KV is stored in and handed to the roundtrip; the reference is
        the cache after the same cast, so an identity roundtrip is exact.
    """

    layers: int = 4
    hidden: int = 256
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 64
    intermediate: int = 512
    vocab: int = 1000
    sequences: int = 4
    prefix_tokens: int = 128
    continuation_tokens: int = 32
    outlier_pairs: int = 2
    outlier_scale: float = 15.0
    query_outlier_scale: float = 4.0
    logit_scale: float = 8.0
    rope_theta: float = 10000.0
    kv_dtype: torch.dtype = torch.bfloat16
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate", "vocab",
                     "sequences", "prefix_tokens", "continuation_tokens"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value >= 1, f"{name} must be a positive int, got {value!r}")
        _check(self.heads % self.kv_heads == 0, "heads must be a multiple of kv_heads")
        _check(self.head_dim % 2 == 0, "head_dim must be even (RoPE)")
        _check(0 <= self.outlier_pairs <= self.head_dim // 2, "outlier_pairs must be in [0, head_dim/2]")
        for name in ("outlier_scale", "query_outlier_scale", "logit_scale", "rope_theta"):
            _check(getattr(self, name) > 0, f"{name} must be > 0")
        _check(self.kv_dtype.is_floating_point, "kv_dtype must be floating point")


class ModelCheck:
    """Next-token logits of a tiny Llama with the exact vs. the round-tripped prefix cache.

    Built once (model, token sequences, prefix cache, reference logits), then
    ``run(roundtrip)`` costs one continuation forward plus the roundtrips.
    """

    def __init__(self, settings: ModelCheckSettings | None = None) -> None:
        from transformers import LlamaConfig, LlamaForCausalLM

        s = self.settings = settings or ModelCheckSettings()
        self.config = LlamaConfig(
            vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
            num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
            head_dim=s.head_dim, max_position_embeddings=s.prefix_tokens + s.continuation_tokens,
            rope_theta=s.rope_theta, tie_word_embeddings=False,
        )
        self.config._attn_implementation = "sdpa"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s.seed)
            model = LlamaForCausalLM(self.config)
        model = model.float().eval()
        half = s.head_dim // 2
        rows = torch.arange(half - s.outlier_pairs, half)  # lowest-frequency rotary pairs
        chans = torch.cat([rows, rows + half])
        with torch.no_grad():
            for layer in model.model.layers:
                attn = layer.self_attn
                for proj, nheads, gain in ((attn.q_proj, s.heads, s.query_outlier_scale),
                                          (attn.k_proj, s.kv_heads, s.outlier_scale)):
                    idx = (torch.arange(nheads)[:, None] * s.head_dim + chans[None, :]).reshape(-1)
                    proj.weight[idx] *= gain
            model.model.norm.weight.mul_(s.logit_scale)
        self.model = model
        gen = torch.Generator().manual_seed(s.seed + 1)
        ids = torch.randint(s.vocab, (s.sequences, s.prefix_tokens + s.continuation_tokens), generator=gen)
        self.prefix_ids, self.continuation_ids = ids[:, : s.prefix_tokens], ids[:, s.prefix_tokens:]
        with torch.inference_mode():
            cache = model(input_ids=self.prefix_ids, use_cache=True).past_key_values
        self.prefix_kv = self.cache_to_canonical(cache)  # [S, L, 2, T, H, D] fp32
        self.stored_kv = self.prefix_kv.to(s.kv_dtype)
        self.reference_logits = self._continue(self.stored_kv)
        exact = self._continue(self.prefix_kv)
        self.storage_metrics = {f"storage_{k}": v for k, v in self._compare(exact, self.reference_logits).items()}

    @staticmethod
    def cache_to_canonical(cache: Any) -> torch.Tensor:
        """A transformers ``DynamicCache`` -> fp32 ``[batch, L, 2, T, H, D]`` (layer.keys is ``[B, H, T, D]``)."""
        k = torch.stack([layer.keys for layer in cache.layers], dim=1)
        v = torch.stack([layer.values for layer in cache.layers], dim=1)
        return torch.stack([k, v], dim=2).permute(0, 1, 2, 4, 3, 5).float()

    def canonical_to_cache(self, kv: torch.Tensor) -> Any:
        """fp32 ``[batch, L, 2, T, H, D]`` -> a fresh ``DynamicCache`` holding it."""
        return canonical_to_cache(kv, self.config)

    def _continue(self, kv: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            out = self.model(input_ids=self.continuation_ids, **{cache_argument(self.model): self.canonical_to_cache(kv)},
                             use_cache=True)
        return out.logits.float()

    @staticmethod
    def _compare(ref: torch.Tensor, test: torch.Tensor) -> dict[str, float]:
        lp, lq = torch.log_softmax(ref, -1), torch.log_softmax(test, -1)
        kl = (lp.exp() * (lp - lq)).sum(-1)
        return {
            "kl_mean": kl.mean().item(),
            "kl_max": kl.max().item(),
            "top1_agree": (ref.argmax(-1) == test.argmax(-1)).float().mean().item(),
            "max_abs_logit_diff": (ref - test).abs().max().item(),
        }

    def run(self, roundtrip: Roundtrip) -> dict[str, float]:
        """Compare logits at every continuation position (sequences x continuation_tokens of them).

        kl_mean / kl_max: KL(reference || decoded) of the next-token distribution, nats.
        top1_agree: fraction of positions with the same argmax. max_abs_logit_diff: logits.
        kv_rel_err: Frobenius relative error of the decoded prefix KV. storage_*: the same
        comparison for fp32 cache vs. the ``kv_dtype`` cache (the floor before any codec).
        """
        decoded = torch.stack([_decode(roundtrip, kv) for kv in self.stored_kv])
        logits = self._continue(decoded)
        out = self._compare(self.reference_logits, logits)
        out["kv_rel_err"] = relative_error(self.stored_kv, decoded)
        return {**out, **self.storage_metrics}


def cache_argument(model: Any) -> str:
    """The name under which ``model``'s forward takes a KV cache: ``cache`` from transformers 5.2x (where
    ``past_key_values`` still works but warns), ``past_key_values`` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def canonical_to_cache(kv: torch.Tensor, config: Any) -> Any:
    """fp32 ``[batch, L, 2, T, H, D]`` -> a fresh transformers ``DynamicCache`` holding it, for ``config``."""
    from transformers import DynamicCache

    kv = kv.float().permute(0, 1, 2, 4, 3, 5)  # [B, L, 2, H, T, D]
    data = [(kv[:, i, 0].contiguous(), kv[:, i, 1].contiguous()) for i in range(kv.shape[1])]
    return DynamicCache(data, config=config)


# --------------------------------------------------------------------------- quanto peer


@dataclass(frozen=True)
class QuantoSettings:
    """transformers' ``QuantizedCache(backend="quanto")`` options, with its defaults.

    With ``axis=0`` on transformers' ``[B, H, T, D]`` states, quanto groups ``q_group_size``
    consecutive elements of the flattened tensor, i.e. along head_dim within one token and
    head: keys and values are both quantized per token. ``axis=-1`` groups along tokens
    within one channel (KIVI-style for keys; needs H*T divisible by the group size).
    """

    bits: int = 4
    q_group_size: int = 64
    axis_key: int = 0
    axis_value: int = 0

    def __post_init__(self) -> None:
        _check(self.bits in (2, 4), f"quanto bits must be 2 or 4, got {self.bits!r}")
        _check(self.axis_key in (0, -1) and self.axis_value in (0, -1), "axes must be 0 or -1")
        _check(isinstance(self.q_group_size, int) and self.q_group_size >= 1, "q_group_size must be a positive int")


@dataclass(frozen=True)
class QuantoResult:
    """Dequantized ``[L, P, T, H, D]`` tensor and the bytes quanto really stores for it."""

    decoded: torch.Tensor
    stored_bytes: int


def _qtensor_bytes(qt: Any) -> int:
    """Bytes of a quanto ``WeightQBitsTensor``: packed integer data + scale + shift."""
    data = qt._data
    raw = getattr(data, "_data", data)  # PackedTensor wraps the packed uint8 storage
    return sum(t.nbytes for t in (raw, qt._scale, qt._shift))


def quanto_quantize(kv: torch.Tensor, settings: QuantoSettings | None = None) -> QuantoResult:
    """Quantize ``kv`` with transformers' quanto ``QuantizedCache`` and read back what it stores.

    One cache layer per model layer is fed the whole prefix in one ``update``, which
    quantizes all of it: the full-precision residual window (``residual_length``, 128 by
    default) only collects tokens appended after the first update, so here it is empty
    and every byte counted is a quantized one. A latent (P=1) goes in as the keys.
    """
    from transformers import LlamaConfig, QuantizedCache

    s = settings or QuantoSettings()
    _check(kv.dim() == 5 and kv.shape[1] in (1, 2), f"expected [L, P, T, H, D], got {tuple(kv.shape)}")
    L, P, T, H, D = kv.shape
    config = LlamaConfig(num_hidden_layers=L, num_attention_heads=H, num_key_value_heads=H, head_dim=D,
                         hidden_size=H * D, intermediate_size=1, vocab_size=1, bos_token_id=None,
                         eos_token_id=None, pad_token_id=None)
    cache = QuantizedCache(backend="quanto", config=config, nbits=s.bits, axis_key=s.axis_key,
                           axis_value=s.axis_value, q_group_size=s.q_group_size)
    heads = kv.permute(0, 1, 3, 2, 4)  # [L, P, H, T, D]
    parts: list[list[torch.Tensor]] = [[] for _ in range(P)]
    stored = 0
    for i in range(L):
        with torch.no_grad():
            cache.update(heads[i, 0][None].contiguous(), heads[i, P - 1][None].contiguous(), i)
        layer = cache.layers[i]
        quantized = [layer._quantized_keys] + ([layer._quantized_values] if P == 2 else [])
        for p, qt in enumerate(quantized):
            parts[p].append(qt.dequantize()[0])
            stored += _qtensor_bytes(qt)
    decoded = torch.stack([torch.stack(p) for p in parts], dim=1).permute(0, 1, 3, 2, 4).to(kv.dtype)
    return QuantoResult(decoded=decoded.contiguous(), stored_bytes=stored)


def quanto_roundtrip(bits: int = 4, *, q_group_size: int = 64, axis_key: int = 0, axis_value: int = 0) -> Roundtrip:
    """A ``roundtrip`` callable: quantize with transformers' quanto cache, dequantize."""
    settings = QuantoSettings(bits, q_group_size, axis_key, axis_value)
    return lambda kv: quanto_quantize(kv, settings).decoded


def quanto_bytes(kv: torch.Tensor, bits: int = 4, *, q_group_size: int = 64, axis_key: int = 0,
                 axis_value: int = 0) -> int:
    """Bytes quanto stores for ``kv`` (packed ints + scales + shifts in kv's dtype), measured on its tensors."""
    return quanto_quantize(kv, QuantoSettings(bits, q_group_size, axis_key, axis_value)).stored_bytes


def quanto_ratio(kv: torch.Tensor, bits: int = 4, **kwargs: Any) -> float:
    """Compression ratio vs. 16-bit storage: ``2 * kv.numel() / quanto_bytes``."""
    return 2 * kv.numel() / quanto_bytes(kv, bits, **kwargs)
