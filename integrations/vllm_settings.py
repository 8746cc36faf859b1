"""What a vLLM deployment tells the kvstore connector: its settings, its rank, the layout of its caches, and
what a request's keys bind.

No vLLM import: every function takes vLLM's objects (``VllmConfig``,
``Request``, the registered caches) as they come, so the same code serves
vLLM 0.32 and 0.33 and is testable without vLLM.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from kvstore import KVLayout, StoreConfig
from kvstore.config import ENV_PREFIX
from kvstore.integrations.model_identity import bind_engine_settings, default_model_id
from kvstore.integrations.vllm_lora import AdapterDigests
from kvstore.layout import resolve_dtype
from kvstore.sizes import parse_size

log = logging.getLogger(__name__)

DEFAULT_BLOCK_TOKENS = 256
DEFAULT_STAGING = "256MiB"
CONNECTOR_KEYS = frozenset({"block_tokens", "async_load", "salt", "config", "staging_bytes", "lookup_timeout_s",
                            "scheduler_host_bytes"})
CACHE_DTYPES = {"fp8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2",
                "fp8_inc": "float8_e4m3fn", "fp8_ds_mla": "uint8"}
MM_TOKEN_BIT = 1 << 31  # placeholder tokens of a multimodal item become content words with this bit set
MM_WORDS = 8  # 32-bit words of an item's digest; an item shorter than this also goes into the salt


@dataclass(frozen=True)
class ConnectorSettings:
    """What ``kv_connector_extra_config`` and the environment say (see ``integrations/vllm.py``)."""

    store: StoreConfig
    block_tokens: int
    async_load: bool
    salt: str | None
    staging_bytes: int  # bytes of device and of pinned host staging the worker's copy engine may hold
    lookup_timeout_s: float  # seconds the scheduler waits for a worker's lookup answer
    model_named: bool  # the operator named the model (model_id set): no weight digest


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"kv_connector_extra_config.{name}: expected a positive int, got {value!r}")
    return value


def _config_path(value: Any) -> str | None:
    """``config``: the path of a kvstore config file, or absent (``$KVSTORE_CONFIG``, then defaults). A number
    raised a ``TypeError`` naming no key, and an empty string was taken as absent."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"kv_connector_extra_config.config: expected the path of a kvstore config file, got "
                         f"{value!r}")
    return value


