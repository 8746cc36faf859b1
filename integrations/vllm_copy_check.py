"""The vLLM worker copy engine on a GPU, without vLLM: ``bench/gpu_check.py``'s ``copy_engine`` section.

For caches in vLLM 0.33's layouts (bf16 and fp8 ``[B, H, page, 2D]`` views
of one ``[L, B, page, H, 2D]`` allocation, and MLA's ``[B, 1, page, D]``):
a request's tokens are saved from some pages through ``CopyEngine.save``
(device gather, device-to-host into pinned staging on the engine's stream,
stored by its thread) and loaded back into other pages (host-to-device on
the loader's stream, scattered on the current stream after its event),
once alone and once while another stream runs matmuls. Rows: byte-exact
(every loaded page equal to its source page, every other page untouched)
and GB/s as a ratio to a pinned-memory ``copy_`` of the same bytes measured
in the same run. On a CPU the same code runs with ``staged=True``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from kvstore import KVLayout, KVStore, StoreConfig
from kvstore.integrations.vllm_copy import CopyEngine
from kvstore.integrations.vllm_paged import paged_adapter

KINDS = {"bf16": (torch.bfloat16, 2, 8, 128), "fp8": (torch.float8_e4m3fn, 2, 8, 128),
         "mla": (torch.bfloat16, 1, 1, 576)}


def _caches(kind: str, layers: int, pages: int, page: int, device: torch.device, seed: int
            ) -> tuple[KVLayout, list[torch.Tensor], torch.Tensor]:
    dtype, parts, heads, dim = KINDS[kind]
    raw = torch.randint(0, 256, (layers, pages, page, heads, parts * dim * dtype.itemsize), dtype=torch.uint8,
                        generator=torch.Generator().manual_seed(seed)).to(device)
    if dtype.itemsize == 1:
        views = [raw[i].permute(0, 2, 1, 3) for i in range(layers)]  # vLLM's uint8 views of an fp8 cache
    else:
        typed = raw.view(torch.int16).remainder_(1 << 14).view(dtype)  # finite values: no NaN bit patterns
        views = [typed[i].permute(0, 2, 1, 3) for i in range(layers)]
    layout = KVLayout(num_layers=layers, num_kv_heads=heads, head_dim=dim, dtype=dtype, block_tokens=4 * page,
                      kv_parts=parts)
    return layout, views, raw


def _timed(device: torch.device, fn: Callable[[], Any]) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _ceiling(nbytes: int, device: torch.device) -> tuple[float, float]:
    """Seconds of a pinned host-to-device and device-to-host ``copy_`` of ``nbytes`` (CPU: a plain copy)."""
    pin = device.type == "cuda"
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    h2d = min(_timed(device, lambda: dev.copy_(host, non_blocking=True)) for _ in range(3))
    d2h = min(_timed(device, lambda: host.copy_(dev, non_blocking=True)) for _ in range(3))
    return h2d, d2h


class _Matmuls:
    """Matmuls on a stream of their own until stopped: the model's compute the copies must overlap with."""

    def __init__(self, device: torch.device):
        self.device, self.stop, self.count = device, threading.Event(), 0
        n = 4096 if device.type == "cuda" else 256
        self.a = torch.randn(n, n, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        while not self.stop.is_set():
            if stream is not None:
                with torch.cuda.stream(stream):
                    self.a @ self.a
                stream.synchronize()
            else:
                self.a @ self.a
            self.count += 1

    def __enter__(self) -> "_Matmuls":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def _round_trip(kind: str, device: torch.device, quick: bool) -> list[dict]:
    layers, page = (2, 16) if quick else (8, 16)
    tokens = 256 if quick else 4096
    num_pages = 2 * tokens // page + 2
    layout, src_views, src_raw = _caches(kind, layers, num_pages, page, device, 1)
    _, dst_views, dst_raw = _caches(kind, layers, num_pages, page, device, 2)
    perm = torch.randperm(num_pages, generator=torch.Generator().manual_seed(3)).tolist()
    src_ids, dst_ids = perm[:tokens // page], perm[tokens // page:2 * tokens // page]
    nbytes = layout.token_bytes * tokens
    store = KVStore(layout, StoreConfig(host_bytes=6 * nbytes + (64 << 20)))
    rows: list[dict] = []
    h2d, d2h = _ceiling(nbytes, device)
    try:
        for overlap in (False, True):
            saver = CopyEngine(store, paged_adapter(layout, src_views), 64 << 20, staged=True)
            loader = CopyEngine(store, paged_adapter(layout, dst_views), 64 << 20, staged=True)
            salt = f"{kind}-{overlap}"
            token_ids = list(range(tokens))
            before = dst_raw.clone()
            with (_Matmuls(device) if overlap else _NoMatmuls()) as mm:
                save_s = _timed(device, lambda: (saver.save(token_ids, salt, src_ids, 0), saver.drain()))

                def load() -> int:
                    job = loader.load(token_ids, salt, dst_ids, 0, tokens)
                    for layer in range(layers):
                        job.advance(layer)
                    return job.loaded
                loaded = [0]
                load_s = _timed(device, lambda: loaded.__setitem__(0, load()))
            saver.close()
            loader.close()
            exact = all(torch.equal(dst_raw[:, d], src_raw[:, s]) for s, d in zip(src_ids, dst_ids))
            others = torch.ones(num_pages, dtype=torch.bool)
            others[dst_ids] = False
            untouched = torch.equal(dst_raw[:, others.to(device)], before[:, others.to(device)])
            tag = f"{kind}{'_with_matmul' if overlap else ''}"
            rows.append({"name": f"{tag}_round_trip_exact", "value": loaded[0], "unit": "tokens",
                         "ok": exact and untouched and loaded[0] == tokens,
                         "detail": f"{len(src_ids)} pages x {layers} layers; others untouched: {untouched}"})
            rows.append({"name": f"{tag}_save", "value": round(nbytes / save_s / 1e9, 3), "unit": "GB/s",
                         "ratio_to_ceiling": d2h / save_s, "detail": "ceiling: pinned device-to-host copy_"})
            rows.append({"name": f"{tag}_load", "value": round(nbytes / load_s / 1e9, 3), "unit": "GB/s",
                         "ratio_to_ceiling": h2d / load_s, "detail": "ceiling: pinned host-to-device copy_"})
            if overlap:
                rows.append({"name": f"{kind}_matmuls_during_copies", "value": mm.count, "unit": "matmuls"})
    finally:
        store.close()
    return rows


class _NoMatmuls:
    count = 0

    def __enter__(self) -> "_NoMatmuls":
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def gpu_check(device: torch.device | str, quick: bool = False) -> list[dict]:
    """Rows ``{name, value, unit, ratio_to_ceiling, ok, detail}`` for bf16, fp8 and MLA caches (see module)."""
    device = torch.device(device)
    rows: list[dict] = []
    for kind in KINDS:
        try:
            rows.extend(_round_trip(kind, device, quick))
        except Exception as exc:  # one kind failing must not hide the others
            rows.append({"name": f"{kind}_round_trip_exact", "ok": False, "detail": f"raised {exc!r}"})
    return rows
