"""Shared fixtures and helpers for the kvstore test suite.

Everything here is real: real LMDB environments in ``tmp_path``, real files,
real subprocesses. Data is deterministic (fixed ``torch.Generator`` seeds), so
a child process importing this module produces the very same bytes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from kvstore.layout import KVLayout

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent


def tiny_layout(**changes) -> KVLayout:
    """The tiny layout every test uses: a 16-token block is 4096 bytes in fp16."""
    fields = dict(num_layers=2, num_kv_heads=2, head_dim=16, dtype=torch.float16, block_tokens=16)
    fields.update(changes)
    return KVLayout(**fields)


def make_kv(layout: KVLayout, num_tokens: int, seed: int = 0) -> torch.Tensor:
    """Deterministic random KV ``[L, P, num_tokens, H, D]`` of ``layout.dtype`` (same bytes in any process)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(layout.shape(num_tokens), generator=gen, dtype=torch.float32).to(layout.dtype)


def make_tokens(num_tokens: int, seed: int = 0, vocab: int = 50_000) -> list[int]:
    """Deterministic token ids (a plain list of Python ints)."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    return torch.randint(0, vocab, (num_tokens,), generator=gen).tolist()


def as_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()


def assert_same_kv(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Exact equality: same shape, same dtype, same bytes."""
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert tuple(actual.shape) == tuple(expected.shape), (tuple(actual.shape), tuple(expected.shape))
    assert torch.equal(actual, expected)
    assert as_bytes(actual) == as_bytes(expected)


