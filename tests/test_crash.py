"""SIGKILL crash loops with real processes: whatever a killed writer left behind reopens clean and verifies.

A child process writes through a real KVStore (host RAM -> LMDB -> files,
write-through, both persistent tiers synced) and is SIGKILLed at a random
point chosen from the progress it reports: while opening the store, between
puts, in the middle of a put, a background write or a flush. The parent then
reopens the same directories in-process and checks that they open, that no
temp file of the dead writer is left, that every block any tier returns is
byte-for-byte the KV that was put, that ``get`` returns a correct prefix and
that everything flushed before the kill is still there. The directories
carry their state (and capacity evictions) from cycle to cycle.

Children are started with ``subprocess.Popen`` like ``run_python`` does (cwd
tests/, tests/ on PYTHONPATH). Importing torch costs a child ~2 s, so the next
child is started while the current one runs and is verified: it imports, says
``R`` and waits for ``go`` on stdin before it touches the directories.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import TESTS_DIR, as_bytes, make_kv, make_tokens, tiny_layout
from kvstore.blockformat import HEADER_BYTES
from kvstore.config import StoreConfig
from kvstore.store import KVStore
from kvstore.tiers.files import FilesTier

pytestmark = pytest.mark.crash

BLOCK = 4096  # tiny layout: 16 tokens
STORED = BLOCK + HEADER_BYTES
HOST_BLOCKS, DISK_BLOCKS, FILES_BLOCKS = 8, 40, 60
FLUSH_EVERY = 4  # the child flushes after put i when i % FLUSH_EVERY == FLUSH_EVERY - 1
# How many of the last flushed prompts of a cycle must have survived the kill; see _durable_window.
DURABLE_PROMPTS = 8
CHILD_TIMEOUT = 120.0  # a child that hangs this long is killed and the test fails


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), env.get("PYTHONPATH", "")])
    return env


class Child:
    """A child interpreter running ``code``; reads its stdout line by line, killed by a watchdog if it hangs."""

    def __init__(self, code: str, *args: str):
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._stderr, text=True, cwd=str(TESTS_DIR),
                                     env=_child_env())
        self._watchdog = threading.Timer(CHILD_TIMEOUT, self.proc.kill)
        self._watchdog.daemon = True
        self._watchdog.start()
        self.lines: list[str] = []

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read()

    def read_line(self) -> list[str]:
        """The next progress line, split; fails the test if the child ended instead."""
        line = self.proc.stdout.readline()
        if not line.endswith("\n"):
            self.proc.wait()
            pytest.fail(f"child {self.pid} ended (rc {self.proc.returncode}) after {self.lines[-3:]}:\n"
                        f"{self.stderr()}")
        self.lines.append(line)
        return line.split()

    def wait_for(self, tag: str, count: int = 1) -> None:
        """Read lines until ``count`` lines starting with ``tag`` were seen (counting those read before)."""
        while sum(line.split()[:1] == [tag] for line in self.lines) < count:
            self.read_line()

    def send(self, text: str) -> None:
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def kill(self) -> list[list[str]]:
        """SIGKILL, reap, and return every complete line the child wrote."""
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self._watchdog.cancel()
        rest = self.proc.stdout.read()
        self.lines += [line + "\n" for line in rest.split("\n")[:-1]]  # a torn last line is dropped
        self.proc.stdout.close()
        self.proc.stdin.close()
        assert self.proc.returncode == -signal.SIGKILL, (self.proc.returncode, self.stderr())
        self._stderr.close()
        return [line.split() for line in self.lines]

    def discard(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._watchdog.cancel()
        for stream in (self.proc.stdout, self.proc.stdin):
            try:
                stream.close()
            except OSError:
                pass
        self._stderr.close()


# -- the store crash loop -------------------------------------------------------------------------------

STORE_CHILD = """
import json, sys
from conftest import make_kv, make_tokens, tiny_layout
from kvstore.config import StoreConfig
from kvstore.store import KVStore

