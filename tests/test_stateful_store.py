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
- bad arguments (wrong dtype or shape, token ids out of range, an ``out``
  that requires grad, tensors on the ``meta`` device, a salt with a lone
  surrogate), which must raise ``ValueError`` and leave stored data served.

The model (``storefixtures.Oracle``) knows the KV of every prefix and which
prefixes were put. Invariants: every answer is a leading prefix of exactly
that KV (only the store that configured kivi4 may get blocks within kivi4's
error bound), never longer than what was put under that salt, and nothing
but ``ValueError`` (for a bad argument) reaches the caller.

Several machines share the rules and differ in the configurations and
faults they draw, so one bug does not hide the others. The default run is
bounded (``max_examples=50``); ``KVSTORE_SLOW=1`` (CI) runs 500 examples a
machine. Shrinking is off by default to keep a failing run short; set
``KVSTORE_SHRINK=1`` to get a minimal failing sequence.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvstore import KVStore, StoreConfig
from kvstore.compression.registry import get_codec
from kvstore.tiers.files import FilesTier
from kvstore.tiers.host import HostTier
from kvstore.tiers.lmdb import LmdbTier
from storefixtures import (BLOCK_BYTES, BT, LAYOUT, READS, STORED_BYTES, Oracle, check_prefix, op, put_from,
                           read_all)

SLOW = os.environ.get("KVSTORE_SLOW") == "1"
PHASES = tuple(Phase) if os.environ.get("KVSTORE_SHRINK") == "1" else tuple(p for p in Phase if p != Phase.shrink)
SETTINGS = settings(max_examples=500 if SLOW else 50, stateful_step_count=40 if SLOW else 25, deadline=None,
                    database=None, phases=PHASES,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                           HealthCheck.data_too_large])

SALTS = (None, "tenant-a", b"tenant-b")
# Few distinct token ids: random prompts share prefixes (and blocks) often.
TOKENS = st.lists(st.integers(0, 5), min_size=0, max_size=4 * BT + 2)


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

    def get_into_marked(self, key, out):  # the slot read the store makes (get_into goes through it too)
        self._fault("get_into_marked")
        return super().get_into_marked(key, out)

    def put_many(self, items):
        self._fault("put_many")
        return super().put_many(items)

    def put_lossy(self, items, codec):
        self._fault("put_lossy")
        return super().put_lossy(items, codec)


class StoreMachine(RuleBasedStateMachine):
    """The rules; subclasses say which configurations and faults are drawn."""

    HOSTS = ("flaky", "plain", "none")  # the fastest tier: a flaky HostTier, a plain one, none (a persistent one)
    LMDB_BLOCKS = (0, 1, 2, 4)  # 0: no LMDB tier
    FILES_BLOCKS = (2, 6)  # the files tier's capacity in blocks, as this store sees it: from, to
    FAULTS = True  # corrupt, truncate and delete files
    NEIGHBOUR = True  # the second store sharing the files directory with kivi4
    BAD_ARGUMENTS = True

    def __init__(self):
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="kvstateful-"))
        self.oracle = Oracle()
        self.store: KVStore | None = None
        self.neighbour: KVStore | None = None
        self.neighbour_lossy = True
        self.prompts: list[tuple[object, tuple[int, ...]]] = []  # (salt, tokens) put so far
        self.neighbour_prompts: list[tuple[object, tuple[int, ...]]] = []  # of those, put by the neighbour

    # -- set-up -----------------------------------------------------------------------------------

    @initialize(host=st.sampled_from(("flaky", "plain", "none")), host_blocks=st.integers(1, 3),
                lmdb_blocks=st.sampled_from((0, 1, 2, 4)), files_blocks=st.integers(2, 16),
                write_policy=st.sampled_from(("write_through", "write_back")),
                disk_codec=st.sampled_from(("raw", "zstd")), files_codec=st.sampled_from(("raw", "zstd")),
                seed=st.integers(0, 2**32 - 1), rate=st.sampled_from((0.05, 0.2, 0.5)))
    def open_store(self, host, host_blocks, lmdb_blocks, files_blocks, write_policy, disk_codec, files_codec, seed,
                   rate):
        if host not in self.HOSTS:
            host = self.HOSTS[seed % len(self.HOSTS)]
        if lmdb_blocks not in self.LMDB_BLOCKS:
            lmdb_blocks = self.LMDB_BLOCKS[seed % len(self.LMDB_BLOCKS)]
        low, high = self.FILES_BLOCKS
        files_blocks = low + (files_blocks - low) % (high - low + 1)
        self.host = host
        self.files_dir = self.tmp / "files"
        settings_ = dict(model_id="stateful", host_bytes=0 if host == "none" else host_blocks * BLOCK_BYTES,
                         files_dir=str(self.files_dir), files_bytes=files_blocks * STORED_BYTES, files_sync=False,
                         files_codec=files_codec, write_policy=write_policy, slow_factor=1e9, degraded_seconds=0.05,
                         staging_bytes="1MiB", prefetch_policy="best_effort")
        if lmdb_blocks:
            settings_.update(disk_dir=str(self.tmp / "lmdb"), disk_bytes=lmdb_blocks * STORED_BYTES, disk_sync=False,
                             disk_codec=disk_codec)
        self.config = StoreConfig(**settings_)
        self.schedule = random.Random(seed)
        self.rate = rate
        self._open()

    def _tiers(self) -> list | None:
        """The custom tiers for ``KVStore(..., tiers=...)`` when the fastest tier is the flaky one."""
        if self.host != "flaky":
            return None
        c = self.config
        tiers = [FlakyHostTier(LAYOUT, c.host_bytes, self.schedule, self.rate)]
        try:
            if c.disk_dir is not None:
                tiers.append(LmdbTier(c.disk_dir, c.disk_bytes, LAYOUT, sync=False, codec=get_codec(c.disk_codec)))
            tiers.append(FilesTier(c.files_dir, c.files_bytes, LAYOUT, sync=False, codec=get_codec(c.files_codec)))
        except BaseException:
            for tier in tiers:
                tier.close()
            raise
        return tiers

    def _open(self) -> None:
        with op("KVStore(...)"):
            self.store = KVStore(LAYOUT, self.config, tiers=self._tiers())

    def teardown(self):
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
        return StoreConfig(model_id="stateful", host_bytes=BLOCK_BYTES, disk_dir=str(self.tmp / "neighbour-lmdb"),
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


TestEverything = EverythingMachine.TestCase
TestPersistentFastestTier = PersistentFastestMachine.TestCase
TestFilesFaultsAndFlakyHost = FaultsMachine.TestCase
TestLossyNeighbour = LossyNeighbourMachine.TestCase
TestBadArguments = BadArgumentsMachine.TestCase
for _case in (TestEverything, TestPersistentFastestTier, TestFilesFaultsAndFlakyHost, TestLossyNeighbour,
              TestBadArguments):
    _case.settings = SETTINGS
del _case
