"""What vLLM's scheduler half of the kvstore connector tells its worker halves each step.

vLLM pickles the metadata to every worker process; it carries only plain
values (token ids, block ids, vLLM's block hashes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata


@dataclass
class LoadSpec:
    """Load tokens ``[start, end)`` of ``tokens`` (the key tokens up to a store block boundary) into
    ``block_ids``: the request's block table of each KV-cache group, from token 0 (``NO_PAGE`` where a
    group holds vLLM's null block)."""

    req_id: str
    tokens: list[int]
    salt: str | None
    block_ids: tuple[list[int], ...]
    start: int
    end: int
    is_async: bool = False
    eager: bool = False  # complete it before the forward: the step may replay a FULL CUDA graph


@dataclass
class SaveSpec:
    """Save ``tokens`` (the prompt's key tokens, or its first store blocks computed so far) from
    ``block_ids`` (one block table per KV-cache group, ``NO_PAGE`` where a group may have freed the page);
    tokens before ``after`` were handed over by an earlier step; ``block_hashes`` are vLLM's hashes of the
    request's full blocks (for KV cache events)."""

    req_id: str
    tokens: list[int]
    salt: str | None
    block_ids: tuple[list[int], ...]
    block_hashes: list = field(default_factory=list)
    lora_name: str | None = None
    after: int = 0
    # For KV cache events, as vLLM's own carry them: the prompt's token ids where ``tokens`` has words of an
    # image's or embeddings' digest (None: ``tokens`` are the ids), and vLLM's extra keys of each full page
    # from page ``after // page_size`` on (LoRA, images, cache salt; None: none has any).
    event_tokens: list[int] | None = None
    extra_keys: list | None = None


@dataclass
class KVStoreConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
    step_tokens: int = 0  # tokens vLLM computes this step (the planner learns prefill speed from it)
