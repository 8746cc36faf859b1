"""SGLang HiCache page batches: the kvstore backend next to SGLang's built-in ``HiCacheFile`` on the same pages.

Run (needs SGLang: ``scripts/engine-venvs.sh sglang``)::

    .venv-sglang/bin/pytest -p no:cacheprovider bench/test_bench_sglang.py --benchmark-only

Pages: a real ``MHATokenToKVPoolHost`` (``layer_first``, SGLang's default
host layout) of a Llama-3-8B-shaped shard scaled to 8 layers (8 KV heads,
head dim 128, bf16) with pages of 64 tokens: 2 MiB a page, batches of 16
pages (32 MiB), as SGLang's cache controller moves them between its host
pool and the L3 backend:

* set: ``HiCacheFile`` gets flat copies of the pages (``get_data_page``) in
  ``batch_set``, SGLang's generic path; kvstore ``host`` / ``disk`` take the
  zero-copy ``batch_set_v1`` (``interface_v1``), ``host_flat`` the generic
  path. Each round stores new page keys (both backends skip keys they hold).
  ``disk`` waits for the LMDB write-behind (``store.flush()``, fsync'ed)
  inside the timed round; ``HiCacheFile`` never fsyncs, nor does
  ``files_no_fsync`` (kvstore's files tier alone, a file per page: the same
  durability).
* get: ``HiCacheFile`` and kvstore ``host_flat`` read into flat pages and
  SGLang copies them into the pool (``set_from_flat_data_page``), the
  generic path; kvstore ``host`` / ``disk`` read straight into the pool
  (``batch_get_v1``). ``disk`` has no host tier (``host_bytes=0``): every
  page comes from LMDB. ``HiCacheFile`` reads files it has just written, so
  from the page cache, as LMDB reads its map.

One torch thread (as the other benchmarks). The summary's ratio column is
HiCacheFile's median over the subject's ("ceiling" there is the baseline:
conftest's naming), so the issue's target is a ratio >= 2;
``extra_info["GB/s"]`` holds each throughput.
"""

from __future__ import annotations

import importlib.util
import itertools
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sglang", reason="needs SGLang 0.5.23: build .venv-sglang with scripts/engine-venvs.sh sglang "
                                     "and run .venv-sglang/bin/pytest")

from sglang.srt.mem_cache.hicache_storage import HiCacheFile  # noqa: E402
from sglang.srt.mem_cache.storage import StorageBackendFactory  # noqa: E402

from kvstore.compression.table import one_thread  # noqa: E402


# SGLang's pools and its storage config, built as the backend's tests build them (torchvision stub included).
_TESTS = Path(__file__).resolve().parents[1] / "tests" / "integrations"
sys.path.insert(0, str(_TESTS))  # its sglang_env.py
_spec = importlib.util.spec_from_file_location("_sglang_backend_tests", _TESTS / "test_sglang_backend.py")
_tests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tests)
MHATokenToKVPool, MHATokenToKVPoolHost, storage_config = (_tests.MHATokenToKVPool, _tests.MHATokenToKVPoolHost,
                                                         _tests.storage_config)

LAYERS, HEADS, HEAD_DIM, PAGE = 8, 8, 128, 64
BATCH = 16  # pages per batch: 32 MiB
DEVICE_TOKENS = 2 * BATCH * PAGE  # the host pool holds twice that: 4 batches
SRC, DST = list(range(BATCH)), list(range(2 * BATCH, 3 * BATCH))
ROUNDS = 12
SUBJECTS = {
    "host": ({"host_bytes": "512MiB"}, True),
    "host_flat": ({"host_bytes": "512MiB"}, False),
    "disk": ({"host_bytes": 0}, True),
}
SET_SUBJECTS = {**SUBJECTS, "disk": ({"host_bytes": "512MiB"}, True),  # host + write-through LMDB, flushed
                # HiCacheFile's durability: a file per page, no fsync (the files tier alone)
                "files_no_fsync": ({"host_bytes": 0, "files_sync": False}, True)}


def _pool():
    device = MHATokenToKVPool(DEVICE_TOKENS, PAGE, torch.bfloat16, HEADS, HEAD_DIM, LAYERS, "cpu", False,
                              start_layer=0, end_layer=LAYERS - 1)
    capacity = device.size if device.host_capacity_tokens is None else device.host_capacity_tokens
    pool = MHATokenToKVPoolHost(device.get_device_pool_infos()[0].buffer_info, 2.0, 0, PAGE, "layer_first",
                                pin_memory=False, device_capacity_tokens=capacity, start_layer=device.start_layer,
                                end_layer=device.end_layer, write_back_staging=device.hicache_write_back_staging)
    raw = pool.kv_buffer.view(torch.uint8)
    raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0)))
    return pool


@pytest.fixture(scope="module")
def pool():
    return _pool()


