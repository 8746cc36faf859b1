"""Helpers for the whole-store property tests (test_combinations.py, test_stateful_store.py).

The rule they check, "exact bytes or a miss": whatever a reader gets back for
``tokens`` is a leading prefix of exactly the KV that was put for those
tokens and that salt (compared as bit patterns, so a NaN payload or a -0.0
that changed is caught), or fewer tokens; never other bytes, and no
exception into the caller. Only a store that configured a lossy codec may
get blocks back that decode within that codec's error bound.

``Oracle`` is the model. The KV of token ``i`` is a deterministic function of
the salt and ``tokens[:i + 1]`` (as it is in a real transformer), so every put
of a prefix agrees with every other one, any number of stores or processes
may put the same prefixes, and the expected bytes of any answer are known.
It also remembers which prefixes were put, so an answer that claims more
tokens than were ever stored is caught.

Real servers for the shared tiers: a ``kvstore serve`` process
(``tests/server/conftest.py``'s ``ServerProcess``) and a ``redis-server``
(``tests/tiers/redisfixtures.py``'s ``RedisServer``), each started once per
test module. ``LazyCacheServer`` is the cache server for code that cannot
take a fixture (a hypothesis state machine): started on first use, killed,
stopped and restarted on demand, killed at module end by a module fixture.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import hashlib
import importlib.util
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from kvstore import KVLayout
from kvstore.blockformat import HEADER_BYTES

TESTS_DIR = Path(__file__).resolve().parent

# The tiny layout: 2 layers, K and V, 2 heads of 8, fp16, 4-token blocks: a full block is 512 bytes.
LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.float16, block_tokens=4)
BT = LAYOUT.block_tokens
BLOCK_BYTES = LAYOUT.block_bytes
# Bytes a full block takes below host RAM (the integrity header in front of the payload).
STORED_BYTES = BLOCK_BYTES + HEADER_BYTES

# Relative L2 error a lossy codec may show on one block of this test's data (measured: kivi4 <= 0.06).
LOSSY_BOUND = {"kivi4": 0.2, "int8": 0.05, "rq4": 0.3, "ec4": 0.2, "ec5": 0.3}

# fp16 bit patterns spliced into the data now and then: -0.0, the smallest subnormal, a signalling NaN
# with a payload (a float32 round trip quiets it to 0x7E01), a negative quiet NaN and the largest finite.
SPECIALS = (0x8000, 0x0001, 0x7C01, 0xFE00, 0x7BFF)
_SAME_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """``t`` as integers of its element size (CPU, contiguous): compares NaN payloads and -0.0 exactly."""
    t = t.detach().to("cpu").contiguous()
    return t.view(_SAME_INT[t.element_size()]) if t.is_floating_point() else t


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape) and torch.equal(bits(a), bits(b))


def _salt_bytes(salt: object) -> bytes:
    if salt is None:
        return b"\x00none"
    if isinstance(salt, bytes):
        return b"\x01" + salt
    return b"\x02" + str(salt).encode("utf-8", "surrogatepass")


class Oracle:
    """The KV every put uses, and which (salt, prefix) blocks were put."""

    def __init__(self, layout: KVLayout = LAYOUT):
        self.layout = layout
        self._per_token = layout.num_layers * layout.kv_parts * layout.num_kv_heads * layout.head_dim
        self._cache: dict[bytes, torch.Tensor] = {}
        self.full: set[tuple] = set()  # (salt, tokens of a prefix ending on a block boundary)
        self.tails: set[tuple] = set()  # (salt, tokens of a whole prompt with a trailing partial block)

    def _token(self, digest: bytes) -> torch.Tensor:
        got = self._cache.get(digest)
        if got is None:
            rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
            raw = rng.standard_normal(self._per_token).astype(np.float16).view(np.uint16)
            if digest[8] % 4 == 0:
                raw[digest[9] % self._per_token] = SPECIALS[digest[10] % len(SPECIALS)]
            got = self._cache[digest] = torch.from_numpy(raw.view(np.float16)).view(
                self.layout.num_layers, self.layout.kv_parts, self.layout.num_kv_heads, self.layout.head_dim)
        return got

    def kv(self, salt: object, tokens: Sequence[int]) -> torch.Tensor:
        """The KV ``[L, P, len(tokens), H, D]`` of ``tokens`` under ``salt`` (the same in every call)."""
        digest = hashlib.blake2b(_salt_bytes(salt), digest_size=16).digest()
        parts = []
        for token in tokens:
            digest = hashlib.blake2b(digest + int(token).to_bytes(4, "little"), digest_size=16).digest()
            parts.append(self._token(digest))
        if not parts:
            return torch.empty(self.layout.shape(0), dtype=self.layout.dtype)
        return torch.stack(parts, dim=2).to(self.layout.dtype)

    def fill(self, salt: object, tokens: Sequence[int], start: int = 0) -> Callable:
        """A ``put_from`` fill callback writing this oracle's KV of ``tokens`` under ``salt`` into ``dst``."""
        kv = self.kv(salt, tokens)

        def fill(block, dst: torch.Tensor) -> None:
            assert block.start >= start, f"put_from filled block {block} before start={start}"
            assert tuple(dst.shape) == self.layout.shape(block.num_tokens), (tuple(dst.shape), block)
            dst.copy_(kv[:, :, block.start:block.end])
        return fill

    def record(self, salt: object, tokens: Sequence[int], start: int = 0) -> None:
        """``tokens`` were put under ``salt`` (blocks before ``start`` were skipped: not recorded)."""
        tokens = tuple(int(t) for t in tokens)
        bt = self.layout.block_tokens
        for end in range(bt, len(tokens) + 1, bt):
            if end > start:
                self.full.add((salt, tokens[:end]))
        if len(tokens) % bt:
            self.tails.add((salt, tokens))

    def bound(self, salt: object, tokens: Sequence[int]) -> int:
        """The most leading tokens of ``tokens`` any store may return: every block of them was put."""
        tokens = tuple(int(t) for t in tokens)
        bt = self.layout.block_tokens
        end = 0
        while end + bt <= len(tokens) and (salt, tokens[:end + bt]) in self.full:
            end += bt
        if end == len(tokens) - len(tokens) % bt and len(tokens) % bt and (salt, tokens) in self.tails:
            end = len(tokens)
        return end


