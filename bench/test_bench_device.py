"""Device (HBM) tier transfers on 32 MiB blocks against a plain ``copy_`` of pinned memory.

Needs CUDA (skipped without it). Groups: ``h2d`` (a put from a pinned host
block into the device tier vs ``device_tensor.copy_(pinned)``) and ``d2h``
(a get from the device tier into a pinned host buffer vs
``pinned.copy_(device_tensor)``). Each timed call ends synchronised, so the
figure is the transfer, not the launch.
"""

from __future__ import annotations

import pytest
import torch

from kvstore.benchmarking import LLAMA3_8B, random_kv
from kvstore.tiers.device import DeviceTier

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

LAYOUT = LLAMA3_8B
ROUNDS = 20
KEY = bytes(range(32))


@pytest.fixture(scope="module")
def pinned() -> torch.Tensor:
    return random_kv(LAYOUT, LAYOUT.block_tokens).pin_memory()


@pytest.fixture(scope="module")
def tier():
    made = DeviceTier(LAYOUT, 4 * LAYOUT.block_bytes, "cuda")
    yield made
    made.close()


def _synced(fn):
    def run():
        fn()
        torch.cuda.synchronize()
    return run


@pytest.mark.benchmark(group="h2d")
def test_h2d_copy_ceiling(benchmark, pinned):
    device = torch.empty_like(pinned, device="cuda")
    benchmark.pedantic(_synced(lambda: device.copy_(pinned, non_blocking=True)), rounds=ROUNDS, warmup_rounds=2)


@pytest.mark.benchmark(group="h2d")
def test_h2d_device_tier_put(benchmark, tier, pinned):
    def put():
        tier.delete(KEY)
        tier.put(KEY, pinned)
    benchmark.pedantic(_synced(put), rounds=ROUNDS, warmup_rounds=2)
    out = torch.empty_like(pinned)
    assert tier.get_into(KEY, out) and torch.equal(out, pinned)


@pytest.mark.benchmark(group="d2h")
def test_d2h_copy_ceiling(benchmark, pinned):
    device = pinned.to("cuda")
    out = torch.empty_like(pinned).pin_memory()
    benchmark.pedantic(_synced(lambda: out.copy_(device, non_blocking=True)), rounds=ROUNDS, warmup_rounds=2)


@pytest.mark.benchmark(group="d2h")
def test_d2h_device_tier_get(benchmark, tier, pinned):
    tier.put(KEY, pinned)
    out = torch.empty_like(pinned).pin_memory()
    benchmark.pedantic(_synced(lambda: tier.get_into(KEY, out)), rounds=ROUNDS, warmup_rounds=2)
    assert torch.equal(out, pinned)
