"""Random sequences of store operations under real faults: exact bytes or a miss, and only ValueError.

A hypothesis ``RuleBasedStateMachine`` drives a real ``KVStore`` over tiny
tiers (a host-RAM pool of one to three blocks, a one-to-four block LMDB, a
files tier of a few blocks): put, put_from, lookup, get, get_into, plan,
prefetch, whole and layer-wise load, flush, close and reopen, interleaved
with faults a deployment really meets:

- bytes flipped inside a stored ``.kvb`` file, a file truncated, a file
  deleted (another process evicting it);
- a second ``KVStore`` sharing the files directory with ``files_codec="kivi4"``
  putting the same prefixes, so lossy frames land beside exact blocks (and,
  closed and reopened with exact codecs, that store must from then on read
  exact bytes only);
- a custom tier passed through ``KVStore(layout, config, tiers=[...])``: a
  real ``HostTier`` whose reads and writes raise on a seeded schedule;
- a real cache server tier: ``kvstore serve`` as a subprocess (one per
  module, ``storefixtures.LazyCacheServer``, small enough to evict), under
  the local tiers or as the fastest tier (``host_bytes=0``, no LMDB, with or
  without files), SIGKILLed (and restarted in the background, its blocks
  gone) or SIGSTOPped for a few operations, which then time out;
- slow reads: the real LMDB and files tiers wrapped in ``faulty.FaultyTier``,
  a few reads delayed now and then (at most 0.06 s), with the store's
  health breaker live (``slow_factor=10``); besides exact-or-miss, a tier
  that raised nothing is never degraded unless 5 of some 8 of its reads
  were slow (``kvstore/health.py``): one slow read among fast ones never;
- bad arguments (wrong dtype or shape, token ids out of range, an ``out``
  that requires grad, tensors on the ``meta`` device, a salt with a lone
  surrogate), which must raise ``ValueError`` and leave stored data served.

The model (``storefixtures.Oracle``) knows the KV of every prefix and which
prefixes were put. Each example has its own ``model_id`` (the cache server
keeps blocks across examples) and its own directories. Invariants: every
answer is a leading prefix of exactly that KV (only the store that
configured kivi4 may get blocks within kivi4's error bound), never longer
than what was put under that salt, and nothing but ``ValueError`` (for a
bad argument) reaches the caller.

Several machines share the rules and differ in the configurations and
faults they draw, so one bug does not hide the others. The default run is
bounded (``max_examples=50``; 12 and 20 for the cache server and slow-read
machines); ``KVSTORE_SLOW=1`` (CI) runs 200 examples a machine (40 and 80
for those two: a server restart costs a second of CPU, a slow read up to
0.06 s; more kept CI over 30 minutes on 2 cores). Shrinking is off by default to keep a failing run short; set
``KVSTORE_SHRINK=1`` to get a minimal failing sequence.

One plain test at the end pins down what the cache server machine found: a
forked child keeps a closed store's LMDB directory locked.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from faulty import FaultyTier
from kvstore import KVStore, StoreConfig
from kvstore.health import WINDOW_READS
from kvstore.hierarchy import TIER_SPECS
from kvstore.tiers.host import HostTier
from storefixtures import (BLOCK_BYTES, BT, LAYOUT, READS, STORED_BYTES, LazyCacheServer, Oracle, block_keys,
                           check_prefix, evict, op, put_from, read_all, server_token)

SLOW = os.environ.get("KVSTORE_SLOW") == "1"
PHASES = tuple(Phase) if os.environ.get("KVSTORE_SHRINK") == "1" else tuple(p for p in Phase if p != Phase.shrink)
SETTINGS = settings(max_examples=200 if SLOW else 50, stateful_step_count=40 if SLOW else 25, deadline=None,
                    database=None, phases=PHASES,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                           HealthCheck.data_too_large])

SALTS = (None, "tenant-a", b"tenant-b")
# Few distinct token ids: random prompts share prefixes (and blocks) often.
TOKENS = st.lists(st.integers(0, 5), min_size=0, max_size=4 * BT + 2)


# The cache server of this module's remote machine (48 KiB of RAM: it evicts within an example), started on first
# use and killed at module end (``_the_cache_server_dies_with_the_module``).
CACHE_SERVER = LazyCacheServer("--host-bytes", "48KiB", "--disk-bytes", "0")


@pytest.fixture(scope="module", autouse=True)
def _the_cache_server_dies_with_the_module():
    yield
    CACHE_SERVER.close()


# Reads of at least this many seconds may be judged slow by the store's breaker (its min_slow_seconds is 10 GIL
# switch intervals, 50 ms; a read timed in the store is this wrapper's time plus a little): half of it, for slack.
MAYBE_SLOW_SECONDS = 10 * sys.getswitchinterval() / 2
# The breaker trips at 5 slow reads of its last 8; reads finishing on several threads may reach it in another
# order than the wrapper saw them, so the wrapper counts over a window a little wider than the breaker's.
TRIP_READS = WINDOW_READS // 2 + 1
COUNTED_WINDOW = WINDOW_READS + 2


class FlakyHostTier(HostTier):
    """A real host-RAM tier whose reads and writes raise ``OSError(EIO)`` on a seeded schedule."""

    def __init__(self, layout, capacity_bytes: int, schedule: random.Random, rate: float):
        super().__init__(layout, capacity_bytes)
        self.schedule = schedule
        self.rate = rate
        self.raised = 0

    def _fault(self, call: str) -> None:
        if self.rate and self.schedule.random() < self.rate:
            self.raised += 1
            raise OSError(errno.EIO, f"injected fault in {call}")

    def get_run_marked(self, keys, outs):  # the slot read the store makes (get_into_marked goes through it too)
        self._fault("get_run_marked")
        return super().get_run_marked(keys, outs)

    def put_many(self, items):
        self._fault("put_many")
        return super().put_many(items)

    def put_lossy(self, items, codec):
        self._fault("put_lossy")
        return super().put_lossy(items, codec)


class SlowReadTier(FaultyTier):
    """A real tier (``FaultyTier``) whose next reads are delayed on a schedule (``slow_next``); it remembers,
    per successful read, whether that read took long enough that the store's breaker may judge it slow."""

    def __init__(self, inner):
        super().__init__(inner)
        self._lock = threading.Lock()
        self._fast_left = 0  # reads before the delayed ones start
        self._slow_left = 0
        self._window: deque[bool] = deque(maxlen=COUNTED_WINDOW)  # successful reads: long enough to be slow?
        self.peak = 0  # the most such reads in any window of COUNTED_WINDOW reads since ``take_peak``
        self.slow_reads = 0

    def slow_next(self, count: int, delay: float, after: int = 0) -> None:
        """Delay ``count`` reads by ``delay`` seconds, after ``after`` more reads at full speed."""
        with self._lock:
            self._fast_left, self._slow_left, self.delay = after, count, delay

    def take_peak(self) -> int:
        """``peak`` since the last call; it starts again from the reads now in the window."""
        with self._lock:
            peak, self.peak = self.peak, sum(self._window)
            return peak

    def get_into(self, key, out) -> bool:
        start = time.perf_counter()  # all of this call: the store times no less of it
        self._fault()
        with self._lock:
            self.reads += 1
            delay = 0.0
            if self._fast_left:
                self._fast_left -= 1
            elif self._slow_left:
                self._slow_left -= 1
                delay = self.delay
        if delay:
            time.sleep(delay)
        found = self.inner.get_into(key, out)
        if found:
            with self._lock:
                slow = time.perf_counter() - start >= MAYBE_SLOW_SECONDS
                self.slow_reads += slow
                self._window.append(slow)
                self.peak = max(self.peak, sum(self._window))
        return found


