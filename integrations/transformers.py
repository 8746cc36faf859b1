"""Hugging Face transformers adapter: load a prompt's stored prefix KV into a ``DynamicCache``, prefill the rest.

Why: prefill is the compute-bound part of a request. When the leading tokens
of a prompt (a system prompt, a shared document, earlier chat turns) were
seen before, their KV is loaded from a ``KVStore`` and the model only runs
on the uncached suffix; the KV it computes is saved for the next request.

    store = KVStore(layout_for(model, block_tokens=256), StoreConfig(host_bytes="8GiB"))
    cached = CachedModel(model, store)
    out, info = cached.forward(input_ids)            # out.logits: [B, computed tokens, vocab]
    seqs, info = cached.generate(input_ids, max_new_tokens=64, do_sample=False)
    print(info.loaded_tokens, info.computed_tokens, info.ttft_seconds)

How a request runs (``CachedModel._load`` then the model):

1. ``store.plan`` decides how many leading tokens to load: those stored
   whose load is expected to beat recomputing them (the prefill time of
   each request is reported back with ``store.record_prefill``).
2. ``store.load`` returns ``[L, 2, n, H, D]``, possibly fewer tokens than
   planned if a block vanished in between: the returned size is used. A
   ``prefetch`` handle started when the request was queued makes the
   load a host-RAM copy even when the prefix was on disk.
3. At least one prompt token is always computed (the model needs one
   position to produce logits). When the whole prompt is stored, all of it
   is fetched and the last token dropped: fetching ``tokens[:len-1]`` would
   miss, because a trailing partial block is stored under a key covering
   exactly its own token count.
4. The KV becomes a ``DynamicCache`` of plain (full) layers; the model runs
   on ``input_ids[:, loaded:]`` and positions continue from the cache length.
5. The KV of the prompt (and, after ``generate``, of the generated tokens
   except the last one, which has no KV yet) is saved; stored blocks dedup.

``generate`` in transformers 5.23: given ``past_key_values`` holding ``c``
tokens and the full ``input_ids`` (``S`` tokens, no padding, no pad token:
refused, ``transformers_checks``), ``generate`` builds an all-ones
attention mask of length ``S``, so ``_prefill`` sets
``next_sequence_length = S - c`` and ``prepare_inputs_for_generation``
feeds only ``input_ids[:, -(S - c):]``; position ids come from the mask's
cumsum (``0..S-1``) sliced the same way. A user-supplied cache is marked
``_is_user_defined`` and returned grown to ``len(sequences) - 1`` tokens.

Equality (tests/integrations/test_transformers.py; CPU, torch 2.13, tiny
random models of 5 architectures): with fp32 weights, logits with a store
hit match a plain ``model(input_ids)`` within 1e-4 max abs (measured: at
most 5e-7, matmuls of another shape round differently) and greedy
generations are identical. With bf16 weights the loaded prefix KV is
bit-equal to the recomputed one, and the logits with a hit are bit-equal
to the same split (prefix, then the rest) computed without the store.
Against one full forward they were bit-identical with eager attention
(max abs difference 0 over Llama, Qwen2, Mistral and Gemma, prefixes of
16-48 tokens, logits up to |9|), but sdpa's continued attention over a
split may round otherwise: 2e-3 was measured on a 2-layer GQA Llama.
GPU kernels chosen by shape may differ by bf16 rounding; the tests allow 1e-2.

Limits: batch rows must have equal length without padding (each row is
looked up separately and the shortest stored prefix is loaded for all);
``num_beams`` and ``num_return_sequences`` must be 1 (beam search reorders
cache rows, so the saved KV would not match the returned sequences).
Sliding-window layers are cached in full (so their KV can be saved); the
attention mask still applies the window. Rows of a batch that stop early
at EOS save their padding tokens too (valid KV of those ids, rarely reused).
"""

from __future__ import annotations

import copy
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import xxhash
from transformers import DynamicCache
from transformers.generation.configuration_utils import GenerationMode