@pytest.fixture(autouse=True)
def single_core(monkeypatch):
    for var in ("SGLANG_TEST_HICACHE_BACKEND_RANDOM_DELAY", "SGLANG_TEST_HICACHE_BACKEND_RANDOM_FAILURE",
                "SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR"):
        monkeypatch.delenv(var, raising=False)
    with one_thread():
        yield


def _indices(pages) -> torch.Tensor:
    return torch.cat([torch.arange(p * PAGE, (p + 1) * PAGE) for p in pages])


def _keys(tag: str, n: int) -> list[str]:
    return [f"{tag}-{i:06d}".ljust(64, "0") for i in range(n)]


def _batch_bytes(pool) -> int:
    return BATCH * pool.get_data_page(0, flat=False).numel() * pool.dtype.itemsize


def _file_backend(path) -> HiCacheFile:
    return StorageBackendFactory.create_backend("file", storage_config({"file_storage_path": str(path)}), None)


def _kvstore_backend(pool, settings: dict, disk_dir):
    extra = {"backend_name": "kvstore", "module_path": "kvstore.integrations.sglang", "class_name": "KVStoreHiCache",
             "interface_v1": 1, **settings}
    if disk_dir is not None:
        extra["disk_dir"] = str(disk_dir)
    backend = StorageBackendFactory.create_backend("dynamic", storage_config(extra), pool)
    backend.register_mem_pool_host(pool)
    return backend


def _generic_get(backend, pool, keys) -> None:
    """SGLang's ``_generic_page_get``: flat pages from the backend, copied into the host pool."""
    pages = backend.batch_get(keys, [pool.get_dummy_flat_data_page() for _ in keys])
    for p, page in zip(DST, pages):
        assert page is not None
        pool.set_from_flat_data_page(p * PAGE, page)


def _generic_set(backend, pool, keys) -> None:
    """SGLang's ``_generic_page_set``: flat copies of the host pool's pages to ``batch_set``."""
    assert backend.batch_set(keys, [pool.get_data_page(p * PAGE) for p in SRC])


def _check_dst(pool) -> None:
    for s, d in zip(SRC, DST):
        src, dst = pool.get_data_page(s * PAGE), pool.get_data_page(d * PAGE)
        assert torch.equal(src.view(torch.uint8), dst.view(torch.uint8))
    pool.kv_buffer[:, :, DST[0] * PAGE:(DST[-1] + 1) * PAGE].zero_()


def _record(benchmark, pool) -> None:
    median = benchmark.stats.stats.median
    benchmark.extra_info["GB/s"] = round(_batch_bytes(pool) / median / 1e9, 3)
    benchmark.extra_info["batch_MiB"] = _batch_bytes(pool) / (1 << 20)


def _fresh_keys(tag: str):
    counter = itertools.count()
    return lambda: ((_keys(f"{tag}{next(counter)}", BATCH),), {})


@pytest.mark.benchmark(group="sglang-set")
def test_set_hicache_file_ceiling(benchmark, pool, tmp_path):
    backend = _file_backend(tmp_path / "hicache")
    benchmark.pedantic(lambda keys: _generic_set(backend, pool, keys), setup=_fresh_keys("fs"), rounds=ROUNDS,
                       warmup_rounds=1)
    _record(benchmark, pool)


@pytest.mark.benchmark(group="sglang-set")
@pytest.mark.parametrize("subject", list(SET_SUBJECTS))
def test_set_kvstore(benchmark, pool, tmp_path, subject):
    settings, zero_copy = SET_SUBJECTS[subject]
    if subject == "files_no_fsync":
        settings = {**settings, "files_dir": str(tmp_path / "files")}
    backend = _kvstore_backend(pool, settings, tmp_path / "kv" if subject == "disk" else None)
    indices = _indices(SRC)

    def store(keys) -> None:
        if zero_copy:
            assert all(backend.batch_set_v1(keys, indices))
        else:
            _generic_set(backend, pool, keys)
        if subject == "disk":
            backend.store.flush()
    try:
        benchmark.pedantic(store, setup=_fresh_keys("ks" + subject), rounds=ROUNDS, warmup_rounds=1)
        _record(benchmark, pool)
    finally:
        backend.close()


@pytest.mark.benchmark(group="sglang-get")
def test_get_hicache_file_ceiling(benchmark, pool, tmp_path):
    backend = _file_backend(tmp_path / "hicache")
    keys = _keys("fg", BATCH)
    _generic_set(backend, pool, keys)
    benchmark.pedantic(lambda: _generic_get(backend, pool, keys), rounds=ROUNDS, warmup_rounds=1)
    _check_dst(pool)
    _record(benchmark, pool)


