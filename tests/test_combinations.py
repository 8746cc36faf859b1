"""Every combination of tiers serves every operation: exact bytes or a miss, never an exception.

Any subset of the tiers (device on the CPU, host RAM, LMDB, files, a real
``kvstore serve`` cache server, a real ``redis-server``), big or tiny (one or
two blocks, so every put evicts), including stores whose fastest tier is
persistent (``host_bytes=0``). For each one: put and ``put_from``, then every
read path (lookup, get, get_into, plan, load whole / into ``out`` / layer by
layer, prefetch then load with the handle), again after ``flush``, after the
fast tiers lost the blocks (hits come from below and are promoted), after
only the slowest tier kept them, and after close and reopen (persistent tiers
serve again). Every answer must be a leading prefix of exactly the KV that
was put (bit patterns, see ``storefixtures.check_prefix``), never more tokens
than were put, and where capacity guarantees it, all of it.

Configs set ``slow_factor`` very high: a read that a busy 2-core machine
delays must not get a tier bypassed, or the "all of it" checks would flake.
"""

from __future__ import annotations

import itertools
import os
import re

import pytest

from kvstore import KVStore, StoreConfig
from storefixtures import (BLOCK_BYTES, BT, LAYOUT, READS, STORED_BYTES, Oracle, block_keys, cache_server,
                           check_prefix, evict, needs_redis, op, persistent, put_from, read_all, redis_url,
                           same_bits, server_token)

__all__ = ["cache_server", "redis_url"]  # module-scoped server fixtures used through getfixturevalue

TIERS = ("device", "host", "lmdb", "files", "remote", "redis")
SHARED = ("remote", "redis")
BIG_BLOCKS = 64
# Tiny capacities: the device pool holds one block, host RAM two, LMDB and the files tier two each.
TINY_BLOCKS = {"device": 1, "host": 2, "lmdb": 2, "files": 2}

# Prompts (tokens; the salt keeps each test's keys apart on the shared servers).
A = list(range(1, 11))                     # 2 full blocks + a 2-token tail
B = A[:8] + list(range(50, 56))            # shares A's 2 full blocks; 3 full + tail
B2 = B[:12] + [60, 61, 62, 63]             # B's full blocks + one more: put_from(start=12)
C = [7, 8, 9]                              # a tail only
E = list(range(100, 116))                  # 4 full blocks, no tail
D = list(range(200, 213))                  # put_from: 3 full + 1-token tail
PROMPTS = {"A": A, "B": B, "B2": B2, "C": C, "D": D, "E": E}
QUICK = ("lookup", "get", "layer_wise")  # the reads of a phase that repeats the one before


def _subsets() -> list[tuple[str, ...]]:
    out = []
    for r in range(1, len(TIERS) + 1):
        out.extend(itertools.combinations(TIERS, r))
    return out


def _param(combo: tuple[str, ...], size: str, **extra):
    name = "+".join(combo) + f"-{size}" + "".join(f"-{k}={v}" for k, v in extra.items())
    marks = [needs_redis] if "redis" in combo else []
    return pytest.param(combo, size, extra, id=name, marks=marks)


# Every subset of the local tiers; over the shared servers (each combination costs round trips to real
# servers), the local subsets below, or every subset with KVSTORE_SLOW=1 (as CI runs it).
SLOW = os.environ.get("KVSTORE_SLOW") == "1"
LOCAL_OVER_SHARED = [(), ("device",), ("host",), ("lmdb",), ("files",), ("device", "host"), ("lmdb", "files"),
                     ("host", "lmdb", "files"), ("device", "host", "lmdb", "files")]


def _wanted(combo: tuple[str, ...]) -> bool:
    local = tuple(t for t in combo if t not in SHARED)
    return SLOW or local == combo or local in LOCAL_OVER_SHARED


