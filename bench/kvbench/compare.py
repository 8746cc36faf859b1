"""kvstore's side of the peer comparisons, on the chunk shapes the LMCache peer script measures.

Chunks are Llama-3-8B shaped (32 layers, 8 KV heads, head dim 128, bf16):
256 tokens are 32 MiB, 16 tokens 2 MiB. As in ``bench/peers/lmcache_peer.py``,
every store and retrieve moves one prompt of ``prompt_tokens`` tokens (2048:
256 MiB, eight 32 MiB blocks or 128 of 2 MiB; 1024 in a quick run) under new
keys each round. Every figure is measured here, in this process, next to
its ceiling timed alternately on the same bytes
(``kvstore.benchmarking.alternate``); ``kvbench.peers`` puts the peer's own
figure, measured in the same run, beside it.

Rows (``path``, ``op``): ``cpu`` store/retrieve (the prompt's KV into and out
of the host tier, ratio to the same per-block ``Tensor.copy_`` calls alone,
as the peer's ceiling is a copy per chunk); ``paged``
store/retrieve (the prompt gathered from and scattered into vLLM's paged
layout ``[2, num_blocks, 16, H, D]`` per layer at random block ids, ratio to
``Tensor.copy_``); ``lookup`` (a 131,072-token prompt with nothing cached,
seconds); ``disk`` store (GB/s, no fsync, as LMCache's local disk) and
retrieve (warm, ratio to a raw read of the same bytes); ``server``
store/retrieve through a store whose only tier is a ``kvstore serve`` on
loopback (GB/s). The host tier and the files tier hold three prompts (as
LMCache's local disk does in the peer script): later rounds evict, as a
full cache does.
"""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from kvstore import KVStore, StoreConfig
from kvstore.benchmarking import (LLAMA3_8B, LOOKUP_TOKENS, Pair, PromptSource, alternate, random_kv, raw_read,
                                  raw_write_fsync, timed)
from kvstore.compression.table import one_thread
from kvstore.integrations.paged import VLLMPagedAdapter
from kvstore.integrations.paged_store import block_sink, save_paged
from kvstore.layout import KVLayout

CHUNKS = {"32MiB": 256, "2MiB": 16}  # chunk tokens of each size
PAGE = 16
Row = dict


def chunk_layout(tokens: int) -> KVLayout:
    return replace(LLAMA3_8B, block_tokens=tokens)


def _ratio_row(path: str, op: str, layout: KVLayout, pair: Pair) -> Row:
    return {"path": path, "op": op, "chunk_bytes": layout.block_bytes, "chunk_tokens": layout.block_tokens,
            "bytes": pair.nbytes, "unit": "ratio_to_ceiling", "kvstore": pair.ratio,
            "seconds": statistics.median(pair.subject_s), "ceiling": pair.ceiling_name,
            "ceiling_seconds": statistics.median(pair.ceiling_s)}


def _gbps_row(path: str, op: str, layout: KVLayout, nbytes: int, times: list[float], note: str) -> Row:
    median = statistics.median(times)
    return {"path": path, "op": op, "chunk_bytes": layout.block_bytes, "chunk_tokens": layout.block_tokens,
            "bytes": nbytes, "unit": "GB/s", "kvstore": nbytes / median / 1e9, "seconds": median, "note": note}


def _prompt(tokens: int, prompt_tokens: int) -> tuple[KVLayout, torch.Tensor, torch.Tensor, PromptSource, int]:
    """The chunk layout, the prompt's KV, an output buffer, fresh prompts and the prompt's bytes."""
    layout = chunk_layout(tokens)
    kv = random_kv(layout, prompt_tokens)
    return layout, kv, torch.empty_like(kv), PromptSource(prompt_tokens), layout.token_bytes * prompt_tokens


def _per_block(layout: KVLayout, kv: torch.Tensor, out: torch.Tensor) -> tuple[Callable[[], None], Callable[[], None]]:
    """The copies a block store cannot avoid, with none of its bookkeeping: each block's slice of ``kv`` into
    its own preallocated buffer, and back into ``out`` (the peer's ceiling is the same: a copy per chunk)."""
    n, step = kv.shape[2], layout.block_tokens
    spans = [(i, min(i + step, n)) for i in range(0, n, step)]
    buffers = [torch.zeros(layout.shape(b - a), dtype=layout.dtype) for a, b in spans]

    def store() -> None:
        for (a, b), buf in zip(spans, buffers):
            buf.copy_(kv[:, :, a:b])

    def retrieve() -> None:
        for (a, b), buf in zip(spans, buffers):
            out[:, :, a:b].copy_(buf)
    return store, retrieve


