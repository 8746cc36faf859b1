"""``kvstore demo``: a small random-initialised Llama on the CPU, served with and without kvstore.

Two parts, both on the same model in the same run (so every figure is a
ratio of times measured side by side):

1. A mixed workload (``kvstore.integrations.workload``): chats that grow
   their history, RAG requests over shared documents and an agent's fan-out
   under one system prompt. Every request runs through ``CachedModel``
   (host RAM over an LMDB disk tier in a local folder), then the same
   prompts run again on the bare model. Time to first token (TTFT) is the
   load plus the prefill up to the first token's logits.
2. A shared prefix of ``prefix_tokens`` tokens followed by a fresh question:
   TTFT with a full prefill, with the prefix in host RAM, on disk (raw and
   with a 4-bit codec), and on disk but prefetched during a simulated queue
   wait, where the engine's load should cost about what a host hit costs.

It prints a table per part, hit rates per tier, prefill tokens and
estimated compute seconds saved, and writes a PNG chart of TTFT per request.
"""

from __future__ import annotations

import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvstore import KVStore, StoreConfig
from kvstore.integrations.transformers import CachedModel, layout_for
from kvstore.integrations.workload import Request, Workload, WorkloadSettings

Progress = Callable[[str], None]


@dataclass(frozen=True)
class DemoSettings:
    """The model (a Llama built from a config, seeded), the store, and the prefix benchmark.

    Sizes are tokens; ``queue_wait_seconds`` is how long a prefetched
    request waits in the simulated queue before it is scheduled.
    """

    hidden_size: int = 512
    intermediate_size: int = 1536
    layers: int = 6
    heads: int = 8
    kv_heads: int = 2
    vocab_size: int = 8000
    dtype: str = "bfloat16"
    block_tokens: int = 256
    host_bytes: str = "512MiB"
    disk_bytes: str = "2GiB"
    codec: str = "kivi4"
    prefix_tokens: int = 4096
    question_tokens: int = 32
    repeats: int = 5
    queue_wait_seconds: float = 0.3
    prefill_tokens_per_second: float = 0.0  # the planner's prefill rate; 0 learns it from the requests
    workload: WorkloadSettings = field(default_factory=WorkloadSettings)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "layers", "heads", "kv_heads", "vocab_size",
                     "block_tokens", "prefix_tokens", "question_tokens", "repeats"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
        if self.hidden_size % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"heads: expected hidden_size % heads == 0 and heads % kv_heads == 0, got "
                             f"hidden_size={self.hidden_size}, heads={self.heads}, kv_heads={self.kv_heads}")
        if self.workload.vocab_size > self.vocab_size:
            raise ValueError(f"workload.vocab_size: expected <= {self.vocab_size}, got {self.workload.vocab_size}")

    @classmethod
    def quick(cls) -> "DemoSettings":
        """A few-second version (for tests): a tiny model, short prompts, one repeat."""
        return cls(hidden_size=64, intermediate_size=128, layers=2, heads=2, kv_heads=1, vocab_size=500,
                   block_tokens=16, host_bytes="16MiB", disk_bytes="64MiB", prefix_tokens=128,
                   question_tokens=8, repeats=1, queue_wait_seconds=0.05,
                   workload=WorkloadSettings(vocab_size=500, system_tokens=40, document_tokens=64, rag_requests=2,
                                             question_tokens=8, chats=1, chat_turns=2, user_tokens=8,
                                             reply_tokens=4, agent_calls=2, task_tokens=8))


def build_model(settings: DemoSettings) -> Any:
    """A random-initialised Llama (seeded) in ``settings.dtype``, in eval mode, on the CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(settings.seed)
    config = LlamaConfig(vocab_size=settings.vocab_size, hidden_size=settings.hidden_size,
                         intermediate_size=settings.intermediate_size, num_hidden_layers=settings.layers,
                         num_attention_heads=settings.heads, num_key_value_heads=settings.kv_heads,
                         max_position_embeddings=max(8192, 2 * settings.prefix_tokens))
    return LlamaForCausalLM(config).to(getattr(torch, settings.dtype)).eval()


@dataclass
class RequestTiming:
    """TTFT of one request with and without kvstore (seconds), and where its prefix came from (tokens)."""

    request: Request
    with_store: float
    without_store: float = 0.0
    loaded_tokens: int = 0
    sources: dict[str, int] = field(default_factory=dict)


def _ttft_bare(model: Any, prompt: torch.Tensor) -> float:
    """Seconds of a plain prefill up to the first token's logits (no kvstore)."""
    start = time.perf_counter()
    with torch.no_grad():
        model(prompt.unsqueeze(0), logits_to_keep=1)
    return time.perf_counter() - start


def _drop_from_host(store: KVStore, tokens: torch.Tensor) -> None:
    """Evict ``tokens``' blocks from host RAM, so the next request finds them on disk only."""
    for block in store.block_keys(tokens):
        store.host.delete(block.key)


