"""``kvstore demo``: a real trained model on the CPU, served with and without kvstore.

The model is SmolLM2-135M-Instruct (``kvstore.models``; fp32, so greedy
answers are identical with and without a hit), or any causal LM by path or
hub id; ``model="random"`` is a small random-initialised Llama. Two parts,
both on the same model in the same run (so every figure is a ratio of times
measured side by side):

1. A mixed workload in real words (``demo_texts``; random token ids for the
   random model): chats that grow their history, RAG requests over shared
   documents and an agent's fan-out under one long system prompt. Each
   request runs through ``CachedModel`` (host RAM over an LMDB disk tier in
   a local folder) and on the bare model, interleaved, and its answers from
   both are compared. Time to first token (TTFT) is the load plus the
   prefill up to the first token's logits; the bare TTFT is the median of
   ``bare_repeats`` runs taken around the kvstore run.
2. A shared prefix of ``prefix_tokens`` tokens followed by a fresh question:
   TTFT with a full prefill, with the prefix in host RAM, on disk (raw and
   with the ``ec4`` codec), and on disk but prefetched during a simulated queue
   wait. A warm-up round first, then ``repeats`` rounds in which every case
   runs once, in turn (so drift hits all cases alike); medians.

It prints a table per part, the answers, hit rates per tier, prefill tokens
and the compute seconds they stand for at this run's measured prefill rate,
and writes a PNG chart of TTFT per request.
"""

from __future__ import annotations

import itertools
import shutil
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvstore import KVStore, StoreConfig
from kvstore.compression.text_check import reference_text
from kvstore.integrations.demo_texts import TextWorkload, TextWorkloadSettings
from kvstore.integrations.transformers import CachedModel, layout_for
from kvstore.integrations.workload import Request, Workload, WorkloadSettings
from kvstore.models import SMOLLM2, load_model
from kvstore.validation import check_counts

Progress = Callable[[str], None]


RANDOM = "random"  # ``DemoSettings.model``: the random-initialised Llama below


@dataclass(frozen=True)
class DemoSettings:
    """The model (``model``: ``smollm2``, a path or hub id, or ``random``: a Llama built from the fields
    below, seeded), the store, and the prefix benchmark.

    Sizes are tokens; ``host_bytes`` "auto" sizes host RAM to the KV the
    demo keeps (a quarter more); ``queue_wait_seconds`` is how long a
    prefetched request waits in the simulated queue before it is scheduled.
    """

    model: str = SMOLLM2
    hidden_size: int = 512
    intermediate_size: int = 1536
    layers: int = 6
    heads: int = 8
    kv_heads: int = 2
    vocab_size: int = 8000
    dtype: str = "float32"
    block_tokens: int = 64
    host_bytes: str = "auto"
    disk_bytes: str = "2GiB"
    codec: str = "ec4"
    prefix_tokens: int = 4096
    question_tokens: int = 32
    repeats: int = 5
    bare_repeats: int = 3
    queue_wait_seconds: float = 0.3
    prefill_tokens_per_second: float = 0.0  # the planner's prefill rate; 0 learns it from the requests
    workload: WorkloadSettings = field(default_factory=WorkloadSettings)
    text_workload: TextWorkloadSettings = field(default_factory=TextWorkloadSettings)
    seed: int = 0

    def __post_init__(self) -> None:
        check_counts(self, ("hidden_size", "intermediate_size", "layers", "heads", "kv_heads", "vocab_size",
                            "block_tokens", "prefix_tokens", "question_tokens", "repeats", "bare_repeats"))
        if self.hidden_size % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"heads: expected hidden_size % heads == 0 and heads % kv_heads == 0, got "
                             f"hidden_size={self.hidden_size}, heads={self.heads}, kv_heads={self.kv_heads}")
        if self.workload.vocab_size > self.vocab_size:
            raise ValueError(f"workload.vocab_size: expected <= {self.vocab_size}, got {self.workload.vocab_size}")

    @classmethod
    def quick(cls, model: str = SMOLLM2) -> "DemoSettings":
        """A few-second version (for tests): short prompts, one repeat; with ``random``, a tiny model too."""
        small = dict(block_tokens=16, prefix_tokens=128, question_tokens=8, repeats=1, bare_repeats=1,
                     queue_wait_seconds=0.05, disk_bytes="256MiB",
                     text_workload=TextWorkloadSettings(document_tokens=96, rag_requests=2, chats=1, chat_turns=2,
                                                        reply_tokens=4, agent_calls=2))
        if model != RANDOM:
            return cls(model=model, **small)
        return cls(model=RANDOM, hidden_size=64, intermediate_size=128, layers=2, heads=2, kv_heads=1,
                   vocab_size=500, dtype="bfloat16", **small,
                   workload=WorkloadSettings(vocab_size=500, system_tokens=40, document_tokens=64, rag_requests=2,
                                             question_tokens=8, chats=1, chat_turns=2, user_tokens=8,
                                             reply_tokens=4, agent_calls=2, task_tokens=8))