CASES = [_param(combo, size) for combo in _subsets() if _wanted(combo) for size in ("big", "tiny")]
CASES += [
    _param(("host", "lmdb", "files"), "big", write_policy="write_back"),
    _param(("device", "host", "lmdb"), "tiny", write_policy="write_back"),
    _param(("device", "lmdb", "files"), "big", write_policy="write_back"),
    _param(("lmdb", "files"), "big", disk_codec="zstd", files_codec="zstd"),
    _param(("host", "lmdb", "files"), "tiny", disk_codec="zstd", files_codec="zstd"),
    _param(("host", "lmdb", "files"), "big", disk_admit_after=2, files_admit_after=2),
    _param(("host", "lmdb", "remote"), "big", remote_codec="zstd"),
    _param(("host", "redis"), "big", redis_codec="zstd"),
    _param(("host", "files"), "big", files_codec="kivi4"),
    _param(("lmdb", "files"), "big", files_codec="kivi4"),
    _param(("host", "lmdb"), "tiny", disk_codec="kivi4"),
    _param(("host", "lmdb", "remote"), "big", remote_codec="ec4"),
    _param(("host", "redis"), "tiny", redis_codec="ec5"),
    _param(("lmdb", "files"), "big", disk_codec="ec5", files_codec="ec4:rope=10000"),
    _param(("host", "lmdb", "files"), "big", prefetch_policy="timeout", promote=False),
]


def make_config(combo: tuple[str, ...], size: str, tmp_path, request, extra: dict) -> StoreConfig:
    def room(tier: str, unit: int) -> int:
        return (BIG_BLOCKS if size == "big" else TINY_BLOCKS[tier]) * unit

    settings: dict = dict(model_id="combinations", host_bytes=0, slow_factor=1e9, staging_bytes="1MiB",
                          disk_sync=False, files_sync=False)
    if "device" in combo:
        settings.update(device_bytes=room("device", BLOCK_BYTES), device="cpu")
    if "host" in combo:
        settings.update(host_bytes=room("host", BLOCK_BYTES))
    if "lmdb" in combo:
        settings.update(disk_dir=str(tmp_path / "lmdb"), disk_bytes=room("lmdb", STORED_BYTES))
    if "files" in combo:
        settings.update(files_dir=str(tmp_path / "files"), files_bytes=room("files", STORED_BYTES))
    if "remote" in combo:
        settings.update(remote_url=request.getfixturevalue("cache_server").url, remote_token=server_token())
    if "redis" in combo:
        settings.update(redis_url=request.getfixturevalue("redis_url"), redis_namespace=request.node.name[-60:]
                        .replace(":", "_"))
    settings.update(extra)
    return StoreConfig(**settings)


def lossy_codec(config: StoreConfig) -> str | None:
    for name in ("disk_codec", "files_codec", "remote_codec", "redis_codec"):
        codec = getattr(config, name)
        if codec not in ("raw", "zstd"):
            return codec.split(":")[0]
    return None