@pytest.mark.benchmark(group="sglang-get")
@pytest.mark.parametrize("subject", list(SUBJECTS))
def test_get_kvstore(benchmark, pool, tmp_path, subject):
    settings, zero_copy = SUBJECTS[subject]
    backend = _kvstore_backend(pool, settings, tmp_path / "kv" if subject == "disk" else None)
    keys = _keys("kg" + subject, BATCH)
    try:
        assert all(backend.batch_set_v1(keys, _indices(SRC)))
        backend.store.flush()
        indices = _indices(DST)

        def load() -> None:
            if zero_copy:
                assert all(backend.batch_get_v1(keys, indices))
            else:
                _generic_get(backend, pool, keys)
        benchmark.pedantic(load, rounds=ROUNDS, warmup_rounds=1)
        _check_dst(pool)
        _record(benchmark, pool)
        if subject == "disk":
            assert backend.store.stats()["tiers"]["lmdb"]["hits"] >= ROUNDS * BATCH
    finally:
        backend.close()


# -- v2: a host pool beside the KV pool (a sliding-window model's SWA pool: an MHA host pool of its own) ----------

# "disk": the L3 default (no host tier, LMDB fsync'ed each round); "disk_no_fsync": HiCacheFile's durability
# (it never fsyncs); "host": a host-only L3 (host_bytes alone).
V2_SUBJECTS = {"disk": ({}, True), "disk_no_fsync": ({"disk_sync": False}, True),
               "host": ({"host_bytes": "512MiB"}, False)}


def _v2_transfer(keys, pages):
    from sglang.srt.mem_cache.hicache_storage import PoolName, PoolTransfer
    return [PoolTransfer(name=PoolName.SWA, keys=list(keys), host_indices=_indices(pages))]


def _v2_backend(kind: str, pool, tmp_path):
    if kind == "file":
        backend = _file_backend(tmp_path / "hicache")
    else:
        settings, disk = V2_SUBJECTS[kind]
        backend = _kvstore_backend(pool, settings, tmp_path / "kv" if disk else None)
    backend.register_mem_host_pool_v2(pool, "swa")
    return backend


def _v2_set_round(benchmark, backend, pool, tag: str) -> None:
    def store(keys) -> None:
        assert all(backend.batch_set_v2(_v2_transfer(keys, SRC))["swa"])
        if isinstance(backend, HiCacheFile):
            return
        backend.store.flush()  # the LMDB write-behind, fsync'ed, inside the timed round
        for name in backend.pools.names:
            backend.pools._pools[name].store.flush()
    benchmark.pedantic(store, setup=_fresh_keys(tag), rounds=ROUNDS, warmup_rounds=1)
    _record(benchmark, pool)


def _v2_get_round(benchmark, backend, pool, tag: str) -> None:
    keys = _keys(tag, BATCH)
    assert all(backend.batch_set_v2(_v2_transfer(keys, SRC))["swa"])
    benchmark.pedantic(lambda: backend.batch_get_v2(_v2_transfer(keys, DST)), rounds=ROUNDS, warmup_rounds=1)
    _check_dst(pool)
    _record(benchmark, pool)


@pytest.mark.benchmark(group="sglang-v2-set")
def test_v2_set_hicache_file_ceiling(benchmark, pool, tmp_path):
    """``batch_set_v2`` of a batch of the pool beside the KV pool, SGLang's HiCacheFile."""
    _v2_set_round(benchmark, _v2_backend("file", pool, tmp_path), pool, "v2sf")


@pytest.mark.benchmark(group="sglang-v2-set")
@pytest.mark.parametrize("kind", list(V2_SUBJECTS))
def test_v2_set_kvstore(benchmark, pool, tmp_path, kind):
    backend = _v2_backend(kind, pool, tmp_path)
    try:
        _v2_set_round(benchmark, backend, pool, "v2s" + kind)
    finally:
        backend.close()


@pytest.mark.benchmark(group="sglang-v2-get")
def test_v2_get_hicache_file_ceiling(benchmark, pool, tmp_path):
    """``batch_get_v2`` of a batch stored before into other slots (checked byte-exact), SGLang's HiCacheFile."""
    _v2_get_round(benchmark, _v2_backend("file", pool, tmp_path), pool, "v2gf")


@pytest.mark.benchmark(group="sglang-v2-get")
@pytest.mark.parametrize("kind", list(V2_SUBJECTS))
def test_v2_get_kvstore(benchmark, pool, tmp_path, kind):
    backend = _v2_backend(kind, pool, tmp_path)
    try:
        _v2_get_round(benchmark, backend, pool, "v2g" + kind)
    finally:
        backend.close()


# -- v2: Mamba states (flat bytes: SGLang's MambaPoolHost concatenates each state's tensors) ----------------------

MAMBA_LAYERS = [0, 1, 2, 3]