def build_model(settings: DemoSettings) -> tuple[Any, Any]:
    """(model, tokenizer) in eval mode on the CPU: the real model (``kvstore.models.load_model``), or for
    ``random`` a seeded random-initialised Llama and no tokenizer."""
    dtype = getattr(torch, settings.dtype)
    if settings.model != RANDOM:
        return load_model(settings.model, dtype=dtype)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(settings.seed)
    config = LlamaConfig(vocab_size=settings.vocab_size, hidden_size=settings.hidden_size,
                         intermediate_size=settings.intermediate_size, num_hidden_layers=settings.layers,
                         num_attention_heads=settings.heads, num_key_value_heads=settings.kv_heads,
                         max_position_embeddings=max(8192, 2 * settings.prefix_tokens))
    return LlamaForCausalLM(config).to(dtype).eval(), None


@dataclass
class RequestTiming:
    """TTFT of one request with and without kvstore (seconds), and where its prefix came from (tokens)."""

    request: Request
    with_store: float
    without_store: float = 0.0
    loaded_tokens: int = 0
    sources: dict[str, int] = field(default_factory=dict)
    answer: str = ""  # what the model generated with kvstore (decoded; token ids for the random model)
    identical: bool = True  # the same tokens without kvstore


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


def _workload(settings: DemoSettings, tokenizer: Any) -> Workload | TextWorkload:
    return Workload(settings.workload) if tokenizer is None else TextWorkload(tokenizer, settings.text_workload)