def cpu_rows(rounds: int, prompt_tokens: int) -> Iterator[Row]:
    """The prompt put into and read back out of the host tier, against the same per-block copies alone."""
    for tokens in CHUNKS.values():
        layout, kv, out, prompts, nbytes = _prompt(tokens, prompt_tokens)
        copy_in, copy_out = _per_block(layout, kv, out)
        with KVStore(layout, StoreConfig(model_id="kvbench", host_bytes=3 * nbytes)) as store:
            store.host.wait_warm()  # the steady state, as LMCache's pool is allocated before it is timed
            yield _ratio_row("cpu", "store", layout, alternate("cpu store", nbytes, lambda: store.put(prompts(), kv),
                                                               copy_in, "Tensor.copy_ per block", 0, rounds))
            stored = prompts()
            store.put(stored, kv)
            yield _ratio_row("cpu", "retrieve", layout, alternate("cpu retrieve", nbytes,
                                                                  lambda: store.get_into(stored, out), copy_out,
                                                                  "Tensor.copy_ per block", 0, rounds))


def _paged(layout: KVLayout, tokens: int, seed: int) -> tuple[VLLMPagedAdapter, list[int]]:
    """vLLM caches twice the prompt, and a random block table for the prompt's pages."""
    pages = 2 * tokens // PAGE + 1
    caches = [torch.zeros(2, pages, PAGE, layout.num_kv_heads, layout.head_dim, dtype=layout.dtype)
              for _ in range(layout.num_layers)]
    table = torch.randperm(pages, generator=torch.Generator().manual_seed(seed))[:tokens // PAGE].tolist()
    return VLLMPagedAdapter(layout, caches), table


def paged_rows(rounds: int, prompt_tokens: int) -> Iterator[Row]:
    """Store and retrieve as the vLLM connector does on CPU caches (``kvstore.integrations.paged_store``):
    store straight into host slots (``put_from``) when a block spans many pages, else staged layer by
    layer; retrieve through ``load(layer_wise=True)`` with a sink scattering each stored block straight
    into the pages."""
    for tokens in CHUNKS.values():
        layout, kv, out, prompts, nbytes = _prompt(tokens, prompt_tokens)
        adapter, table = _paged(layout, prompt_tokens, seed=tokens)
        adapter.scatter(kv, adapter.locate(table, prompt_tokens))
        sink = block_sink(adapter, table)
        with KVStore(layout, StoreConfig(model_id="kvbench", host_bytes=3 * nbytes)) as store:
            yield _ratio_row("paged", "store", layout, alternate("paged store", nbytes,
                                                                 lambda: save_paged(store, prompts(), adapter, table),
                                                                 lambda: out.copy_(kv), "Tensor.copy_", 0, rounds))
            stored = prompts()
            store.put(stored, kv)

            def retrieve() -> None:
                with store.load(stored, layer_wise=True, sink=sink) as loader:
                    loader.wait_layer(layout.num_layers - 1)
            for layer in range(layout.num_layers):  # the retrieve below must put every byte back
                adapter.kv_caches[layer].zero_()
            yield _ratio_row("paged", "retrieve", layout, alternate("paged retrieve", nbytes, retrieve,
                                                                    lambda: out.copy_(kv), "Tensor.copy_", 0, rounds))
        got = adapter.gather(adapter.locate(table, prompt_tokens))
        if not torch.equal(got.view(torch.uint8), kv.view(torch.uint8)):
            raise RuntimeError("paged retrieve did not put the prompt's bytes back")


def lookup_rows(rounds: int) -> Iterator[Row]:
    """``lookup`` of a 131,072-token prompt (a token tensor, as engines pass it) with nothing cached."""
    for tokens in (256, 16):
        layout = KVLayout(num_layers=1, num_kv_heads=1, head_dim=8, dtype=torch.bfloat16, block_tokens=tokens)
        prompt = torch.from_numpy(PromptSource(LOOKUP_TOKENS)())
        with KVStore(layout, StoreConfig(model_id="kvbench", host_bytes="1MiB")) as store:
            store.lookup(prompt)
            times = [timed(lambda: store.lookup(prompt)) for _ in range(max(rounds, 20))]
        yield {"path": "lookup", "op": "lookup", "chunk_bytes": None, "chunk_tokens": tokens, "unit": "seconds",
               "kvstore": statistics.median(times), "seconds": statistics.median(times),
               "note": f"{LOOKUP_TOKENS} tokens, {tokens}-token blocks, nothing cached"}


def disk_rows(rounds: int, prompt_tokens: int, directory: Path) -> Iterator[Row]:
    """The files tier (a file per block, like LMCache's local disk) as the only tier, without fsync as
    LMCache writes: store GB/s, and a warm retrieve against a raw read of the same bytes from one file."""
    for tokens in CHUNKS.values():
        layout, kv, out, prompts, nbytes = _prompt(tokens, prompt_tokens)
        raw = kv.view(torch.uint8).reshape(-1).numpy()
        buffer = np.empty_like(raw)
        folder = Path(tempfile.mkdtemp(prefix=f"disk-{tokens}-", dir=directory))
        raw_write_fsync(folder / "raw.bin", raw)
        config = StoreConfig(model_id="kvbench", host_bytes=0, files_dir=str(folder / "files"), files_sync=False,
                             files_bytes=3 * (nbytes + 4096 * nbytes // layout.block_bytes))
        with KVStore(layout, config) as store:
            store.put(prompts(), kv)
            yield _gbps_row("disk", "store", layout, nbytes, [timed(lambda: store.put(prompts(), kv))
                                                             for _ in range(rounds)],
                            "files tier alone, no fsync (LMCache's local disk does not fsync either)")
            stored = prompts()
            store.put(stored, kv)
            yield _ratio_row("disk", "retrieve", layout, alternate("disk retrieve", nbytes,
                                                                   lambda: store.get_into(stored, out),
                                                                   lambda: raw_read(folder / "raw.bin", buffer),
                                                                   "raw read (warm)", 0, rounds))


def server_rows(rounds: int, prompt_tokens: int, server: object) -> Iterator[Row]:
    """The prompt put into and read back from a store whose only tier is a memory-only ``kvstore serve``."""
    for tokens in CHUNKS.values():
        layout, kv, out, prompts, nbytes = _prompt(tokens, prompt_tokens)
        config = StoreConfig(model_id="kvbench", host_bytes=0, remote_url=server.url, remote_token=server.token,
                             remote_timeout_seconds=60.0)
        with KVStore(layout, config) as store:
            def put() -> None:
                if store.put(prompts(), kv) != prompt_tokens // tokens:
                    raise RuntimeError("the cache server did not store the prompt")
            put()
            yield _gbps_row("server", "store", layout, nbytes, [timed(put) for _ in range(rounds)],
                            "kvstore serve on loopback, memory only, the store's remote tier")
            stored = prompts()
            store.put(stored, kv)
            store.get_into(stored, out)
            yield _gbps_row("server", "retrieve", layout, nbytes,
                            [timed(lambda: store.get_into(stored, out)) for _ in range(rounds)],
                            "kvstore serve on loopback, memory only, the store's remote tier")


def kvstore_rows(rounds: int, directory: Path, server: object | None, progress: Callable[[str], None],
                 prompt_tokens: int = 2048) -> tuple[list[Row], dict[str, str]]:
    """Every kvstore row of the comparison, on one torch thread (as the peer), and what was skipped."""
    rows, skipped = [], {}
    measures: dict[str, Callable[[], Iterator[Row]]] = {
        "cpu": lambda: cpu_rows(rounds, prompt_tokens), "paged": lambda: paged_rows(rounds, prompt_tokens),
        "lookup": lambda: lookup_rows(rounds), "disk": lambda: disk_rows(rounds, prompt_tokens, directory)}
    if server is None:
        skipped["server"] = "no cache server was started"
    else:
        measures["server"] = lambda: server_rows(rounds, prompt_tokens, server)
    with one_thread():
        for name, measure in measures.items():
            rows += list(measure())
            progress(f"kvstore side: {name}")
    return rows, skipped
