"""kvstore's side of the peer comparisons, on the chunk shapes the LMCache peer script measures.

Chunks are Llama-3-8B shaped (32 layers, 8 KV heads, head dim 128, bf16):
256 tokens are 32 MiB, 16 tokens 2 MiB. Every figure is measured here, in
this process, next to its ceiling timed alternately on the same bytes
(``kvstore.benchmarking.alternate``); ``kvbench.peers`` puts the peer's own
figure, measured in the same run, beside it.

Rows (``path``, ``op``): ``cpu`` store/retrieve (a contiguous chunk into and
out of the host tier, ratio to ``Tensor.copy_``); ``paged`` store/retrieve
(the chunk gathered from and scattered into vLLM's paged layout ``[2,
num_blocks, 16, H, D]`` per layer at random block ids, ratio to
``Tensor.copy_`` of the chunk); ``lookup`` (a 131,072-token prompt with
nothing cached, seconds); ``disk`` store (GB/s, no fsync, as LMCache's
local disk) and retrieve (warm, ratio to a raw read of the same bytes);
``server`` store/retrieve over loopback (GB/s).
"""

from __future__ import annotations

import os
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
from kvstore.layout import KVLayout

CHUNKS = {"32MiB": 256, "2MiB": 16}  # chunk tokens of each size
PAGE = 16
Row = dict


def chunk_layout(tokens: int) -> KVLayout:
    return replace(LLAMA3_8B, block_tokens=tokens)


def _ratio_row(path: str, op: str, pair: Pair) -> Row:
    return {"path": path, "op": op, "chunk_bytes": pair.nbytes, "unit": "ratio_to_ceiling", "kvstore": pair.ratio,
            "seconds": statistics.median(pair.subject_s), "ceiling": pair.ceiling_name,
            "ceiling_seconds": statistics.median(pair.ceiling_s)}


def _gbps_row(path: str, op: str, nbytes: int, times: list[float], note: str) -> Row:
    median = statistics.median(times)
    return {"path": path, "op": op, "chunk_bytes": nbytes, "unit": "GB/s", "kvstore": nbytes / median / 1e9,
            "seconds": median, "note": note}


def cpu_rows(rounds: int) -> Iterator[Row]:
    """A chunk put into and read back out of the host tier, against ``Tensor.copy_`` of its bytes."""
    for tokens in CHUNKS.values():
        layout = chunk_layout(tokens)
        kv, out = random_kv(layout, tokens), torch.empty(layout.shape(tokens), dtype=layout.dtype)
        prompts = PromptSource(tokens)
        with KVStore(layout, StoreConfig(model_id="kvbench", host_bytes=(rounds + 4) * layout.block_bytes)) as store:
            yield _ratio_row("cpu", "store", alternate("cpu store", layout.block_bytes, lambda: store.put(prompts(), kv),
                                                       lambda: out.copy_(kv), "Tensor.copy_", 0, rounds))
            stored = prompts()
            store.put(stored, kv)
            yield _ratio_row("cpu", "retrieve", alternate("cpu retrieve", layout.block_bytes,
                                                          lambda: store.get_into(stored, out), lambda: out.copy_(kv),
                                                          "Tensor.copy_", 0, rounds))


