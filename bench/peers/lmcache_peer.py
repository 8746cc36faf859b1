#!/usr/bin/env python3
"""Measure LMCache's storage layer on kvstore's chunk shapes, next to ceilings
measured in the same process.

Standalone: needs torch and (optionally) lmcache, never kvstore. Build the
environment with ``scripts/engine-venvs.sh lmcache`` and run

    .venv-lmcache/bin/python bench/peers/lmcache_peer.py --out rows.json [--quick]
        [--paths cpu,paged,lookup,disk,remote,server,l2]

Every row is measured in this run through LMCache's own API or CLI; nothing
is copied from its documentation. A path that cannot run is recorded under
"skipped" with its reason, and the script still exits 0 with a JSON file
(also when lmcache is not installed at all).

Shapes (Llama-3-8B KV, bf16): a token's KV over all layers is
32 layers x 2 (K, V) x 8 KV heads x 128 dims x 2 bytes = 128 KiB, so LMCache's
``chunk_size`` of 256 tokens gives 32 MiB chunks and 16 tokens gives 2 MiB.
Each store/retrieve moves one prompt of 2048 tokens (256 MiB: 8 chunks of
32 MiB or 128 of 2 MiB; 1024 tokens with --quick), with new keys every round;
a few warmup rounds, then the median of the timed rounds. torch runs on one
thread, as in kvstore's benchmarks. LMCache's usage telemetry is switched off
(LMCACHE_TRACK_USAGE=false, DO_NOT_TRACK=1) for this process and its children.

Paths (LMCache's in-process v1 engine, ``LMCacheEngineBuilder.get_or_create``):
  cpu     CPU tier (``local_cpu=True``); the connector copies whole chunks with
          ``copy_`` from/to contiguous per-chunk tensors [2, L, T, H*D].
          Ceiling: ``copy_`` of the same chunks between preallocated tensors.
          Also the same engine with LMCache's MockGPUConnector (copies
          nothing): the engine's own cost per prompt, with no ceiling.
  paged   CPU tier with a vLLM-style paged CPU buffer: per layer
          [2, num_blocks, 16, H, D] (vLLM's flash-attention layout) and a
          random block table turned into a slot_mapping. The connector is
          LMCache's ``VLLMPagedMemGPUConnectorV2`` logic minus CUDA streams; the
          gather/scatter itself is LMCache's own torch fallback
          ``lmcache.device_ops.multi_layer_kv_transfer`` (the CPU DeviceOps
          baseline: per layer ``index_select`` on D2H, ``index_copy_`` on H2D),
          format ``EngineKVFormat.NL_X_TWO_NB_BS_NH_HS``. Ceiling: ``copy_``.
  lookup  A 131,072-token prompt with nothing cached, chunk_size 256 and 16:
          ``engine.lookup(tokens=...)`` and ``LMCacheBypassLookupClient.lookup``
          (vLLM's scheduler-side call when the lookup runs in-process: hash the
          chunks, then ``engine.lookup(hashes=..., offsets=..., pin=True)``).
  disk    Local-disk backend alone (``local_cpu=False``, ``local_disk=DIR``),
          three prompts' capacity (as kvstore's files tier here): it evicts.
          Store = ``engine.store`` until every chunk is on disk (its writes
          are not fsync'ed); ceiling: the same bytes written one file per
          chunk, no fsync. Warm retrieve = ``engine.retrieve`` of chunks still
          in the page cache; ceiling: a warm ``readinto`` of LMCache's own files.
  remote  Legacy cache server (``python -m lmcache.v1.server HOST PORT cpu``)
          behind the engine's remote backend (``remote_url=lm://...``,
          ``local_cpu=False``). Ceiling: the same bytes over a loopback TCP
          socket in this process.
  server  The multiprocess server: ``lmcache server`` plus its own client
          ``lmcache bench server --mode cpu`` (``--transfer-mode lmcache_driven``:
          the server reads and writes the client's paged KV in POSIX shared
          memory; in the full run also ``engine_driven`` at 32 MiB, the mode
          that ``--mode cpu`` picks by default, and a second server for 2 MiB).
          Times are its reported cold-store / warm-retrieve p50. Ceiling:
          ``copy_`` of the same bytes in this process.
  l2      ``lmcache bench l2`` with the ``fs`` (and in the full run
          ``fs_native``, and 2 MiB values too) adapters; its JSON output is
          kept under "captured". Ceilings: raw write (no fsync) / warm raw read
          of the same sizes.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from typing import Any, Callable

# LMCache logs at INFO on every store/retrieve and its dependencies print
# FutureWarnings at import; keep the run's output readable.
os.environ.setdefault("LMCACHE_DISABLE_BANNER", "1")
os.environ.setdefault("LMCACHE_LOG_LEVEL", "ERROR")
# LMCache reports usage to its authors' server unless told not to; this
# benchmark must not send anything anywhere (subprocesses inherit these).
os.environ["LMCACHE_TRACK_USAGE"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)

# -- shapes -----------------------------------------------------------------
NUM_LAYERS = 32
NUM_KV_HEADS = 8
HEAD_DIM = 128
DTYPE_BYTES = 2  # bf16
BYTES_PER_TOKEN = NUM_LAYERS * 2 * NUM_KV_HEADS * HEAD_DIM * DTYPE_BYTES  # 128 KiB
CHUNK_TOKENS_32MIB = 256  # 256 x 128 KiB = 32 MiB per chunk
CHUNK_TOKENS_2MIB = 16  # 16 x 128 KiB = 2 MiB per chunk
CHUNK_SIZES = (CHUNK_TOKENS_32MIB, CHUNK_TOKENS_2MIB)
assert CHUNK_TOKENS_32MIB * BYTES_PER_TOKEN == 32 << 20
assert CHUNK_TOKENS_2MIB * BYTES_PER_TOKEN == 2 << 20
BLOCK_SIZE = 16  # vLLM's page size in tokens
LOOKUP_TOKENS = 131072
MODEL_NAME = "meta-llama/Meta-Llama-3-8B"
# `lmcache bench server` sleeps this long between a request's cold store and
# its warm lookup (and between requests). With 0 the server often answered the
# warm lookup with a miss right after acknowledging the store, so no retrieve
# was timed; the sleep is not part of any reported latency.
SERVER_INTERVAL_S = 0.3


DISK_PROMPTS = 3  # the local-disk backend's capacity, in prompts


def _mib(n: int) -> str:
    return f"{n / (1 << 20):g} MiB"


class Plan:
    def __init__(self, quick: bool):
        self.quick = quick
        self.prompt_tokens = 1024 if quick else 2048
        self.warmup = 1 if quick else 2
        self.rounds = 3 if quick else 5
        self.lookup_rounds = 3 if quick else 7
        self.server_requests = 2 if quick else 4
        self.l2_rounds = 1 if quick else 2

    @property
    def prompt_bytes(self) -> int:
        return self.prompt_tokens * BYTES_PER_TOKEN


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


class Results:
    def __init__(self, quick: bool):
        self.doc: dict[str, Any] = {
            "peer": "lmcache",
            "version": None,
            "torch": None,
            "quick": quick,
            "shapes": {
                "num_layers": NUM_LAYERS,
                "num_kv_heads": NUM_KV_HEADS,
                "head_dim": HEAD_DIM,
                "dtype": "bfloat16",
                "bytes_per_token": BYTES_PER_TOKEN,
                "block_size": BLOCK_SIZE,
            },
            "torch_threads": 1,
            "rows": [],
            "skipped": {},
            "captured": {},
        }

    def row(self, path: str, op: str, chunk_tokens: int | None, seconds: float, nbytes: int,
            ceiling: str | None, ceiling_seconds: float | None, note: str, samples: list[float],
            **extra: Any) -> None:
        r: dict[str, Any] = {
            "path": path,
            "op": op,
            "chunk_bytes": None if chunk_tokens is None else chunk_tokens * BYTES_PER_TOKEN,
            "chunk_tokens": chunk_tokens,
            "seconds": seconds,
            "bytes": nbytes,
            "ceiling": ceiling,
            "ceiling_seconds": ceiling_seconds,
            "note": note,
            "rounds": len(samples),
            "samples": [round(s, 6) for s in samples],
        }
        if nbytes and seconds > 0:
            r["gb_per_s"] = nbytes / seconds / 1e9
        if ceiling_seconds and seconds > 0:
            r["fraction_of_ceiling"] = ceiling_seconds / seconds
        r.update(extra)
        self.doc["rows"].append(r)
        frac = r.get("fraction_of_ceiling")
        gbs = r.get("gb_per_s")
        print(f"  {path:<7} {op:<9} {_mib(r['chunk_bytes']) if r['chunk_bytes'] else '-':>8} "
              f"{r.get('variant', ''):<16}"
              f"{seconds * 1e3:9.2f} ms"
              + (f"  {gbs:6.2f} GB/s" if gbs else "")
              + (f"  {frac:5.2f} of {ceiling}" if frac else ""), flush=True)

    def skip(self, path: str, reason: str) -> None:
        self.doc["skipped"][path] = reason
        print(f"  {path}: skipped: {reason}", flush=True)

    def write(self, out: str) -> None:
        with open(out, "w") as f:
            json.dump(self.doc, f, indent=1)
            f.write("\n")


# -- helpers that need torch ------------------------------------------------

def _tokens(rng: random.Random, n: int) -> list[int]:
    # Distinct random prompts: every round stores chunks that are new to LMCache.
    return [rng.randrange(1, 128000) for _ in range(n)]


def _lmcache_cli() -> list[str]:
    """The ``lmcache`` console script of this interpreter's installation."""
    return [sys.executable, "-c",
            "import sys; from lmcache.cli.main import main; sys.argv[0] = 'lmcache'; sys.exit(main())"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"server did not listen on port {port} within {timeout:.0f} s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _tail(path: str, n: int = 1500) -> str:
    try:
        with open(path, errors="replace") as f:
            text = f.read()
    except OSError:
        return ""
    lines = [ln for ln in text.splitlines() if "Warning" not in ln and "warnings.warn" not in ln]
    return "\n".join(lines)[-n:]


def _sub_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(LMCACHE_DISABLE_BANNER="1", PYTHONWARNINGS="ignore",
               LMCACHE_LOG_LEVEL=os.environ.get("LMCACHE_LOG_LEVEL", "WARNING"))
    return env


class Bench:
    def __init__(self, plan: Plan, res: Results, workdir: str):
        import torch

        self.torch = torch
        self.plan = plan
        self.res = res
        self.workdir = workdir
        self.rng = random.Random(20260)
        self._instance = 0

        from lmcache.v1.cache_engine import LMCacheEngineBuilder
        from lmcache.v1.config import LMCacheEngineConfig
        from lmcache.v1.gpu_connector.gpu_connectors import GPUConnectorInterface
        from lmcache.v1.metadata import LMCacheMetadata

        self.Builder = LMCacheEngineBuilder
        self.Config = LMCacheEngineConfig
        self.Metadata = LMCacheMetadata
        self.connectors = _make_connectors(torch, GPUConnectorInterface)

    # -- engine lifecycle ---------------------------------------------------
    def engine(self, chunk_tokens: int, connector: Any, **cfg: Any):
        torch = self.torch
        self._instance += 1
        iid = f"kvstore-peer-{os.getpid()}-{self._instance}"
        config = self.Config.from_defaults(chunk_size=chunk_tokens, lmcache_instance_id=iid, **cfg)
        metadata = self.Metadata(
            model_name=MODEL_NAME, world_size=1, local_world_size=1, worker_id=0, local_worker_id=0,
            kv_dtype=torch.bfloat16,
            kv_shape=(NUM_LAYERS, 2, chunk_tokens, NUM_KV_HEADS, HEAD_DIM),
            chunk_size=chunk_tokens,
        )
        eng = self.Builder.get_or_create(iid, config, metadata, connector, None, None)
        eng.post_init()
        return iid, eng

    def destroy(self, iid: str) -> None:
        self.Builder.destroy(iid)

    # -- data ---------------------------------------------------------------
    def chunks(self, chunk_tokens: int, fill: bool) -> list:
        torch = self.torch
        n = self.plan.prompt_tokens // chunk_tokens
        shape = (2, NUM_LAYERS, chunk_tokens, NUM_KV_HEADS * HEAD_DIM)
        if fill:
            g = torch.Generator().manual_seed(chunk_tokens)
            return [torch.randn(shape, generator=g).to(torch.bfloat16) for _ in range(n)]
        return [torch.zeros(shape, dtype=torch.bfloat16) for _ in range(n)]  # zeros: pages touched

    def copy_ceiling(self, src: list, dst: list) -> float:
        t0 = time.perf_counter()
        for d, s in zip(dst, src):
            d.copy_(s)
        return time.perf_counter() - t0

    # -- (a) CPU tier, contiguous ------------------------------------------
    def run_cpu(self) -> None:
        plan = self.plan
        for ct in CHUNK_SIZES:
            src, out, ceil_dst = self.chunks(ct, True), self.chunks(ct, False), self.chunks(ct, False)
            total = plan.warmup + plan.rounds
            # Room for every round's prompt: nothing is evicted while measuring.
            pool_gb = (total + 1) * plan.prompt_bytes / (1 << 30) + 0.25
            iid, eng = self.engine(ct, self.connectors.Contiguous(ct), local_cpu=True,
                                   max_local_cpu_size=pool_gb)
            try:
                st, rt, ce = [], [], []
                for i in range(total):
                    toks = _tokens(self.rng, plan.prompt_tokens)
                    c = self.copy_ceiling(src, ceil_dst)
                    t0 = time.perf_counter()
                    eng.store(toks, chunks=src)
                    t1 = time.perf_counter()
                    mask = eng.retrieve(toks, out=out)
                    t2 = time.perf_counter()
                    _check_round_trip("cpu", mask, plan.prompt_tokens, i != 0 or
                        all(self.torch.equal(a, b) for a, b in zip(src, out)))
                    for o in out:
                        o.zero_()
                    if i >= plan.warmup:
                        st.append(t1 - t0)
                        rt.append(t2 - t1)
                        ce.append(c)
                cs = _median(ce)
                note = ("LMCacheEngine CPU tier (local_cpu=True); connector copy_ of whole chunks "
                        "from/to contiguous [2,L,T,H*D] tensors; each op is one "
                        f"{plan.prompt_tokens}-token prompt, fresh keys every round")
                self.res.row("cpu", "store", ct, _median(st), plan.prompt_bytes, "copy_", cs,
                             note, st, variant="copy_", connector="contiguous copy_")
                self.res.row("cpu", "retrieve", ct, _median(rt), plan.prompt_bytes, "copy_", cs,
                             note + "; retrieve without a prior lookup pin", rt,
                             variant="copy_", connector="contiguous copy_")
            finally:
                self.destroy(iid)
            # The engine with LMCache's MockGPUConnector (no copy at all): the
            # engine's own bookkeeping per prompt, for reference.
            from lmcache.v1.gpu_connector import MockGPUConnector
            iid, eng = self.engine(ct, MockGPUConnector(kv_shape=(NUM_LAYERS, 2, ct, NUM_KV_HEADS, HEAD_DIM)),
                                   local_cpu=True, max_local_cpu_size=pool_gb)
            try:
                st, rt = [], []
                for i in range(total):
                    toks = _tokens(self.rng, plan.prompt_tokens)
                    t0 = time.perf_counter()
                    eng.store(toks)
                    t1 = time.perf_counter()
                    eng.retrieve(toks)
                    t2 = time.perf_counter()
                    if i >= plan.warmup:
                        st.append(t1 - t0)
                        rt.append(t2 - t1)
                note = ("LMCache's MockGPUConnector: no KV is copied, so this is the engine's "
                        "own overhead (hashing, allocation, put/get) per prompt")
                self.res.row("cpu", "store", ct, _median(st), 0, None, None, note, st,
                             variant="mock (no copy)", connector="MockGPUConnector (no copy)",
                             prompt_bytes=plan.prompt_bytes, copy_seconds=cs)
                self.res.row("cpu", "retrieve", ct, _median(rt), 0, None, None, note, rt,
                             variant="mock (no copy)", connector="MockGPUConnector (no copy)",
                             prompt_bytes=plan.prompt_bytes, copy_seconds=cs)
            finally:
                self.destroy(iid)
            del src, out, ceil_dst

    # -- (b) CPU tier, vLLM-style paged buffer ------------------------------
    def run_paged(self) -> None:
        torch = self.torch
        plan = self.plan
        used_blocks = plan.prompt_tokens // BLOCK_SIZE
        num_blocks = 2 * used_blocks  # the request's blocks are scattered over twice as many
        for ct in CHUNK_SIZES:
            g = torch.Generator().manual_seed(7 + ct)
            layer_shape = (2, num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
            kv_src = [torch.randn(layer_shape, generator=g).to(torch.bfloat16) for _ in range(NUM_LAYERS)]
            kv_dst = [torch.zeros(layer_shape, dtype=torch.bfloat16) for _ in range(NUM_LAYERS)]
            src, ceil_dst = self.chunks(ct, True), self.chunks(ct, False)
            total = plan.warmup + plan.rounds
            pool_gb = (total + 1) * plan.prompt_bytes / (1 << 30) + 0.25
            conn = self.connectors.Paged(num_blocks)
            iid, eng = self.engine(ct, conn, local_cpu=True, max_local_cpu_size=pool_gb)
            try:
                st, rt, ce = [], [], []
                for i in range(total):
                    toks = _tokens(self.rng, plan.prompt_tokens)
                    block_table = torch.randperm(num_blocks, generator=g)[:used_blocks]
                    pos = torch.arange(plan.prompt_tokens)
                    slot_mapping = block_table[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE
                    c = self.copy_ceiling(src, ceil_dst)
                    t0 = time.perf_counter()
                    eng.store(toks, kvcaches=kv_src, slot_mapping=slot_mapping)
                    t1 = time.perf_counter()
                    mask = eng.retrieve(toks, kvcaches=kv_dst, slot_mapping=slot_mapping)
                    t2 = time.perf_counter()
                    _check_round_trip("paged", mask, plan.prompt_tokens, i != 0 or
                        all(torch.equal(a[:, block_table], b[:, block_table]) for a, b in zip(kv_src, kv_dst)))
                    if i >= plan.warmup:
                        st.append(t1 - t0)
                        rt.append(t2 - t1)
                        ce.append(c)
                cs = _median(ce)
                note = (f"vLLM flash-attn paged CPU buffer, per layer [2,{num_blocks},{BLOCK_SIZE},"
                        f"{NUM_KV_HEADS},{HEAD_DIM}], random block table ({used_blocks} of {num_blocks} "
                        "blocks) as slot_mapping; copy by LMCache's torch fallback "
                        "device_ops.multi_layer_kv_transfer (index_select / index_copy_ per layer), "
                        "format NL_X_TWO_NB_BS_NH_HS; ceiling is copy_ of the same bytes, contiguous")
                self.res.row("paged", "store", ct, _median(st), plan.prompt_bytes, "copy_", cs, note, st,
                             variant="paged", connector="paged (lmcache torch fallback)")
                self.res.row("paged", "retrieve", ct, _median(rt), plan.prompt_bytes, "copy_", cs, note, rt,
                             variant="paged", connector="paged (lmcache torch fallback)")
            finally:
                self.destroy(iid)
            del kv_src, kv_dst, src, ceil_dst

    # -- (c) lookup of an uncached long prompt -------------------------------
    def run_lookup(self) -> None:
        from lmcache.v1.lookup_client.lmcache_lookup_client_bypass import LMCacheBypassLookupClient

        plan = self.plan
        for ct in CHUNK_SIZES:
            from lmcache.v1.gpu_connector import MockGPUConnector
            iid, eng = self.engine(ct, MockGPUConnector(kv_shape=(NUM_LAYERS, 2, ct, NUM_KV_HEADS, HEAD_DIM)),
                                   local_cpu=True, max_local_cpu_size=0.25)
            try:
                client = LMCacheBypassLookupClient(eng.config, eng.metadata, eng)
                et, bt, ht = [], [], []
                for i in range(plan.warmup + plan.lookup_rounds):
                    toks = _tokens(self.rng, LOOKUP_TOKENS)
                    t0 = time.perf_counter()
                    hit = eng.lookup(tokens=toks, lookup_id=f"e{i}", pin=True)
                    t1 = time.perf_counter()
                    hit2 = client.lookup(toks, lookup_id=f"b{i}")
                    t2 = time.perf_counter()
                    n = sum(1 for _ in eng.token_database.process_tokens(toks, make_key=False))
                    t3 = time.perf_counter()
                    eng.lookup_unpin(f"e{i}")
                    eng.lookup_unpin(f"b{i}")
                    if hit or hit2:
                        raise RuntimeError(f"uncached prompt reported {hit}/{hit2} hit tokens")
                    if n != LOOKUP_TOKENS // ct:
                        raise RuntimeError(f"{n} chunks for {LOOKUP_TOKENS} tokens")
                    if i >= plan.warmup:
                        et.append(t1 - t0)
                        bt.append(t2 - t1)
                        ht.append(t3 - t2)
                hs = _median(ht)
                common = (f"{LOOKUP_TOKENS}-token prompt (list of ints, as vLLM passes it), nothing cached, "
                          f"{LOOKUP_TOKENS // ct} chunks; hash_seconds = token_database.process_tokens alone "
                          "(LMCache's chunk hashing, builtin hash)")
                self.res.row("lookup", "lookup", ct, _median(et), 0, None, None,
                             "engine.lookup(tokens=..., pin=True); " + common, et,
                             variant="engine.lookup", api="LMCacheEngine.lookup(tokens)",
                             tokens=LOOKUP_TOKENS, hash_seconds=hs)
                self.res.row("lookup", "lookup", ct, _median(bt), 0, None, None,
                             "LMCacheBypassLookupClient.lookup: vLLM scheduler's in-process call "
                             "(hash, then engine.lookup(hashes, offsets, pin=True)); the default "
                             "client sends the same hashes over ZMQ; " + common, bt,
                             variant="bypass client", api="LMCacheBypassLookupClient.lookup",
                             tokens=LOOKUP_TOKENS, hash_seconds=hs)
            finally:
                self.destroy(iid)

    # -- (d) local-disk backend ---------------------------------------------
    def run_disk(self) -> None:
        torch = self.torch
        plan = self.plan
        for ct in CHUNK_SIZES:
            n_chunks = plan.prompt_tokens // ct
            total = plan.warmup + plan.rounds
            d = tempfile.mkdtemp(prefix=f"lmcache-disk-{ct}-", dir=self.workdir)
            raw_dir = tempfile.mkdtemp(prefix=f"raw-{ct}-", dir=self.workdir)
            src, out = self.chunks(ct, True), self.chunks(ct, False)
            read_buf = bytearray(ct * BYTES_PER_TOKEN)
            # Three prompts, as kvstore's files tier holds in kvbench.compare: from the fourth round on both
            # evict a prompt's chunks for each one stored, as a full cache does.
            disk_gb = DISK_PROMPTS * plan.prompt_bytes / (1 << 30)
            iid, eng = self.engine(ct, self.connectors.Contiguous(ct), local_cpu=False,
                                   max_local_cpu_size=2 * plan.prompt_bytes / (1 << 30) + 0.25,
                                   local_disk=d, max_local_disk_size=disk_gb)
            try:
                disk = eng.storage_manager.storage_backends["LocalDiskBackend"]
                st, rt, wc, rc = [], [], [], []
                for i in range(total):
                    toks = _tokens(self.rng, plan.prompt_tokens)
                    keys = [k for _, _, k in eng.token_database.process_tokens(toks)]
                    before = set(os.listdir(d))
                    # ceiling for the store: the same bytes, one file per chunk, no fsync
                    t0 = time.perf_counter()
                    for j, s in enumerate(src):
                        with open(os.path.join(raw_dir, f"{i}-{j}.bin"), "wb") as f:
                            f.write(s.view(torch.uint8).numpy().data)
                    w = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    eng.store(toks, chunks=src)
                    deadline = time.monotonic() + 120
                    while not all(disk.contains(k) for k in keys):
                        if time.monotonic() > deadline:
                            raise RuntimeError("disk writes did not finish within 120 s")
                        time.sleep(0.0005)
                    t1 = time.perf_counter()
                    files = sorted(set(os.listdir(d)) - before)
                    if len(files) != n_chunks:
                        raise RuntimeError(f"expected {n_chunks} new files, found {len(files)}")
                    # ceiling for the retrieve: warm readinto of LMCache's own files
                    t2 = time.perf_counter()
                    for name in files:
                        with open(os.path.join(d, name), "rb") as f:
                            f.readinto(read_buf)
                    r = time.perf_counter() - t2
                    t2 = time.perf_counter()
                    mask = eng.retrieve(toks, out=out)
                    t3 = time.perf_counter()
                    _check_round_trip("disk", mask, plan.prompt_tokens, i != 0 or
                        all(torch.equal(a, b) for a, b in zip(src, out)))
                    for name in os.listdir(raw_dir):
                        os.unlink(os.path.join(raw_dir, name))
                    if i >= plan.warmup:
                        st.append(t1 - t0)
                        rt.append(t3 - t2)
                        wc.append(w)
                        rc.append(r)
                self.res.row("disk", "store", ct, _median(st), plan.prompt_bytes, "raw_write", _median(wc),
                             "LocalDiskBackend alone (local_cpu=False), one file per chunk, default 4 writer "
                             "threads, no fsync; time from engine.store until every chunk is on disk "
                             "(backend.contains); ceiling: same bytes written one file per chunk from one "
                             "thread, no fsync", st, variant="LocalDiskBackend")
                self.res.row("disk", "retrieve", ct, _median(rt), plan.prompt_bytes, "raw_read", _median(rc),
                             "warm: the chunk files were just written and are in the page cache; "
                             "engine.retrieve reads them (4 reader threads) into its staging buffers and the "
                             "connector copies them out; ceiling: one-thread readinto of the same files "
                             "into one preallocated buffer", rt, variant="LocalDiskBackend")
            finally:
                self.destroy(iid)
                shutil.rmtree(d, ignore_errors=True)
                shutil.rmtree(raw_dir, ignore_errors=True)
            del src, out

    # -- legacy cache server + remote backend --------------------------------
    def loopback_ceiling(self, nbytes: int, piece: int) -> float:
        """Send nbytes over a loopback TCP connection, received into one buffer."""
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        payload = memoryview(bytearray(os.urandom(1 << 16)) * (piece // (1 << 16)))

        def sender() -> None:
            c = socket.create_connection(srv.getsockname())
            sent = 0
            while sent < nbytes:
                c.sendall(payload)
                sent += len(payload)
            c.close()

        th = threading.Thread(target=sender)
        conn_buf = memoryview(bytearray(piece))
        t0 = time.perf_counter()
        th.start()
        conn, _ = srv.accept()
        got = 0
        while got < nbytes:
            n = conn.recv_into(conn_buf[(got % piece):], piece - got % piece)
            if n == 0:
                break
            got += n
        t = time.perf_counter() - t0
        th.join()
        conn.close()
        srv.close()
        return t

    def run_remote(self) -> None:
        plan = self.plan
        port = _free_port()
        log = os.path.join(self.workdir, "lmcache_legacy_server.log")
        with open(log, "w") as lf:
            proc = subprocess.Popen([sys.executable, "-m", "lmcache.v1.server", "127.0.0.1", str(port), "cpu"],
                                    stdout=lf, stderr=subprocess.STDOUT, env=_sub_env())
        try:
            try:
                _wait_port(port, proc, 60)
            except RuntimeError as e:
                raise RuntimeError(f"{e}: {_tail(log)}") from None
            for ct in CHUNK_SIZES:
                src, out = self.chunks(ct, True), self.chunks(ct, False)
                iid, eng = self.engine(ct, self.connectors.Contiguous(ct), local_cpu=False,
                                       max_local_cpu_size=2 * plan.prompt_bytes / (1 << 30) + 0.25,
                                       remote_url=f"lm://127.0.0.1:{port}", remote_serde="naive")
                try:
                    rb = eng.storage_manager.storage_backends["RemoteBackend"]
                    st, rt, ce = [], [], []
                    for i in range(plan.warmup + plan.rounds):
                        toks = _tokens(self.rng, plan.prompt_tokens)
                        keys = [k for _, _, k in eng.token_database.process_tokens(toks)]
                        c = self.loopback_ceiling(plan.prompt_bytes, ct * BYTES_PER_TOKEN)
                        t0 = time.perf_counter()
                        eng.store(toks, chunks=src)
                        deadline = time.monotonic() + 120
                        while any(rb.exists_in_put_tasks(k) for k in keys):
                            if time.monotonic() > deadline:
                                raise RuntimeError("remote puts did not finish within 120 s")
                            time.sleep(0.0005)
                        t1 = time.perf_counter()
                        mask = eng.retrieve(toks, out=out)
                        t2 = time.perf_counter()
                        _check_round_trip("remote", mask, plan.prompt_tokens, i != 0 or
                            all(self.torch.equal(a, b) for a, b in zip(src, out)))
                        if i >= plan.warmup:
                            st.append(t1 - t0)
                            rt.append(t2 - t1)
                            ce.append(c)
                    note = ("legacy cache server (python -m lmcache.v1.server 127.0.0.1 PORT cpu, "
                            "thread per client, in-memory dict) behind the engine's RemoteBackend "
                            "(remote_url=lm://, naive serde, local_cpu=False); store timed until no put "
                            "task is pending; ceiling: same bytes over a loopback TCP socket")
                    cs = _median(ce)
                    self.res.row("remote", "store", ct, _median(st), plan.prompt_bytes, "loopback_tcp", cs,
                                 note, st, variant="lm:// legacy")
                    self.res.row("remote", "retrieve", ct, _median(rt), plan.prompt_bytes, "loopback_tcp", cs,
                                 note, rt, variant="lm:// legacy")
                finally:
                    self.destroy(iid)
        finally:
            _stop(proc)

    # -- (e) multiprocess server + its own bench client -----------------------
    def run_server(self) -> None:
        # One server per chunk size (its --chunk-size is server-wide). The
        # engine-driven transfer mode is slow on CPU, so it runs once, at 32 MiB.
        if self.plan.quick:
            self._server_one(CHUNK_TOKENS_32MIB, ["lmcache_driven"])
        else:
            self._server_one(CHUNK_TOKENS_32MIB, ["lmcache_driven", "engine_driven"])
            self._server_one(CHUNK_TOKENS_2MIB, ["lmcache_driven"])

    def _server_one(self, ct: int, modes: list[str]) -> None:
        plan = self.plan
        size = _mib(ct * BYTES_PER_TOKEN)
        port, http_port = _free_port(), _free_port()
        log = os.path.join(self.workdir, f"lmcache_server_{ct}.log")
        # L1 holds every request of the run (the server touches all of it at start).
        l1_gb = max(1, math.ceil((plan.server_requests + 4) * plan.prompt_bytes / (1 << 30)))
        server_cmd = _lmcache_cli() + [
            "server", "--host", "127.0.0.1", "--port", str(port), "--chunk-size", str(ct),
            "--l1-size-gb", str(l1_gb), "--eviction-policy", "LRU", "--supported-transfer-mode", "auto",
            "--http-host", "127.0.0.1", "--http-port", str(http_port), "--disable-observability"]
        t_start = time.perf_counter()
        with open(log, "w") as lf:
            proc = subprocess.Popen(server_cmd, stdout=lf, stderr=subprocess.STDOUT, env=_sub_env())
        try:
            try:
                _wait_port(port, proc, 120)
                _wait_port(http_port, proc, 60)
            except RuntimeError as e:
                raise RuntimeError(f"lmcache server: {e}: {_tail(log)}") from None
            startup = time.perf_counter() - t_start
            # The bench client places request `seq` at block offset
            # (seq * blocks_needed) % (num_blocks - blocks_needed). Block 0 is
            # the server's null block (--null-block-id 0): a chunk written
            # from it counts as absent and the warm lookup misses. With
            # num_blocks = 2 * needed + 1 and 1 <= seq <= needed the offset is
            # never 0.
            needed = plan.prompt_tokens // BLOCK_SIZE + 1  # the client adds one token
            num_blocks = 2 * needed + 1
            src, dst = self.chunks(ct, True), self.chunks(ct, False)
            ce = [self.copy_ceiling(src, dst) for _ in range(plan.warmup + plan.rounds)][plan.warmup:]
            cs = _median(ce)
            seq = 1
            for mode in modes:
                n_req = plan.server_requests if mode == "lmcache_driven" else 2
                out = os.path.join(self.workdir, f"server_bench_{mode}_{ct}.json")
                cmd = _lmcache_cli() + [
                    "bench", "server", "--rpc-url", f"tcp://127.0.0.1:{port}", "--mode", "cpu",
                    "--transfer-mode", mode, "--num-tokens", str(plan.prompt_tokens),
                    "--kvcache-shape-spec",
                    f"(2,{num_blocks},{BLOCK_SIZE},{NUM_KV_HEADS},{HEAD_DIM}):bfloat16:{NUM_LAYERS}",
                    "--num-blocks", str(num_blocks), "--block-size", str(BLOCK_SIZE),
                    "--start", str(seq), "--end", str(seq + n_req), "--interval", str(SERVER_INTERVAL_S),
                    "--url", f"http://127.0.0.1:{http_port}", "--format", "json", "--output", out]
                seq += n_req
                p = subprocess.run(cmd, capture_output=True, text=True, env=_sub_env(), timeout=300)
                if p.returncode != 0 or not os.path.exists(out):
                    self.res.skip(f"server:{mode}:{size}", f"lmcache bench server exited {p.returncode}: "
                                  + (p.stdout + p.stderr)[-1500:])
                    continue
                with open(out) as f:
                    m = json.load(f)["metrics"]
                lines = [ln for ln in p.stdout.splitlines() if ln.startswith("  [seq")]
                self.res.doc["captured"][f"server_bench_{mode}_{ct}"] = {"metrics": m, "log": lines}
                results = m.get("results", {})
                common = (f"lmcache server (chunk {ct}, L1 {l1_gb} GB, startup {startup:.1f} s) + its client "
                          f"`lmcache bench server --mode cpu --transfer-mode {mode}` with "
                          f"{plan.prompt_tokens}-token requests on a paged [2,{num_blocks},16,8,128]x32 bf16 "
                          f"KV; --interval {SERVER_INTERVAL_S}; p50 of its reported latencies; checksums ok "
                          f"{results.get('checksum_ok')}/{results.get('total_requests')}; ceiling copy_ of "
                          "the same bytes in this process")
                for key, op in (("cold_store", "store"), ("warm_retrieve", "retrieve")):
                    sec = m.get(key)
                    if not sec:
                        self.res.skip(f"server:{mode}:{size}:{op}", f"no {key} latencies reported: {results}")
                        continue
                    self.res.row("server", op, ct, sec[f"{key}_p50"] / 1e3, plan.prompt_bytes, "copy_", cs,
                                 common + f"; {sec[f'{key}_count']} samples, min {sec[f'{key}_min']:.1f} ms, "
                                 f"max {sec[f'{key}_max']:.1f} ms", [],
                                 variant=mode, transfer_mode=mode, samples_reported=sec[f"{key}_count"])
        finally:
            _stop(proc)

    # -- (f) lmcache bench l2 -------------------------------------------------
    def raw_file_ceilings(self, size: int, count: int) -> tuple[float, float]:
        d = tempfile.mkdtemp(prefix="raw-l2-", dir=self.workdir)
        buf = os.urandom(1 << 20) * (size >> 20) if size >= 1 << 20 else os.urandom(size)
        rd = bytearray(size)
        ws, rs = [], []
        try:
            for r in range(self.plan.warmup + self.plan.rounds):
                t0 = time.perf_counter()
                for j in range(count):
                    with open(os.path.join(d, f"{r}-{j}"), "wb") as f:
                        f.write(buf)
                t1 = time.perf_counter()
                for j in range(count):
                    with open(os.path.join(d, f"{r}-{j}"), "rb") as f:
                        f.readinto(rd)
                t2 = time.perf_counter()
                for j in range(count):
                    os.unlink(os.path.join(d, f"{r}-{j}"))
                if r >= self.plan.warmup:
                    ws.append(t1 - t0)
                    rs.append(t2 - t1)
        finally:
            shutil.rmtree(d, ignore_errors=True)
        return _median(ws), _median(rs)

    def run_l2(self) -> None:
        plan = self.plan
        adapters = ["fs"] if plan.quick else ["fs", "fs_native"]
        sizes = [CHUNK_TOKENS_32MIB] if plan.quick else list(CHUNK_SIZES)
        for ct in sizes:
            size = ct * BYTES_PER_TOKEN
            n_keys = plan.prompt_bytes // size
            wcs, rcs = self.raw_file_ceilings(size, n_keys)
            for ad in adapters:
                base = tempfile.mkdtemp(prefix=f"l2-{ad}-", dir=self.workdir)
                out = os.path.join(self.workdir, f"l2_{ad}_{ct}.json")
                cmd = _lmcache_cli() + [
                    "bench", "l2", "--l2-adapter", json.dumps({"type": ad, "base_path": base}),
                    "--num-keys", str(n_keys), "--data-size-kb", str(size // 1024),
                    "--rounds", str(plan.l2_rounds), "--warmup-rounds", "1", "--format", "json", "--output", out]
                try:
                    p = subprocess.run(cmd, capture_output=True, text=True, env=_sub_env(), timeout=300)
                finally:
                    shutil.rmtree(base, ignore_errors=True)
                if p.returncode != 0 or not os.path.exists(out):
                    self.res.skip(f"l2:{ad}:{_mib(size)}", f"lmcache bench l2 exited {p.returncode}: "
                                  + (p.stdout + p.stderr)[-1500:])
                    continue
                with open(out) as f:
                    m = json.load(f)["metrics"]
                self.res.doc["captured"][f"bench_l2_{ad}_{ct}"] = {
                    "command": "lmcache " + " ".join(cmd[4:]), "metrics": m,
                    "log": [ln for ln in p.stdout.splitlines() if ln.strip().startswith("[")]}
                for k, v in m.items():
                    if not k.startswith("op_"):
                        continue
                    op = {"Store": "store", "Load": "retrieve", "Lookup": "lookup"}.get(v.get("operation"))
                    if op is None:
                        continue
                    ceil_name, ceil = {"store": ("raw_write", wcs), "retrieve": ("raw_read", rcs)}.get(
                        op, (None, None))
                    self.res.row("l2", op, ct, v["duration_p50_ms"] / 1e3, 0 if op == "lookup" else plan.prompt_bytes,
                                 ceil_name, ceil,
                                 f"lmcache bench l2 --l2-adapter {ad}: {n_keys} keys x {_mib(size)} per round, "
                                 f"{v['rounds']} rounds after 1 warmup, p50 reported by the tool; ceilings: raw "
                                 "one-thread write (no fsync) / warm readinto of the same sizes, this process",
                                 [], variant=ad, adapter=ad, success=f"{v.get('total_success')}/{v.get('total_keys')}")


def _check_round_trip(path: str, mask: Any, tokens: int, same: bool) -> None:
    """A retrieve must return every token (``mask``) and the bytes stored (``same``: checked, or not checked)."""
    got = int(mask.sum())
    if got != tokens:
        raise RuntimeError(f"{path} retrieve returned {got} of {tokens} tokens")
    if not same:
        raise RuntimeError(f"{path} round trip differs")


def _make_connectors(torch: Any, GPUConnectorInterface: type) -> Any:
    """Two CPU connectors implementing LMCache's GPUConnectorInterface."""
    from lmcache import device_ops
    from lmcache.lmcache_native import EngineKVFormat, TransferDirection

    hidden = NUM_KV_HEADS * HEAD_DIM
    cpu = torch.device("cpu")

    class _Batched(GPUConnectorInterface):
        """The batched calls one chunk at a time, and the KV_2LTD memory-object shape."""

        def batched_from_gpu(self, memory_objs, starts, ends, **kwargs):
            for m, s, e in zip(memory_objs, starts, ends):
                self.from_gpu(m, s, e, **kwargs)

        def batched_to_gpu(self, memory_objs, starts, ends, **kwargs):
            for m, s, e in zip(memory_objs, starts, ends):
                self.to_gpu(m, s, e, **kwargs)

        def get_shape(self, num_tokens):
            return torch.Size([2, NUM_LAYERS, num_tokens, hidden])

    class Contiguous(_Batched):
        """KV held as one contiguous [2, L, T, H*D] tensor per chunk (kwargs
        ``chunks`` on store, ``out`` on retrieve); the copy is a plain ``copy_``."""

        def __init__(self, chunk_tokens: int):
            self.chunk_tokens = chunk_tokens

        def from_gpu(self, memory_obj, start, end, **kwargs):
            memory_obj.tensor.copy_(kwargs["chunks"][start // self.chunk_tokens])

        def to_gpu(self, memory_obj, start, end, **kwargs):
            kwargs["out"][start // self.chunk_tokens].copy_(memory_obj.tensor)

    class Paged(_Batched):
        """vLLM's paged KV on the CPU: ``kvcaches`` is one [2, num_blocks,
        block_size, H, D] tensor per layer, ``slot_mapping`` the token -> slot
        map of the whole prompt. Same flow as LMCache's
        VLLMPagedMemGPUConnectorV2 (one transfer per chunk, KV_2LTD memory
        objects) without its CUDA streams; the copy is LMCache's own torch
        fallback kernel."""

        def __init__(self, num_blocks: int):
            self.num_blocks = num_blocks
            self.page_buffer_size = num_blocks * BLOCK_SIZE
            self._views: tuple[int, list] | None = None

        def _layers(self, kvcaches):
            # [2, NB, BS, H, D] viewed as [2, NB*BS, H*D]: the shape the
            # fallback uses for a "two-major" per-layer layout.
            if self._views is None or self._views[0] != id(kvcaches):
                self._views = (id(kvcaches), [k.view(2, self.page_buffer_size, hidden) for k in kvcaches])
            return self._views[1]

        def _transfer(self, memory_obj, start, end, direction, skip=0, **kwargs):
            device_ops.multi_layer_kv_transfer(
                memory_obj.tensor, self._layers(kwargs["kvcaches"]), kwargs["slot_mapping"][start:end],
                cpu, self.page_buffer_size, direction, EngineKVFormat.NL_X_TWO_NB_BS_NH_HS,
                block_size=BLOCK_SIZE, head_size=HEAD_DIM, skip_prefix_n_tokens=skip)

        def from_gpu(self, memory_obj, start, end, **kwargs):
            self._transfer(memory_obj, start, end, TransferDirection.D2H, **kwargs)

        def to_gpu(self, memory_obj, start, end, **kwargs):
            vllm_cached = kwargs.get("vllm_cached_tokens", 0)
            skip = min(end - start, max(0, vllm_cached - start))
            self._transfer(memory_obj, start, end, TransferDirection.H2D, skip=skip, **kwargs)

    class _NS:
        pass

    ns = _NS()
    ns.Contiguous = Contiguous
    ns.Paged = Paged
    return ns


ALL_PATHS = ("cpu", "paged", "lookup", "disk", "remote", "server", "l2")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="where to write the JSON result")
    ap.add_argument("--quick", action="store_true", help="smaller prompts and fewer rounds (about 40 s)")
    ap.add_argument("--paths", default=",".join(ALL_PATHS),
                    help=f"comma-separated subset of {','.join(ALL_PATHS)} (default: all)")
    ap.add_argument("--workdir", default=None,
                    help="directory for disk files and logs (default: a new temporary directory)")
    args = ap.parse_args(argv)
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = [p for p in paths if p not in ALL_PATHS]
    if unknown:
        ap.error(f"unknown paths: {unknown}; choose from {ALL_PATHS}")

    res = Results(args.quick)
    t_all = time.perf_counter()

    if importlib.util.find_spec("lmcache") is None:
        res.doc["skipped"]["all"] = ("lmcache is not installed: no module named 'lmcache' in "
                                     f"{sys.executable} (build .venv-lmcache with scripts/engine-venvs.sh lmcache)")
        res.write(args.out)
        print(f"lmcache peer: skipped: {res.doc['skipped']['all']}")
        return 0
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - any import failure means: not usable here
        res.doc["skipped"]["all"] = f"lmcache is not usable: torch does not import: {e!r}"
        res.write(args.out)
        print(f"lmcache peer: skipped: {res.doc['skipped']['all']}")
        return 0
    torch.set_num_threads(1)
    res.doc["torch"] = torch.__version__
    try:
        from importlib.metadata import version

        res.doc["version"] = version("lmcache")
        importlib.import_module("lmcache")
        importlib.import_module("lmcache.v1.cache_engine")  # the engine and its compiled extensions
    except Exception as e:  # noqa: BLE001
        res.doc["skipped"]["all"] = (f"lmcache is not installed (it does not import): {e!r} "
                                     "(build .venv-lmcache with scripts/engine-venvs.sh lmcache)")
        res.write(args.out)
        print(f"lmcache peer: skipped: {res.doc['skipped']['all']}")
        return 0

    plan = Plan(args.quick)
    # Other work on the machine skews every figure: keep the load next to them.
    res.doc["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]
    res.doc["cpus"] = os.cpu_count()
    res.doc["prompt_tokens"] = plan.prompt_tokens
    res.doc["prompt_bytes"] = plan.prompt_bytes
    res.doc["warmup_rounds"] = plan.warmup
    res.doc["timed_rounds"] = plan.rounds
    own_workdir = args.workdir is None
    workdir = tempfile.mkdtemp(prefix="lmcache-peer-") if own_workdir else args.workdir
    os.makedirs(workdir, exist_ok=True)
    print(f"lmcache {res.doc['version']} peer, torch {torch.__version__}, "
          f"{plan.prompt_tokens}-token prompts ({_mib(plan.prompt_bytes)}), "
          f"{plan.warmup} warmup + {plan.rounds} rounds, medians", flush=True)
    bench = Bench(plan, res, workdir)
    runners: dict[str, Callable[[], None]] = {
        "cpu": bench.run_cpu, "paged": bench.run_paged, "lookup": bench.run_lookup,
        "disk": bench.run_disk, "remote": bench.run_remote, "server": bench.run_server, "l2": bench.run_l2}
    timings = {}
    try:
        for p in paths:
            t0 = time.perf_counter()
            try:
                runners[p]()
            except Exception as e:  # noqa: BLE001 - one path failing must not lose the others
                res.skip(p, f"{type(e).__name__}: {e}"[:2000])
                res.doc.setdefault("tracebacks", {})[p] = traceback.format_exc()[-4000:]
            timings[p] = round(time.perf_counter() - t0, 1)
            res.write(args.out)  # keep what we have if a later path hangs
    finally:
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    res.doc["path_seconds"] = timings
    res.doc["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    res.doc["total_seconds"] = round(time.perf_counter() - t_all, 1)
    res.write(args.out)
    print(f"wrote {args.out} ({len(res.doc['rows'])} rows, {len(res.doc['skipped'])} skipped) "
          f"in {res.doc['total_seconds']} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