def connector_settings(vllm_config: Any, environ: Mapping[str, str] | None = None) -> ConnectorSettings:
    """The store config (``StoreConfig.load`` + extra_config overrides) and the connector's own settings."""
    environ = dict(os.environ if environ is None else environ)
    extra = dict(vllm_config.kv_transfer_config.kv_connector_extra_config or {})
    own = {k: extra.pop(k) for k in list(extra) if k in CONNECTOR_KEYS}
    base = StoreConfig.load(_config_path(own.get("config")), environ)
    named = "model_id" in extra or f"{ENV_PREFIX}MODEL_ID" in environ or base.model_id != StoreConfig.model_id
    store = StoreConfig.from_dict({**dataclasses.asdict(base), **extra}, source="kv_connector_extra_config")
    page = vllm_config.cache_config.block_size
    block_tokens = own.get("block_tokens")
    if block_tokens is None:
        block_tokens = page * max(1, -(-DEFAULT_BLOCK_TOKENS // page))
    block_tokens = _positive_int("block_tokens", block_tokens)
    if block_tokens % page:
        raise ValueError(f"kv_connector_extra_config.block_tokens: expected a multiple of vLLM's block size "
                         f"{page}, got {block_tokens}")
    async_load = own.get("async_load", False)
    if not isinstance(async_load, bool):
        raise ValueError(f"kv_connector_extra_config.async_load: expected true or false, got {async_load!r}")
    salt = own.get("salt")
    if salt is not None and (not isinstance(salt, str) or not salt):
        raise ValueError(f"kv_connector_extra_config.salt: expected a non-empty string, got {salt!r}")
    staging = parse_size(own.get("staging_bytes", DEFAULT_STAGING), "kv_connector_extra_config.staging_bytes")
    if staging < 1 << 20:
        raise ValueError(f"kv_connector_extra_config.staging_bytes: expected at least 1MiB, got {staging} bytes")
    timeout = own.get("lookup_timeout_s", 1.0)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 60:
        raise ValueError(f"kv_connector_extra_config.lookup_timeout_s: expected seconds in (0, 60], got {timeout!r}")
    if "scheduler_host_bytes" in own:
        log.info("kv_connector_extra_config.scheduler_host_bytes is ignored: the scheduler opens no store; "
                 "it asks the workers' stores")
    return ConnectorSettings(store, block_tokens, async_load, salt, staging, float(timeout), named)


# -- ranks -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RankPlace:
    """Where a worker sits in the deployment: its engine, data-parallel, pipeline and tensor ranks."""

    engine_id: str
    dp_rank: int = 0
    dp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    tp_rank: int = 0
    tp_size: int = 1

    @property
    def shared_node(self) -> bool:
        """Whether other ranks of this deployment may run beside this one (and must not share its LMDB)."""
        return self.dp_size * self.pp_size * self.tp_size > 1

    @property
    def rank_dir(self) -> str:
        return f"rank-dp{self.dp_rank}-pp{self.pp_rank}of{self.pp_size}-tp{self.tp_rank}of{self.tp_size}"

    def peers(self) -> list[tuple[int, int]]:
        """``(pp_rank, tp_rank)`` of every worker the scheduler of this data-parallel rank asks."""
        return [(pp, tp) for pp in range(self.pp_size) for tp in range(self.tp_size)]


def rank_place(vllm_config: Any, worker: bool) -> RankPlace:
    """This process's place; a worker reads its ranks from vLLM's parallel state (the scheduler has none)."""
    parallel = vllm_config.parallel_config
    for name in ("decode_context_parallel_size", "prefill_context_parallel_size"):
        size = int(getattr(parallel, name, 1) or 1)
        if size > 1:  # each rank's pages hold an interleaved share of the tokens: not a prefix's KV
            raise ValueError(f"parallel_config.{name}: expected 1 with the kvstore connector, got {size}: context "
                             f"parallelism spreads each block's tokens over ranks, which kvstore does not store")
    place = RankPlace(engine_id=str(vllm_config.kv_transfer_config.engine_id),
                      dp_rank=int(getattr(parallel, "data_parallel_rank", 0) or 0),
                      dp_size=int(getattr(parallel, "data_parallel_size", 1) or 1),
                      pp_size=int(parallel.pipeline_parallel_size), tp_size=int(parallel.tensor_parallel_size))
    if not worker:
        return place
    try:
        from vllm.distributed.parallel_state import get_pp_group, get_tp_group, model_parallel_is_initialized
        if model_parallel_is_initialized():
            return dataclasses.replace(place, pp_rank=get_pp_group().rank_in_group,
                                       tp_rank=get_tp_group().rank_in_group)
    except Exception as exc:  # vLLM without parallel state (tests that build a worker by hand)
        log.debug("no vLLM parallel state (%r): worker taken as rank 0", exc)
    return place


def _packing_tag() -> str:
    """vLLM's CPU attention backend packs each page its own way (K transposed, then V), not K and V per token:
    its bytes round-trip exactly but must never be read as another engine's K/V, so its ids say so."""
    try:
        from vllm.platforms import current_platform
        return "|packing=vllm-cpu-attention" if current_platform.is_cpu() else ""
    except Exception:
        return ""


def model_id_of(settings: ConnectorSettings, vllm_config: Any) -> str:
    """The configured model id, or a digest of the weights vLLM loads (``integrations/model_identity.py``),
    bound to the settings that change the KV those weights compute (``--hf-overrides`` of the RoPE base or
    scaling, a ``--quantization`` applied at load: the same weights served two ways shared KV); tagged when
    the caches hold an engine-specific packing (``_packing_tag``)."""
    model = vllm_config.model_config
    if settings.model_named:
        base = settings.store.model_id
    else:
        base = default_model_id(str(model.model), getattr(model, "revision", None))
    engine = {"hf_overrides": getattr(model, "hf_overrides", None), "quantization": getattr(model, "quantization", None)}
    if vllm_config.cache_config.cache_dtype not in (None, "auto"):
        # The layout's dtype is then the cache's (fp8): the model's own dtype, which the KV was computed in,
        # reaches the keys only here (an fp16 engine's pages were served to a bf16 one).
        engine["dtype"] = str(getattr(model, "dtype", None))
    return bind_engine_settings(base, engine) + _packing_tag()


def rank_store_config(settings: ConnectorSettings, place: RankPlace, model_id: str) -> StoreConfig:
    """The worker's store config: its own LMDB directory when other ranks run beside it, and the model id."""
    config = settings.store.replace(model_id=model_id)
    if config.disk_dir is not None and place.shared_node:
        config = config.replace(disk_dir=os.path.join(config.disk_dir, place.rank_dir))
    return config


# -- the caches' layout ------------------------------------------------------------------------------


def layer_index(name: str) -> int:
    """The model layer a cache belongs to, from its name (``model.layers.12.self_attn.attn`` -> 12)."""
    try:
        from vllm.model_executor.models.utils import extract_layer_index
        return int(extract_layer_index(name))
    except Exception:
        found = re.findall(r"\d+", name)
        return int(found[0]) if found else 0


def cache_dtype(vllm_config: Any) -> torch.dtype:
    """The dtype the KV is stored in: ``--kv-cache-dtype`` (fp8 variants, in the platform's own e4m3 format),
    else the model's dtype; a ``ValueError`` naming the setting for a cache kvstore does not store."""
    name = vllm_config.cache_config.cache_dtype
    if name in (None, "auto"):
        return resolve_dtype(vllm_config.model_config.dtype)
    mapped = CACHE_DTYPES.get(str(name), str(name))
    if mapped == "float8_e4m3fn":
        mapped = _platform_fp8(mapped)
    try:
        return resolve_dtype(mapped)
    except ValueError:
        raise ValueError(f"cache_config.cache_dtype: expected 'auto' or one of {sorted(CACHE_DTYPES)} with the "
                         f"kvstore connector, got {name!r}") from None


def _platform_fp8(default: str) -> str:
    """vLLM's e4m3 format on this platform: ROCm's MI300 keeps fp8 caches as ``float8_e4m3fnuz``, whose bytes
    mean other values than ``float8_e4m3fn``'s, so a fleet of both must not share keys."""
    try:
        from vllm.platforms import current_platform
        return str(current_platform.fp8_dtype()).removeprefix("torch.")
    except Exception:  # no vLLM platform (a layout worked out by hand)
        return default


def layout_from_caches(vllm_config: Any, caches: Sequence[torch.Tensor], first_layer: int, block_tokens: int,
                       place: RankPlace) -> KVLayout:
    """The ``KVLayout`` of one worker's registered caches (standardized ``[B, H, page, P * D]`` views, the
    pre-0.33 ``[2, B, page, H, D]``, or MLA's ``[B, page, D]``)."""
    first = caches[0]
    mla = bool(getattr(vllm_config.model_config, "use_mla", False))
    parts = 1 if mla else 2
    if first.dim() == 5:
        heads, head_dim = first.shape[3], first.shape[4]
        parts = first.shape[0]
    elif first.dim() == 4:
        heads, head_dim = first.shape[1], first.shape[3] // parts
    elif first.dim() == 3:
        heads, head_dim, parts = 1, first.shape[2], 1
    else:
        raise ValueError(f"kv_caches: expected per-layer tensors of 3, 4 or 5 dims, got {list(first.shape)}")
    return KVLayout(num_layers=len(caches), num_kv_heads=int(heads), head_dim=int(head_dim),
                    dtype=cache_dtype(vllm_config), block_tokens=block_tokens, kv_parts=parts,
                    tp_rank=0 if mla else place.tp_rank, tp_size=1 if mla else place.tp_size,
                    first_layer=first_layer)


# -- what a request's keys bind ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Bound:
    """Prompt positions whose KV depends on more than their token ids (a multimodal item, or a run of
    positions given as embeddings), and the digest of what they hold."""

    offset: int
    length: int
    digest: bytes  # 32 bytes


def _bound_spans(request: Any) -> list[_Bound]:
    """Each multimodal item's placeholders, and each run of positions a mixed-mode prompt gives as embeddings
    (vLLM marks them in ``prompt_is_token_ids``; without the mask every position comes from the embeddings)."""
    spans = [_Bound(f.mm_position.offset, f.mm_position.length,
                    hashlib.sha256(f"{f.modality}\0{f.identifier}".encode()).digest())
             for f in (getattr(request, "mm_features", None) or ())]
    embeds = getattr(request, "prompt_embeds", None)
    if embeds is None:
        return spans
    mask = getattr(request, "prompt_is_token_ids", None)
    count = len(embeds)
    given = [True] * count if mask is None else [not is_token for is_token in list(mask)[:count]]
    start = None
    for position, by_embedding in enumerate(given + [False]):
        if by_embedding and start is None:
            start = position
        elif not by_embedding and start is not None:
            rows = embeds[start:position].detach().to("cpu").contiguous()
            digest = hashlib.sha256(f"embeds\0{rows.dtype}\0{list(rows.shape)}\0".encode())
            digest.update(rows.view(torch.uint8).numpy().tobytes() if rows.numel() else b"")
            spans.append(_Bound(start, position - start, digest.digest()))
            start = None
    return spans


class RequestKeys(NamedTuple):
    """What a request's blocks are keyed by (``request_keys``)."""

    tokens: list[int] | None  # ``key_tokens``
    salt: str | None  # ``request_salt``
    bound: bool  # some positions' words are digests of what they hold (images, embeddings), not token ids


def request_keys(request: Any, extra: str | None = None, adapters: AdapterDigests | None = None) -> RequestKeys:
    """``key_tokens`` and ``request_salt`` of a request, its bound spans digested once (a mixed-mode prompt's
    embeddings were hashed once for each)."""
    spans = _bound_spans(request)
    return RequestKeys(_key_tokens(request, spans), _request_salt(request, extra, spans, adapters), bool(spans))


def request_salt(request: Any, extra: str | None = None, adapters: AdapterDigests | None = None) -> str | None:
    """The kvstore salt of a request: its ``cache_salt``, LoRA adapter (name, path, as vLLM keys it, and the
    digest of its files, through ``adapters``' memo if given: a retrained adapter, at a new path or the same
    one, must not reuse the old one's KV), the configured salt, and the digests of bound spans too short to be
    bound through their positions' words (``key_tokens``)."""
    return _request_salt(request, extra, _bound_spans(request), adapters)


def _request_salt(request: Any, extra: str | None, spans: list[_Bound],
                  adapters: AdapterDigests | None) -> str | None:
    lora = getattr(request, "lora_request", None)
    named = None
    if lora is not None:
        path = getattr(lora, "lora_path", None)
        digest = (adapters or AdapterDigests()).digest(path)
        named = (getattr(lora, "lora_name", None), path) + (() if digest is None else (digest,))
    parts: dict[str, Any] = {"cache_salt": getattr(request, "cache_salt", None), "lora": named, "salt": extra}
    short = [f"{span.offset}:{span.digest.hex()}" for span in spans if span.length < MM_WORDS]
    if short:
        parts["mm"] = ",".join(short)
    if all(v is None for v in parts.values()):
        return None
    return ";".join(f"{k}={v!r}" for k, v in parts.items())


def key_tokens(request: Any) -> list[int] | None:
    """The token ids a request's keys chain over: its prompt, with each multimodal item's placeholder tokens,
    and each run of positions given as embeddings, replaced by words of their digest (top bit set: no
    vocabulary reaches it). An image then binds the blocks from its first placeholder on, as vLLM's own
    block hashes do, and the text before it is shared with requests that have other images. None for a
    prompt given only as embeddings (not stored)."""
    return _key_tokens(request, _bound_spans(request))


def _key_tokens(request: Any, spans: list[_Bound]) -> list[int] | None:
    tokens = getattr(request, "prompt_token_ids", None)
    if tokens is None:
        return None
    tokens = list(tokens)
    for span in spans:
        words = struct.unpack(f"<{MM_WORDS}I", span.digest)
        for j in range(max(0, span.offset), min(len(tokens), span.offset + span.length)):
            tokens[j] = MM_TOKEN_BIT | (words[(j - span.offset) % MM_WORDS] >> 1)
    return tokens