def _generate_bare(model: Any, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(prompt.unsqueeze(0), max_new_tokens=new_tokens, do_sample=False)[0, len(prompt):]


def run_workload(model: Any, tokenizer: Any, store: KVStore, settings: DemoSettings,
                 progress: Progress) -> list[RequestTiming]:
    """Part 1: every request of the mixed workload with kvstore and on the bare model, interleaved."""
    cached = CachedModel(model, store)
    workload = _workload(settings, tokenizer)
    timings = []
    for request in workload:
        prompt = torch.tensor(request.prompt)
        bare = [_ttft_bare(model, prompt)]  # before and after the kvstore run: drift hits both sides
        output, info = cached.generate(prompt, max_new_tokens=request.reply_tokens, do_sample=False)
        bare += [_ttft_bare(model, prompt) for _ in range(settings.bare_repeats - 1)]
        answer = output[0, len(request.prompt):]
        workload.reply(request, tuple(answer.tolist()))
        text = tokenizer.decode(answer, skip_special_tokens=True).strip() if tokenizer else str(answer.tolist())
        timings.append(RequestTiming(request, info.ttft_seconds, statistics.median(bare), info.loaded_tokens,
                                     info.sources, text,
                                     torch.equal(answer, _generate_bare(model, prompt, request.reply_tokens))))
        progress(request.name)
    return timings


@dataclass
class PrefixResult:
    """Part 2: median TTFT (seconds) per scenario and the engine's load time (seconds) where it matters."""

    ttft: dict[str, float] = field(default_factory=dict)
    load: dict[str, float] = field(default_factory=dict)
    loaded_tokens: dict[str, int] = field(default_factory=dict)


def _prefix_prompts(settings: DemoSettings, tokenizer: Any) -> tuple[torch.Tensor, Iterator[torch.Tensor]]:
    """The shared prefix and an endless supply of distinct questions, as token ids."""
    generator = torch.Generator().manual_seed(settings.seed + 1)
    if tokenizer is None:
        prefix = torch.randint(0, settings.vocab_size, (settings.prefix_tokens,), generator=generator)
        return prefix, iter(lambda: torch.randint(0, settings.vocab_size, (settings.question_tokens,),
                                                  generator=generator), None)
    ids = tokenizer(reference_text(), add_special_tokens=False).input_ids
    if len(ids) < settings.prefix_tokens:
        raise ValueError(f"prefix_tokens: expected at most {len(ids)} (the reference text), got "
                         f"{settings.prefix_tokens}")
    questions = (tokenizer(f"\n\nQuestion {n}: what does the text above say about {topic}?",
                           add_special_tokens=False).input_ids
                 for n in itertools.count(1) for topic in ("names", "errors", "loops", "classes"))
    return torch.tensor(ids[:settings.prefix_tokens]), (torch.tensor(q) for q in questions)


def run_prefix(model: Any, tokenizer: Any, stores: dict[str, KVStore], settings: DemoSettings,
               progress: Progress) -> PrefixResult:
    """TTFT of ``prefix + question`` cold, from host RAM, from disk (raw, codec) and from a prefetched disk:
    a warm-up round, then ``repeats`` rounds of every case in turn; medians."""
    prefix, questions = _prefix_prompts(settings, tokenizer)
    result = PrefixResult()
    raw, coded = CachedModel(model, stores["raw"]), CachedModel(model, stores["codec"])

    def prefetch_then_wait(prompt: torch.Tensor) -> Any:
        _drop_from_host(raw.store, prompt)
        handle = raw.prefetch(prompt)
        time.sleep(settings.queue_wait_seconds)  # the request waits in the engine's queue meanwhile
        return handle

    cases: dict[str, tuple[CachedModel | None, Callable[[torch.Tensor], Any] | None]] = {
        "full prefill": (None, None),
        "host hit": (raw, None),
        "disk hit": (raw, lambda prompt: _drop_from_host(raw.store, prompt)),
        f"disk hit, {settings.codec}": (coded, lambda prompt: _drop_from_host(coded.store, prompt)),
        "disk hit, prefetched": (raw, prefetch_then_wait),
    }
    for cached in (raw, coded):  # first sight: computed and saved
        cached.forward(torch.cat([prefix, next(questions)]))
        cached.store.flush()
    samples: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in cases}
    for repeat in range(settings.repeats + 1):  # the first round is a warm-up, not counted
        for name, (cached, before) in cases.items():
            prompt = torch.cat([prefix, next(questions)])
            handle = before(prompt) if before is not None else None
            if cached is None:
                ttft, load = _ttft_bare(model, prompt), None
            else:
                _, info = cached.forward(prompt, prefetch=handle)
                ttft, load = info.ttft_seconds, info.load_seconds
                result.loaded_tokens[name] = info.loaded_tokens
            if repeat:
                samples[name][0].append(ttft)
                samples[name][1].extend([load] if load is not None else [])
                progress(f"{settings.prefix_tokens}-token prefix: {name}")
    for name, (ttfts, loads) in samples.items():
        result.ttft[name] = statistics.median(ttfts)
        if loads:
            result.load[name] = statistics.median(loads)
    return result