lay = tiny_layout()
make_kv(lay, 16, seed=0)  # warm up torch before saying ready
settings = json.loads(sys.argv[1])
flush_every = int(sys.argv[2])
print("R", flush=True)
go = sys.stdin.readline().split()
if not go:
    sys.exit(0)
start = int(go[1])
print("G", flush=True)
store = KVStore(lay, StoreConfig(**settings))
print("O", flush=True)
for i in range(start, start + 100_000):
    n = 40 + (i % 3) * 8  # 2 full blocks + 8-token tail, 3 full blocks, 3 full blocks + 8-token tail
    tokens, kv = make_tokens(n, seed=i), make_kv(lay, n, seed=i)
    store.put(tokens, kv)
    print("P", i, flush=True)
    if i % flush_every == flush_every - 1:
        assert store.flush(timeout=60)
        print("F", i, flush=True)  # every put up to i is durable
"""


def _store_settings(tmp_path: Path) -> dict:
    # slow_factor: a verification read delayed by the scheduler must not get a tier bypassed mid-check.
    return dict(host_bytes=HOST_BLOCKS * BLOCK, disk_dir=str(tmp_path / "lmdb"), disk_bytes=DISK_BLOCKS * STORED,
                disk_sync=True, files_dir=str(tmp_path / "files"), files_bytes=FILES_BLOCKS * STORED,
                files_sync=True, write_policy="write_through", slow_factor=1e9)


def _prompt(i: int, layout, cache: dict) -> tuple[list[int], torch.Tensor]:
    if i not in cache:
        n = 40 + (i % 3) * 8
        cache[i] = (make_tokens(n, seed=i), make_kv(layout, n, seed=i))
    return cache[i]


def _temp_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob(".*.tmp")) if root.exists() else []


def _durable_window(start: int, last_flush: int | None) -> range:
    """Prompts of this cycle whose every block must have survived the kill in LMDB or the files tier.

    A prompt is at most 4 blocks (3 full + a tail). The files tier (60 full blocks) evicts its least
    recently used files down to the low-water mark (54 blocks) minus the incoming block at most, so at any time
    it keeps at least the most recent 52 full blocks' worth of what it was given. The child writes the
    files tier in put order, after everything older: earlier cycles' blocks were last touched by the
    parent's verification, which ran before this child started. Written after the first block of
    prompt ``last_flush - DURABLE_PROMPTS + 1``: at most DURABLE_PROMPTS prompts up to the flush (32
    blocks) plus the prompts put after it before the child died (at most FLUSH_EVERY = 4 prompts, 16
    blocks, since the next flush never completed): 48 <= 52, so none of them can have been evicted
    from the files tier for capacity. (LMDB, 40 blocks, usually holds them too; either tier counts.)
    """
    if last_flush is None or last_flush < start:
        return range(0)
    return range(max(start, last_flush - DURABLE_PROMPTS + 1), last_flush + 1)


def _verify_reopened(tmp_path: Path, layout, started: range, this_cycle: range, last_flush: int | None,
                     cache: dict) -> dict:
    """Reopen the directories and check them; returns what was seen.

    ``promote=False``: the checking ``get``s must not copy blocks up into LMDB, whose evictions would
    then race the checks; it reads host (empty) -> LMDB -> files exactly as a serving store does.
    """
    store = KVStore(layout, StoreConfig(**_store_settings(tmp_path), promote=False))
    try:
        # The open removed every temp file of the dead child (no other writer runs on this host).
        leftovers = _temp_files(tmp_path / "files")
        assert leftovers == [], leftovers
        found: dict[int, list[bool]] = {}
        verified = 0
        for i in started:  # per tier, through the tier API: no promotion, every copy judged
            tokens, kv = _prompt(i, layout, cache)
            refs = store.block_keys(tokens)
            found[i] = [False] * len(refs)
            for tier in (store.disk, store.files):
                for b, ref in enumerate(refs):
                    if not tier.contains(ref.key):
                        continue
                    out = torch.empty(layout.shape(ref.num_tokens), dtype=layout.dtype)
                    if tier.get_into(ref.key, out):
                        assert as_bytes(out) == as_bytes(kv[:, :, ref.start:ref.end]), (tier.name, i, b)
                        found[i][b] = True
                        verified += 1
        for i in _durable_window(this_cycle.start, last_flush):
            assert all(found[i]), f"prompt {i} was flushed (up to {last_flush}) but blocks {found[i]} survived"
        for i in started:  # through the store: a correct prefix, the longest one the tiers hold
            tokens, kv = _prompt(i, layout, cache)
            got = store.get(tokens)
            n = got.shape[2]
            assert as_bytes(got) == as_bytes(kv[:, :, :n]), i
            refs = store.block_keys(tokens)
            intact = next((ref.start for ref, ok in zip(refs, found[i]) if not ok), len(tokens))
            assert n == intact, (i, n, intact, found[i])
        stats = store.stats()["tiers"]
        for name in ("lmdb", "files"):
            assert stats[name]["corrupt"] == 0, (name, stats[name])  # a kill never leaves a damaged block
            assert stats[name]["errors"] == 0, (name, stats[name])
            assert stats[name]["used_bytes"] <= stats[name]["capacity_bytes"], (name, stats[name])
        return {"verified": verified, "files_used": stats["files"]["used_bytes"],
                "temp_removed": stats["files"]["temp_removed"]}
    finally:
        store.close()


def _cycles(default: int) -> int:
    return int(os.environ.get("KVSTORE_CRASH_CYCLES", default))


@pytest.mark.parametrize("size", ["default", pytest.param("long", marks=pytest.mark.slow)])
def test_sigkill_store_writer_loop(tmp_path, layout, size, request):
    if size == "long":
        markexpr = request.config.getoption("markexpr") or ""
        if os.environ.get("KVSTORE_SLOW") != "1" and not ("slow" in markexpr and "not slow" not in markexpr):
            pytest.skip("60 crash cycles: set KVSTORE_SLOW=1 or select -m slow")
        cycles = max(60, _cycles(60))
    else:
        cycles = _cycles(20)
    settings = json.dumps(_store_settings(tmp_path))
    rng = random.Random(20240611 + cycles)
    cache: dict = {}
    start = 0
    total_verified = 0
    max_files_used = 0
    plans = []

    def spawn() -> Child:
        return Child(STORE_CHILD, settings, str(FLUSH_EVERY))

    child = spawn()
    spare = None
    try:
        for cycle in range(cycles):
            child.wait_for("R")
            spare = spawn() if cycle + 1 < cycles else None  # imports while this one runs
            child.send(f"go {start}")
            plan = rng.random()
            if plan < 0.12:  # kill while it opens the store
                child.wait_for("G")
                time.sleep(rng.uniform(0, 0.01))
                plans.append("open")
            elif plan < 0.24:  # right after the open or after one put: mid first/second put
                child.wait_for("O") if plan < 0.18 else child.wait_for("P", 1)
                time.sleep(rng.uniform(0, 0.005))
                plans.append("first puts")
            else:
                puts = rng.randint(2, 24)
                child.wait_for("P", puts)
                time.sleep(rng.uniform(0, 0.02))  # lands anywhere in the next puts or flush
                plans.append(f"{puts} puts")
            lines = child.kill()
            puts_done = [int(words[1]) for words in lines if words[:1] == ["P"]]
            flushes = [int(words[1]) for words in lines if words[:1] == ["F"]]
            last_put = max(puts_done, default=start - 1)
            # The prompt after the last reported put may be partly stored: verify it too.
            this_cycle = range(start, last_put + 2)
            seen = _verify_reopened(tmp_path, layout, range(0, last_put + 2), this_cycle,
                                    max(flushes, default=None), cache)
            total_verified += seen["verified"]
            max_files_used = max(max_files_used, seen["files_used"])
            start = last_put + 2  # new prompts next cycle; the directories keep their state
            child, spare = spare, None
    finally:
        for leftover in (child, spare):
            if leftover is not None:
                leftover.discard()
    assert total_verified > 0, plans
    if start * 3 > 2 * FILES_BLOCKS:  # puts of 3-4 blocks: the tiers ran full and the kills hit evictions
        assert max_files_used >= 45 * STORED, (max_files_used, start, plans)


# -- files tier: killed inside a large put_many ------------------------------------------------------------

BIG = dict(num_layers=32, num_kv_heads=8, head_dim=256)  # fp16, 16 tokens: 4 MiB a block
BIG_CAPACITY_BLOCKS = 12

FILES_CHILD = """
import hashlib, sys
from conftest import make_kv, tiny_layout
from kvstore.tiers.files import FilesTier