def block_errors(got: torch.Tensor, ref: torch.Tensor, bt: int = BT) -> list[float]:
    """Relative L2 error of each block of ``got`` against ``ref`` (NaN for a block whose reference is not finite)."""
    errors = []
    for start in range(0, ref.shape[2], bt):
        r = ref[:, :, start:start + bt].float()
        g = got[:, :, start:start + bt].float()
        if not torch.isfinite(r).all():
            errors.append(float("nan"))
            continue
        errors.append(float((g - r).norm() / r.norm().clamp_min(1e-6)))
    return errors


def check_prefix(got: torch.Tensor, ref: torch.Tensor, what: str, lossy: str | None = None) -> int:
    """``got`` (``[L, P, n, H, D]``) is the leading ``n`` tokens of ``ref``: bit for bit, or for a store that
    configured the lossy codec ``lossy``, each block exact or within that codec's bound. Returns ``n``."""
    assert isinstance(got, torch.Tensor), f"{what}: expected a tensor, got {type(got).__name__}"
    n = got.shape[2] if got.dim() == 5 else -1
    shape = tuple(ref.shape[:2]) + (n,) + tuple(ref.shape[3:])
    assert got.dtype == ref.dtype and got.dim() == 5 and tuple(got.shape) == shape, \
        f"{what}: got {got.dtype} {list(got.shape)}, expected {ref.dtype} {list(ref.shape)} or fewer tokens"
    assert 0 <= n <= ref.shape[2], f"{what}: {n} tokens returned, only {ref.shape[2]} asked for"
    want = ref[:, :, :n]
    if same_bits(got, want):
        return n
    if lossy is None:
        diff = (bits(got) != bits(want)).nonzero()
        first = diff[0].tolist() if len(diff) else None
        raise AssertionError(f"{what}: {n} tokens returned, not the bytes that were put ({len(diff)} elements differ, "
                             f"first at {first}: got {got[tuple(first)].item() if first else None}, "
                             f"put {want[tuple(first)].item() if first else None})")
    bound = LOSSY_BOUND[lossy]
    errors = block_errors(got, want)
    bad = [(i, e) for i, e in enumerate(errors) if e == e and e > bound]
    assert not bad, f"{what}: blocks beyond {lossy}'s error bound {bound}: {bad}"
    return n


