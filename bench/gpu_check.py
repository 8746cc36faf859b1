#!/usr/bin/env python3
"""The GPU check: kvstore's CUDA paths, byte-exact and as ratios to ``copy_`` measured in the same run.

Run on a machine with a CUDA torch (``scripts/gpu-check.sh`` installs kvstore
from the wheels ``scripts/gpu-wheels.sh`` made, then runs this); ``--device
cpu`` runs the very same code on the CPU (that is how the test suite covers
it, with ``--quick``). Sections, each in its own ``try`` and under its own
time cap, so one failure or stall does not stop the rest:

- ``ceiling``: GB/s of ``Tensor.copy_`` host->device and device->host from
  pinned and from pageable memory, and device->device, for a few sizes (on
  the CPU: one CPU tensor into another). Every other speed figure is a ratio
  to the ``copy_`` of its kind at the largest size here (64-256 MiB: no cache effects).
- ``device_tier``: the HBM tier (``tiers/device.py``, ``device_bytes``):
  put from device and from pinned host memory, get to the device, into
  pageable and into pinned host memory; byte-exact.
- ``host_tier``: the host-RAM tier (``tiers/host.py``: its slot pool is
  pinned when CUDA exists): the pool is pinned, put from the device,
  ``store.load(..., device=...)``, a layer-wise save from device tensors;
  byte-exact.
- ``layer_wise``: ``store.load(tokens, layer_wise=True, device=...)`` and
  ``loader.layer(i)`` (its copies run on the loader's own CUDA stream),
  byte-exact, alone and while a stream of matmuls runs on another stream:
  the matmuls' slowdown and how much of the load hides behind them.
- ``codecs``: every codec of ``kvstore.compression.CODECS`` on CUDA bf16 and
  fp16 KV blocks: lossless ones byte-exact (and their frames equal to the
  CPU's), lossy ones within the bounds tests/compression/test_codecs.py
  checks (int8, kivi: half a quantization step per element; rq: relative
  RMS error); encode and decode GB/s.
- ``transformers``: ``integrations/transformers.py`` on the device: a
  random-initialised fp32 Llama's logits with a store hit within 1e-4 of
  the model without a cache (bf16: within 1e-2, the bound its tests allow
  for GPU kernels); TTFT cold vs a host-RAM hit on a ~1.2B-parameter random
  Llama (Llama-3.2-1B's shape, bf16) with a 4,096-token prompt.
- ``copy_engine``: ``kvstore.integrations.vllm_copy_check.gpu_check(device,
  quick)`` when that module and function exist (ok=None, "not in this
  build", when not).

Rows: ``{section, name, value, unit, ratio_to_ceiling, ok, detail}``.
``ok`` is True/False on correctness rows (byte-exact, within a bound) and
None on measurements: no speed figure is asserted. Timing: CUDA events on a
GPU (around a ``torch.cuda.synchronize()`` for calls that use several
streams or host work, so the figure is the whole call), ``time.perf_counter``
on the CPU; the median of the repetitions. The JSON (``--out``) is rewritten
after every section, so a run cut short still leaves what it measured.
Exit status 1 if any correctness row failed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import signal
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

SECTIONS = ("ceiling", "device_tier", "host_tier", "layer_wise", "codecs", "transformers", "copy_engine")
# Seconds each section may use: repetitions stop once it is spent (at least one runs), and an
# alarm at 1.5x raises inside the section. Sum well under the 7 minutes gpu-check.sh allows.
BUDGET_S = {"ceiling": 30, "device_tier": 30, "host_tier": 30, "layer_wise": 40, "codecs": 60,
            "transformers": 120, "copy_engine": 60}
MiB = 1 << 20
FP32_TOL = 1e-4  # tests/integrations/test_transformers.py
BF16_TOL = 1e-2  # the same file: "tests allow 1e-2 for GPU kernels"


# -- sizes -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    ceiling_bytes: tuple[int, ...]
    layers: int
    kv_heads: int
    head_dim: int
    block_tokens: int
    tokens: int  # tokens stored and read by the tier and layer-wise sections
    codec_shape: tuple[int, int, int, int, int]
    matmul: int  # side of the square bf16 matmul that competes with the layer-wise load
    reps: int
    llama: dict[str, int] = field(default_factory=dict)  # the TTFT model's config
    prompt_tokens: int = 4096
    ttft_reps: int = 3


FULL = Sizes(ceiling_bytes=(8 * MiB, 64 * MiB, 256 * MiB), layers=32, kv_heads=8, head_dim=128, block_tokens=256,
             tokens=2048, codec_shape=(32, 2, 256, 8, 128), matmul=8192, reps=5,
             # Llama-3.2-1B's shape: 1.24B parameters (embeddings tied), 32 KiB of bf16 KV a token.
             llama=dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192),
             prompt_tokens=4096, ttft_reps=3)
QUICK = Sizes(ceiling_bytes=(1 * MiB, 4 * MiB), layers=4, kv_heads=2, head_dim=64, block_tokens=16,
              tokens=64, codec_shape=(2, 2, 48, 2, 64), matmul=192, reps=2,
              llama=dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
              prompt_tokens=64, ttft_reps=1)


# -- rows, timing, budgets -----------------------------------------------------------------------


def row(section: str, name: str, value: Any = None, unit: str = "", ratio: float | None = None,
        ok: bool | None = None, detail: str = "") -> dict[str, Any]:
    def clean(x: Any) -> Any:
        if hasattr(x, "item") and callable(x.item):  # a tensor or numpy scalar
            x = x.item()
        if isinstance(x, float) and not math.isfinite(x):
            return None
        return x
    return {"section": section, "name": name, "value": clean(value), "unit": unit,
            "ratio_to_ceiling": None if ratio is None else clean(round(float(ratio), 4)),
            "ok": ok, "detail": detail}


class SectionTimeout(Exception):
    pass


class Budget:
    def __init__(self, seconds: float):
        self.seconds = seconds
        self.start = time.perf_counter()

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)

    def reps(self, n: int) -> Iterator[int]:
        """Up to ``n`` repetitions; stops early (after the first) when the budget is spent."""
        for i in range(n):
            if i and self.left() <= 0:
                return
            yield i


@contextmanager
def alarm(seconds: float) -> Iterator[None]:
    """Raise ``SectionTimeout`` in this (main) thread after ``seconds`` (where SIGALRM exists)."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def fire(*_: Any) -> None:
        raise SectionTimeout(f"section ran past its hard cap of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Timer:
    """Seconds per call: CUDA events on a GPU, ``perf_counter`` on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def once(self, fn: Callable[[], object], synced: bool = True) -> float:
        """One call. ``synced``: the end mark waits for every stream (calls using side streams or the host);
        else both marks are on the current stream (a plain ``copy_``)."""
        if not self.cuda:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        torch.cuda.synchronize(self.device)
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        if synced:
            torch.cuda.synchronize(self.device)
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1e3

    def median(self, fn: Callable[[], object], reps: Iterator[int], warmup: int = 1, synced: bool = True) -> float:
        for _ in range(warmup):
            self.once(fn, synced)
        return statistics.median(self.once(fn, synced) for _ in reps)


@dataclass
class Context:
    device: torch.device
    sizes: Sizes
    quick: bool
    timer: Timer
    ceilings: dict[str, float] = field(default_factory=dict)  # kind -> GB/s of copy_ (largest size) in this run
    budget: Budget | None = None

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def reps(self, n: int | None = None) -> Iterator[int]:
        return self.budget.reps(self.sizes.reps if n is None else n)

    def ratio(self, kind: str, gbps: float) -> float | None:
        ceiling = self.ceilings.get(kind)
        return gbps / ceiling if ceiling else None

    def speed(self, section: str, name: str, nbytes: int, seconds: float, kind: str, detail: str = "") -> dict:
        gbps = nbytes / seconds / 1e9 if seconds > 0 else float("inf")
        text = f"vs {kind} copy_" + (f"; {detail}" if detail else "")
        return row(section, name, round(gbps, 3), "GB/s", self.ratio(kind, gbps), None, text)


def bits_of(t: torch.Tensor) -> torch.Tensor:
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(width)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(bits_of(a), bits_of(b.to(a.device)))


def exact_row(section: str, name: str, got: torch.Tensor, expected: torch.Tensor, detail: str = "") -> dict:
    ok = same_bytes(got, expected)
    differing = 0 if ok else (
        int((bits_of(got) != bits_of(expected.to(got.device))).sum()) if got.shape == expected.shape else -1)
    where = f"on {got.device}"
    return row(section, name, differing, "elements differing", None, ok,
               f"byte-exact {where}" + (f"; {detail}" if detail else ""))


def random_kv(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32).to(dtype)


def layout_of(sizes: Sizes):
    from kvstore import KVLayout
    return KVLayout(num_layers=sizes.layers, num_kv_heads=sizes.kv_heads, head_dim=sizes.head_dim,
                    dtype=torch.bfloat16, block_tokens=sizes.block_tokens)


def tokens_of(n: int, seed: int = 0) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128_000, (n,), generator=generator).tolist()


def pinned_like(t: torch.Tensor, cuda: bool) -> torch.Tensor:
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=cuda)
    host.copy_(t)
    return host


def label(nbytes: int) -> str:
    return f"{nbytes // MiB}MiB" if nbytes >= MiB else f"{nbytes // 1024}KiB"


class Busy:
    """Keeps the current CUDA stream busy for about ``seconds`` (matmuls), so work ordered after it waits:
    what a side stream does in that window races with what the caller does next. No-op on the CPU."""

    def __init__(self, ctx: "Context"):
        self.ctx = ctx
        if not ctx.cuda:
            return
        m = 8192  # ~1.4 ms a product on an H200: a few hundred launches make 0.3 s
        self.a = torch.randn(m, m, device=ctx.device, dtype=torch.bfloat16)
        self.c = torch.empty_like(self.a)
        for _ in range(2):
            torch.mm(self.a, self.a, out=self.c)
        self.one = ctx.timer.once(lambda: [torch.mm(self.a, self.a, out=self.c) for _ in range(5)], synced=False) / 5

    def enqueue(self, seconds: float) -> int:
        if not self.ctx.cuda:
            return 0
        k = max(1, min(20_000, math.ceil(seconds / self.one)))
        for _ in range(k):
            torch.mm(self.a, self.a, out=self.c)
        return k


# -- sections ----------------------------------------------------------------------------------


def section_ceiling(ctx: Context, out: list[dict]) -> None:
    rows, checks = [], []
    for size in ctx.sizes.ceiling_bytes:
        src = torch.randint(0, 256, (size,), dtype=torch.uint8)
        if ctx.cuda:
            pinned, pinned_out = src.pin_memory(), torch.empty(size, dtype=torch.uint8, pin_memory=True)
            pageable, pageable_out = src.clone(), torch.zeros(size, dtype=torch.uint8)
            dev_a = torch.empty(size, dtype=torch.uint8, device=ctx.device)
            dev_b = torch.empty_like(dev_a)
            kinds = {
                "h2d_pinned": lambda: dev_a.copy_(pinned, non_blocking=True),
                "d2h_pinned": lambda: pinned_out.copy_(dev_a, non_blocking=True),
                "h2d_pageable": lambda: dev_a.copy_(pageable),
                "d2h_pageable": lambda: pageable_out.copy_(dev_a),
                "d2d": lambda: dev_b.copy_(dev_a),
            }
        else:
            dst = torch.zeros(size, dtype=torch.uint8)
            kinds = {"cpu_copy": lambda: dst.copy_(src)}
        for kind, fn in kinds.items():
            seconds = ctx.timer.median(fn, ctx.reps(max(ctx.sizes.reps, 7)), warmup=2, synced=False)
            gbps = size / seconds / 1e9
            rows.append((kind, size, gbps))
        ctx.timer.sync()
        if ctx.cuda:
            checks += [torch.equal(dev_a.cpu(), src), torch.equal(dev_b.cpu(), src),
                       torch.equal(pinned_out, src), torch.equal(pageable_out, src)]
        else:
            checks.append(torch.equal(dst, src))
    largest = {kind: gbps for kind, size, gbps in rows if size == max(ctx.sizes.ceiling_bytes)}
    ctx.ceilings.update(largest)
    if not ctx.cuda:  # one kind of memory: every transfer's ceiling is the CPU copy
        for kind in ("h2d_pinned", "d2h_pinned", "h2d_pageable", "d2h_pageable", "d2d"):
            ctx.ceilings[kind] = largest["cpu_copy"]
    out += [row("ceiling", f"{kind}_{label(size)}", round(gbps, 3), "GB/s", gbps / largest[kind], None,
               "Tensor.copy_; ratio: to the largest size, the ceiling of the other sections"
               + ("; d2d counts bytes once" if kind == "d2d" else ""))
           for kind, size, gbps in rows]
    out.append(row("ceiling", "copies_byte_exact", sum(not c for c in checks), "copies differing", None,
                   all(checks), f"{len(checks)} copies checked"))


def section_device_tier(ctx: Context, rows: list[dict]) -> None:
    from kvstore import KVStore, StoreConfig

    layout, n, sec = layout_of(ctx.sizes), ctx.sizes.tokens, "device_tier"
    kv_dev = random_kv(layout.shape(n), layout.dtype, ctx.device, seed=1)
    kv_host = pinned_like(kv_dev, ctx.cuda)
    nbytes = kv_dev.nbytes
    tokens = tokens_of(n, seed=1)
    config = StoreConfig(model_id="gpu-check", device_bytes=4 * nbytes, device=str(ctx.device), host_bytes=0,
                         prefill_tokens_per_second=1.0)
    with KVStore(layout, config) as store:
        tier = store.device
        on = getattr(tier, "device", None)
        rows.append(row(sec, "tier_on_device", str(on), "", None, on is not None and on.type == ctx.device.type,
                        f"store.device is {type(tier).__name__}; pool on {on}; copies on "
                        f"{'its own CUDA stream' if getattr(tier, '_stream', None) is not None else 'the caller'}"))
        salt = iter(range(1_000_000))

        def put_from(kv: torch.Tensor) -> Callable[[], object]:
            return lambda: store.put(tokens, kv, salt=f"put-{next(salt)}")

        t = ctx.timer.median(put_from(kv_dev), ctx.reps())
        rows.append(ctx.speed(sec, "put_from_device", nbytes, t, "d2d"))
        t = ctx.timer.median(put_from(kv_host), ctx.reps())
        rows.append(ctx.speed(sec, "put_from_pinned_host", nbytes, t, "h2d_pinned"))

        store.put(tokens, kv_dev, salt="dev")
        store.put(tokens, kv_host, salt="host")
        got = {}
        t = ctx.timer.median(lambda: got.__setitem__("dev", store.get(tokens, salt="dev", device=ctx.device)),
                             ctx.reps())
        rows.append(ctx.speed(sec, "get_to_device", nbytes, t, "d2d"))
        t = ctx.timer.median(lambda: got.__setitem__("cpu", store.get(tokens, salt="host", device="cpu")),
                             ctx.reps())
        rows.append(ctx.speed(sec, "get_to_host", nbytes, t, "d2h_pageable",
                              "store.get(device='cpu') returns a pageable tensor"))
        out = torch.empty(kv_host.shape, dtype=kv_host.dtype, pin_memory=ctx.cuda)
        t = ctx.timer.median(lambda: store.get_into(tokens, out, salt="host"), ctx.reps())
        rows.append(ctx.speed(sec, "get_into_pinned_host", nbytes, t, "d2h_pinned"))
        ctx.timer.sync()
        rows.append(exact_row(sec, "put_device_get_device_exact", got["dev"], kv_dev))
        rows.append(exact_row(sec, "put_pinned_get_host_exact", got["cpu"], kv_host))
        rows.append(exact_row(sec, "get_into_pinned_exact", out, kv_host))
        rows.append(exact_row(sec, "put_device_get_host_exact", store.get(tokens, salt="dev", device="cpu"), kv_host))
        # put from a device tensor, then overwrite the tensor on the same stream: the stored copy must not change
        busy = Busy(ctx)
        src = random_kv(layout.shape(n), layout.dtype, ctx.device, seed=11)
        original = src.clone()
        busy.enqueue(0.2)  # the tier's side stream waits for this before copying
        store.put(tokens, src, salt="reuse")
        src.zero_()  # the caller reuses its buffer once put returned
        rows.append(exact_row(sec, "source_reusable_after_put", store.get(tokens, salt="reuse", device=ctx.device),
                              original, "put(kv on the device), then kv.zero_() on the caller's stream, then get"))
        stats = store.stats()["tiers"]["device"]
        rows.append(row(sec, "tier_hits", stats.get("hits"), "hits", None, None,
                        f"evictions {stats.get('evictions')}, errors {stats.get('errors')}"))


def section_host_tier(ctx: Context, rows: list[dict]) -> None:
    from kvstore import KVStore, StoreConfig

    layout, n, sec = layout_of(ctx.sizes), ctx.sizes.tokens, "host_tier"
    kv_dev = random_kv(layout.shape(n), layout.dtype, ctx.device, seed=2)
    kv_host = kv_dev.cpu()
    nbytes = kv_dev.nbytes
    tokens = tokens_of(n, seed=2)
    config = StoreConfig(model_id="gpu-check", host_bytes=4 * nbytes, prefill_tokens_per_second=1.0)
    with KVStore(layout, config) as store:
        pool = getattr(store.host, "_pool", None)
        pinned = None if pool is None else bool(pool.is_pinned())
        expected = torch.cuda.is_available()
        rows.append(row(sec, "pool_pinned", pinned, "", None, None if pinned is None else pinned == expected,
                        f"expected {'pinned (CUDA available)' if expected else 'not pinned (no CUDA)'}"))
        salt = iter(range(1_000_000))
        t = ctx.timer.median(lambda: store.put(tokens, kv_dev, salt=f"put-{next(salt)}"), ctx.reps())
        rows.append(ctx.speed(sec, "put_from_device", nbytes, t, "d2h_pinned"))

        store.put(tokens, kv_dev, salt="kv")
        got = {}
        t = ctx.timer.median(lambda: got.__setitem__("load", store.load(tokens, salt="kv", device=ctx.device)),
                             ctx.reps())
        rows.append(ctx.speed(sec, "load_to_device", nbytes, t, "h2d_pinned", "store.load(device=...)"))
        ctx.timer.sync()
        rows.append(exact_row(sec, "load_to_device_exact", got["load"], kv_dev))
        rows.append(exact_row(sec, "get_to_host_exact", store.get(tokens, salt="kv"), kv_host))

        # layer-wise save of device tensors: staged on the host, stored when the last layer arrives
        staged = {}

        def save_layers() -> None:
            saver = store.save(tokens, layer_wise=True, salt=f"save-{next(salt)}")
            staged["pinned"] = bool(saver.layer_buffer(0).is_pinned())
            for layer in range(layout.num_layers):
                saver.save_layer(layer, kv_dev[layer])
        t = ctx.timer.median(save_layers, ctx.reps())
        rows.append(ctx.speed(sec, "save_layer_wise_from_device", nbytes, t, "d2h_pinned",
                              f"staging buffer pinned: {staged['pinned']}"))
        rows.append(row(sec, "save_staging_pinned", staged["pinned"], "", None, None,
                        "LayerSaver's staging comes from BufferPool (numpy, pageable); a pinned one would let "
                        "the device->host copy run at the pinned ceiling"))
        saver = store.save(tokens, layer_wise=True, salt="saved")
        for layer in range(layout.num_layers):
            saver.save_layer(layer, kv_dev[layer])
        rows.append(exact_row(sec, "save_layer_wise_exact", store.load(tokens, salt="saved", device=ctx.device),
                              kv_dev, f"{saver.stored} blocks stored"))


def section_layer_wise(ctx: Context, rows: list[dict]) -> None:
    from kvstore import KVStore, StoreConfig

    layout, n, sec = layout_of(ctx.sizes), ctx.sizes.tokens, "layer_wise"
    kv_dev = random_kv(layout.shape(n), layout.dtype, ctx.device, seed=3)
    nbytes = kv_dev.nbytes
    tokens = tokens_of(n, seed=3)
    # prefetch handles pin at most half the fastest pool: 4x leaves every block pinned (no private reads)
    config = StoreConfig(model_id="gpu-check", host_bytes=4 * nbytes, prefill_tokens_per_second=1.0)
    with KVStore(layout, config) as store:
        store.put(tokens, kv_dev, salt="lw")
        info: dict[str, Any] = {}

        def load_into(dst: torch.Tensor) -> None:
            with store.load(tokens, salt="lw", layer_wise=True, device=ctx.device) as loader:
                info["tokens"] = loader.num_tokens
                pipe = getattr(loader, "_pipe", None)
                info["stream"] = getattr(pipe, "stream", None) is not None
                for layer in range(layout.num_layers):
                    dst[layer].copy_(loader.layer(layer))  # the engine's copy into its own cache

        dst = torch.empty_like(kv_dev)
        t_load = ctx.timer.median(lambda: load_into(dst), ctx.reps())
        ctx.timer.sync()
        rows.append(exact_row(sec, "layer_wise_load_exact", dst, kv_dev,
                              f"{info['tokens']} of {n} tokens, {layout.num_layers} layers, lookahead "
                              f"{config.load_lookahead_layers}"))
        rows.append(row(sec, "loader_stream", info["stream"], "", None, None,
                        "copies on the loader's own CUDA stream" if info["stream"] else "no side stream"))
        rows.append(ctx.speed(sec, "load_alone", nbytes, t_load, "h2d_pinned"))

        rows.append(pins_race_check(ctx))

        m = ctx.sizes.matmul if ctx.cuda else min(ctx.sizes.matmul, 1024)
        mm_dtype = torch.bfloat16 if ctx.cuda else torch.float32
        a = torch.randn(m, m, device=ctx.device).to(mm_dtype)
        b = torch.randn(m, m, device=ctx.device).to(mm_dtype)
        c = torch.empty(m, m, device=ctx.device, dtype=mm_dtype)
        dst2 = torch.empty_like(kv_dev)
        if ctx.cuda:
            side = torch.cuda.Stream(ctx.device)

            def burst(k: int) -> tuple[torch.cuda.Event, torch.cuda.Event]:
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                with torch.cuda.stream(side):
                    begin.record(side)
                    for _ in range(k):
                        torch.mm(a, b, out=c)
                    end.record(side)
                return begin, end

            burst(3)
            ctx.timer.sync()
            begin, end = burst(5)
            ctx.timer.sync()
            one = begin.elapsed_time(end) / 1e3 / 5
            k = max(4, min(5000, math.ceil(2 * t_load / one)))
            alone = []
            for _ in ctx.reps(3):
                begin, end = burst(k)
                ctx.timer.sync()
                alone.append(begin.elapsed_time(end) / 1e3)
            t_mm = statistics.median(alone)
            results = []
            for _ in ctx.reps(3):
                ctx.timer.sync()
                side.wait_stream(torch.cuda.current_stream(ctx.device))
                mm_begin, mm_end = burst(k)
                load_begin, load_end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                load_begin.record()
                load_into(dst2)
                load_end.record()
                ctx.timer.sync()
                t_mm_c = mm_begin.elapsed_time(mm_end) / 1e3
                t_load_c = load_begin.elapsed_time(load_end) / 1e3
                total = max(mm_begin.elapsed_time(mm_end), mm_begin.elapsed_time(load_end)) / 1e3
                results.append((t_mm_c, t_load_c, total))
        else:
            def burst_cpu(k: int) -> None:
                for _ in range(k):
                    torch.mm(a, b, out=c)

            burst_cpu(3)
            start = time.perf_counter()
            burst_cpu(5)
            one = (time.perf_counter() - start) / 5
            k = max(4, min(5000, math.ceil(2 * t_load / one)))
            t_mm = ctx.timer.median(lambda: burst_cpu(k), ctx.reps(3), warmup=1)
            results = []
            for _ in ctx.reps(3):
                marks: dict[str, float] = {}

                def worker() -> None:
                    begin = time.perf_counter()
                    burst_cpu(k)
                    marks["mm"] = time.perf_counter() - begin
                    marks["mm_end"] = time.perf_counter()

                start = time.perf_counter()
                thread = threading.Thread(target=worker)
                thread.start()
                load_into(dst2)
                load_end = time.perf_counter()
                thread.join()
                results.append((marks["mm"], load_end - start, max(marks["mm_end"], load_end) - start))
        t_mm_c = statistics.median(r[0] for r in results)
        t_load_c = statistics.median(r[1] for r in results)
        total = statistics.median(r[2] for r in results)
        rows.append(exact_row(sec, "layer_wise_load_with_matmul_exact", dst2, kv_dev,
                              "while matmuls run " + ("on another stream" if ctx.cuda else "in another thread")))
        rows.append(ctx.speed(sec, "load_with_matmul", nbytes, t_load_c, "h2d_pinned"))
        flops = 2 * m ** 3 * k
        rows.append(row(sec, "matmul_alone", round(flops / t_mm / 1e12, 3), "TFLOP/s", None, None,
                        f"{k} x {m}x{m} {str(mm_dtype).removeprefix('torch.')} matmuls, {t_mm * 1e3:.2f} ms"))
        rows.append(row(sec, "matmul_slowdown", round(t_mm_c / t_mm, 4), "x", None, None,
                        f"matmuls {t_mm * 1e3:.2f} ms alone, {t_mm_c * 1e3:.2f} ms beside the load"))
        rows.append(row(sec, "load_slowdown", round(t_load_c / t_load, 4), "x", None, None,
                        f"load {t_load * 1e3:.2f} ms alone, {t_load_c * 1e3:.2f} ms beside the matmuls"))
        overlap = (t_load + t_mm - total) / min(t_load, t_mm)
        rows.append(row(sec, "load_overlap", round(overlap, 4), "fraction", None, None,
                        f"(load alone + matmuls alone - both together) / the shorter; both together "
                        f"{total * 1e3:.2f} ms; 1: fully hidden, 0: serialised"))


def pins_race_check(ctx: Context) -> dict:
    """A layer-wise load's pinned host blocks must stay unchanged until its last host-to-device copy has run.

    The engine keeps its stream busy while it asks for the layer that lets the loader enqueue its last
    copies (they wait for the engine's stream to release a ring buffer); the loader then releases the
    prefetch pins; a put that evicts those blocks overwrites their host slots. If the pins were released
    before the copies ran, the last layers arrive with the new bytes."""
    from kvstore import KVStore, StoreConfig

    sec, layout = "layer_wise", layout_of(ctx.sizes)
    blocks = 2
    n = blocks * layout.block_tokens
    kv_a = random_kv(layout.shape(n), layout.dtype, ctx.device, seed=21).cpu()
    kv_b = random_kv(layout.shape(2 * n), layout.dtype, ctx.device, seed=22).cpu()
    tokens_a, tokens_b = tokens_of(n, seed=21), tokens_of(2 * n, seed=22)
    # two slots per block of A: every block of A can be pinned (prefetches pin at most half the pool),
    # and B (twice A) fills the free half, then evicts A
    config = StoreConfig(model_id="gpu-check-race", host_bytes=2 * blocks * layout.block_bytes,
                         prefill_tokens_per_second=1.0)
    busy = Busy(ctx)
    last, look = layout.num_layers - 1, config.load_lookahead_layers
    trigger = last - look
    if trigger < 1:
        return row(sec, "pins_held_until_copies_land", None, "", None, None,
                   f"needs more than {look + 1} layers, got {layout.num_layers}")
    with KVStore(layout, config) as store:
        store.put(tokens_a, kv_a, salt="a")
        dst = torch.empty(kv_a.shape, dtype=kv_a.dtype, device=ctx.device)
        stored_b = evicted = 0
        with store.load(tokens_a, salt="a", layer_wise=True, device=ctx.device) as loader:
            for layer in range(layout.num_layers):
                if layer == trigger:
                    busy.enqueue(0.3)
                dst[layer].copy_(loader.layer(layer))
                if layer == trigger:  # the worker now enqueues the last layers, then releases its pins
                    deadline = time.perf_counter() + 5
                    while loader.loaded_layers < layout.num_layers and time.perf_counter() < deadline:
                        time.sleep(0.001)
                    time.sleep(0.02)  # its ``finally: handle.close()``
                    before = store.stats()["tiers"]["host"].get("evictions", 0)
                    stored_b = store.put(tokens_b, kv_b, salt="b")
                    evicted = store.stats()["tiers"]["host"].get("evictions", 0) - before
        ctx.timer.sync()
    differing = [layer for layer in range(layout.num_layers) if not same_bytes(dst[layer].cpu(), kv_a[layer])]
    return row(sec, "pins_held_until_copies_land", len(differing), "layers differing", None, not differing,
               f"a put evicting the loaded blocks ({stored_b} blocks stored, {evicted} evicted) right after the "
               f"loader enqueued its last copies; layers differing: {differing}")


def within_bound(codec: Any, x: torch.Tensor, y: torch.Tensor) -> tuple[bool, float, str, str]:
    """(ok, value, unit, what) of ``y`` decoded from ``x`` by ``codec``, as the codec tests check it."""
    from kvstore.compression import Int8Codec, KiviCodec, RotationCodec
    from kvstore.compression.bounds import RQ_REL_RMS, int8_bound, kivi_bound

    if codec.lossless:
        differing = int((bits_of(y) != bits_of(x)).sum())
        return differing == 0, differing, "elements differing", "byte-exact"
    err = (y.float() - x.float()).abs()
    if isinstance(codec, Int8Codec):
        excess = float((err - int8_bound(x)).max())
        return excess <= 0, float(err.max()), "max abs error", f"<= half a step per vector (worst excess {excess:.3g})"
    if isinstance(codec, KiviCodec):
        excess = float((err - kivi_bound(x, codec.bits, codec.group, codec.residual)).max())
        return excess <= 0, float(err.max()), "max abs error", f"<= half a step per group (worst excess {excess:.3g})"
    if isinstance(codec, RotationCodec) and codec.bits in RQ_REL_RMS:
        rel = float((y.double() - x.double()).norm() / x.double().norm())
        return rel <= RQ_REL_RMS[codec.bits], rel, "relative RMS error", f"<= {RQ_REL_RMS[codec.bits]}"
    rel = float((y.double() - x.double()).norm() / x.double().norm())
    return math.isfinite(rel), rel, "relative RMS error", "no documented bound: finite"


def section_codecs(ctx: Context, rows: list[dict]) -> None:
    from kvstore.compression import CODECS, get_codec

    sec = "codecs"
    for dtype in (torch.bfloat16, torch.float16):
        dt = str(dtype).removeprefix("torch.")
        x = random_kv(ctx.sizes.codec_shape, dtype, ctx.device, seed=4)
        nbytes = x.nbytes
        x_cpu = x.cpu()
        for name in CODECS:
            if ctx.budget.left() <= 0:
                rows.append(row(sec, f"{name}_{dt}", None, "", None, None, "skipped: section budget spent"))
                continue
            try:
                codec = get_codec(name)
                frame = codec.encode(x)
                y = codec.decode(frame, device=ctx.device)
                ctx.timer.sync()
                where = y.device.type == ctx.device.type and y.shape == x.shape and y.dtype == x.dtype
                ok, value, unit, what = within_bound(codec, x, y)
                also = ""
                if ctx.cuda:
                    cpu_diff = float((codec.decode(frame).float() - y.float().cpu()).abs().max())
                    also = f"; same frame decoded on the CPU differs by {cpu_diff:.3g}"
                rows.append(row(sec, f"{name}_{dt}_{'exact' if codec.lossless else 'bound'}", value, unit, None,
                                ok and where,
                                f"{what}; decoded on {y.device}{also}; {nbytes / len(frame):.2f}x smaller"))
                if codec.lossless and ctx.cuda:
                    cpu_frame = codec.encode(x_cpu)
                    rows.append(row(sec, f"{name}_{dt}_frame_as_cpu", len(frame), "bytes", None,
                                    bytes(cpu_frame) == bytes(frame),
                                    f"frame of the {ctx.device.type} tensor == frame of its CPU copy"))
                reps = 1 if ctx.quick else None
                t_enc = ctx.timer.median(lambda: codec.encode(x), ctx.reps(reps), warmup=0)
                t_dec = ctx.timer.median(lambda: codec.decode(frame, device=ctx.device), ctx.reps(reps), warmup=0)
                rows.append(ctx.speed(sec, f"{name}_{dt}_encode", nbytes, t_enc, "d2h_pageable",
                                      f"{ctx.device.type} tensor -> host frame"))
                rows.append(ctx.speed(sec, f"{name}_{dt}_decode", nbytes, t_dec, "h2d_pageable",
                                      f"host frame -> {ctx.device.type} tensor"))
            except SectionTimeout:
                raise
            except Exception as exc:  # one codec failing does not hide the others
                rows.append(row(sec, f"{name}_{dt}", None, "", None, False, failure_text(exc)))


def section_transformers(ctx: Context, rows: list[dict]) -> None:
    import transformers
    from kvstore import KVStore, StoreConfig
    from kvstore.integrations.transformers import CachedModel, layout_for

    sec, dev = "transformers", ctx.device
    rows.append(row(sec, "version", transformers.__version__, "", None, None, "transformers"))

    # 1. equality: a store hit gives the logits of the model without a cache (the tests' tiny Llama)
    for dtype, tol in ((torch.float32, FP32_TOL), (torch.bfloat16, BF16_TOL)):
        dt = str(dtype).removeprefix("torch.")
        config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, max_position_embeddings=256,
                                          initializer_range=0.1)
        config._attn_implementation = "sdpa"
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config).to(dtype).to(dev).eval()
        length, block = 37, 16  # two blocks and a partial tail
        ids = torch.randint(0, 512, (1, length), generator=torch.Generator().manual_seed(length)).to(dev)
        store_config = StoreConfig(model_id=f"gpu-check-{dt}", host_bytes="4MiB", prefill_tokens_per_second=1.0)
        with KVStore(layout_for(model, block_tokens=block), store_config) as store:
            cached = CachedModel(model, store)
            with torch.no_grad():
                expected = model(ids).logits.float()
            cold_out, cold = cached.forward(ids)
            warm_out, warm = cached.forward(ids)
            cold_diff = float((cold_out.logits.float() - expected).abs().max())
            hit_diff = float((warm_out.logits.float()[:, -1] - expected[:, -1]).abs().max())
        hit_ok = hit_diff <= tol and warm.loaded_tokens == length - 1
        rows.append(row(sec, f"{dt}_cold_logits", cold_diff, "max abs diff", None, cold_diff <= tol,
                        f"no hit vs model(ids) on {dev}; bound {tol}"))
        rows.append(row(sec, f"{dt}_hit_logits", hit_diff, "max abs diff", None, hit_ok,
                        f"{warm.loaded_tokens} of {length} tokens loaded from the host tier vs model(ids); "
                        f"bound {tol}"))
        del model

    # 2. TTFT: cold vs a host-RAM hit on a model large enough for prefill to cost something
    config = transformers.LlamaConfig(initializer_range=0.02, tie_word_embeddings=True, **ctx.sizes.llama)
    config._attn_implementation = "sdpa"
    start = time.perf_counter()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(dev):
            torch.manual_seed(0)
            model = transformers.LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    model = model.to(torch.bfloat16)
    ctx.timer.sync()
    built = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    n = ctx.sizes.prompt_tokens
    layout = layout_for(model, block_tokens=ctx.sizes.block_tokens)
    kv_bytes = layout.token_bytes * n
    reps = ctx.sizes.ttft_reps
    store = KVStore(layout, StoreConfig(model_id="gpu-check-ttft", host_bytes=(reps + 2) * kv_bytes,
                                        prefill_tokens_per_second=1.0))
    try:
        cached = CachedModel(model, store)
        vocab = config.vocab_size

        def prompt(seed: int) -> torch.Tensor:
            return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed)).to(dev)

        with torch.no_grad():
            for _ in range(1 if ctx.quick else 2):
                model(prompt(999), logits_to_keep=1)
        if not ctx.quick:
            cached.forward(prompt(998), logits_to_keep=1)  # warm the store's paths too: a miss, then a hit
            cached.forward(prompt(998), logits_to_keep=1)
        colds, hits, loads, diffs, loaded = [], [], [], [], []
        for rep in ctx.budget.reps(reps):
            ids = prompt(rep)
            cold_out, cold = cached.forward(ids, logits_to_keep=1)
            hit_out, hit = cached.forward(ids, logits_to_keep=1)
            colds.append(cold.ttft_seconds)
            hits.append(hit.ttft_seconds)
            loads.append(hit.load_seconds)
            loaded.append(hit.loaded_tokens)
            diffs.append(float((hit_out.logits[:, -1].float() - cold_out.logits[:, -1].float()).abs().max()))
    finally:
        store.close()
    cold_s, hit_s, load_s = statistics.median(colds), statistics.median(hits), statistics.median(loads)
    what = (f"{params / 1e6:,.1f}M-parameter random Llama, bf16, {n}-token prompt, built in {built:.1f} s, "
            f"{len(colds)} prompts")
    rows.append(row(sec, "ttft_cold", round(cold_s * 1e3, 3), "ms", None, None, what))
    rows.append(row(sec, "ttft_host_hit", round(hit_s * 1e3, 3), "ms", None, None,
                    f"{min(loaded)} tokens loaded from the host tier, 1 computed"))
    rows.append(row(sec, "ttft_speedup", round(cold_s / hit_s, 3), "x", None, None, "cold / host hit"))
    rows.append(ctx.speed(sec, "hit_load", layout.token_bytes * min(loaded), load_s, "h2d_pinned",
                          "plan + store.load + DynamicCache, from RequestInfo.load_seconds"))
    rows.append(row(sec, "ttft_hit_loaded_all", min(loaded), "tokens", None, min(loaded) == n - 1,
                    f"expected {n - 1} (every token but the last)"))
    rows.append(row(sec, "bf16_hit_vs_cold_last_logits", max(diffs), "max abs diff", None, None,
                    "large random bf16 model: information only"))
    del model
    if ctx.cuda:
        torch.cuda.empty_cache()


def section_copy_engine(ctx: Context, rows: list[dict]) -> None:
    sec, name = "copy_engine", "kvstore.integrations.vllm_copy_check"
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name in (name, "kvstore.integrations"):
            rows.append(row(sec, "gpu_check", None, "", None, None, "not in this build"))
            return
        raise
    check = getattr(module, "gpu_check", None)
    if not callable(check):
        rows.append(row(sec, "gpu_check", None, "", None, None, "not in this build (no gpu_check in vllm_copy_check)"))
        return
    found = check(ctx.device, ctx.quick) or []
    if not found:
        rows.append(row(sec, "gpu_check", None, "", None, None, "gpu_check returned no rows"))
    for item in found:
        item = dict(item)
        ratio = item.get("ratio_to_ceiling")
        ok = item.get("ok")
        rows.append(row(sec, str(item.get("name", "")), item.get("value"), str(item.get("unit", "")),
                        None if ratio is None else float(ratio), None if ok is None else bool(ok),
                        str(item.get("detail", ""))))


RUNNERS: dict[str, Callable[[Context, list[dict]], None]] = {
    "ceiling": section_ceiling, "device_tier": section_device_tier, "host_tier": section_host_tier,
    "layer_wise": section_layer_wise, "codecs": section_codecs, "transformers": section_transformers,
    "copy_engine": section_copy_engine,
}


# -- driver --------------------------------------------------------------------------------------


def failure_text(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else ""
    return f"{type(exc).__name__}: {exc}"[:400] + where


def meta(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    import kvstore
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "kvstore": getattr(kvstore, "__file__", None), "device": str(device),
                            "quick": args.quick, "machine": platform.machine(), "cpus": os.cpu_count()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def write(path: str | None, report: dict[str, Any]) -> None:
    if not path:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1, default=str)
    os.replace(tmp, path)


def table(rows: list[dict]) -> str:
    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)
    header = ("section", "name", "value", "unit", "ratio", "ok", "detail")
    lines = [[r["section"], r["name"], fmt(r["value"]), r["unit"], fmt(r["ratio_to_ceiling"]),
              {True: "ok", False: "FAIL", None: "-"}[r["ok"]], r["detail"][:90]] for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    widths[-1] = len(header[-1])
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="torch device (default cuda; cpu runs the same code)")
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds on a CPU)")
    parser.add_argument("--out", default="gpu-check.json", help="JSON report (rewritten after every section)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--budget-scale", type=float, default=1.0, help="multiply every section's time cap")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print(f"gpu_check: --device {args.device}, but this torch ({torch.__version__}) sees no CUDA device",
                  file=sys.stderr)
            return 2
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        torch.cuda.set_device(device)
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        parser.error(f"--sections: expected names from {list(SECTIONS)}, got {unknown}")
    sizes = QUICK if args.quick else FULL
    ctx = Context(device=device, sizes=sizes, quick=args.quick, timer=Timer(device))
    report: dict[str, Any] = {"meta": meta(args, device), "section_seconds": {}, "rows": []}
    print(f"gpu_check: {report['meta']}", flush=True)
    if "ceiling" not in chosen:
        print("gpu_check: no ceiling section: speed rows carry no ratio", flush=True)
    for name in SECTIONS:
        if name not in chosen:
            continue
        budget = BUDGET_S[name] * args.budget_scale
        ctx.budget = Budget(budget)
        start = time.perf_counter()
        rows: list[dict] = []  # a section appends as it goes: what it measured before a failure is kept
        try:
            with alarm(1.5 * budget + 5):
                RUNNERS[name](ctx, rows)
        except BaseException as exc:  # noqa: BLE001 - a section's failure is a row, the others still run
            if isinstance(exc, KeyboardInterrupt):
                raise
            rows.append(row(name, "error", None, "", None, False, failure_text(exc)))
            if os.environ.get("GPU_CHECK_TRACEBACK"):
                traceback.print_exc()
        finally:
            if device.type == "cuda":
                try:
                    torch.cuda.synchronize(device)
                    torch.cuda.empty_cache()
                except Exception:  # noqa: BLE001 - a broken context shows in the next section's row
                    pass
        seconds = time.perf_counter() - start
        report["section_seconds"][name] = round(seconds, 2)
        report["rows"].extend(rows)
        write(args.out, report)
        print(f"gpu_check: {name}: {len(rows)} rows in {seconds:.1f} s"
              + ("".join(f"; FAIL {r['name']}" for r in rows if r["ok"] is False)), flush=True)
    print(table(report["rows"]))
    failed = [r for r in report["rows"] if r["ok"] is False]
    print(f"gpu_check: {len(report['rows'])} rows, {len(failed)} failed; "
          f"{sum(report['section_seconds'].values()):.1f} s; JSON: {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