def run_workload(model: Any, store: KVStore, settings: DemoSettings, progress: Progress) -> list[RequestTiming]:
    """Part 1: every request of the mixed workload with kvstore, then the same prompts on the bare model."""
    cached = CachedModel(model, store)
    workload = Workload(settings.workload)
    timings = []
    for request in workload:
        prompt = torch.tensor(request.prompt)
        output, info = cached.generate(prompt, max_new_tokens=request.reply_tokens, do_sample=False)
        workload.reply(request, tuple(output[0, len(request.prompt):].tolist()))
        timings.append(RequestTiming(request, info.ttft_seconds, loaded_tokens=info.loaded_tokens,
                                     sources=info.sources))
        progress(f"with kvstore: {request.name}")
    for timing in timings:
        timing.without_store = _ttft_bare(model, torch.tensor(timing.request.prompt))
        progress(f"without kvstore: {timing.request.name}")
    return timings


@dataclass
class PrefixResult:
    """Part 2: median TTFT (seconds) per scenario and the engine's load time (seconds) where it matters."""

    ttft: dict[str, float] = field(default_factory=dict)
    load: dict[str, float] = field(default_factory=dict)
    loaded_tokens: dict[str, int] = field(default_factory=dict)


def run_prefix(model: Any, stores: dict[str, KVStore], settings: DemoSettings, progress: Progress) -> PrefixResult:
    """TTFT of ``prefix + question`` cold, from host RAM, from disk (raw, codec) and from a prefetched disk."""
    generator = torch.Generator().manual_seed(settings.seed + 1)
    prefix = torch.randint(0, settings.vocab_size, (settings.prefix_tokens,), generator=generator)
    questions = iter(lambda: torch.randint(0, settings.vocab_size, (settings.question_tokens,), generator=generator),
                     None)
    result = PrefixResult()
    raw, coded = CachedModel(model, stores["raw"]), CachedModel(model, stores["codec"])

    def measure(name: str, cached: CachedModel | None, before: Callable[[torch.Tensor], Any] | None = None) -> None:
        ttfts, loads = [], []
        for repeat in range(settings.repeats + 1):  # the first is a warm-up, not counted
            prompt = torch.cat([prefix, next(questions)])
            handle = before(prompt) if before is not None else None
            if cached is None:
                ttft, load = _ttft_bare(model, prompt), None
            else:
                _, info = cached.forward(prompt, prefetch=handle)
                ttft, load = info.ttft_seconds, info.load_seconds
                result.loaded_tokens[name] = info.loaded_tokens
            if repeat:
                ttfts.append(ttft)
                loads += [load] if load is not None else []
                progress(f"{settings.prefix_tokens}-token prefix: {name}")
        result.ttft[name] = statistics.median(ttfts)
        if loads:
            result.load[name] = statistics.median(loads)

    measure("full prefill", None)
    for cached in (raw, coded):  # first sight: computed and saved
        cached.forward(torch.cat([prefix, next(questions)]))
        cached.store.flush()
    measure("host hit", raw)
    measure("disk hit", raw, lambda prompt: _drop_from_host(raw.store, prompt))
    measure(f"disk hit, {settings.codec}", coded, lambda prompt: _drop_from_host(coded.store, prompt))

    def prefetch_then_wait(prompt: torch.Tensor) -> Any:
        _drop_from_host(raw.store, prompt)
        handle = raw.prefetch(prompt)
        time.sleep(settings.queue_wait_seconds)  # the request waits in the engine's queue meanwhile
        return handle

    measure("disk hit, prefetched", raw, prefetch_then_wait)
    return result


def open_stores(settings: DemoSettings, model: Any, directory: Path) -> dict[str, KVStore]:
    """A raw store and one with ``settings.codec`` on disk, both host RAM over LMDB under ``directory``."""
    layout = layout_for(model, block_tokens=settings.block_tokens)
    stores = {}
    for name, codec in (("raw", "raw"), ("codec", settings.codec)):
        path = directory / f"lmdb-{name}"
        shutil.rmtree(path, ignore_errors=True)  # the demo's own data: a run starts cold
        stores[name] = KVStore(layout, StoreConfig(model_id="kvstore-demo", host_bytes=settings.host_bytes,
                                                   disk_dir=str(path), disk_bytes=settings.disk_bytes,
                                                   disk_codec=codec, prefetch_policy="wait",
                                                   prefill_tokens_per_second=settings.prefill_tokens_per_second))
    return stores


def run_demo(settings: DemoSettings, directory: str | Path, progress: Progress | None = None,
             chart: bool = True) -> dict[str, Any]:
    """Run both parts; returns the figures (and the chart's path) and prints nothing."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    progress = progress or (lambda _: None)
    model = build_model(settings)
    warm_up = torch.zeros(2 * settings.block_tokens + 1, dtype=torch.long)
    with KVStore(layout_for(model, block_tokens=settings.block_tokens), StoreConfig(host_bytes="64MiB")) as scratch:
        for _ in range(2):  # one-time costs (kernels, thread pools, first allocations) are nobody's TTFT
            CachedModel(model, scratch).generate(warm_up, max_new_tokens=2, do_sample=False)
    stores = open_stores(settings, model, directory)
    try:
        timings = run_workload(model, stores["raw"], settings, progress)
        workload_stats = stores["raw"].stats()
        prefix = run_prefix(model, stores, settings, progress)
    finally:
        for store in stores.values():
            store.close()
    figures = {"timings": timings, "stats": workload_stats, "prefix": prefix, "chart": None}
    if chart:
        from kvstore.integrations.demo_report import write_chart

        figures["chart"] = write_chart(timings, prefix, directory / "ttft.png", settings)
    return figures

