"""RedisTier throughput on 2 MiB and 32 MiB blocks next to raw redis-py SET/GET of the same bytes.

Run: ``pytest bench/test_bench_redis.py -p no:cacheprovider --benchmark-only``
(needs ``redis-server`` on PATH and redis-py). A standalone ``redis-server``
on a free 127.0.0.1 port is started for the module. The ceiling of each group
is plain redis-py (the redis-benchmark-like figure for one client): ``SET``
of a bytes object of the block's size into a new key, ``GET`` of it back. The
tier adds the header, checksums, the copy of the block into the value (put)
and out of the reply into the caller's tensor (get). Each put goes to a new
key; the previous round's key is deleted untimed, so the server holds one
block at a time. The summary prints each ratio ceiling/tier (tier throughput
over raw); ``extra_info`` holds GB/s.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

import pytest
import torch

from kvstore.benchmarking import LLAMA3_8B, random_kv
from kvstore.layout import KVLayout

redis = pytest.importorskip("redis", reason="redis-py is not installed (pip install 'redis>=5')")
from kvstore.tiers.redis import RedisTier  # noqa: E402 - needs redis-py

# Blocks of 2 MiB (16 tokens) and 32 MiB (256 tokens) of Llama-3-8B-shaped KV.
LAYOUTS = {
    "2MiB": KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16, block_tokens=16),
    "32MiB": LLAMA3_8B,
}
ROUNDS = {"2MiB": 60, "32MiB": 20}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not on PATH: install Redis (Debian/Ubuntu: apt-get install redis-server)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    directory = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                                "no", "--dir", str(directory)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=30)
    deadline = time.monotonic() + 10
    while True:
        try:
            if client.ping():
                break
        except redis.ConnectionError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise
            time.sleep(0.02)
    yield f"redis://127.0.0.1:{port}/0", client
    client.close()
    process.kill()
    process.wait()


@pytest.fixture(params=sorted(LAYOUTS))
def size(request):
    return request.param


@pytest.fixture
def kv(size):
    layout = LAYOUTS[size]
    return random_kv(layout, layout.block_tokens)


@pytest.fixture
def tier(server, size):
    made = RedisTier(server[0], LAYOUTS[size], namespace=f"bench-{size}", timeout_seconds=30)
    yield made
    made.close()


def _run(benchmark, group, nbytes, fn, size, setup=None):
    benchmark.group = f"{group}-{size}"
    benchmark.pedantic(fn, setup=setup, rounds=ROUNDS[size], warmup_rounds=1)
    benchmark.extra_info["GB/s"] = round(nbytes / benchmark.stats.stats.median / 1e9, 3)


class FreshKeys:
    """Setup of a put round: delete the previous round's key (untimed), hand out a new one."""

    def __init__(self, delete, make_key):
        self._delete, self._make_key, self._n, self._last = delete, make_key, 0, None

    def __call__(self):
        if self._last is not None:
            self._delete(self._last)
        self._n += 1
        self._last = self._make_key(self._n)
        return (self._last,), {}


def test_redis_set_ceiling(benchmark, server, kv, size):
    _, client = server
    data = kv.view(torch.uint8).reshape(-1).numpy().tobytes()
    fresh = FreshKeys(client.delete, lambda n: f"raw:{size}:{n}".encode())
    _run(benchmark, "redis-put", len(data), lambda key: client.set(key, data), size, setup=fresh)


def test_redis_put_many(benchmark, tier, kv, size):
    fresh = FreshKeys(tier.delete, lambda n: n.to_bytes(32, "little"))
    _run(benchmark, "redis-put", kv.nbytes, lambda key: tier.put_many([(key, kv)]), size,
         setup=fresh)
    assert tier.stats()["blocks_written"] == ROUNDS[size] + 1 and tier.stats()["errors"] == 0


def test_redis_get_ceiling(benchmark, server, kv, size):
    _, client = server
    data = kv.view(torch.uint8).reshape(-1).numpy().tobytes()
    client.set(b"raw:get", data)
    _run(benchmark, "redis-get", len(data), lambda: client.get(b"raw:get"), size)
    assert client.get(b"raw:get") == data
    client.delete(b"raw:get")


def test_redis_get_into(benchmark, tier, kv, size):
    key = b"\x01" * 32
    assert tier.put_many([(key, kv)]) == 1
    out = torch.empty_like(kv)
    _run(benchmark, "redis-get", kv.nbytes, lambda: tier.get_into(key, out), size)
    assert torch.equal(out, kv) and tier.stats()["misses"] == 0
    tier.delete(key)