@contextmanager
def mounted_tmpfs(point: Path, options: str) -> Iterator[Path]:
    """A fresh tmpfs at ``point`` mounted with ``options`` (``size=3m``...) for the block, unmounted after; skips
    the test where mounting is not permitted (it needs CAP_SYS_ADMIN)."""
    point.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount command: cannot make a small or read-only filesystem")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here (needs CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield point
    finally:
        if subprocess.run(["umount", str(point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(point)], capture_output=True)


@contextmanager
def mounted_ext4(point: Path, size: str = "32M") -> Iterator[Path]:
    """A fresh ext4 filesystem of ``size`` on a loop device at ``point`` for the block (``freeze`` stops its
    writes as a hung mount would), thawed and unmounted after; skips the test where that is not permitted."""
    point.mkdir(parents=True, exist_ok=True)
    image = point.parent / f"{point.name}.img"
    for tool in ("mkfs.ext4", "mount", "fsfreeze"):
        if shutil.which(tool) is None:
            pytest.skip(f"no {tool}: cannot make a filesystem to freeze")
    subprocess.run(["truncate", "-s", size, str(image)], check=True)
    made = subprocess.run(["mkfs.ext4", "-q", str(image)], capture_output=True, text=True)
    done = subprocess.run(["mount", "-o", "loop", str(image), str(point)], capture_output=True, text=True)
    if made.returncode != 0 or done.returncode != 0:
        pytest.skip(f"a loop-mounted ext4 is not permitted here: {made.stderr.strip()} {done.stderr.strip()}")
    try:
        yield point
    finally:
        subprocess.run(["fsfreeze", "-u", str(point)], capture_output=True)
        if subprocess.run(["umount", str(point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(point)], capture_output=True)
        image.unlink(missing_ok=True)


def freeze(point: Path, frozen: bool = True) -> None:
    """Freeze (writes block until thawed, as on a share that stopped answering) or thaw ``point``."""
    subprocess.run(["fsfreeze", "-f" if frozen else "-u", str(point)], check=True, capture_output=True)


def remount(point: Path, options: str) -> subprocess.CompletedProcess:
    """``mount -o remount,OPTIONS point`` (``ro``, ``size=128m``...)."""
    return subprocess.run(["mount", "-o", f"remount,{options}", str(point)], capture_output=True, text=True)


def run_threads(target: Callable[[int], None], count: int, timeout: float = 60) -> None:
    """Run ``target(0) .. target(count - 1)`` on threads at once and wait for them all."""
    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)


def run_python(code: str, *, env_extra: dict[str, str] | None = None, timeout: float = 60) -> str:
    """Run ``code`` in a fresh interpreter (tests dir importable); return stdout, fail on a non-zero exit."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), env.get("PYTHONPATH", "")])
    env.update(env_extra or {})
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            env=env, cwd=str(TESTS_DIR), timeout=timeout)
    assert result.returncode == 0, f"child failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture
def layout() -> KVLayout:
    return tiny_layout()


@pytest.fixture
def kv_for(layout):
    """``kv_for(n, seed=0)``: deterministic KV for ``n`` tokens of the tiny layout."""
    def factory(num_tokens: int, seed: int = 0, lay: KVLayout | None = None) -> torch.Tensor:
        return make_kv(lay or layout, num_tokens, seed)
    return factory


@pytest.fixture
def disk_dir(tmp_path) -> Path:
    path = tmp_path / "kvdisk"
    path.mkdir()
    return path


@pytest.fixture
def make_store(tmp_path, layout):
    """``make_store(mode, lay=None, disk=None, **config)``: a KVStore closed at teardown.

    ``mode``: "host" (1 MiB host pool only), "disk" (host_bytes=0, LMDB only) or
    "both" (host pool + LMDB, write-through unless ``write_policy`` says otherwise).
    The LMDB dir defaults to ``tmp_path / "disk"``; ``disk_sync`` defaults to False.
    """
    from kvstore.config import StoreConfig
    from kvstore.store import KVStore

    stores = []

    def factory(mode: str = "host", lay: KVLayout | None = None, disk=None, **config):
        assert mode in ("host", "disk", "both"), mode
        settings: dict = {"host_bytes": 0 if mode == "disk" else 1 << 20}
        if mode != "host":
            settings.update(disk_dir=str(disk or tmp_path / "disk"), disk_bytes=4 << 20, disk_sync=False)
        settings.update(config)
        store = KVStore(lay or layout, StoreConfig(**settings))
        stores.append(store)
        return store

    yield factory
    for store in stores:
        store.close()


_REAL_MODELS: dict[torch.dtype, tuple | str] = {}


def real_model(dtype: torch.dtype = torch.float32) -> tuple:
    """(model, tokenizer) of SmolLM2-135M-Instruct in ``dtype``, loaded once per test session (through
    ``kvstore.models.load_model``, which fetches it into the model cache the first time); the calling test is
    skipped, with the reason, where it cannot be had (and the attempt is not repeated)."""
    if dtype not in _REAL_MODELS and dtype != torch.float32:  # a cast of the fp32 one: no second GGUF load
        import copy
        model, tokenizer = real_model(torch.float32)
        _REAL_MODELS[dtype] = (copy.deepcopy(model).to(dtype), tokenizer)
    if dtype not in _REAL_MODELS:
        from kvstore.models import ModelUnavailable, load_model
        try:
            _REAL_MODELS[dtype] = load_model(dtype=dtype)
        except ModelUnavailable as exc:
            _REAL_MODELS[dtype] = f"SmolLM2-135M-Instruct is not available here: {exc}"
    loaded = _REAL_MODELS[dtype]
    if isinstance(loaded, str):
        pytest.skip(loaded)
    return loaded


@contextmanager
def model_stores(block_tokens: int, host_bytes: str) -> Iterator:
    """A factory of stores for a transformers model (its layout, ``block_tokens``-token blocks, ``host_bytes`` of
    host RAM unless given; a slow prefill rate, 1 token/s, so every stored token is worth loading: exact counts,
    whatever the machine); every store it made is closed on exit."""
    from kvstore import KVStore, StoreConfig
    from kvstore.integrations.transformers import layout_for

    stores = []

    def factory(model, **config):
        config.setdefault("host_bytes", host_bytes)
        config.setdefault("prefill_tokens_per_second", 1.0)
        store = KVStore(layout_for(model, block_tokens=block_tokens), StoreConfig(**config))
        stores.append(store)
        return store

    try:
        yield factory
    finally:
        for store in stores:
            store.close()