@contextlib.contextmanager
def op(what: str) -> Iterator[None]:
    """Turn any exception of a call with valid arguments into a failure that names the call."""
    try:
        yield
    except AssertionError:
        raise
    except Exception as exc:
        raise AssertionError(f"{what} raised {type(exc).__name__}: {exc}") from exc


def read_all(store, oracle: Oracle, salt: object, tokens: Sequence[int], what: str, lossy: str | None = None,
             ops: Sequence[str] | None = None, policy: str = "wait",
             problems: list[str] | None = None) -> dict[str, int]:
    """Every read path of ``store`` for ``tokens``; each answer checked against ``oracle``. Tokens per path.

    A failed check raises, or with ``problems`` is appended there and the next read goes on (the path that
    failed is left out of the returned counts).
    """
    ref = oracle.kv(salt, tokens)
    bound = oracle.bound(salt, tokens)
    want = ops or READS
    got: dict[str, int] = {}
    label = f"{what}: {{}}(salt={salt!r}, {len(tokens)} tokens)"

    def failed(message: str) -> None:
        if problems is None:
            raise AssertionError(message)
        problems.append(message)

    for name in want:
        try:
            with op(label.format(name)):
                n = _read(store, name, salt, tokens, ref, label, lossy, policy, got)
            assert n <= bound, f"{label.format(name)}: {n} tokens, but only {bound} were ever put"
        except AssertionError as exc:
            failed(str(exc))
            continue
        got[name] = n
    return got


READS = ("lookup", "get", "get_into", "plan", "load", "load_out", "layer_wise", "prefetch")


def _read(store, name, salt, tokens, ref, label, lossy, policy, got) -> int:
    if name == "lookup":
        n = store.lookup(tokens, salt=salt)
        assert isinstance(n, int) and 0 <= n <= len(tokens), f"{label.format(name)} -> {n!r}"
    elif name == "get":
        n = check_prefix(store.get(tokens, salt=salt), ref, label.format(name), lossy)
    elif name == "get_into":
        out = torch.full(LAYOUT.shape(len(tokens)), 7.0, dtype=LAYOUT.dtype)
        n = store.get_into(tokens, out, salt=salt)
        assert isinstance(n, int) and 0 <= n <= len(tokens), f"{label.format(name)} -> {n!r}"
        check_prefix(out[:, :, :n], ref, label.format(name), lossy)
    elif name == "plan":
        plan = store.plan(tokens, salt=salt)
        assert plan.num_tokens == len(tokens), (label.format(name), plan)
        assert 0 <= plan.load_tokens <= plan.found <= len(tokens), (label.format(name), plan)
        assert sum(plan.sources.values()) == plan.load_tokens, (label.format(name), plan)
        n = plan.found
        loaded = check_prefix(store.load(tokens, salt=salt, plan=plan), ref, label.format("load(plan=)"), lossy)
        assert loaded <= plan.load_tokens, (label.format("load(plan=)"), loaded, plan)
    elif name == "load":
        n = check_prefix(store.load(tokens, salt=salt), ref, label.format(name), lossy)
    elif name == "load_out":
        out = torch.full(LAYOUT.shape(len(tokens)), 7.0, dtype=LAYOUT.dtype)
        n = check_prefix(store.load(tokens, salt=salt, out=out), ref, label.format(name), lossy)
    elif name == "layer_wise":
        with store.load(tokens, salt=salt, layer_wise=True) as loader:
            n = loader.num_tokens
            assert 0 <= n <= len(tokens), (label.format(name), n)
            layers = 0
            for index, layer in loader:
                assert index == layers, (label.format(name), index, layers)
                check_prefix(layer.unsqueeze(0), ref[index:index + 1], label.format(f"layer_wise layer {index}"),
                             lossy)
                assert layer.shape[1] == n, (label.format(name), layer.shape, n)
                layers += 1
            assert layers == LAYOUT.num_layers, (label.format(name), layers)
    elif name == "prefetch":
        handle = store.prefetch(tokens, salt=salt, policy=policy)
        ready = handle.wait(10.0) if policy == "wait" else handle.result()
        assert 0 <= ready <= len(tokens), (label.format(name), ready)
        n = check_prefix(store.load(tokens, salt=salt, prefetch=handle), ref, label.format("load(prefetch=)"),
                         lossy)
        assert handle.closed, label.format("load(prefetch=) left the handle open")
        got["prefetch_ready"] = ready
    else:
        raise AssertionError(f"unknown read {name}")
    return n