from kvstore import KVLayout, KVStore, StoreConfig
from kvstore.compression.fidelity import cache_argument
from kvstore.integrations.continued_attention import use_continued_attention
from kvstore.integrations.transformers_checks import (check_call, check_model, check_no_pad, check_saved_cache,
                                                      dropout_of)
from kvstore.keys import Salt, salt_bytes
from kvstore.prefetch import PrefetchHandle

# Layer kinds whose cache is plain per-token K and V (what a KVLayout with kv_parts=2 describes).
ATTENTION_LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})


def _text_config(model_or_config: Any) -> Any:
    config = getattr(model_or_config, "config", model_or_config)
    get_text_config = getattr(config, "get_text_config", None)
    return get_text_config(decoder=True) if callable(get_text_config) else config


def _config_int(config: Any, name: str) -> int:
    value = getattr(config, name, None)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"config.{name}: expected a positive int, got {value!r}")
    return value


log = logging.getLogger(__name__)

_UNNAMED = StoreConfig().model_id  # the model_id of a store whose config names no model
_LATENT_FIELDS = ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
# generate's modes whose cache continues the preloaded prefix one row per request (beams, assistants and the
# like re-prefill or reorder it: the KV saved after them was not the returned rows')
# Per-token tensors a call may pass: checked (all ones, 0 .. S-1), or the cache's own positions. Any other
# (token_type_ids, inputs_embeds, pixel_values...) changes the KV of the same ids, which the keys do not cover.
_PER_TOKEN_CHECKED = frozenset({"attention_mask", "position_ids", "cache_position"})
_GENERATION_MODES = frozenset({GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE})