def host_bytes_for(settings: DemoSettings, layout: Any, workload_tokens: int) -> str:
    """``settings.host_bytes``, or for "auto" the KV a store keeps in RAM (``workload_tokens`` of part 1, the
    prefix and every question of part 2) plus a quarter, in whole blocks: memory in proportion to the KV."""
    if settings.host_bytes != "auto":
        return settings.host_bytes
    questions = (settings.repeats + 2) * 5 * max(settings.question_tokens, 32)
    tokens = workload_tokens + settings.prefix_tokens + questions
    blocks = -(-tokens * 5 // 4 // settings.block_tokens) + 8  # partial tails take a whole block each
    return str(blocks * layout.block_bytes)


def open_stores(settings: DemoSettings, model: Any, directory: Path, workload_tokens: int) -> dict[str, KVStore]:
    """A raw store (parts 1 and 2) and one with ``settings.codec`` on disk (part 2 only), both host RAM over
    LMDB under ``directory``."""
    layout = layout_for(model, block_tokens=settings.block_tokens)
    stores = {}
    for name, codec, tokens in (("raw", "raw", workload_tokens), ("codec", settings.codec, 0)):
        path = directory / f"lmdb-{name}"
        shutil.rmtree(path, ignore_errors=True)  # the demo's own data: a run starts cold
        stores[name] = KVStore(layout, StoreConfig(model_id="kvstore-demo",
                                                   host_bytes=host_bytes_for(settings, layout, tokens),
                                                   disk_dir=str(path), disk_bytes=settings.disk_bytes,
                                                   disk_codec=codec, prefetch_policy="wait",
                                                   prefill_tokens_per_second=settings.prefill_tokens_per_second))
    return stores


def _workload_tokens(settings: DemoSettings, tokenizer: Any) -> int:
    """An upper bound on the tokens part 1 stores: every prompt and answer (chats resend their history)."""
    workload = _workload(settings, tokenizer)
    total = 0
    for request in workload:
        total += len(request.prompt) + request.reply_tokens
        workload.reply(request, (0,) * request.reply_tokens)
    return total


def run_demo(settings: DemoSettings, directory: str | Path, progress: Progress | None = None,
             chart: bool = True, model: tuple[Any, Any] | None = None) -> dict[str, Any]:
    """Run both parts; returns the figures (and the chart's path) and prints nothing. ``model``: a loaded
    (model, tokenizer) to use instead of loading ``settings.model``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    progress = progress or (lambda _: None)
    model, tokenizer = model if model is not None else build_model(settings)
    warm_up = torch.zeros(2 * settings.block_tokens + 1, dtype=torch.long)
    with KVStore(layout_for(model, block_tokens=settings.block_tokens), StoreConfig(host_bytes="64MiB")) as scratch:
        for _ in range(2):  # one-time costs (kernels, thread pools, first allocations) are nobody's TTFT
            CachedModel(model, scratch).generate(warm_up, max_new_tokens=2, do_sample=False)
    progress("warm-up")
    stores = open_stores(settings, model, directory, _workload_tokens(settings, tokenizer))
    try:
        timings = run_workload(model, tokenizer, stores["raw"], settings, progress)
        workload_stats = stores["raw"].stats()
        prefix = run_prefix(model, tokenizer, stores, settings, progress)
        host_capacity = stores["raw"].stats()["tiers"]["host"]["capacity_bytes"]
    finally:
        for store in stores.values():
            store.close()
    figures = {"timings": timings, "stats": workload_stats, "prefix": prefix, "chart": None,
               "model": describe_model(model, settings), "host_bytes": host_capacity}
    if chart:
        from kvstore.integrations.demo_report import write_chart

        figures["chart"] = write_chart(timings, prefix, directory / "ttft.png", settings)
    return figures


def describe_model(model: Any, settings: DemoSettings) -> str:
    """One line naming the model and its shape, for the report."""
    config = model.config
    name = "random-init Llama" if settings.model == RANDOM else (
        "SmolLM2-135M-Instruct" if settings.model == SMOLLM2 else settings.model)
    return (f"{name}: {config.num_hidden_layers} layers, {config.num_attention_heads} heads "
            f"({config.num_key_value_heads} KV), hidden {config.hidden_size}, {settings.dtype}")
