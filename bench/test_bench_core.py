"""Core-store benchmarks on 32 MiB Llama-3-8B-shaped blocks, each next to its ceiling.

Run: ``pytest bench/ --benchmark-only`` (the summary prints each ratio).
Targets (issue 2): host put/get >= 0.8 of ``Tensor.copy_``; LMDB put >= 0.7
of raw write+fsync and warm get >= 0.7 of a raw read; lookup of 131,072
tokens median <= 2 ms.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvstore import KVStore, StoreConfig
from kvstore.benchmarking import (LLAMA3_8B, LOOKUP_LAYOUT, LOOKUP_TOKENS, PromptSource, random_kv,
                                  raw_read, raw_write_fsync)

LAYOUT = LLAMA3_8B
ROUNDS = 10


@pytest.fixture(scope="module")
def kv() -> torch.Tensor:
    return random_kv(LAYOUT, LAYOUT.block_tokens)


@pytest.fixture(scope="module")
def host_store():
    with KVStore(LAYOUT, StoreConfig(model_id="bench", host_bytes=(ROUNDS + 4) * LAYOUT.block_bytes)) as store:
        yield store


@pytest.fixture(scope="module")
def disk_store(tmp_path_factory):
    directory = tmp_path_factory.mktemp("lmdb")
    config = StoreConfig(model_id="bench", host_bytes=0, disk_dir=str(directory),
                         disk_bytes=(ROUNDS + 4) * (LAYOUT.block_bytes + 4096))
    with KVStore(LAYOUT, config) as store:
        yield store


def _pedantic(benchmark, fn, setup=None):
    benchmark.pedantic(fn, setup=setup, rounds=ROUNDS, warmup_rounds=1)


@pytest.mark.benchmark(group="host")
def test_copy_ceiling(benchmark, kv):
    out = torch.empty_like(kv)
    _pedantic(benchmark, lambda: out.copy_(kv))


@pytest.mark.benchmark(group="disk-write")
def test_write_fsync_ceiling(benchmark, kv, tmp_path):
    raw = kv.view(torch.uint8).reshape(-1).numpy()
    _pedantic(benchmark, lambda: raw_write_fsync(tmp_path / "raw.bin", raw))


@pytest.mark.benchmark(group="disk-read")
def test_read_ceiling(benchmark, kv, tmp_path):
    raw = kv.view(torch.uint8).reshape(-1).numpy()
    raw_write_fsync(tmp_path / "raw.bin", raw)
    buffer = np.empty_like(raw)
    _pedantic(benchmark, lambda: raw_read(tmp_path / "raw.bin", buffer))


# Each store's put is measured against the write ceiling of its medium, get against the read ceiling.
PUT_GROUPS = {"host_store": "host", "disk_store": "disk-write"}
GET_GROUPS = {"host_store": "host", "disk_store": "disk-read"}


@pytest.mark.parametrize("store_name", sorted(PUT_GROUPS))
def test_put(benchmark, kv, request, store_name):
    store = request.getfixturevalue(store_name)
    benchmark.group = PUT_GROUPS[store_name]
    prompts = PromptSource(LAYOUT.block_tokens)
    _pedantic(benchmark, lambda tokens: store.put(tokens, kv), setup=lambda: ((prompts(),), {}))
    assert store.stats()["store"]["dedup_blocks"] == 0


@pytest.mark.parametrize("store_name", sorted(GET_GROUPS))
def test_get_into(benchmark, kv, request, store_name):
    store = request.getfixturevalue(store_name)
    benchmark.group = GET_GROUPS[store_name]
    tokens = PromptSource(LAYOUT.block_tokens)()
    store.put(tokens, kv)
    out = torch.empty_like(kv)
    _pedantic(benchmark, lambda: store.get_into(tokens, out))
    assert torch.equal(out, kv)


@pytest.fixture(scope="module")
def lookup_store(tmp_path_factory):
    blocks = LOOKUP_TOKENS // LOOKUP_LAYOUT.block_tokens
    config = StoreConfig(model_id="bench", host_bytes=(blocks + 1) * LOOKUP_LAYOUT.block_bytes,
                         disk_dir=str(tmp_path_factory.mktemp("lookup")), disk_bytes="64MiB")
    prompts = PromptSource(LOOKUP_TOKENS)
    hit, miss = prompts(), prompts()
    with KVStore(LOOKUP_LAYOUT, config) as store:
        store.put(hit, random_kv(LOOKUP_LAYOUT, LOOKUP_TOKENS))
        yield store, hit, miss


@pytest.mark.benchmark(group="lookup-131k")
@pytest.mark.parametrize("case", ["hits-numpy", "hits-list", "misses-numpy", "misses-list"])
def test_lookup(benchmark, lookup_store, case):
    store, hit, miss = lookup_store
    outcome, form = case.split("-")
    tokens = hit if outcome == "hits" else miss
    tokens = tokens.tolist() if form == "list" else tokens
    result = benchmark.pedantic(lambda: store.lookup(tokens), rounds=50, warmup_rounds=2)
    assert result == (LOOKUP_TOKENS if outcome == "hits" else 0)