def _tensors(model: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """``model``'s parameters, then its buffers (a quantized layer's packed weights and scales, RoPE's
    frequencies): all that the KV it computes depends on besides its config."""
    yield from model.named_parameters()
    for name, buffer in model.named_buffers():
        yield f"buffer:{name}", buffer


def weights_digest(model: Any) -> bytes:
    """A digest of ``model``'s config, parameters and buffers (names, dtypes, shapes and bytes): the identity of
    the KV it computes. Buffers count: GPTQ/AWQ layers keep their weights in them, and two such models (or a
    patched RoPE frequency) shared KV 0.14 off in the last logit. xxh3-128 (tens of GB/s): weights are the
    operator's, not a tenant's, so no one crafts a collision."""
    h = xxhash.xxh3_128()
    config = getattr(model, "config", None)
    h.update((config.to_json_string(use_diff=False) if config is not None else type(model).__name__).encode())
    for name, parameter in _tensors(model):
        data = parameter.detach()
        h.update(f"\0{name}\0{data.dtype}\0{list(data.shape)}\0".encode())
        if data.numel():
            h.update(data.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.digest()


def _weights_state(model: Any) -> tuple[tuple[int, int], ...]:
    """Each parameter's and buffer's version counter and storage address: what changes when the weights are
    updated in place (autograd's counter) or given new tensors, at a few microseconds a hundred of them.
    Tensors made under ``torch.inference_mode()`` keep no counter: only a new tensor shows for them."""
    return tuple((-1 if p.is_inference() else p._version, p.data_ptr()) for _, p in _tensors(model))


def adapter_state(model: Any) -> bytes:
    """What the model's PEFT adapters do now: for each tuner layer, its active adapters and their scaling,
    whether adapters are disabled and which are merged; empty for a model without adapters.

    Switching the active adapter, disabling adapters or rescaling them
    changes the KV of the same ids while every parameter stays as it was: a
    LoRA wrapper saved with adapter ``a`` served its KV to adapter ``b`` and
    to the base model (last logits 0.7 off). Read at every call, in
    microseconds a module; nothing at all unless PEFT is imported (a model
    with adapters imported it).
    """
    if "peft" not in sys.modules:
        return b""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = []
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            active = tuple(module.active_adapters)
            scaling = getattr(module, "scaling", {})  # LoRA's; other tuners have none
            layers.append((name, active, bool(module.disable_adapters), tuple(module.merged_adapters),
                           [scaling.get(adapter) for adapter in active]))
    return repr(layers).encode() if layers else b""


def _prompt_learning(model: Any) -> str | None:
    """The PEFT type of a prompt-learning adapter of ``model`` (virtual tokens prepended to every prompt), if
    any: a hit was served KV without them (last logits 0.8 off), and another adapter's."""
    if "peft" not in sys.modules:
        return None
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return None
    return next((str(config.peft_type) for config in model.peft_config.values() if config.is_prompt_learning), None)


def layout_for(model_or_config: Any, dtype: torch.dtype | str | None = None, block_tokens: int = 256,
               **layout_fields: Any) -> KVLayout:
    """The ``KVLayout`` of a transformers model's KV cache (a model or its config).

    ``num_kv_heads`` is ``num_key_value_heads`` (grouped-query attention),
    else ``num_attention_heads``; ``head_dim`` is the config's ``head_dim``
    when set (Gemma and others decouple it from the width), else
    ``hidden_size // num_attention_heads``. ``dtype`` defaults to the
    model's parameter dtype (or the config's ``dtype``): it must be the
    dtype of the KV the model computes. ``block_tokens`` is tokens per
    stored block; other KVLayout fields (``tp_rank``...) pass through.
    """
    config = _text_config(model_or_config)
    latent = [name for name in _LATENT_FIELDS if getattr(config, name, None)]
    if latent:  # keys and values of different widths (a latent or split head): not one [L, 2, T, H, D] layout
        raise ValueError(f"config.{latent[0]}: expected a model whose keys and values have one head_dim "
                         f"(multi-head latent attention is not supported here), got {getattr(config, latent[0])}")
    shared = getattr(config, "num_kv_shared_layers", None)
    if shared:  # Gemma 3n: the last layers reuse earlier layers' KV, so the cache holds fewer layers
        raise ValueError(f"config.num_kv_shared_layers: expected 0 (every layer with a KV cache of its own), "
                         f"got {shared}")
    num_layers = _config_int(config, "num_hidden_layers")
    num_heads = _config_int(config, "num_attention_heads")
    try:
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        head_dim = getattr(config, "head_dim", None)
    except RuntimeError as error:  # a config whose layers differ (Gemma 4) refuses to name one value
        raise ValueError(f"config: expected one num_key_value_heads and head_dim for every layer, got per-layer "
                         f"values ({error})") from None
    if head_dim is None:
        hidden = _config_int(config, "hidden_size")
        if hidden % num_heads:
            raise ValueError(f"config.hidden_size: expected a multiple of num_attention_heads={num_heads}, "
                             f"got {hidden}")
        head_dim = hidden // num_heads
    other = sorted(set(getattr(config, "layer_types", None) or ()) - ATTENTION_LAYER_TYPES)
    if other:
        raise ValueError(f"config.layer_types: expected only {sorted(ATTENTION_LAYER_TYPES)}, got {other}")
    if dtype is None:
        dtype = getattr(model_or_config, "dtype", None) if hasattr(model_or_config, "config") else None
        dtype = dtype or getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if dtype is None:
            raise ValueError("dtype: expected a torch dtype (the config names none), got None")
    return KVLayout(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype,
                    block_tokens=block_tokens, **layout_fields)


def cache_from_kv(kv: torch.Tensor) -> DynamicCache:
    """A ``DynamicCache`` holding ``kv``: ``[B, L, 2, n, H, D]`` (or ``[L, 2, n, H, D]`` for one row).

    Each layer gets keys and values ``[B, H, n, D]`` (one permute, no per-token work).
    """
    if kv.dim() == 5:
        kv = kv.unsqueeze(0)
    if kv.dim() != 6 or kv.shape[2] != 2:
        raise ValueError(f"kv: expected shape [B, L, 2, n, H, D], got {list(kv.shape)}")
    per_layer = kv.permute(1, 2, 0, 4, 3, 5)  # [L, 2, B, H, n, D]
    return DynamicCache([(layer[0], layer[1]) for layer in per_layer])


def kv_from_cache(cache: DynamicCache, row: int = 0, num_tokens: int | None = None) -> torch.Tensor:
    """Leading ``num_tokens`` (default all) of batch row ``row`` of ``cache`` as a contiguous ``[L, 2, n, H, D]``.

    One copy per layer and part, straight into the result (a strided transpose, no per-token work).
    """
    layers = cache.layers
    keys = layers[0].keys if layers else None
    if keys is None or keys.dim() != 4:
        raise ValueError(f"cache: expected layers holding keys [B, H, n, D], got {len(layers)} layers, "
                         f"first keys {None if keys is None else list(keys.shape)}")
    n = keys.shape[2] if num_tokens is None else num_tokens
    if n > keys.shape[2]:
        raise ValueError(f"num_tokens: expected at most the {keys.shape[2]} cached tokens, got {n}")
    out = torch.empty((len(layers), 2, n, keys.shape[1], keys.shape[3]), dtype=keys.dtype, device=keys.device)
    for index, layer in enumerate(layers):
        out[index, 0].copy_(layer.keys[row, :, :n].transpose(0, 1))
        out[index, 1].copy_(layer.values[row, :, :n].transpose(0, 1))
    return out


def _report_prefill(store: KVStore, num_tokens: int, seconds: float) -> None:
    """Tell the store's planner how long ``num_tokens`` of prefill took (its prefill throughput estimate)."""
    if num_tokens > 0:
        store.record_prefill(num_tokens, seconds)


@dataclass
class RequestInfo:
    """What one request cost and saved. Token counts are per batch row; times are seconds (wall clock)."""

    batch_size: int
    prompt_tokens: int
    planned_tokens: int = 0  # leading tokens the store's planner chose to load
    sources: dict[str, int] = field(default_factory=dict)  # of those, tokens per tier (row 0)
    fetched_tokens: int = 0  # tokens store.load returned for every row (fewer than planned if a block vanished)
    loaded_tokens: int = 0  # tokens whose KV went from the store into the cache: min(fetched, prompt - 1)
    computed_tokens: int = 0  # prompt tokens the model prefilled: prompt_tokens - loaded_tokens
    generated_tokens: int = 0  # new tokens from generate (0 for forward)
    saved_tokens: int = 0  # leading tokens whose KV was handed to store.put (0: already all stored, or save off)
    blocks_stored: int = 0  # blocks newly stored by those puts (the others were already stored)
    load_seconds: float = 0.0  # plan, get and cache construction
    prefill_seconds: float = 0.0  # the model's first forward: the computed prompt tokens
    save_seconds: float = 0.0  # cache to store layout and store.put

    @property
    def ttft_seconds(self) -> float:
        """Time to first token: loading the prefix plus prefilling the rest."""
        return self.load_seconds + self.prefill_seconds


class CachedModel:
    """A causal LM from transformers whose prompt prefill is served from a ``KVStore`` where possible.

    ``model``'s KV must match ``store.layout`` (layers, KV heads, head
    dimension, dtype), else ``ValueError``. ``salt`` separates tenants (no
    hit across salts); a per-call ``salt`` overrides it. ``save_generated``:
    after ``generate``, also save the generated tokens' KV (what the next
    turn of a chat reuses). ``last_info`` is the latest ``RequestInfo``.

    A model using ``sdpa`` is switched to ``continued_attention.NAME``: the
    same attention, computed in two parts when a prefill continues a loaded
    prefix on CPU (``continued_attention`` is True when it was switched).
    """

    def __init__(self, model: Any, store: KVStore, *, salt: Salt = None, save_generated: bool = True):
        if not isinstance(store, KVStore):
            raise ValueError(f"store: expected a KVStore, got {type(store).__name__}")
        layout = store.layout
        got = layout_for(model, block_tokens=layout.block_tokens, tp_rank=layout.tp_rank, tp_size=layout.tp_size)
        for name in ("num_layers", "num_kv_heads", "head_dim", "dtype", "kv_parts"):
            if getattr(got, name) != getattr(layout, name):
                raise ValueError(f"store.layout.{name}: expected {getattr(got, name)} (the model's KV), "
                                 f"got {getattr(layout, name)}")
        check_model(model, _text_config(model))
        prompt_learning = _prompt_learning(model)
        if prompt_learning:
            raise ValueError("model: expected no PEFT prompt learning (prompt tuning, p-tuning, prefix tuning): "
                             "its virtual tokens are KV the token ids do not key; got a PEFT model with "
                             f"{prompt_learning}")
        self.model = model
        self.store = store
        self.salt = salt
        self._dropout = dropout_of(model, _text_config(model))  # refused in training mode (``check_call``)
        # A store that names no model (model_id left at its default) keys this model's blocks under a digest
        # of its weights: another model sharing the directory (same shapes, other weights) was served them.
        self._weights = weights_digest(model) if store.config.model_id == _UNNAMED else None
        self._weights_seen = _weights_state(model) if self._weights is not None else ()
        self.save_generated = save_generated
        self.last_info: RequestInfo | None = None
        self._cache_kwarg = cache_argument(model)  # transformers renamed it; the old name warns
        # sdpa computes a prefill after a loaded prefix over the whole masked rectangle (slower, on CPU, than
        # prefilling the prefix too); the variant computes the same attention at the cost of a cold prefill
        self.continued_attention = use_continued_attention(model)

    def key_salt(self, salt: Salt = None) -> Salt:
        """The salt a call's blocks are keyed under in ``store`` (for asking the store directly): ``salt``,
        bound to a digest of the weights when the store names no model, and to what the model's PEFT
        adapters do now (``adapter_state``). ``ValueError`` for a bad salt.

        The digest is taken again when a parameter changed since (an in-place
        update under ``no_grad``, or a new tensor assigned to ``.data``, as
        optimizers and adapter merges do): stored KV of the old weights must
        never reach the new ones. Writes through ``param.data`` in place do
        not show; call ``refresh_weights()`` after those.
        """
        adapters = adapter_state(self.model)
        if adapters:
            salt = b"adapters=" + xxhash.xxh3_128_hexdigest(adapters).encode() + b";" + salt_bytes(salt)
        if self._weights is None:
            return salt
        if _weights_state(self.model) != self._weights_seen:
            self.refresh_weights()
        return b"weights=" + self._weights.hex().encode() + b";" + salt_bytes(salt)

    def refresh_weights(self) -> None:
        """Digest the model's weights again (after changing them in place through ``param.data``); only when
        the store names no model (a named model is whatever the name says)."""
        if self._weights is not None:
            self._weights = weights_digest(self.model)
            self._weights_seen = _weights_state(self.model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _batch(self, input_ids: Any, kwargs: dict[str, Any]) -> torch.Tensor:
        """``input_ids`` as ``[B, S]`` int64 on the model's device; rejects padding, a caller's cache, no cache."""
        ids = torch.as_tensor(input_ids)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2 or ids.shape[1] < 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"input_ids: expected integer ids [batch, tokens >= 1], "
                             f"got {ids.dtype} {list(ids.shape)}")
        for name in ("past_key_values", "cache"):
            if kwargs.get(name) is not None:
                raise ValueError(f"{name}: expected None (the cache is built from the store), got a cache")
        use_cache = kwargs.pop("use_cache", None)
        if use_cache is not None and not use_cache:
            raise ValueError(f"use_cache: expected True or None (the KV to save comes from the cache), "
                             f"got {use_cache!r}")
        for name, value in kwargs.items():
            if isinstance(value, (torch.Tensor, np.ndarray)) and name not in _PER_TOKEN_CHECKED:
                raise ValueError(f"{name}: expected no per-token input but input_ids (the store keys KV by token "
                                 f"ids and salt, and {name} changes it; call the model itself), got a "
                                 f"{type(value).__name__}")
        if self.model.dtype != self.store.layout.dtype:
            raise ValueError(f"model dtype: expected {self.store.layout.dtype}, the store's KV (the model's when "
                             f"wrapped), got {self.model.dtype}: wrap the model again with a store of its layout")
        check_call(self.model, ids, self._dropout, self.device)
        mask = kwargs.get("attention_mask")
        if mask is not None:
            mask = torch.as_tensor(mask)
            if tuple(mask.shape) != tuple(ids.shape) or not bool((mask == 1).all()):
                raise ValueError(f"attention_mask: expected all ones of shape {list(ids.shape)} (padding is not "
                                 f"supported), got shape {list(mask.shape)} with {int((mask == 0).sum())} zeros")
        positions = kwargs.get("position_ids")
        if positions is not None:
            positions = torch.as_tensor(positions)
            expected = torch.arange(ids.shape[1])
            if positions.shape[-1:] != ids.shape[-1:] or not bool((positions.cpu() == expected).all()):
                raise ValueError(f"position_ids: expected 0 .. {ids.shape[1] - 1} in every row (other positions "
                                 f"give other KV for the same tokens), got shape {list(positions.shape)}")
        return ids.to(device=self.device, dtype=torch.long)

    def _generation_config(self, generate_kwargs: dict[str, Any]) -> Any:
        """The generation config ``generate`` will run with: the one passed (or the model's), updated with the
        keyword arguments that are its fields (a ``generation_config`` argument got past the checks)."""
        config = copy.deepcopy(generate_kwargs.get("generation_config") or self.model.generation_config)
        config.update(**{name: value for name, value in generate_kwargs.items() if hasattr(config, name)})
        return config

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _load(self, ids: torch.Tensor, salt: Salt,
              prefetch: PrefetchHandle | None = None) -> tuple[DynamicCache, RequestInfo]:
        """Fetch the stored prefix every row has (at most ``S - 1`` tokens) into a new cache."""
        start = time.perf_counter()
        batch, length = ids.shape
        info = RequestInfo(batch_size=batch, prompt_tokens=length)
        rows = ids.cpu()
        if prefetch is not None and batch != 1:
            raise ValueError(f"prefetch: expected a batch of 1 with a prefetch handle, got {batch} rows")
        plans = [self.store.plan(row, salt=salt) for row in rows]
        info.planned_tokens = min(plan.load_tokens for plan in plans)
        info.sources = dict(plans[0].sources)
        kvs = []
        have = info.planned_tokens
        for row, plan in zip(rows, plans):
            if have == 0:
                break
            if plan.load_tokens != have:  # another row has less: load the common prefix only
                plan = self.store.plan(row[:have], salt=salt)
                row = row[:have]
            kv = self.store.load(row, salt=salt, device=self.device, prefetch=prefetch, plan=plan)
            have = min(have, kv.shape[2])
            kvs.append(kv)
        if prefetch is not None:
            prefetch.close()
        info.fetched_tokens = have
        info.loaded_tokens = min(have, length - 1)
        info.computed_tokens = length - info.loaded_tokens
        if info.loaded_tokens:
            cache = cache_from_kv(torch.stack([kv[:, :, :info.loaded_tokens] for kv in kvs]))
        else:
            cache = DynamicCache()  # plain layers keep every token (sliding layers included), so all can be saved
        self._sync()
        info.load_seconds = time.perf_counter() - start
        return cache, info

    def _time_prefill(self, info: RequestInfo) -> tuple[Any, Any]:
        """Hooks timing the model's first forward (the prefill) into ``info`` and reporting it to the store."""
        marks: list[float] = []

        def before(*_: Any) -> None:
            if not marks:
                marks.append(time.perf_counter())

        def after(*_: Any) -> None:
            if len(marks) == 1:
                self._sync()
                marks.append(time.perf_counter())
                info.prefill_seconds = marks[1] - marks[0]
                _report_prefill(self.store, info.computed_tokens * info.batch_size, info.prefill_seconds)

        return self.model.register_forward_pre_hook(before), self.model.register_forward_hook(after)

    def save(self, input_ids: Any, cache: DynamicCache, lengths: int | Sequence[int], salt: Salt = None) -> int:
        """Store the KV of each row's first ``n`` tokens of ``input_ids`` ``[B, >= n]``, for each ``n`` in ``lengths``.

        Several lengths share one copy out of the cache: each is worth a put
        because a trailing partial block is keyed by its exact token count.
        Returns blocks newly stored (already stored ones are deduplicated).
        """
        lengths = [lengths] if isinstance(lengths, int) else list(lengths)
        ids = torch.as_tensor(input_ids).cpu()
        ids = ids.unsqueeze(0) if ids.dim() == 1 else ids
        if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool or not lengths:
            raise ValueError(f"input_ids, lengths: expected integer ids [batch, tokens] and at least one length, "
                             f"got {ids.dtype} {list(ids.shape)} and {lengths!r}")
        check_saved_cache(cache, ids, lengths)
        return self._put_rows(ids, cache, lengths, self.key_salt(self.salt if salt is None else salt))

    def _put_rows(self, ids: torch.Tensor, cache: DynamicCache, lengths: list[int], salt: Salt) -> int:
        stored = 0
        for row in range(ids.shape[0]):
            kv = kv_from_cache(cache, row, max(lengths))
            for n in lengths:
                stored += self.store.put(ids[row, :n], kv[:, :, :n], salt=salt)
        return stored

    def _save(self, ids: torch.Tensor, cache: DynamicCache, lengths: list[int], salt: Salt,
              info: RequestInfo) -> None:
        """Save unless the fetch just returned every block of the longest length (then all are stored)."""
        if info.fetched_tokens == max(lengths):
            return
        start = time.perf_counter()
        info.blocks_stored = self._put_rows(ids.cpu(), cache, lengths, salt)
        info.saved_tokens = max(lengths)
        info.save_seconds = time.perf_counter() - start

    def prefetch(self, input_ids: Any, *, salt: Salt = None, policy: str | None = None) -> PrefetchHandle:
        """Start bringing a request's stored prefix up to the fastest tier (call it when the request is queued).

        Pass the handle to ``forward`` / ``generate`` of the same
        ``input_ids``: its policy (``best_effort``, ``wait``, ``timeout``)
        decides how much of the prefix is loaded rather than computed.
        """
        ids = torch.as_tensor(input_ids)
        ids = ids.unsqueeze(0) if ids.dim() == 1 else ids
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise ValueError(f"input_ids: expected one request [tokens] or [1, tokens], got {list(ids.shape)}")
        return self.store.prefetch(ids[0].cpu(), salt=self.key_salt(self.salt if salt is None else salt), policy=policy)

    def forward(self, input_ids: Any, *, salt: Salt = None, save: bool = True,
                prefetch: PrefetchHandle | None = None, **model_kwargs: Any) -> tuple[Any, RequestInfo]:
        """Run the model on ``input_ids`` (``[B, S]`` or ``[S]``), loading the stored prefix first.

        Returns the model's output, whose ``logits`` cover only the computed
        positions ``[B, computed_tokens, vocab]`` (the last is the next-token
        distribution) and whose ``past_key_values`` hold all ``S`` tokens,
        and the request's ``RequestInfo``. Other ``model_kwargs`` pass through.
        """
        if model_kwargs.get("labels") is not None:
            raise ValueError("labels: expected none: the model computes only the tokens not loaded from the store, "
                             "so a loss over the whole prompt cannot come from it (call the model itself)")
        ids = self._batch(input_ids, model_kwargs)
        model_kwargs.pop("attention_mask", None)  # all ones (checked): the cache length sets positions
        positions = model_kwargs.get("position_ids")
        salt = self.key_salt(self.salt if salt is None else salt)
        cache, info = self._load(ids, salt, prefetch)
        if positions is not None:  # given for the whole prompt: the model runs on the computed part only
            model_kwargs["position_ids"] = torch.as_tensor(positions)[..., info.loaded_tokens:]
        hooks = self._time_prefill(info)
        try:
            with torch.no_grad():
                output = self.model(input_ids=ids[:, info.loaded_tokens:], use_cache=True,
                                    **{self._cache_kwarg: cache}, **model_kwargs)
        finally:
            for hook in hooks:
                hook.remove()
        if save:
            self._save(ids, cache, [info.prompt_tokens], salt, info)
        self.last_info = info
        return output, info

    def generate(self, input_ids: Any, *, salt: Salt = None, save: bool = True, save_generated: bool | None = None,
                 prefetch: PrefetchHandle | None = None, **generate_kwargs: Any) -> tuple[Any, RequestInfo]:
        """``model.generate`` with the prompt's stored prefix preloaded; returns its output and the ``RequestInfo``.

        ``generate_kwargs`` pass through (``max_new_tokens``, ``do_sample``,
        ``return_dict_in_generate``...); ``generate`` computes only the
        uncached prompt tokens (see the module docstring). Then the prompt's
        KV is saved and, when ``save_generated`` (default: the wrapper's),
        that of the generated tokens but the last, which has none yet.
        """
        if generate_kwargs.get("custom_generate") is not None:
            raise ValueError("custom_generate: expected none: a decoding loop of its own need not continue the "
                             "loaded prefix's cache (greedy search or sampling only)")
        ids = self._batch(input_ids, generate_kwargs)
        config = self._generation_config(generate_kwargs)
        for name in ("num_beams", "num_return_sequences"):
            value = getattr(config, name, 1) or 1
            if value != 1:
                raise ValueError(f"{name}: expected 1 (the saved KV must match the returned rows), got {value}")
        if generate_kwargs.get("attention_mask") is None:  # given, it is all ones (checked): nothing inferred
            check_no_pad(ids, config)
        mode = config.get_generation_mode(generate_kwargs.get("assistant_model"))
        if mode not in _GENERATION_MODES:
            raise ValueError(f"generate: expected greedy search or sampling (a cache continuing the stored prefix, "
                             f"one row a request), got {mode.value}")
        if getattr(config, "cache_implementation", None) is not None:  # the wrapper's own cache holds the prefix
            generate_kwargs["cache_implementation"] = None
        generate_kwargs["use_cache"] = True  # a fine-tune's config may say False: the loaded prefix is a cache
        salt = self.key_salt(self.salt if salt is None else salt)
        save_generated = self.save_generated if save_generated is None else save_generated
        cache, info = self._load(ids, salt, prefetch)
        hooks = self._time_prefill(info)
        try:
            output = self.model.generate(ids, **{self._cache_kwarg: cache}, **generate_kwargs)
        finally:
            for hook in hooks:
                hook.remove()
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        info.generated_tokens = sequences.shape[1] - info.prompt_tokens
        if save and cache.get_seq_length() > sequences.shape[1]:  # not the rows' KV: a mode that re-prefilled
            log.warning("generate: the cache holds %d positions for %d tokens (a generation mode that does not "
                        "continue the loaded prefix); nothing is saved", cache.get_seq_length(), sequences.shape[1])
            save = False
        if save:
            lengths = [info.prompt_tokens]
            if save_generated and cache.get_seq_length() > info.prompt_tokens:
                # the prompt's own partial tail is keyed by its length: keep it, so the same prompt hits again
                whole = min(cache.get_seq_length(), sequences.shape[1])
                tail = info.prompt_tokens % self.store.layout.block_tokens
                lengths = [whole, info.prompt_tokens] if tail and info.fetched_tokens < info.prompt_tokens else [whole]
            self._save(sequences, cache, lengths, salt, info)
        self.last_info = info
        return output, info


__all__ = ["CachedModel", "RequestInfo", "cache_from_kv", "kv_from_cache", "layout_for"]