@pytest.fixture(scope="module")
def mamba_pool():
    """A real ``MambaPoolHost`` of Mamba2 states (4 layers, 32 heads of 64 x 128 fp32 temporal state: about 4 MiB
    a state), filled with random bytes; states are its pages (host page size 1)."""
    with _tests.stubbed_torchvision():
        from sglang.srt.configs.mamba_utils import Mamba2CacheParams, Mamba2StateShape
        from sglang.srt.mem_cache.memory_pool import MambaPool
        from sglang.srt.mem_cache.pool_host.mamba import MambaPoolHost
    shape = Mamba2StateShape.create(tp_world_size=1, intermediate_size=2048, n_groups=1, num_heads=32, head_dim=64,
                                    state_size=128, conv_kernel=4)
    device = MambaPool(size=BATCH, spec_state_size=4, cache_params=Mamba2CacheParams(shape=shape, layers=MAMBA_LAYERS),
                       mamba_layer_ids=MAMBA_LAYERS, device="cpu")
    (info,) = device.get_device_pool_infos()
    host = MambaPoolHost(info.buffer_info, 2.0, 0, device_capacity=device.size, pin_memory=False,
                         layout="page_first_direct")
    gen = torch.Generator().manual_seed(0)
    for buf in host.kv_buffer:
        raw = buf.view(torch.uint8)
        raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=gen))
    return host


def _mamba_transfer(keys, slots):
    from sglang.srt.mem_cache.hicache_storage import PoolName, PoolTransfer
    return [PoolTransfer(name=PoolName.MAMBA, keys=list(keys), host_indices=torch.tensor(slots, dtype=torch.int64))]


def _mamba_backend(kind: str, kv_pool, mamba_pool, tmp_path):
    if kind == "file":
        backend = _file_backend(tmp_path / "hicache")
    else:
        settings, disk = V2_SUBJECTS[kind]
        backend = _kvstore_backend(kv_pool, settings, tmp_path / "kv" if disk else None)
    backend.register_mem_host_pool_v2(mamba_pool, "mamba")
    return backend


def _mamba_rounds(benchmark, backend, mamba_pool, op: str, tag: str) -> None:
    src, dst = list(range(BATCH)), list(range(BATCH, 2 * BATCH))
    state_bytes = mamba_pool.get_dummy_flat_data_page().numel()
    if op == "set":
        def store(keys) -> None:
            assert all(backend.batch_set_v2(_mamba_transfer(keys, src))["mamba"])
            if not isinstance(backend, HiCacheFile):
                for name in backend.pools.names:
                    backend.pools._pools[name].store.flush()
        benchmark.pedantic(store, setup=_fresh_keys(tag), rounds=ROUNDS, warmup_rounds=1)
    else:
        keys = _keys(tag, BATCH)
        assert all(backend.batch_set_v2(_mamba_transfer(keys, src))["mamba"])
        benchmark.pedantic(lambda: backend.batch_get_v2(_mamba_transfer(keys, dst)), rounds=ROUNDS, warmup_rounds=1)
        for s, d in zip(src, dst):
            assert torch.equal(mamba_pool.get_data_page(s), mamba_pool.get_data_page(d))
    median = benchmark.stats.stats.median
    benchmark.extra_info["GB/s"] = round(BATCH * state_bytes / median / 1e9, 3)
    benchmark.extra_info["batch_MiB"] = BATCH * state_bytes / (1 << 20)


@pytest.mark.benchmark(group="sglang-v2-mamba-set")
def test_v2_mamba_set_hicache_file_ceiling(benchmark, pool, mamba_pool, tmp_path):
    _mamba_rounds(benchmark, _mamba_backend("file", pool, mamba_pool, tmp_path), mamba_pool, "set", "msf")


@pytest.mark.benchmark(group="sglang-v2-mamba-set")
@pytest.mark.parametrize("kind", list(V2_SUBJECTS))
def test_v2_mamba_set_kvstore(benchmark, pool, mamba_pool, tmp_path, kind):
    backend = _mamba_backend(kind, pool, mamba_pool, tmp_path)
    try:
        _mamba_rounds(benchmark, backend, mamba_pool, "set", "ms" + kind)
    finally:
        backend.close()


@pytest.mark.benchmark(group="sglang-v2-mamba-get")
def test_v2_mamba_get_hicache_file_ceiling(benchmark, pool, mamba_pool, tmp_path):
    _mamba_rounds(benchmark, _mamba_backend("file", pool, mamba_pool, tmp_path), mamba_pool, "get", "mgf")


@pytest.mark.benchmark(group="sglang-v2-mamba-get")
@pytest.mark.parametrize("kind", list(V2_SUBJECTS))
def test_v2_mamba_get_kvstore(benchmark, pool, mamba_pool, tmp_path, kind):
    backend = _mamba_backend(kind, pool, mamba_pool, tmp_path)
    try:
        _mamba_rounds(benchmark, backend, mamba_pool, "get", "mg" + kind)
    finally:
        backend.close()