_SLOW_CLASSES: dict[type, type] = {}


def slow_read_tier(inner) -> SlowReadTier:
    """``inner`` wrapped in a ``SlowReadTier`` that declares ``inner``'s capabilities (LMDB evicts to on_evict)."""
    kind = type(inner)
    cls = _SLOW_CLASSES.get(kind)
    if cls is None:
        cls = _SLOW_CLASSES[kind] = type(f"SlowRead{kind.__name__}", (SlowReadTier,),
                                         {"capabilities": kind.capabilities})
    return cls(inner)


class StoreMachine(RuleBasedStateMachine):
    """The rules; subclasses say which configurations and faults are drawn."""

    HOSTS = ("flaky", "plain", "none")  # the fastest tier: a flaky HostTier, a plain one, none (a persistent one)
    LMDB_BLOCKS = (0, 1, 2, 4)  # 0: no LMDB tier
    FILES_BLOCKS = (2, 6)  # the files tier's capacity in blocks, as this store sees it: from, to
    FAULTS = True  # corrupt, truncate and delete files
    NEIGHBOUR = True  # the second store sharing the files directory with kivi4
    BAD_ARGUMENTS = True
    REMOTE = False  # a cache server tier below the local ones (the fastest, with host_bytes=0 and no LMDB or files)
    FILES_ALWAYS = True  # False: a third of the draws have no files tier
    SLOW_READS = False  # the LMDB and files tiers wrapped in SlowReadTier; the breaker live (slow_factor 10)

    def __init__(self):
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="kvstateful-"))
        # Keys name the model: a fresh one per example keeps the cache server's blocks of earlier examples apart.
        self.model_id = f"stateful-{uuid.uuid4().hex}"
        self.slow_tiers: dict[str, SlowReadTier] = {}
        self.health_seen: dict[str, tuple[int, int]] = {}  # tier -> (degradations, errors) at the last check
        self.server_killed = False
        self.oracle = Oracle()
        self.store: KVStore | None = None
        self.neighbour: KVStore | None = None
        self.neighbour_lossy = True
        self.prompts: list[tuple[object, tuple[int, ...]]] = []  # (salt, tokens) put so far
        self.neighbour_prompts: list[tuple[object, tuple[int, ...]]] = []  # of those, put by the neighbour

    # -- set-up -----------------------------------------------------------------------------------

    @initialize(host=st.integers(0, 11), host_blocks=st.integers(1, 3), lmdb_blocks=st.integers(0, 11),
                files_blocks=st.integers(2, 16),
                write_policy=st.sampled_from(("write_through", "write_back")),
                disk_codec=st.sampled_from(("raw", "zstd")), files_codec=st.sampled_from(("raw", "zstd")),
                seed=st.integers(0, 2**32 - 1), rate=st.sampled_from((0.05, 0.2, 0.5)),
                files=st.sampled_from((True, True, False)), remote_timeout=st.sampled_from((0.05, 0.15, 0.3)),
                remote_codec=st.sampled_from(("raw", "zstd")), remote_connections=st.sampled_from((1, 2, 4)),
                remote_write=st.sampled_from((None, "write_through", "write_through")),
                degraded_seconds=st.sampled_from((0.05, 0.05, 30.0)), server_dies=st.sampled_from((False, False, True)))
    def open_store(self, host, host_blocks, lmdb_blocks, files_blocks, write_policy, disk_codec, files_codec, seed,
                   rate, files, remote_timeout, remote_codec, remote_connections, remote_write, degraded_seconds,
                   server_dies):
        host = self.HOSTS[host % len(self.HOSTS)]  # the machine's choices (twice listed: twice as likely)
        lmdb_blocks = self.LMDB_BLOCKS[lmdb_blocks % len(self.LMDB_BLOCKS)]
        low, high = self.FILES_BLOCKS
        files_blocks = low + (files_blocks - low) % (high - low + 1)
        self.host = host
        self.server_killed = not server_dies  # the cache server is killed in a third of the examples, once at most
        self.files_dir = self.tmp / "files"
        settings_ = dict(model_id=self.model_id, host_bytes=0 if host == "none" else host_blocks * BLOCK_BYTES,
                         write_policy=write_policy, staging_bytes="1MiB", prefetch_policy="best_effort",
                         # The breaker: off for slowness (a busy machine's stalls must not hide blocks) but where
                         # slow reads are the fault; errors trip it, and a tier is probed again after 50 ms.
                         slow_factor=10.0 if self.SLOW_READS else 1e9,
                         degraded_seconds=degraded_seconds if self.SLOW_READS else 0.05)
        if files or self.FILES_ALWAYS:
            settings_.update(files_dir=str(self.files_dir), files_bytes=files_blocks * STORED_BYTES, files_sync=False,
                             files_codec=files_codec)
        if lmdb_blocks:
            settings_.update(disk_dir=str(self.tmp / "lmdb"), disk_bytes=lmdb_blocks * STORED_BYTES, disk_sync=False,
                             disk_codec=disk_codec)
        if self.REMOTE:
            with op("start the cache server"):
                url = CACHE_SERVER.get().url
            settings_.update(remote_url=url, remote_token=server_token(), remote_timeout_seconds=remote_timeout,
                             remote_codec=remote_codec, remote_connections=remote_connections,
                             remote_write_policy=remote_write)
        self.config = StoreConfig(**settings_)
        self.schedule = random.Random(seed)
        self.rate = rate
        self._open()

    def _tiers(self) -> list | None:
        """The custom tiers for ``KVStore(..., tiers=...)``: the flaky host tier, the slow-read wrappers, and
        the others as the config would build them; None (the config builds them) where nothing is custom."""
        if self.host != "flaky" and not self.SLOW_READS:
            return None
        c = self.config
        tiers = []
        self.slow_tiers = {}
        try:
            for spec in TIER_SPECS.values():
                if not spec.wanted(c):
                    continue
                if spec.name == "host" and self.host == "flaky":
                    tier = FlakyHostTier(LAYOUT, c.host_bytes, self.schedule, self.rate)
                else:
                    tier = spec.build(LAYOUT, c)
                if self.SLOW_READS and spec.name in ("lmdb", "files"):
                    tier = self.slow_tiers[spec.name] = slow_read_tier(tier)
                tiers.append(tier)
        except BaseException:
            for tier in tiers:
                tier.close()
            raise
        return tiers

    def _open(self) -> None:
        if self.REMOTE:
            # A server restarting in the background is a child forked from this process: until it has exec'd,
            # it holds the LMDB directory lock the store just closed (see LazyCacheServer.spawned).
            CACHE_SERVER.spawned()
            if CACHE_SERVER.url and self.config.remote_url != CACHE_SERVER.url:
                self.config = self.config.replace(remote_url=CACHE_SERVER.url)  # restarted on another port
        with op("KVStore(...)"):
            self.store = KVStore(LAYOUT, self.config, tiers=self._tiers())
        self.health_seen = {}

    def teardown(self):
        if self.REMOTE:
            CACHE_SERVER.cont()  # never left hung for the next example (or for close)
        failures = []
        for store in (self.store, self.neighbour):
            if store is not None:
                try:
                    with op("close at teardown"):
                        store.close()
                except AssertionError as exc:
                    failures.append(str(exc))
        self.store = self.neighbour = None
        shutil.rmtree(self.tmp, ignore_errors=True)
        assert not failures, failures

    # -- helpers ----------------------------------------------------------------------------------

    def _record(self, salt, tokens, start: int = 0) -> None:
        self.oracle.record(salt, tokens, start)
        self.prompts.append((salt, tuple(tokens)))

    def _read(self, store: KVStore, salt, tokens, reads, lossy: str | None = None, policy: str = "wait") -> dict:
        return read_all(store, self.oracle, salt, list(tokens), f"{self.host} host", lossy, reads, policy)

    def _prompt(self, data) -> tuple[object, list[int]]:
        """A prompt put before (often), or a fresh one."""
        if self.prompts and data.draw(st.booleans(), label="reuse a prompt"):
            salt, tokens = data.draw(st.sampled_from(self.prompts), label="prompt")
            cut = data.draw(st.integers(0, len(tokens) + 2), label="length")
            tokens = list(tokens[:cut]) + data.draw(st.lists(st.integers(0, 5), max_size=max(0, cut - len(tokens))),
                                                    label="extension")
            return salt, tokens
        return data.draw(st.sampled_from(SALTS), label="salt"), data.draw(TOKENS, label="tokens")

    # -- writes -----------------------------------------------------------------------------------

    @rule(salt=st.sampled_from(SALTS), tokens=TOKENS)
    def put(self, salt, tokens):
        with op(f"put({len(tokens)} tokens, salt={salt!r})"):
            stored = self.store.put(tokens, self.oracle.kv(salt, tokens), salt=salt)
        self._record(salt, tokens)
        assert 0 <= stored <= -(-len(tokens) // BT), stored

    @rule(salt=st.sampled_from(SALTS), tokens=TOKENS, start_block=st.integers(0, 5))
    def put_from(self, salt, tokens, start_block):
        bounds = sorted({0, len(tokens), *range(0, len(tokens), BT)})  # block boundaries: where start may be
        start = bounds[start_block % len(bounds)]
        with op(f"put_from({len(tokens)} tokens, salt={salt!r}, start={start})"):
            stored = put_from(self.store, self.oracle, salt, tokens, start)
        self.prompts.append((salt, tuple(tokens)))
        assert 0 <= stored <= -(-(len(tokens) - start) // BT), stored

    @rule()
    def flush(self):
        with op("flush"):
            assert self.store.flush(30.0), "flush(30.0) timed out"

    @rule()
    def close_and_reopen(self):
        with op("close"):
            self.store.close()
        self.store = None
        self._open()

    # -- reads ------------------------------------------------------------------------------------

    @rule(data=st.data(), read=st.sampled_from(READS))
    def read(self, data, read):
        salt, tokens = self._prompt(data)
        self._read(self.store, salt, tokens, (read,))

    @rule(data=st.data(), policy=st.sampled_from(("wait", "best_effort", "timeout")))
    def prefetch_then_load(self, data, policy):
        salt, tokens = self._prompt(data)
        ref = self.oracle.kv(salt, tokens)
        bound = self.oracle.bound(salt, tokens)
        what = f"prefetch({len(tokens)} tokens, salt={salt!r}, policy={policy})"
        with op(what):
            handle = self.store.prefetch(tokens, salt=salt, policy=policy)
            handle.wait(10.0)  # no fetch left running behind the next rule
            ready = handle.result()
            assert 0 <= ready <= bound, (what, ready, bound)
            layer_wise = data.draw(st.booleans(), label="layer_wise")
            if layer_wise:
                with self.store.load(tokens, salt=salt, layer_wise=True, prefetch=handle) as loader:
                    n = loader.num_tokens
                    for index, layer in loader:
                        check_prefix(layer.unsqueeze(0), ref[index:index + 1], f"{what} layer {index}")
            else:
                n = check_prefix(self.store.load(tokens, salt=salt, prefetch=handle), ref, f"{what} load")
            assert n <= bound, (what, n, bound)
            handle.close()

    @rule(data=st.data())
    def lookup_never_exceeds_what_was_put(self, data):
        salt, tokens = self._prompt(data)
        with op("lookup"):
            n = self.store.lookup(tokens, salt=salt)
        assert 0 <= n <= self.oracle.bound(salt, tokens), (n, self.oracle.bound(salt, tokens))

    # -- faults in the files directory -------------------------------------------------------------

    def _stored_files(self) -> list[Path]:
        return sorted(self.files_dir.rglob("*.kvb")) if self.files_dir.exists() else []

    @precondition(lambda self: self.FAULTS)
    @rule(pick=st.integers(0, 10**6), where=st.integers(0, 10**6), mask=st.integers(1, 255))
    def corrupt_a_file(self, pick, where, mask):
        files = self._stored_files()
        if not files:
            return
        path = files[pick % len(files)]
        try:
            with open(path, "r+b") as f:
                size = os.fstat(f.fileno()).st_size
                if not size:
                    return
                f.seek(where % size)
                byte = f.read(1)
                f.seek(where % size)
                f.write(bytes([byte[0] ^ mask]))
        except FileNotFoundError:
            pass  # evicted meanwhile

    @precondition(lambda self: self.FAULTS)
    @rule(pick=st.integers(0, 10**6), keep=st.integers(0, 10**6))
    def truncate_a_file(self, pick, keep):
        files = self._stored_files()
        if not files:
            return
        path = files[pick % len(files)]
        try:
            os.truncate(path, keep % max(1, path.stat().st_size))
        except FileNotFoundError:
            pass

    @precondition(lambda self: self.FAULTS)
    @rule(pick=st.integers(0, 10**6))
    def another_process_evicts_a_file(self, pick):
        files = self._stored_files()
        if files:
            files[pick % len(files)].unlink(missing_ok=True)

    # -- a second store sharing the files directory, with a lossy codec -----------------------------

    def _neighbour_config(self) -> StoreConfig:
        return StoreConfig(model_id=self.model_id, host_bytes=BLOCK_BYTES, disk_dir=str(self.tmp / "neighbour-lmdb"),
                           disk_bytes=STORED_BYTES, disk_sync=False, files_dir=str(self.files_dir),
                           files_bytes=8 * STORED_BYTES, files_sync=False,
                           files_codec="kivi4" if self.neighbour_lossy else "raw", slow_factor=1e9,
                           staging_bytes="1MiB")

    def _open_neighbour(self) -> None:
        with op("KVStore(neighbour)"):
            self.neighbour = KVStore(LAYOUT, self._neighbour_config())

    @precondition(lambda self: self.NEIGHBOUR)
    @rule(data=st.data())
    def neighbour_puts_the_same_prefixes(self, data):
        if self.neighbour is None:
            self._open_neighbour()
        if self.prompts and data.draw(st.booleans(), label="a prompt the store put"):
            salt, tokens = data.draw(st.sampled_from(self.prompts), label="prompt")
        else:  # several blocks: most of them only in the kivi4 files once its tiny host and LMDB tiers evict
            salt = data.draw(st.sampled_from(SALTS), label="salt")
            tokens = data.draw(st.lists(st.integers(0, 5), min_size=2 * BT, max_size=4 * BT + 2), label="tokens")
        with op(f"neighbour put({len(tokens)} tokens, salt={salt!r})"):
            self.neighbour.put(tokens, self.oracle.kv(salt, tokens), salt=salt)
            assert self.neighbour.flush(30.0)
        self._record(salt, tokens)
        self.neighbour_prompts.append((salt, tuple(tokens)))

    @precondition(lambda self: self.NEIGHBOUR and self.neighbour is not None)
    @rule(data=st.data(), read=st.sampled_from(("get", "get_into", "load", "layer_wise", "prefetch")))
    def neighbour_reads(self, data, read):
        """The neighbour opted into kivi4 (blocks within its bound) until it reopens with exact codecs."""
        if self.neighbour_prompts and data.draw(st.booleans(), label="one the neighbour put"):
            salt, tokens = data.draw(st.sampled_from(self.neighbour_prompts), label="neighbour prompt")
        else:
            salt, tokens = self._prompt(data)
        lossy = "kivi4" if self.neighbour_lossy else None
        read_all(self.neighbour, self.oracle, salt, tokens, f"neighbour ({lossy or 'exact'})", lossy, (read,))

    @precondition(lambda self: self.NEIGHBOUR and self.neighbour is not None)
    @rule()
    def neighbour_reopens_with_the_other_codec(self):
        """Closed and reopened on the same LMDB and files directories with kivi4 turned off (or on again).
        Exact from then on: whatever its LMDB kept must be the bytes that were put, not decoded kivi4."""
        with op("close neighbour"):
            self.neighbour.close()
        self.neighbour = None
        self.neighbour_lossy = not self.neighbour_lossy
        self._open_neighbour()

    # -- bad arguments: ValueError, and nothing stored is lost ---------------------------------------

    def _bad(self, what: str, call) -> None:
        """``call()`` must raise ValueError; what was stored before is still found and exact afterwards."""
        with op("flush before a bad call"):
            assert self.store.flush(30.0)
        stored = [(s, list(t)) for s, t in self.prompts[-3:]]
        with op("lookup before a bad call"):
            before = [self.store.lookup(t, salt=s) for s, t in stored]
        try:
            call()
        except ValueError:
            pass
        except Exception as exc:
            raise AssertionError(f"{what}: expected ValueError, got {type(exc).__name__}: {exc}") from exc
        else:
            raise AssertionError(f"{what}: expected ValueError, nothing raised")
        with op("flush after a bad call"):
            assert self.store.flush(30.0)
        with op("lookup after a bad call"):
            after = [self.store.lookup(t, salt=s) for s, t in stored]
        lost = [(len(t), b, a) for (s, t), b, a in zip(stored, before, after) if a < b]
        assert not lost, f"{what}: stored prefixes no longer found afterwards (tokens, before, after): {lost}"
        for s, t in stored:
            self._read(self.store, s, t, ("get",))

    @precondition(lambda self: self.BAD_ARGUMENTS)
    @rule(tokens=st.lists(st.integers(100, 105), min_size=1, max_size=3 * BT),
          kind=st.sampled_from(("dtype", "shape_short", "shape_long", "rank", "meta", "numpy")))
    def put_bad_kv(self, tokens, kind):
        kv = self.oracle.kv("bad", tokens)
        bad = {"dtype": lambda: kv.float(), "shape_short": lambda: kv[:, :, :-1],
               "shape_long": lambda: torch.cat([kv, kv[:, :, :1]], dim=2), "rank": lambda: kv[0],
               "meta": lambda: kv.to("meta"), "numpy": lambda: kv.numpy()}[kind]()
        self._bad(f"put(kv {kind})", lambda: self.store.put(tokens, bad, salt="bad"))
        # Nothing was stored: the model never recorded these tokens, so any hit would break its bound.
        self.lookup_tokens_never_put(tokens)

    def lookup_tokens_never_put(self, tokens):
        with op("lookup after a bad put"):
            n = self.store.lookup(tokens, salt="bad")
        assert n <= self.oracle.bound("bad", tokens), f"a refused put stored {n} tokens"

    @precondition(lambda self: self.BAD_ARGUMENTS)
    @rule(bad_id=st.sampled_from((-1, -2**31, 2**32, 2**40)), position=st.integers(0, 5),
          call=st.sampled_from(("put", "lookup", "get", "get_into", "plan", "prefetch", "load", "put_from")))
    def bad_token_ids(self, bad_id, position, call):
        tokens = [1, 2, 3, 4, 5, 6]
        tokens[position] = bad_id
        kv = self.oracle.kv("bad", [1] * len(tokens))
        calls = {
            "put": lambda: self.store.put(tokens, kv, salt="bad"),
            "lookup": lambda: self.store.lookup(tokens),
            "get": lambda: self.store.get(tokens),
            "get_into": lambda: self.store.get_into(tokens, torch.empty_like(kv)),
            "plan": lambda: self.store.plan(tokens),
            "prefetch": lambda: self.store.prefetch(tokens),
            "load": lambda: self.store.load(tokens),
            "put_from": lambda: self.store.put_from(tokens, lambda block, dst: dst.zero_(), salt="bad"),
        }
        self._bad(f"{call}(token id {bad_id})", calls[call])

    @precondition(lambda self: self.BAD_ARGUMENTS and any(t for _, t in self.prompts))
    @rule(data=st.data(), kind=st.sampled_from(("requires_grad", "meta", "dtype", "shape")),
          call=st.sampled_from(("get_into", "load_out")))
    def bad_out_tensor(self, data, kind, call):
        """Into a prompt that was put (so the store has blocks to copy into the bad tensor)."""
        salt, tokens = data.draw(st.sampled_from([p for p in self.prompts if p[1]]), label="prompt")
        tokens = list(tokens)
        shape = LAYOUT.shape(len(tokens))
        out = {"requires_grad": lambda: torch.zeros(shape, dtype=LAYOUT.dtype, requires_grad=True),
               "meta": lambda: torch.empty(shape, dtype=LAYOUT.dtype, device="meta"),
               "dtype": lambda: torch.zeros(shape, dtype=torch.float32),
               "shape": lambda: torch.zeros(LAYOUT.shape(len(tokens) + 1), dtype=LAYOUT.dtype)}[kind]()
        if call == "get_into":
            self._bad(f"get_into(out {kind})", lambda: self.store.get_into(tokens, out, salt=salt))
        else:
            self._bad(f"load(out {kind})", lambda: self.store.load(tokens, salt=salt, out=out))

    @precondition(lambda self: self.BAD_ARGUMENTS)
    @rule(call=st.sampled_from(("put", "lookup", "get", "prefetch", "load", "put_from")),
          salt=st.sampled_from(("\ud800", "tenant\udfff", 7, 1.5)))
    def bad_salt(self, call, salt):
        tokens = [1, 2, 3, 4, 5]
        kv = self.oracle.kv(None, tokens)
        calls = {
            "put": lambda: self.store.put(tokens, kv, salt=salt),
            "lookup": lambda: self.store.lookup(tokens, salt=salt),
            "get": lambda: self.store.get(tokens, salt=salt),
            "prefetch": lambda: self.store.prefetch(tokens, salt=salt),
            "load": lambda: self.store.load(tokens, salt=salt),
            "put_from": lambda: self.store.put_from(tokens, lambda block, dst: dst.zero_(), salt=salt),
        }
        self._bad(f"{call}(salt={salt!r})", calls[call])

    @precondition(lambda self: self.BAD_ARGUMENTS)
    @rule(kind=st.sampled_from(("not_callable", "start_inside_a_block", "start_past_the_end", "start_negative")))
    def bad_put_from(self, kind):
        tokens = [1, 2, 3, 4, 5, 6, 7, 8, 9]
        fill, start = (lambda block, dst: dst.zero_()), 0
        if kind == "not_callable":
            fill = "fill"
        else:
            start = {"start_inside_a_block": 2, "start_past_the_end": 12, "start_negative": -4}[kind]
        self._bad(f"put_from({kind})", lambda: self.store.put_from(tokens, fill, salt="bad", start=start))

    # -- the cache server: killed, hung, restarted ----------------------------------------------------

    def _some_operation(self, data, what: str) -> None:
        """One operation of the store (drawn), while the cache server is down or hung."""
        kind = data.draw(st.sampled_from(("put", "put_from", "read", "lookup", "flush")), label=f"{what} operation")
        if kind in ("put", "put_from"):
            salt = data.draw(st.sampled_from(SALTS), label="salt")
            tokens = data.draw(TOKENS, label="tokens")
            if kind == "put":
                self.put(salt, tokens)
            else:
                self.put_from(salt, tokens, data.draw(st.integers(0, 5), label="start block"))
        elif kind == "read":
            salt, tokens = self._prompt(data)
            self._read(self.store, salt, tokens, (data.draw(st.sampled_from(READS), label="read"),))
        elif kind == "lookup":
            self.lookup_never_exceeds_what_was_put(data)
        else:
            self.flush()

    @precondition(lambda self: self.REMOTE)
    @rule(data=st.data(), operations=st.integers(0, 3))
    def the_cache_server_hangs(self, data, operations):
        """SIGSTOP for a few operations (each call to it can only time out), then SIGCONT."""
        with CACHE_SERVER.hung():
            for _ in range(operations):
                self._some_operation(data, "hung server")

    @precondition(lambda self: self.REMOTE and any(t for _, t in self.prompts))
    @rule(data=st.data(), read=st.sampled_from(READS))
    def only_the_cache_server_keeps_a_prompt(self, data, read):
        """Every local tier loses a prompt's blocks (as their capacity evictions would): reads go to the server."""
        salt, tokens = data.draw(st.sampled_from([p for p in self.prompts if p[1]]), label="prompt")
        with op("flush"):
            assert self.store.flush(30.0)
        with op("evict from the local tiers"):
            evict(self.store, block_keys(self.store, salt, tokens), lambda index, tier: tier.name == "remote")
        self._read(self.store, salt, tokens, (read,))

    @precondition(lambda self: self.REMOTE and not self.server_killed)
    @rule(data=st.data(), operations=st.integers(0, 3), restart=st.sampled_from(("background", "background", "now")))
    def the_cache_server_is_killed(self, data, operations, restart):
        """SIGKILL (in a third of the examples, once: a restart costs a second of CPU): connections refused,
        every block it held gone; a few operations, then a fresh server on the same port, at once or coming up
        while the store goes on."""
        self.server_killed = True
        CACHE_SERVER.kill()
        for _ in range(operations):
            self._some_operation(data, "killed server")
        with op("restart the cache server"):
            CACHE_SERVER.restart(wait=restart == "now")

    # -- slow reads of the LMDB and files tiers --------------------------------------------------------

    @precondition(lambda self: self.SLOW_READS)
    @rule(which=st.sampled_from(("lmdb", "files")), delay=st.sampled_from((0.01, 0.03, 0.06, 0.06)),
          count=st.sampled_from((1, 1, 1, 2, 4, 8)), after=st.integers(0, 8))
    def reads_turn_slow(self, which, delay, count, after):
        """The next ``count`` reads of the tier (after ``after`` at full speed) take ``delay`` seconds longer."""
        tier = self.slow_tiers.get(which)
        if tier is not None:
            tier.slow_next(count, delay, after)

    @precondition(lambda self: self.SLOW_READS)
    @rule(salt=st.sampled_from(SALTS), tokens=st.lists(st.integers(0, 5), min_size=2 * BT, max_size=4 * BT + 2),
          after=st.integers(0, 10), reads=st.integers(3, 6), delay=st.sampled_from((0.06, 0.06, 0.03)))
    def one_slow_read_among_fast_ones(self, salt, tokens, after, reads, delay):
        """A prompt put, then read again and again; one read of each tier among them slow: no tier degrades."""
        self.put(salt, tokens)
        self.flush()
        for tier in self.slow_tiers.values():
            tier.slow_next(1, delay, after)
        for _ in range(reads):
            self._read(self.store, salt, tokens, ("get",))
        for tier in self.slow_tiers.values():
            tier.slow_next(0, 0.0)
        self.slow_reads_degrade_a_tier_only_by_the_rule()

    @precondition(lambda self: self.SLOW_READS and any(t for _, t in self.prompts))
    @rule(data=st.data(), which=st.sampled_from(("lmdb", "files")))
    def a_tier_raises_once(self, data, which):
        """Its calls raise EIO for one read of a prompt (and the writes meanwhile): degraded, and rightly."""
        tier = self.slow_tiers.get(which)
        if tier is None:
            return
        salt, tokens = data.draw(st.sampled_from([p for p in self.prompts if p[1]]), label="prompt")
        tier.fail = True
        try:
            self._read(self.store, salt, tokens, ("get",))
        finally:
            tier.fail = False

    @invariant()
    def slow_reads_degrade_a_tier_only_by_the_rule(self):
        """A tier that raised nothing is degraded only if 5 of some 8 of its reads may have been slow.

        The breaker's rule (``kvstore/health.py``): 5 slow reads of the last 8 trip it, fewer never do; one
        slow read among fast ones never does. The wrapper counts reads that took long enough to be judged slow
        (injected delays and the machine's own stalls alike), over 10 reads for the order threads record them
        in; checked against ``degradations`` (every trip counts, even one whose back-off has run out since).
        """
        if not self.slow_tiers or self.store is None:
            return
        with op("stats"):
            tiers = self.store.stats()["tiers"]  # before take_peak: the reads behind a degradation are counted
        for name, tier in self.slow_tiers.items():
            entry = tiers[name]
            peak = tier.take_peak()
            degradations, errors = entry["degradations"], entry["errors"]
            seen_degradations, seen_errors = self.health_seen.get(name, (0, 0))
            self.health_seen[name] = (degradations, errors)
            if degradations > seen_degradations and errors == seen_errors:
                assert peak >= TRIP_READS, (
                    f"tier {name} degraded (state {entry['state']!r}, degradations {seen_degradations} -> "
                    f"{degradations}) without raising, though at most {peak} of any {COUNTED_WINDOW} consecutive "
                    f"reads took {MAYBE_SLOW_SECONDS * 1000:.0f} ms or more ({tier.slow_reads} such reads of "
                    f"{tier.reads}; it takes {TRIP_READS} of {WINDOW_READS}); last error: {entry['last_error']}")

    # -- an invariant over everything put so far -------------------------------------------------

    @invariant()
    def the_latest_prompt_is_exact_or_missing(self):
        if self.store is None or not self.prompts:
            return
        salt, tokens = self.prompts[-1]
        self._read(self.store, salt, tokens, ("lookup", "get"))


class EverythingMachine(StoreMachine):
    """Every configuration (a flaky, plain or no host tier), every fault, the lossy neighbour, bad arguments."""


class PersistentFastestMachine(StoreMachine):
    """host_bytes=0: a tiny LMDB is the fastest tier, over files; no faults beyond constant eviction."""

    HOSTS = ("none",)
    LMDB_BLOCKS = (1, 2)
    FAULTS = False
    NEIGHBOUR = False
    BAD_ARGUMENTS = False


class FaultsMachine(StoreMachine):
    """A host tier above LMDB and files; files corrupted, truncated and deleted; the host tier flaky or not."""

    HOSTS = ("flaky", "plain")
    NEIGHBOUR = False
    BAD_ARGUMENTS = False


class LossyNeighbourMachine(StoreMachine):
    """The kivi4 neighbour in the shared files directory, reopened exact now and then; no other faults."""

    HOSTS = ("plain",)
    FILES_BLOCKS = (8, 16)
    FAULTS = False
    BAD_ARGUMENTS = False


class BadArgumentsMachine(StoreMachine):
    """Bad arguments between ordinary operations on a plain host + LMDB + files store."""

    HOSTS = ("plain",)
    FAULTS = False
    NEIGHBOUR = False


class CacheServerMachine(StoreMachine):
    """A real ``kvstore serve`` tier below host RAM, LMDB and files, or the fastest tier (host_bytes=0 and no LMDB;
    files or none); killed, hung and restarted between operations; files corrupted; a flaky host tier."""

    HOSTS = ("none", "none", "plain", "flaky")
    LMDB_BLOCKS = (0, 0, 1, 2)
    FILES_BLOCKS = (2, 8)
    FILES_ALWAYS = False
    REMOTE = True
    NEIGHBOUR = False
    BAD_ARGUMENTS = False


class SlowReadsMachine(StoreMachine):
    """LMDB and files whose reads are now and then slow (at most 0.06 s), the breaker live; files faults too."""

    HOSTS = ("none", "none", "plain")
    LMDB_BLOCKS = (1, 2, 4)
    SLOW_READS = True
    NEIGHBOUR = False
    BAD_ARGUMENTS = False


TestEverything = EverythingMachine.TestCase
TestPersistentFastestTier = PersistentFastestMachine.TestCase
TestFilesFaultsAndFlakyHost = FaultsMachine.TestCase
TestLossyNeighbour = LossyNeighbourMachine.TestCase
TestBadArguments = BadArgumentsMachine.TestCase
for _case in (TestEverything, TestPersistentFastestTier, TestFilesFaultsAndFlakyHost, TestLossyNeighbour,
              TestBadArguments):
    _case.settings = SETTINGS
del _case
TestCacheServer = CacheServerMachine.TestCase
TestCacheServer.settings = settings(SETTINGS, max_examples=40 if SLOW else 12)
TestSlowReads = SlowReadsMachine.TestCase
TestSlowReads.settings = settings(SETTINGS, max_examples=80 if SLOW else 20)


def test_a_forked_child_does_not_keep_a_closed_stores_directory_locked(tmp_path):
    """A child forked while a store is open (``multiprocessing``'s "fork" start method; ``subprocess.Popen``
    before its exec) that never touches the store must not keep its LMDB directory locked once the parent has
    closed it: the parent reopens its own directory. Found by ``CacheServerMachine``: a store closed and
    reopened while the cache server was being restarted from another thread raised ``DirectoryInUseError``
    (the machine now waits for that restart's exec, ``LazyCacheServer.spawned``)."""
    config = StoreConfig(model_id="forked", host_bytes=0, disk_dir=str(tmp_path / "lmdb"),
                         disk_bytes=4 * STORED_BYTES, disk_sync=False)
    store = KVStore(LAYOUT, config)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: waits until the parent is done, touches nothing, runs no cleanup
        try:
            os.close(write_end)
            os.read(read_end, 1)
        finally:
            os._exit(0)
    os.close(read_end)
    try:
        with op("close"):
            store.close()
        with op("KVStore(...) on the same disk_dir, reopened while the forked child lives"):
            KVStore(LAYOUT, config).close()
    finally:
        os.close(write_end)  # EOF: the child exits
        os.waitpid(pid, 0)