lay = tiny_layout(num_layers=32, num_kv_heads=8, head_dim=256)
blocks = [make_kv(lay, 16, seed=s) for s in range(3)]
print("R", flush=True)
go = sys.stdin.readline().split()
if not go:
    sys.exit(0)
n = int(go[1])
tier = FilesTier(sys.argv[1], int(sys.argv[2]), lay, sync=True)
print("O", flush=True)
while True:
    batch = []
    for j in range(n, n + 8):
        key = hashlib.sha256(b"big-%d" % j).digest()[:24] + j.to_bytes(8, "big")
        batch.append((key, blocks[j % 3]))
    assert tier.put_many(batch) == 8
    n += 8
    print("P", n, flush=True)
"""


def test_sigkill_inside_files_put_many_leaves_no_temp_and_no_bad_block(tmp_path):
    layout = tiny_layout(**BIG)
    assert layout.block_bytes == 4 << 20
    root = tmp_path / "files"
    capacity = BIG_CAPACITY_BLOCKS * (layout.block_bytes + HEADER_BYTES)
    expected = [as_bytes(make_kv(layout, 16, seed=s)) for s in range(3)]
    rng = random.Random(7)
    start, cycle, removed_total, cycles_with_temp, verified = 0, 0, 0, 0, 0
    child = Child(FILES_CHILD, str(root), str(capacity))
    spare = None
    try:
        while cycle < 3 or (cycles_with_temp == 0 and cycle < 8):
            child.wait_for("R")
            spare = Child(FILES_CHILD, str(root), str(capacity))
            child.send(f"go {start}")
            child.wait_for("P", rng.randint(0, 2))
            child.wait_for("O")
            # Kill it the moment one of its temp files exists: it is inside a block write.
            mine = f"~{child.pid}~"
            deadline = time.monotonic() + 10
            while not any(mine in p.name for p in _temp_files(root)) and time.monotonic() < deadline:
                time.sleep(0.0005)
            lines = child.kill()
            dead_temps = [p for p in _temp_files(root) if mine in p.name]
            cycles_with_temp += bool(dead_temps)
            last = max((int(words[1]) for words in lines if words[:1] == ["P"]), default=start)

            tier = FilesTier(root, capacity, layout, sync=True)
            try:
                assert tier.stats()["temp_removed"] == len(dead_temps)
                removed_total += tier.stats()["temp_removed"]
                assert _temp_files(root) == []
                files = sorted(root.rglob("*.kvb"))
                assert len(files) == tier.stats()["blocks"]
                assert tier.used_bytes() <= capacity
                out = torch.empty(layout.block_shape, dtype=layout.dtype)
                for path in files:
                    key = bytes.fromhex(path.name[:-len(".kvb")])
                    j = int.from_bytes(key[-8:], "big")
                    assert j < last + 8, (j, last)  # nothing the child never started
                    assert path.stat().st_size == layout.block_bytes + HEADER_BYTES, path
                    assert tier.get_into(key, out), path
                    assert as_bytes(out) == expected[j % 3], path
                    verified += 1
                assert tier.stats()["corrupt"] == 0
            finally:
                tier.close()
            start = last + 8  # the batch being written at the kill gets new keys next cycle
            cycle += 1
            child, spare = spare, None
    finally:
        for leftover in (child, spare):
            if leftover is not None:
                leftover.discard()
    assert verified > 0
    assert cycles_with_temp > 0 and removed_total >= cycles_with_temp, (cycle, cycles_with_temp, removed_total)