class Run:
    """One combination's store, oracle and checks; every failed check is collected in ``problems``."""

    def __init__(self, combo, config, salt):
        self.combo, self.config, self.salt = combo, config, salt
        self.oracle = Oracle()
        self.lossy = lossy_codec(config)
        self.store: KVStore | None = None
        self.problems: list[str] = []

    def step(self, what: str, call, *args, **kwargs):
        """``call(*args, **kwargs)``; an exception or failed assertion is a problem (None returned)."""
        try:
            with op(what):
                return call(*args, **kwargs)
        except AssertionError as exc:
            self.problems.append(str(exc))
            return None

    def open(self) -> None:
        self.store = self.step(f"KVStore({'+'.join(self.combo)})", KVStore, LAYOUT, self.config)
        if self.store is None:
            raise AssertionError(self.problems[-1])

    def put_all(self, phase: str) -> None:
        store, salt, oracle = self.store, self.salt, self.oracle
        for name, tokens in (("A", A), ("B", B), ("C", C), ("E", E)):
            stored = self.step(f"[{phase}] put {name}", store.put, tokens, oracle.kv(salt, tokens), salt=salt)
            oracle.record(salt, tokens)
            if stored is not None and not 0 <= stored <= -(-len(tokens) // BT):
                self.problems.append(f"[{phase}] put {name} returned {stored!r}")
        for name, tokens, start in (("D", D, 0), ("B2", B2, 12)):
            stored = self.step(f"[{phase}] put_from {name} start={start}", put_from, store, oracle, salt, tokens, start)
            if stored is not None and not 0 <= stored <= -(-(len(tokens) - start) // BT):
                self.problems.append(f"[{phase}] put_from {name} returned {stored!r}")

    def flush(self, phase: str) -> None:
        if self.step(f"[{phase}] flush", self.store.flush, 30.0) is False:
            self.problems.append(f"[{phase}] flush(30.0) timed out")

    def read_everything(self, phase: str, expect_full: bool, reads=READS, policy: str = "wait",
                        bounds: bool = True) -> None:
        store, salt = self.store, self.salt
        for name, tokens in PROMPTS.items():
            got = read_all(store, self.oracle, salt, tokens, f"[{phase}] {name}", self.lossy, reads, policy,
                           problems=self.problems)
            if expect_full:
                short = {k: v for k, v in got.items() if k in reads and v != len(tokens)}
                if short:
                    self.problems.append(f"[{phase}] {name}: every block is stored, yet these reads got fewer "
                                         f"of its {len(tokens)} tokens: {short}")
        if not bounds:
            return
        # Never more than was put: a longer prompt, another salt, a prompt never put.
        checks = [(salt, A + [999], 8), (salt, B + [1, 2], 12), (f"{salt}/other", A, 0), (salt, [5000, 5001], 0),
                  (salt, E[:6], 4), (salt, D[:12], 12)]
        for s, tokens, most in checks:
            read_all(store, self.oracle, s, tokens, f"[{phase}] (bound {most})", self.lossy, ("lookup", "get", "plan"),
                     problems=self.problems)

    def evict(self, phase: str, keep) -> None:
        keys = []
        for tokens in PROMPTS.values():
            keys += block_keys(self.store, self.salt, tokens)
        self.step(f"[{phase}] evict", evict, self.store, keys, keep)

    def close(self, phase: str) -> None:
        if self.store is not None:
            store, self.store = self.store, None
            self.step(f"[{phase}] close", store.close)

    def verdict(self) -> None:
        """Fail with the problems grouped by cause: how often, and the first occurrence in full."""
        if not self.problems:
            return
        causes: dict[str, list[str]] = {}
        for problem in self.problems:
            causes.setdefault(_cause(problem), []).append(problem)
        lines = [f"{len(self.problems)} failed checks, {len(causes)} causes:"]
        for cause, problems in causes.items():
            lines.append(f"  {len(problems)}x {cause[:300]}\n      first: {problems[0][:400]}")
        pytest.fail("\n".join(lines), pytrace=False)


def _cause(problem: str) -> str:
    """A failed check without the phase, prompt, salt and counts: the same bug reads the same."""
    if " raised " in problem:
        return "raised " + problem.split(" raised ", 1)[1]
    text = re.sub(r"^\[[^]]*\] \S+: ", "", problem)
    text = re.sub(r"\(salt=.*?tokens\)", "()", text)
    return re.sub(r"\d+", "N", text)


@pytest.mark.parametrize("combo,size,extra", CASES)
def test_every_operation_in_every_combination(combo, size, extra, tmp_path, request):
    config = make_config(combo, size, tmp_path, request, extra)
    run = Run(combo, config, salt=f"combo/{request.node.callspec.id}")
    big = size == "big"
    persistent_tiers = any(t in combo for t in ("lmdb", "files", "remote", "redis"))
    shared = any(t in combo for t in SHARED)
    # Admission after 2 sightings keeps first puts off the disk tiers.
    admitting = config.disk_admit_after == 1 and config.files_admit_after == 1
    # Write-back: lower tiers get a block only when the tier above evicts it or on close, so blocks this test
    # deletes from the tiers above (a deletion, not an eviction) are gone from the whole store.
    through = config.write_policy == "write_through"
    # Capacity that holds every block: a big store, or a tiny one over a server (write-through).
    roomy = big or shared
    kept = persistent_tiers and (shared or big and admitting)  # the persistent tiers hold every block
    try:
        run.open()
        run.put_all("put")
        # Before a flush a block the fastest tier evicted may still be on its way to a lower tier: a miss.
        run.read_everything("after put", expect_full=big)
        run.flush("put")
        run.read_everything("after flush", expect_full=roomy, bounds=False)
        run.read_everything("after flush, best_effort prefetch", False, reads=("prefetch",), policy="best_effort",
                            bounds=False)
        # Close and reopen: what the persistent tiers kept (write-back tiers: written on close) serves again.
        run.close("after flush")
        run.open()
        run.read_everything("reopened", expect_full=kept)
        run.put_all("reopened")  # dedup against the persistent tiers; stored anew in a memory-only store
        run.flush("reopened")
        run.read_everything("reopened, put again", expect_full=roomy, reads=QUICK, bounds=False)
        # The memory tiers lose every block: hits come from LMDB, files or a server and are promoted.
        run.evict("volatile", lambda i, tier: persistent(tier))
        run.read_everything("memory tiers evicted", expect_full=through and kept)
        run.read_everything("memory tiers evicted, read again", expect_full=through and kept, reads=QUICK,
                            bounds=False)
        run.flush("promoted")
        # Only the slowest tier keeps the blocks: every hit comes from the bottom and climbs the whole stack.
        run.evict("all but the slowest", lambda i, tier: i == len(run.store.tiers) - 1)
        bottom = through and kept and (combo[-1] in SHARED or big)
        run.read_everything("only the slowest tier holds them", expect_full=bottom)
        run.read_everything("promoted copies", expect_full=bottom, reads=QUICK, bounds=False)
        run.flush("promoted again")
        run.close("end")
        run.open()
        run.read_everything("reopened after promotion", expect_full=bottom)
    finally:
        run.close("teardown")
    run.verdict()


@pytest.mark.parametrize("setting,directory", [("disk_bytes", "disk_dir"), ("files_bytes", "files_dir")])
@pytest.mark.parametrize("host_bytes", [0, 4 * BLOCK_BYTES])
def test_a_persistent_tier_sized_zero(setting, directory, host_bytes, tmp_path):
    """A size of 0 leaves the tier out (StoreConfig's docstring) or is refused with a ValueError naming it;
    either way nothing else: a store that opens serves exact bytes."""
    settings = {"host_bytes": host_bytes, directory: str(tmp_path / "d"), setting: 0,
                "disk_sync": False, "files_sync": False}
    if host_bytes == 0:  # some other tier, so the config is valid whether or not the zero-sized one is left out
        other = "files" if directory == "disk_dir" else "disk"
        settings.update({f"{other}_dir": str(tmp_path / "o"), f"{other}_bytes": 8 * STORED_BYTES})
    try:
        config = StoreConfig(**settings)
        store = KVStore(LAYOUT, config)
    except ValueError as exc:
        assert setting in str(exc), exc
        return
    oracle = Oracle()
    try:
        with op("put"):
            store.put(A, oracle.kv(None, A))
        oracle.record(None, A)
        read_all(store, oracle, None, A, f"{setting}=0")
    finally:
        store.close()


def test_fastest_tier_persistent_promotes_without_error(tmp_path):
    """The reported defect, minimal: host_bytes=0, LMDB over files; a block only the files tier holds is
    read (and copied up into LMDB) by get, load and prefetch without an exception, exactly."""
    config = StoreConfig(host_bytes=0, disk_dir=str(tmp_path / "lmdb"), disk_bytes=8 * STORED_BYTES,
                         files_dir=str(tmp_path / "files"), files_bytes=8 * STORED_BYTES, disk_sync=False,
                         files_sync=False, slow_factor=1e9)
    oracle = Oracle()
    with KVStore(LAYOUT, config) as store:
        store.put(A, oracle.kv(None, A))
        oracle.record(None, A)
        assert store.flush(30.0)
        keys = block_keys(store, None, A)
        for read in ("get", "load", "prefetch", "layer_wise", "get_into"):
            evict(store, keys, lambda i, tier: tier.name != "lmdb")
            got = read_all(store, oracle, None, A, f"lmdb evicted, {read}", None, (read,))
            assert got[read] == len(A), (read, got)


@pytest.mark.parametrize("combo", [("lmdb",), ("files",), ("host", "lmdb"), ("device", "files"),
                                   pytest.param(("remote",), id="remote"),
                                   pytest.param(("redis",), id="redis", marks=needs_redis)],
                         ids=lambda c: "+".join(c))
def test_prefetch_handle_views_are_the_blocks_put(combo, tmp_path, request):
    """``PrefetchHandle.views()``: "pinned views [L, P, tokens, H, D] of the leading ready blocks": each one
    is exactly a block that was put, whatever the fastest tier is (a persistent one cannot pin: fewer views)."""
    config = make_config(combo, "big", tmp_path, request, {})
    oracle = Oracle()
    salt = f"views/{request.node.callspec.id}"
    with KVStore(LAYOUT, config) as store:
        for tokens in (A, E):
            store.put(tokens, oracle.kv(salt, tokens), salt=salt)
            oracle.record(salt, tokens)
        assert store.flush(30.0)
        for tokens in (A, E):
            ref = oracle.kv(salt, tokens)
            with store.prefetch(tokens, salt=salt, policy="wait") as handle:
                ready = handle.wait(10.0)
                start = 0
                for view in handle.views():
                    check_prefix(view, ref[:, :, start:], f"{'+'.join(combo)}: views() block at token {start}")
                    assert view.shape[2] > 0, f"views(): an empty view at token {start}"
                    start += view.shape[2]
                assert start <= ready <= len(tokens), (start, ready)


@pytest.mark.parametrize("lower", ["files", pytest.param("remote", id="remote"),
                                   pytest.param("redis", id="redis", marks=needs_redis)])
def test_lossy_bytes_never_land_in_an_exact_tier(lower, tmp_path, request):
    """LMDB (exact, raw) over a tier storing kivi4 frames: reads decode kivi4 (within its bound, the store opted
    in) and may copy the blocks up. Reopened with every codec exact, the store must return exact bytes or
    miss: approximate bytes must never have been written into LMDB as if they were exact."""
    salt = f"lossy-up/{request.node.callspec.id}"
    lossy = {f"{'files' if lower == 'files' else lower}_codec": "kivi4"}
    base = make_config(("host", "lmdb", lower), "big", tmp_path, request, {})
    # LMDB has room for every block, so whatever was copied up into it is still there after the reopen.
    config = base.replace(host_bytes=BLOCK_BYTES, disk_bytes=16 * STORED_BYTES, **lossy)
    oracle = Oracle()
    prompts = [[p * 100 + i for i in range(3 * BT)] for p in range(1, 5)]
    with KVStore(LAYOUT, config) as store:
        for tokens in prompts:
            store.put(tokens, oracle.kv(salt, tokens), salt=salt)
            oracle.record(salt, tokens)
        assert store.flush(30.0)
        approximate = 0
        for tokens in prompts:  # every block read from the kivi4 frames below, and copied up where allowed
            evict(store, block_keys(store, salt, tokens), lambda i, tier: tier.name not in ("host", "lmdb"))
            got = read_all(store, oracle, salt, tokens, "lossy store", "kivi4", ("layer_wise", "load"))
            assert got["load"] == len(tokens), got  # the lossy tier below holds every block
            approximate += not same_bits(store.get(tokens, salt=salt), oracle.kv(salt, tokens))
        assert approximate, "the kivi4 tier served exact bytes: the test did not exercise a lossy read"
        assert store.flush(30.0)
    exact = config.replace(**{name: "raw" for name in lossy})
    with KVStore(LAYOUT, exact) as store:
        for tokens in prompts:
            read_all(store, oracle, salt, tokens, "reopened exact", None)
