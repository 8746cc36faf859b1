"""Tier-hierarchy benchmarks on 32 MiB Llama-3-8B-shaped blocks, each next to its ceiling.

Run: ``pytest bench/test_bench_tiers.py -p no:cacheprovider`` (the summary prints each ratio).
Targets (issue 3): files-tier put and warm get >= 0.8 of raw write+fsync and raw
read of the same bytes in the same directory; a put into host + LMDB + files
while the write-behind queues drain within 1.5x of a host-only put (ratio >= 0.67).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvstore import KVStore, StoreConfig
from kvstore.benchmarking import (LLAMA3_8B, FreshFiles, PromptSource, queued_blocks, random_kv, raw_read,
                                  raw_write_fsync, wait_until_draining)

LAYOUT = LLAMA3_8B
ROUNDS = 10
LOWER_BYTES = (ROUNDS + 4) * (LAYOUT.block_bytes + 4096)


@pytest.fixture(scope="module")
def kv() -> torch.Tensor:
    return random_kv(LAYOUT, LAYOUT.block_tokens)


@pytest.fixture(scope="module")
def files_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("files")


@pytest.fixture(scope="module")
def files_store(files_dir):
    config = StoreConfig(model_id="bench", host_bytes=0, files_dir=str(files_dir / "tier"), files_bytes=LOWER_BYTES)
    with KVStore(LAYOUT, config) as store:
        yield store


def _pedantic(benchmark, fn, setup=None):
    benchmark.pedantic(fn, setup=setup, rounds=ROUNDS, warmup_rounds=1)


@pytest.mark.benchmark(group="files-write")
def test_files_write_fsync_ceiling(benchmark, kv, files_dir):
    # A new file per round, as the tier writes a new file per block (see FreshFiles).
    _pedantic(benchmark, FreshFiles(files_dir, kv.view(torch.uint8).reshape(-1).numpy()))


@pytest.mark.benchmark(group="files-write")
def test_files_put(benchmark, kv, files_store):
    prompts = PromptSource(LAYOUT.block_tokens)
    _pedantic(benchmark, lambda tokens: files_store.put(tokens, kv), setup=lambda: ((prompts(),), {}))
    assert files_store.stats()["store"]["dedup_blocks"] == 0


@pytest.mark.benchmark(group="files-read")
def test_files_read_ceiling(benchmark, kv, files_dir):
    raw = kv.view(torch.uint8).reshape(-1).numpy()
    raw_write_fsync(files_dir / "raw-read.bin", raw)
    buffer = np.empty_like(raw)
    _pedantic(benchmark, lambda: raw_read(files_dir / "raw-read.bin", buffer))


@pytest.mark.benchmark(group="files-read")
def test_files_get_into(benchmark, kv, files_store):
    tokens = PromptSource(LAYOUT.block_tokens)()
    files_store.put(tokens, kv)
    out = torch.empty_like(kv)
    _pedantic(benchmark, lambda: files_store.get_into(tokens, out))
    assert torch.equal(out, kv)


# torch copies a 32 MiB block with all its intra-op threads; on a machine with as
# few cores as writer threads the background writers take cores the copy would
# use. The "1thread" groups time both puts with one torch thread to show that.
THREADS = {"cascade-put": None, "cascade-put-1thread": 1}


@pytest.fixture(params=sorted(THREADS))
def torch_threads(request, benchmark):
    benchmark.group = request.param
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS[request.param] or before)
    yield
    torch.set_num_threads(before)


def test_host_only_put_ceiling(benchmark, kv, torch_threads):
    with KVStore(LAYOUT, StoreConfig(model_id="bench", host_bytes=(ROUNDS + 4) * LAYOUT.block_bytes)) as store:
        prompts = PromptSource(LAYOUT.block_tokens)
        _pedantic(benchmark, lambda tokens: store.put(tokens, kv), setup=lambda: ((prompts(),), {}))


def test_cascade_put_while_draining(benchmark, kv, tmp_path, torch_threads):
    config = StoreConfig(model_id="bench", host_bytes=(ROUNDS + 4) * LAYOUT.block_bytes,
                         disk_dir=str(tmp_path / "lmdb"), disk_bytes=LOWER_BYTES,
                         files_dir=str(tmp_path / "files"), files_bytes=LOWER_BYTES)
    depths = []
    with KVStore(LAYOUT, config) as store:
        prompts = PromptSource(LAYOUT.block_tokens)

        def setup():
            wait_until_draining(store)  # timed while the writers drain, not against a full queue
            depths.append(queued_blocks(store) + (store.stats()["write_behind"]["queued"]
                                                  > store.stats()["write_behind"]["written"]))
            return (prompts(),), {}

        _pedantic(benchmark, lambda tokens: store.put(tokens, kv), setup=setup)
        store.flush()
        assert store.stats()["tiers"]["files"]["blocks"] == ROUNDS + 1
    assert max(depths) > 0  # the lower tiers were still being written while puts were timed