def put_from(store, oracle: Oracle, salt: object, tokens: Sequence[int], start: int = 0) -> int:
    """``store.put_from`` with a fill that writes the oracle's KV; recorded in the oracle."""
    stored = store.put_from(tokens, oracle.fill(salt, tokens, start), salt=salt, start=start)
    oracle.record(salt, tokens, start)
    return stored


def block_keys(store, salt: object, tokens: Sequence[int]) -> list[bytes]:
    return [b.key for b in store.block_keys(tokens, salt=salt)]


def evict(store, keys: Sequence[bytes], keep: Callable[[int, object], bool]) -> None:
    """Delete ``keys`` from each of ``store``'s tiers ``keep(index, tier)`` rejects (as capacity eviction would)."""
    for i, tier in enumerate(store.tiers):
        if keep(i, tier):
            continue
        for key in keys:
            tier.delete(key)


def persistent(tier: object) -> bool:
    return bool(getattr(tier, "persistent", False))


# -- real servers --------------------------------------------------------------------------------


def _load_module(name: str, path: Path):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


HAVE_REDIS = shutil.which("redis-server") is not None
needs_redis = pytest.mark.skipif(not HAVE_REDIS, reason="redis-server is not on PATH (apt-get install redis-server)")


@pytest.fixture(scope="module")
def cache_server(tmp_path_factory):
    """A real ``kvstore serve`` (64 MiB of RAM, no disk) for the whole module: ``.url``, ``TOKEN``."""
    from server.conftest import ServerProcess

    server = ServerProcess(tmp_path_factory.mktemp("kvserve"), "--host-bytes", "64MiB", "--disk-bytes", "0").start()
    yield server
    server.kill()
    if server.proc is not None and server.proc.stdout is not None:
        server.proc.stdout.close()


