"""The largest error each lossy codec promises, per element: what tests and the GPU check hold decodes to.

``int8``: half a step of the vector's ``absmax / 127`` scale; ``kivi``:
half a step of the element's group (keys per channel over ``group`` tokens,
values per token over ``group`` channels; the last ``residual`` tokens are
kept exactly), each plus the dtype's rounding of the stored scale and
minimum. The rotation codecs (``rq*``) promise a relative RMS error instead
(``RQ_REL_RMS``).
"""

from __future__ import annotations

import torch

# Lloyd-Max distortion of a unit-variance Gaussian is 0.0095 / 0.0345 / 0.1175 at 4 / 3 / 2 bits:
# relative RMS error 0.097 / 0.186 / 0.343; rq's codebook is fitted to the exact law of the coordinate.
RQ_REL_RMS = {4: 0.11, 3: 0.20, 2: 0.37}


def int8_bound(x: torch.Tensor) -> torch.Tensor:
    """Per element: half a step of its vector's absmax / 127 scale (plus the dtype's rounding)."""
    eps = torch.finfo(x.dtype).eps
    absmax = x.float().abs().amax(-1, keepdim=True)
    return (absmax / 127 * (1 + 2 * eps) / 2 + absmax * 2 * eps + 1e-30).expand(x.shape)


def kivi_bound(x: torch.Tensor, bits: int, group: int = 32, residual: int = 0, value_bits: int = 0) -> torch.Tensor:
    """Per element, the largest error KIVI may make: half a step of its group (plus the dtype's rounding);
    ``value_bits`` (0: ``bits``) for the values."""
    x5 = (x if x.dim() == 5 else x.unsqueeze(0)).float()
    _, parts, tokens, _, dim = x5.shape
    eps = torch.finfo(x.dtype).eps
    tq = max(0, tokens - residual)
    bound = torch.zeros_like(x5)

    def half_step(lo: torch.Tensor, hi: torch.Tensor, width: int = bits) -> torch.Tensor:
        # the stored minimum rounds down and the scale up by at most a relative eps each
        span = hi - lo + lo.abs() * 2 * eps
        return span / ((1 << width) - 1) * (1 + 2 * eps) / 2 + (lo.abs() + hi.abs()) * 2 * eps + 1e-30

    if tq:
        gk = max(1, min(group, tq))
        for start in range(0, tq, gk):
            g = x5[:, 0, start:min(start + gk, tq)]  # keys: per channel over gk tokens
            bound[:, 0, start:start + g.shape[1]] = half_step(g.amin(1, keepdim=True), g.amax(1, keepdim=True))
        if parts > 1:
            gv = min(group, dim)
            for start in range(0, dim, gv):
                g = x5[:, 1:, :tq, :, start:start + gv]  # values: per token over gv channels
                bound[:, 1:, :tq, :, start:start + gv] = half_step(g.amin(-1, keepdim=True),
                                                                   g.amax(-1, keepdim=True), value_bits or bits)
    return bound if x.dim() == 5 else bound[0]


def ec_bound(x: torch.Tensor, key_step: int = 250, value_step: int = 500, key_power: int = 500,
             sinks: int = 1, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per element, the largest error ``ec`` may make (see ``kvstore.compression.entropy``).

    Keys: half the channel's step, the step taken from the spread around the
    mean and the largest deviation, each widened by the stored mean's
    rounding. Values: half the vector's step, ``max(value_step / 1000 * rms,
    absmax / 127)``. The first
    ``sinks`` tokens: 0. Plus the rounding of ``dtype`` (the stored one,
    default ``x``'s) of the step and of the result.
    """
    x5 = (x if x.dim() == 5 else x.unsqueeze(0)).float()
    _, parts, tokens, _, dim = x5.shape
    eps = torch.finfo(dtype or x.dtype).eps
    s = min(sinks, tokens)
    bound = torch.zeros_like(x5)
    if s == tokens:
        return bound if x.dim() == 5 else bound[0]
    keys = x5[:, 0, s:]
    mean = keys.mean(1, keepdim=True)
    slack = mean.abs() * 2 * eps
    dev = keys - mean
    spread = dev.square().mean(1, keepdim=True).sqrt() + slack
    head = spread.square().mean(-1, keepdim=True).sqrt()
    power = key_power / 1000
    step = torch.maximum(key_step / 1000 * spread.pow(power) * head.pow(1 - power),
                         (dev.abs().amax(1, keepdim=True) + slack) / 127)
    bound[:, 0, s:] = (step * (1 + 4 * eps) / 2 + slack + keys.abs() * 2 * eps + 1e-6 * spread.amax()
                       ).expand(keys.shape)
    if parts > 1:
        values = x5[:, 1:, s:]
        rms = values.square().mean(-1, keepdim=True).sqrt()
        step = torch.maximum(value_step / 1000 * rms, values.abs().amax(-1, keepdim=True) / 127) * (1 + 4 * eps)
        bound[:, 1:, s:] = (step / 2 + values.abs() * 2 * eps + rms * 1e-6 + 1e-30).expand(values.shape)
    return bound if x.dim() == 5 else bound[0]
