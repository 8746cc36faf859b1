"""What a transformers model or call must be for its KV to be keyed by token ids alone, checked before any tier.

Each check refuses, with a ``ValueError``, a model or a call whose KV the
keys (model, layout, salt, token ids) do not determine: served to another
request, such KV was wrong bytes under a right key. Found in audits, each
with the error it caused (last logits off by this much on a hit):

- an encoder-decoder (BART: the encoder ran on the uncached suffix only, 1.08);
- RoPE scaled by the sequence's length (Phi-3 ``longrope`` 1.72, ``dynamic`` NTK 0.24);
- a model in training mode with dropout (0.026);
- a call under ``torch.autocast`` (an fp32 model's KV at bf16 precision, 0.019);
- ``generate`` without an attention mask over a prompt holding the pad token (it masks them, 0.66);
- ``save`` of a cache whose layers are not plain per-token K and V (sliding windows keep
  their last tokens, quantized caches their newest residual: 2.59 and 3.65).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer

log = logging.getLogger(__name__)

# RoPE whose frequencies follow the length of the call: the same position gets other KV in a longer prompt.
LENGTH_DEPENDENT_ROPE = frozenset({"longrope", "dynamic"})
_DROPOUT_FIELDS = ("dropout", "pdrop")  # config fields of dropout probabilities (attention_dropout, resid_pdrop...)
_HEAD_FIELDS = ("classifier", "summary")  # dropouts of task heads (sequence classification), not of the LM


def _rope_types(config: Any) -> set[str]:
    """Every RoPE type ``config`` names (one dict, or one per layer type)."""
    found: set[str] = set()
    for name in ("rope_parameters", "rope_scaling"):
        value = getattr(config, name, None)
        values = [value] if isinstance(value, dict) and not all(isinstance(v, dict) for v in value.values()) \
            else list(value.values()) if isinstance(value, dict) else []
        for params in values:
            if isinstance(params, dict):
                found.add(str(params.get("rope_type") or params.get("type") or "default"))
    return found


def check_model(model: Any, text_config: Any) -> None:
    """Refuse a model whose KV is not a function of the token ids and the weights (see the module docstring)."""
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"model: expected a decoder-only causal LM, got an encoder-decoder "
                         f"({type(model).__name__}): its cross-attention depends on the encoder input")
    scaled = sorted(_rope_types(text_config) & LENGTH_DEPENDENT_ROPE)
    if scaled:
        raise ValueError(f"config.rope_parameters: expected RoPE that does not depend on the prompt's length, got "
                         f"rope_type {scaled[0]!r} (its frequencies change with the sequence length, so a stored "
                         f"prefix's KV differs from the same tokens' in a longer prompt)")
    if any(p.is_inference() for p in model.parameters()):
        log.warning("model: parameters made under torch.inference_mode() keep no version counter: an in-place "
                    "update of them is not seen; call refresh_weights() after one, or name the model (model_id)")


def dropout_of(model: Any, config: Any) -> str | None:
    """A dropout ``model`` applies in training mode, if any (a module or a config probability above 0)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Dropout) and module.p > 0:
            return f"{name or 'model'}: p={module.p}"
    settings = config.to_dict() if hasattr(config, "to_dict") else {}
    for name, value in settings.items():
        if any(part in name for part in _DROPOUT_FIELDS) and not any(part in name for part in _HEAD_FIELDS) and \
                isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return f"config.{name}={value}"
    return None


def check_call(model: Any, ids: torch.Tensor, dropout: str | None, device: torch.device) -> None:
    """Refuse a call whose KV would not be what the ids key: training-mode dropout, autocast, ids past the
    vocabulary (an ``IndexError`` from the embedding, or a device-side assert on CUDA)."""
    if model.training and dropout is not None:
        raise ValueError(f"model: expected eval mode (call model.eval()): in training mode its dropout ({dropout}) "
                         f"makes KV the token ids do not key, got model.training=True")
    if torch.is_autocast_enabled(device.type):
        raise ValueError(f"torch.autocast: expected none on {device.type}: its KV has the autocast dtype's "
                         f"precision under the keys of the model's dtype; call outside autocast")
    embeddings = model.get_input_embeddings() if callable(getattr(model, "get_input_embeddings", None)) else None
    vocab = getattr(embeddings, "num_embeddings", None)
    if isinstance(vocab, int) and ids.numel() and int(ids.max()) >= vocab:
        raise ValueError(f"input_ids: expected ids below the vocabulary size {vocab}, got {int(ids.max())}")


def _ids_of(value: Any) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, torch.Tensor):
        return {int(v) for v in value.reshape(-1).tolist()}
    return {int(v) for v in value} if isinstance(value, (list, tuple)) else {int(value)}


def check_no_pad(ids: torch.Tensor, generation_config: Any) -> None:
    """``generate`` given no attention mask masks a prompt's pad tokens when the pad id is not also an
    end-of-sequence id (a mask the ids do not key): refuse such a prompt."""
    pads = _ids_of(getattr(generation_config, "pad_token_id", None))
    eos = _ids_of(getattr(generation_config, "eos_token_id", None))
    for pad in pads - eos:
        where = (ids == pad).nonzero()
        if len(where):
            raise ValueError(f"input_ids: expected no pad_token_id={pad} (generate masks it, so its KV is not the "
                             f"ids'; padding is not supported), got it at (row, position) "
                             f"{[tuple(p) for p in where[:4].tolist()]}")


def check_saved_cache(cache: Any, ids: torch.Tensor, lengths: Sequence[int]) -> None:
    """Refuse a ``save`` whose cache cannot give the KV of each row's first ``n`` tokens for each ``n`` in
    ``lengths``: only plain per-token layers (``DynamicLayer``) hold every token from position 0."""
    for n in lengths:
        if isinstance(n, bool) or not isinstance(n, int) or not 0 < n <= ids.shape[1]:
            raise ValueError(f"lengths: expected token counts in 1 .. {ids.shape[1]} (the ids given), got {n!r}")
    layers = getattr(cache, "layers", None)
    if not layers:
        raise ValueError(f"cache: expected a DynamicCache holding the ids' KV, got {type(cache).__name__}")
    kinds = sorted({type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer})
    if kinds:
        raise ValueError(f"cache: expected plain DynamicLayer layers (every token's K and V from position 0), got "
                         f"{kinds}: a sliding window keeps its last tokens, a quantized cache its newest ones")
    held = min(layer.get_seq_length() for layer in layers)
    rows = layers[0].keys.shape[0] if getattr(layers[0], "keys", None) is not None else 0
    if held < max(lengths) or rows != ids.shape[0]:
        raise ValueError(f"cache: expected {ids.shape[0]} rows of at least {max(lengths)} tokens (the ids and "
                         f"lengths given), got {rows} rows of {held}")