class LazyCacheServer:
    """A real ``kvstore serve`` (``ServerProcess``) started on the first ``get()``, for code that cannot take a
    fixture (a hypothesis state machine); the faults a deployment meets on demand.

    ``kill()`` (SIGKILL: the server and its RAM blocks are gone), ``stop()`` / ``cont()`` (SIGSTOP / SIGCONT:
    alive but hung), ``restart(wait=False)`` (a fresh process on the same port, in the background: stores
    configured with the URL pick it up again on their own). ``down`` is True from a ``kill()`` until the next
    ``restart()``. ``get()`` returns a running server (restarting or continuing it as needed). ``close()`` kills
    it; call it at module end (a module fixture), and ``atexit`` does too, as a last resort.
    """

    def __init__(self, *args: str):
        self.args = args or ("--host-bytes", "64MiB", "--disk-bytes", "0")
        self.server = None  # a ServerProcess once started
        self.down = False
        self.starts = 0
        self.log: collections.deque[str] = collections.deque(maxlen=200)  # the server's latest output lines
        self._stopped = False
        self._dir: str | None = None
        self._restart: threading.Thread | None = None
        self._restart_error: BaseException | None = None
        self._replaced = None  # the process a background restart replaces (ServerProcess.proc until it has)

    @property
    def url(self) -> str:
        return self.server.url if self.server is not None else ""

    def get(self):
        """The server, started (or restarted after a kill) and continued if it was stopped."""
        self._join()
        if self.server is None:
            from server.conftest import ServerProcess

            self._dir = tempfile.mkdtemp(prefix="kvstateful-serve-")
            self.server = ServerProcess(Path(self._dir), *self.args)
            atexit.register(self.close)
        self.cont()
        if not self.server.alive():
            self._start()
        self.down = False
        return self.server

    def _start(self) -> None:
        try:
            self.server.start()
        except RuntimeError:  # its port was taken meanwhile (or a start timed out): a fresh port
            self.server.kill()
            self.server.port = 0
            self.server.start()
        self.starts += 1
        proc = self.server.proc
        threading.Thread(target=self._drain, args=(proc,), name="kvserve-drain", daemon=True).start()

    def _drain(self, proc) -> None:
        """Read the server's output, so that a server that logs a lot never blocks on a full pipe."""
        try:
            for line in proc.stdout:
                self.log.append(line)
        except (OSError, ValueError):
            pass

    def _join(self) -> None:
        thread, self._restart = self._restart, None
        if thread is not None:
            thread.join()
        error, self._restart_error = self._restart_error, None
        if error is not None:
            raise RuntimeError(f"restarting the cache server failed: {error}") from error

    def alive(self) -> bool:
        return self.server is not None and self.server.alive()

    def kill(self) -> None:
        """SIGKILL (a stopped server too): no flush, no goodbye; its blocks are lost."""
        self._join()
        if self.alive():
            self.server.kill()
        self._stopped = False
        self.down = True

    def stop(self) -> bool:
        """SIGSTOP: the kernel still accepts connections, nothing answers. False if it was not running (killed,
        or still starting after a ``restart(wait=False)``: not waited for)."""
        if self._restart is not None and self._restart.is_alive():
            return False
        self._join()
        if not self.alive() or self._stopped:
            return False
        os.kill(self.server.proc.pid, signal.SIGSTOP)
        self._stopped = True
        return True

    def cont(self) -> None:
        if self._stopped and self.alive():
            os.kill(self.server.proc.pid, signal.SIGCONT)
        self._stopped = False

    @contextlib.contextmanager
    def hung(self) -> Iterator[bool]:
        """Stopped inside the block (True if it was running), continued after it, whatever happens."""
        stopped = self.stop()
        try:
            yield stopped
        finally:
            if stopped:
                self.cont()

    def restart(self, wait: bool = True) -> None:
        """A fresh process on the same port after a kill (no-op if running); ``wait=False``: in the background."""
        self._join()
        self.down = False
        if self.server is None or self.alive():
            return

        def start() -> None:
            try:
                self._start()
            except BaseException as exc:  # raised by the next call that joins
                self._restart_error = exc

        if wait:
            self._start()
        else:
            self._replaced = self.server.proc
            self._restart = threading.Thread(target=start, name="kvserve-restart", daemon=True)
            self._restart.start()

    def spawned(self) -> None:
        """Return once a background restart's child process has become the server (exec'd), or the restart ended.

        Until its exec the forked child holds copies of this process's file descriptors, and with them every
        flock taken through them: an LMDB tier's directory lock stays held after this process closed its store,
        and a store reopened on that directory meanwhile raises ``DirectoryInUseError``. Wait here before
        reopening a store while a restart may be under way.
        """
        thread = self._restart
        while thread is not None and thread.is_alive() and self.server.proc is self._replaced:
            time.sleep(0.001)

    def close(self) -> None:
        """Kill the server (if any) and remove its data directory; safe to call twice."""
        try:
            self._join()
        except RuntimeError:
            pass
        if self.server is not None:
            self.cont()
            self.server.kill()
            if self.server.proc is not None and self.server.proc.stdout is not None:
                try:
                    self.server.proc.stdout.close()
                except (OSError, ValueError):
                    pass
            self.server = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    """A real standalone ``redis-server`` for the whole module (tests keep apart by namespace): its URL."""
    if not HAVE_REDIS:
        pytest.skip("redis-server is not on PATH")
    fixtures = _load_module("redisfixtures", TESTS_DIR / "tiers" / "redisfixtures.py")
    server = fixtures.RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server.url
    server.stop()


def server_token() -> str:
    from server.conftest import TOKEN

    return TOKEN