def _paged(layout: KVLayout, tokens: int, seed: int) -> tuple[VLLMPagedAdapter, list[int]]:
    """vLLM caches twice the chunk, and a random block table for the chunk's pages."""
    pages = 2 * tokens // PAGE + 1
    caches = [torch.zeros(2, pages, PAGE, layout.num_kv_heads, layout.head_dim, dtype=layout.dtype)
              for _ in range(layout.num_layers)]
    table = torch.randperm(pages, generator=torch.Generator().manual_seed(seed))[:tokens // PAGE].tolist()
    return VLLMPagedAdapter(layout, caches), table


def paged_rows(rounds: int) -> Iterator[Row]:
    """Store: ``put_from``, each layer gathered from vLLM's pages straight into the host tier's slot (one
    copy); retrieve: ``load(layer_wise=True)`` with a sink scattering each stored block straight into the
    pages (one copy). As the vLLM connector does on CPU caches."""
    for tokens in CHUNKS.values():
        layout = chunk_layout(tokens)
        kv, out = random_kv(layout, tokens), torch.empty(layout.shape(tokens), dtype=layout.dtype)
        adapter, table = _paged(layout, tokens, seed=tokens)
        where = adapter.locate(table, tokens)
        adapter.scatter(kv, where)
        prompts = PromptSource(tokens)
        config = StoreConfig(model_id="kvbench", host_bytes=(rounds + 4) * layout.block_bytes)
        with KVStore(layout, config) as store:
            def fill(block: object, dst: torch.Tensor) -> None:  # one block: the whole chunk
                for layer in range(layout.num_layers):
                    adapter.gather_layer(layer, where, out=dst[layer])

            def save() -> None:
                store.put_from(prompts(), fill)
            yield _ratio_row("paged", "store", alternate("paged store", layout.block_bytes, save,
                                                         lambda: out.copy_(kv), "Tensor.copy_", 0, rounds))
            stored = prompts()
            store.put(stored, kv)

            def sink(layer: int, parts: list[tuple[int, torch.Tensor]]) -> None:
                for start, block in parts:
                    adapter.scatter_layer(layer, block, where)  # one block: the whole chunk

            def retrieve() -> None:
                with store.load(stored, layer_wise=True, sink=sink) as loader:
                    loader.wait_layer(layout.num_layers - 1)
            yield _ratio_row("paged", "retrieve", alternate("paged retrieve", layout.block_bytes, retrieve,
                                                            lambda: out.copy_(kv), "Tensor.copy_", 0, rounds))
        got = adapter.gather(where)
        if not torch.equal(got.view(torch.uint8), kv.view(torch.uint8)):
            raise RuntimeError("paged retrieve did not put the chunk's bytes back")


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


def disk_rows(rounds: int, directory: Path) -> Iterator[Row]:
    """The files tier (a file per block, like LMCache's local disk) without fsync, as LMCache writes:
    store GB/s, and a warm retrieve against a raw read of the same bytes."""
    for tokens in CHUNKS.values():
        layout = chunk_layout(tokens)
        kv, out = random_kv(layout, tokens), torch.empty(layout.shape(tokens), dtype=layout.dtype)
        raw = kv.view(torch.uint8).reshape(-1).numpy()
        buffer = np.empty_like(raw)
        folder = Path(tempfile.mkdtemp(prefix=f"disk-{tokens}-", dir=directory))
        raw_write_fsync(folder / "raw.bin", raw)
        config = StoreConfig(model_id="kvbench", host_bytes=0, files_dir=str(folder / "files"), files_sync=False,
                             files_bytes=(2 * rounds + 6) * (layout.block_bytes + 4096))
        prompts = PromptSource(tokens)
        with KVStore(layout, config) as store:
            def put() -> None:
                store.put(prompts(), kv)
                store.flush()
            put()
            yield _gbps_row("disk", "store", layout.block_bytes, [timed(put) for _ in range(rounds)],
                            "files tier, no fsync (LMCache's local disk does not fsync either), flushed each round")
            stored = prompts()
            store.put(stored, kv)
            store.flush()
            yield _ratio_row("disk", "retrieve", alternate("disk retrieve", layout.block_bytes,
                                                           lambda: store.get_into(stored, out),
                                                           lambda: raw_read(folder / "raw.bin", buffer),
                                                           "raw read (warm)", 0, rounds))


def server_rows(rounds: int, server: object) -> Iterator[Row]:
    """Put and get of a 32 MiB chunk through the remote tier to a memory-only ``kvstore serve`` on loopback."""
    from kvstore.tiers.remote import RemoteTier

    layout = chunk_layout(CHUNKS["32MiB"])
    kv, out = random_kv(layout, layout.block_tokens), torch.empty(layout.block_shape, dtype=layout.dtype)
    tier = RemoteTier(server.url, layout, server.token, timeout_seconds=60.0, connections=1)
    try:
        def put() -> bytes:  # a new key each round: the server answers a key it holds PRESENT, storing nothing
            key = os.urandom(32)
            if tier.put_many([(key, kv)]) != 1:
                raise RuntimeError("the server did not store the chunk")
            return key
        put()
        times = []
        for _ in range(rounds):
            times.append(timed(put))
        yield _gbps_row("server", "store", layout.block_bytes, times, "remote tier to a memory-only kvstore serve")
        key = put()
        tier.get_into(key, out)
        times = [timed(lambda: tier.get_into(key, out)) for _ in range(rounds)]
        yield _gbps_row("server", "retrieve", layout.block_bytes, times, "remote tier from a memory-only kvstore serve")
    finally:
        tier.close()


def kvstore_rows(rounds: int, directory: Path, server: object | None,
                 progress: Callable[[str], None]) -> tuple[list[Row], dict[str, str]]:
    """Every kvstore row of the comparison, on one torch thread (as the peer), and what was skipped."""
    rows, skipped = [], {}
    with one_thread():
        for name, measure in (("cpu", lambda: cpu_rows(rounds)), ("paged", lambda: paged_rows(rounds)),
                              ("lookup", lambda: lookup_rows(rounds)), ("disk", lambda: disk_rows(rounds, directory))):
            rows += list(measure())
            progress(f"kvstore side: {name}")
        if server is None:
            skipped["server"] = "no cache server was started"
        else:
            rows += list(server_rows(rounds, server))
            progress("kvstore side: server")
    return rows, skipped
