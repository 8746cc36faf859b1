"""Codec encode/decode on one CPU core, each next to ``Tensor.copy_`` of the same input.

Run: ``pytest bench/test_bench_codecs.py --benchmark-only``. Input: synthetic
bf16 KV ``[4, 2, 512, 8, 128]`` (8 MiB) from the fidelity harness. Targets
(issue 4): int8 and 4-bit encode and decode >= 1 GB/s of 16-bit input on one
core; zstd decode >= 0.8 GB/s. GB/s = 8 MiB / median; the summary prints the
ratio to the copy ceiling measured in the same run. ``kvstore codecs``
prints the same speeds next to sizes and fidelity.
"""

from __future__ import annotations

import pytest
import torch

from kvstore.compression import get_codec
from kvstore.compression.fidelity import synthetic_kv
from kvstore.compression.table import one_thread

SPECS = ("zstd", "int8", "ec4", "ec5", "kivi4", "kivi2", "rq4", "rq3", "rq2")
ROUNDS = 10


@pytest.fixture(scope="module")
def kv() -> torch.Tensor:
    return synthetic_kv(4, 8, 512, 128, dtype=torch.bfloat16)


@pytest.fixture(autouse=True)
def single_core():
    with one_thread():
        yield


def _pedantic(benchmark, fn):
    benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=1)


@pytest.mark.benchmark(group="codec-encode")
def test_encode_copy_ceiling(benchmark, kv):
    out = torch.empty_like(kv)
    _pedantic(benchmark, lambda: out.copy_(kv))


@pytest.mark.benchmark(group="codec-decode")
def test_decode_copy_ceiling(benchmark, kv):
    out = torch.empty_like(kv)
    _pedantic(benchmark, lambda: out.copy_(kv))


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.benchmark(group="codec-encode")
def test_encode(benchmark, kv, spec):
    codec = get_codec(spec)
    _pedantic(benchmark, lambda: codec.encode(kv))


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.benchmark(group="codec-decode")
def test_decode(benchmark, kv, spec):
    codec = get_codec(spec)
    frame = codec.encode(kv)
    out = torch.empty_like(kv)
    _pedantic(benchmark, lambda: codec.decode(frame, out=out))
