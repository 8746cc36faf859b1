"""Attention for a prefill that continues a loaded prefix, without paying for the masked kernel.

Why: a request whose first ``P`` tokens were loaded from the store prefills
its other ``N`` tokens against ``P + N`` keys. transformers' ``sdpa`` can
only say "causal" to PyTorch when queries and keys start together, so it
builds an explicit ``[N, P + N]`` mask, and PyTorch's CPU flash kernel then
computes every query-key block, the ones above the diagonal included. With
SmolLM2-135M on 2 cores, prefilling 1,587 tokens after 256 loaded ones took
4.2 s, against 3.9 s for all 1,843 tokens cold: the load made the request
slower.

Here the attention of such a prefill is computed in two parts: every query
against the ``P`` loaded keys, with no mask, and the queries against their own
``N`` keys, causal with the queries and keys starting together, which the
kernel computes as a triangle. The two results are merged by their
log-sum-exp, which is how the flash kernel itself combines its key blocks:
the work is ``N * P + N * N / 2`` instead of ``N * (P + N)``, and each
query row gets the same softmax over the same keys, up to float rounding
(fp32 and fp64 only: see ``MERGED_DTYPES``). Measured on SmolLM2's shapes,
1,587 queries after 256 loaded tokens: 33 ms a layer against 51 ms masked,
as fast as 1,843 tokens cold; the whole prefill 3.4 s against 3.8 s cold.

Only that case changes. The mask function marks it with PyTorch's
``causal_lower_right`` bias, and only when the mask would be plain causal
attention: no padding, no sliding window or chunked pattern, no packed
sequences, queries ending at the last key, on a CPU tensor. Every other
call (decode steps, cold prefills, padding, GPUs, 16-bit dtypes, dropout) goes to
transformers' own ``sdpa`` functions unchanged; and should the marked mask
reach any other attention code, PyTorch itself applies it correctly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.attention.bias import CausalBias, CausalVariant, causal_lower_right
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask

NAME = "kvstore_sdpa"
# The two parts are merged in these dtypes only. The 16-bit kernels round the
# softmax weights to 16 bits before multiplying by V, and each part's output
# again, so a merge cannot give the masked kernel's bits: bf16 logits moved
# by one ulp (0.03 at |logit| 4-8) in the tests. fp16/bf16 keep the masked path.
MERGED_DTYPES = frozenset({torch.float32, torch.float64})


def _flash_kernel() -> Any:
    """PyTorch's CPU flash attention op, which also returns each row's log-sum-exp; None where it is missing."""
    try:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    except (AttributeError, RuntimeError):
        return None


def continued_prefill_mask(*, batch_size: int, q_length: int, kv_length: int, q_offset: Any = 0,
                           kv_offset: Any = 0, mask_function: Any = causal_mask_function,
                           attention_mask: torch.Tensor | None = None, local_size: int | None = None,
                           allow_is_causal_skip: bool = True, device: torch.device | str = "cpu",
                           **kwargs: Any) -> Any:
    """transformers' ``sdpa_mask``, except a plain causal continued prefill on CPU, marked ``causal_lower_right``."""
    plain = (allow_is_causal_skip and mask_function is causal_mask_function and local_size is None
             and isinstance(q_offset, int) and isinstance(kv_offset, int) and kv_offset == 0
             and q_offset > 0 and q_offset + q_length == kv_length and q_length > 1
             and torch.device(device).type == "cpu" and not torch.compiler.is_compiling()
             and (attention_mask is None or bool(attention_mask.all())))
    if plain:
        return causal_lower_right(q_length, kv_length)
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                     local_size=local_size, allow_is_causal_skip=allow_is_causal_skip, device=device, **kwargs)


def continued_prefill_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                attention_mask: Any, dropout: float = 0.0, scaling: float | None = None,
                                **kwargs: Any) -> tuple[torch.Tensor, None]:
    """``sdpa_attention_forward``'s contract; in two parts when ``attention_mask`` is the lower-right causal mark."""
    q_length, kv_length = query.shape[2], key.shape[2]
    marked = (isinstance(attention_mask, CausalBias) and attention_mask.variant == CausalVariant.LOWER_RIGHT
              and attention_mask.seq_len_q == q_length and attention_mask.seq_len_kv == kv_length)
    plain_call = (dropout == 0.0 and kwargs.get("is_causal") is not False and kwargs.get("softcap") is None
                  and kwargs.get("sliding_window") is None and kwargs.get("position_bias") is None
                  and not kwargs.get("output_attentions", False))
    if not (marked and plain_call and query.device.type == "cpu" and query.dtype in MERGED_DTYPES):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    return _two_part_attention(query, key, value, scaling).transpose(1, 2).contiguous(), None


def _two_part_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        scale: float | None) -> torch.Tensor:
    """Causal attention of the last ``N`` positions over ``P + N`` keys: the loaded part and the triangle, merged."""
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    past = key.shape[2] - query.shape[2]
    flash = _flash_kernel()
    seen, seen_lse = flash(query, key[:, :, :past], value[:, :, :past], 0.0, False, scale=scale)[:2]
    own, own_lse = flash(query, key[:, :, past:], value[:, :, past:], 0.0, True, scale=scale)[:2]
    lse = torch.logaddexp(seen_lse, own_lse)
    merged = seen * (seen_lse - lse).exp().unsqueeze(-1) + own * (own_lse - lse).exp().unsqueeze(-1)
    return merged


def use_continued_attention(model: Any) -> bool:
    """Switch ``model`` from transformers' ``sdpa`` to this variant: True if it uses it (now or already), False
    (left as it is) for any other implementation.

    Registering under ``NAME`` is idempotent; the model's answers do not
    change, only the cost of a prefill after a loaded prefix on CPU.
    """
    implementation = getattr(model.config, "_attn_implementation", None)
    if implementation == NAME:  # switched by an earlier CachedModel
        return True
    if implementation != "sdpa" or _flash_kernel() is None:
        return False
    AttentionInterface.register(NAME, continued_prefill_attention)
    AttentionMaskInterface.register(NAME, continued_prefill_mask)
    model.set_attn_implementation(NAME)
    return model.config._attn_implementation == NAME
