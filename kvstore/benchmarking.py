"""Measured ceilings and the quick benchmark behind ``kvstore bench --quick``.

Every figure is a ratio to a ceiling measured in the same run on the same
bytes (a tensor ``copy_`` for RAM; a raw file write+fsync or read for disk),
because shared machines drift too much for absolute numbers to mean much.
The pytest-benchmark suites under ``bench/`` reuse these pieces.
"""

from __future__ import annotations

import array
import hashlib
import itertools
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kvstore.config import StoreConfig
from kvstore.keymemo import MAX_ENTRIES
from kvstore.layout import KVLayout
from kvstore.store import KVStore

# Llama-3-8B: 32 layers, 8 KV heads, head dim 128, bf16; 256-token blocks are 32 MiB.
LLAMA3_8B = KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16, block_tokens=256)
# Same 256-token blocks with a few bytes of KV: lookup cost depends on keys, not on block bytes.
LOOKUP_LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=8, dtype=torch.bfloat16, block_tokens=256)
LOOKUP_TOKENS = 131_072


def random_kv(layout: KVLayout, num_tokens: int, seed: int = 0) -> torch.Tensor:
    """Deterministic random KV ``[L, P, num_tokens, H, D]``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(layout.shape(num_tokens), generator=generator).to(layout.dtype)


class PromptSource:
    """Distinct token sequences (no two share a first block), so every put stores new blocks."""

    def __init__(self, num_tokens: int, vocab: int = 128_256):
        self._num_tokens = num_tokens
        self._vocab = vocab
        self._next = 0

    def __call__(self) -> np.ndarray:
        rng = np.random.default_rng(self._next)
        self._next += 1
        return rng.integers(0, self._vocab, self._num_tokens, dtype=np.int64)


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def raw_write_fsync(path: Path, data: np.ndarray) -> None:
    """The disk-write ceiling: write ``data`` to a new file and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data).cast("B")
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


class FreshFiles:
    """The ceiling for a tier that writes each block to a new file: raw write+fsync of a new file per call.

    Rewriting one file reuses its page-cache pages; a tier keeping many blocks
    cannot, and on some machines (VMs that fault guest memory in lazily) new
    pages cost more than the disk. Files are kept, as the tier keeps its blocks.
    """

    def __init__(self, directory: Path, data: np.ndarray):
        self._directory = Path(directory)
        self._data = data
        self._count = 0

    def __call__(self) -> None:
        self._count += 1
        raw_write_fsync(self._directory / f"raw-{self._count}.bin", self._data)


def raw_read(path: Path, buffer: np.ndarray) -> None:
    """The disk-read ceiling: read a whole file into a preallocated buffer."""
    with open(path, "rb", buffering=0) as handle:
        view = memoryview(buffer).cast("B")
        while view:
            got = handle.readinto(view)
            if not got:
                raise OSError(f"{path}: short read")
            view = view[got:]


@dataclass(frozen=True)
class Pair:
    """A subject and its ceiling, timed alternately on the same bytes (seconds per call)."""

    name: str
    nbytes: int
    subject_s: list[float]
    ceiling_s: list[float]
    ceiling_name: str
    target: float

    @property
    def ratio(self) -> float:
        """Subject throughput over ceiling throughput (median times)."""
        return statistics.median(self.ceiling_s) / statistics.median(self.subject_s)

    def gbps(self, times: list[float]) -> float:
        return self.nbytes / statistics.median(times) / 1e9

    def line(self) -> str:
        verdict = "met" if self.ratio >= self.target else "MISSED"
        return (f"{self.name:<22} {self.gbps(self.subject_s):7.2f} GB/s   {self.ceiling_name:<22} "
                f"{self.gbps(self.ceiling_s):7.2f} GB/s   ratio {self.ratio:5.2f}  (target >= {self.target:.2f}: {verdict})")


def alternate(name: str, nbytes: int, subject: Callable[[], object], ceiling: Callable[[], object],
              ceiling_name: str, target: float, repeat: int) -> Pair:
    """Time ``subject`` and ``ceiling`` ``repeat`` times each, interleaved, after one warm-up of each."""
    subject()
    ceiling()
    subject_s, ceiling_s = [], []
    for _ in range(repeat):
        ceiling_s.append(timed(ceiling))
        subject_s.append(timed(subject))
    return Pair(name, nbytes, subject_s, ceiling_s, ceiling_name, target)


def host_pairs(repeat: int, layout: KVLayout = LLAMA3_8B) -> Iterator[Pair]:
    """Host-tier put and get of one block against ``Tensor.copy_`` of the same bytes."""
    kv = random_kv(layout, layout.block_tokens)
    out = torch.empty_like(kv)
    config = StoreConfig(model_id="bench", host_bytes=(repeat + 3) * layout.block_bytes)
    prompts = PromptSource(layout.block_tokens)
    with KVStore(layout, config) as store:
        store.host.wait_warm()  # the steady state: a pool still faulting in is the start-up's cost, not a put's
        yield alternate("host put", layout.block_bytes, lambda: store.put(prompts(), kv),
                        lambda: out.copy_(kv), "Tensor.copy_", 0.8, repeat)
        stored = prompts()
        store.put(stored, kv)
        yield alternate("host get_into", layout.block_bytes, lambda: store.get_into(stored, out),
                        lambda: out.copy_(kv), "Tensor.copy_", 0.8, repeat)


def _medium_pairs(label: str, config: StoreConfig, layout: KVLayout, repeat: int, raw_dir: Path,
                  write_ceilings: dict[str, Callable[[np.ndarray], Callable[[], object]]],
                  target: float, get_target: float | None = None) -> Iterator[Pair]:
    """A persistent tier's durable put against each write ceiling, and its warm get against a raw read.

    ``write_ceilings`` maps a ceiling's name to a factory that, given the raw
    bytes, makes the ceiling call. All files live under ``raw_dir``. The
    get is held to ``get_target`` if given, else to ``target`` as the puts.
    """
    kv = random_kv(layout, layout.block_tokens)
    raw = kv.view(torch.uint8).reshape(-1).numpy()
    buffer = np.empty_like(raw)
    out = torch.empty_like(kv)
    raw_dir.mkdir(parents=True, exist_ok=True)
    raw_path = raw_dir / "raw.bin"
    raw_write_fsync(raw_path, raw)
    prompts = PromptSource(layout.block_tokens)
    with KVStore(layout, config) as store:
        for ceiling_name, make in write_ceilings.items():
            yield alternate(f"{label} put (fsync)", layout.block_bytes, lambda: store.put(prompts(), kv),
                            make(raw), ceiling_name, target, repeat)
        stored = prompts()
        store.put(stored, kv)
        yield alternate(f"{label} get (warm)", layout.block_bytes, lambda: store.get_into(stored, out),
                        lambda: raw_read(raw_path, buffer), "raw read (warm)", get_target or target, repeat)


def disk_pairs(directory: Path, repeat: int, layout: KVLayout = LLAMA3_8B) -> Iterator[Pair]:
    """LMDB put (durable) into a filling tier against raw write+fsync, and warm LMDB get against a raw read.

    A filling LMDB grows its file, so its puts are timed against writing a
    new file per call (``FreshFiles``) as well as against rewriting one:
    here a growing file's fresh pages cost LMDB and the new files alike
    (``full_disk_put_pair`` times the tier once it is full).
    """
    config = StoreConfig(model_id="bench", host_bytes=0, disk_dir=str(directory / "lmdb"),
                         disk_bytes=(2 * repeat + 4) * (layout.block_bytes + 4096))
    (directory / "fresh").mkdir(parents=True, exist_ok=True)
    ceilings = {"raw write+fsync, new": lambda raw: FreshFiles(directory / "fresh", raw),
                "raw write+fsync": lambda raw: lambda: raw_write_fsync(directory / "raw.bin", raw)}
    yield from _medium_pairs("lmdb", config, layout, repeat, directory, ceilings, 0.8, get_target=0.9)


def full_disk_put_pair(directory: Path, repeat: int, layout: KVLayout = LLAMA3_8B) -> Pair:
    """A durable LMDB put into a tier already at capacity, against raw write+fsync of the same bytes.

    ``disk_pairs`` times a tier filling up, whose file grows with every put:
    on this VM's fresh page cache its last puts before capacity ran at
    0.28-0.4 of the ceiling while the first ran at 0.8. A serving engine's
    disk tier is full most of its life, so every put here also evicts.
    """
    blocks = 10
    config = StoreConfig(model_id="bench", host_bytes=0, disk_dir=str(directory / "full-lmdb"),
                         disk_bytes=blocks * (layout.block_bytes + 4096))
    kv = random_kv(layout, layout.block_tokens)
    raw = kv.view(torch.uint8).reshape(-1).numpy()
    prompts = PromptSource(layout.block_tokens)
    with KVStore(layout, config) as store:
        for _ in range(2 * blocks):
            store.put(prompts(), kv)
        return alternate("lmdb put (fsync, full)", layout.block_bytes, lambda: store.put(prompts(), kv),
                         lambda: raw_write_fsync(directory / "raw.bin", raw), "raw write+fsync", 0.8, repeat)


def promoted_get_pair(directory: Path, repeat: int, layout: KVLayout = LLAMA3_8B) -> Pair:
    """A warm LMDB get through a store with host RAM in front, against a raw read of the same bytes.

    Host RAM holds one block and two are read in turn, so every get is a
    disk hit that is also promoted into host RAM (evicting the other): the
    read path as an engine meets it, where the promotion is a second copy.
    """
    config = StoreConfig(model_id="bench", host_bytes=layout.block_bytes, disk_dir=str(directory / "promoted"),
                         disk_bytes=4 * (layout.block_bytes + 4096))
    kv = random_kv(layout, layout.block_tokens)
    raw = kv.view(torch.uint8).reshape(-1).numpy()
    buffer = np.empty_like(raw)
    raw_write_fsync(directory / "raw.bin", raw)
    out = torch.empty_like(kv)
    prompts = PromptSource(layout.block_tokens)
    with KVStore(layout, config) as store:
        stored = [prompts(), prompts()]
        for tokens in stored:
            store.put(tokens, kv)
        store.flush()
        in_turn = itertools.cycle(stored)

        def get() -> None:
            if store.get_into(next(in_turn), out) != layout.block_tokens:
                raise RuntimeError("promoted get benchmark: a stored block was not read back")
        return alternate("lmdb get (promoted)", layout.block_bytes, get,
                         lambda: raw_read(directory / "raw.bin", buffer), "raw read (warm)", 0.9, repeat)


def files_pairs(directory: Path, repeat: int, layout: KVLayout = LLAMA3_8B) -> Iterator[Pair]:
    """Files-tier put (fsync'ed, renamed) and warm get against raw write+fsync and raw read in the same directory.

    Put is measured against writing a new file per block (``FreshFiles``),
    as the tier must, and also against rewriting one file.
    """
    files_dir = directory / "files"
    config = StoreConfig(model_id="bench", host_bytes=0, files_dir=str(files_dir / "tier"),
                         files_bytes=(2 * repeat + 4) * (layout.block_bytes + 4096))
    ceilings = {
        "raw write+fsync, new": lambda raw: FreshFiles(files_dir, raw),
        "raw write+fsync, same": lambda raw: lambda: raw_write_fsync(files_dir / "raw.bin", raw),
    }
    yield from _medium_pairs("files", config, layout, repeat, files_dir, ceilings, 0.8)


def queued_blocks(store: KVStore) -> int:
    """Blocks waiting in the store's write-behind queues."""
    return sum(tier["queue_depth"] for tier in store.stats()["tiers"].values())


def wait_until_draining(store: KVStore, most: int = 1, timeout: float = 60.0) -> None:
    """Wait until at most ``most`` blocks wait in the write-behind queues (a worker may still be writing)."""
    deadline = time.monotonic() + timeout
    while queued_blocks(store) > most and time.monotonic() < deadline:
        time.sleep(0.002)


def cascade_pair(directory: Path, repeat: int, layout: KVLayout = LLAMA3_8B, threads: int | None = None) -> Pair:
    """Put latency of host + LMDB + files (write-through) while its writers drain, against a quiet host-only put.

    Each round: the cascade is flushed and a host-only put is timed with no
    background work anywhere (the ceiling); then one cascade put starts the
    writers and the next cascade put is timed while they write. Target:
    within 1.5x of the host-only put. ``threads``: torch intra-op threads
    for both (None keeps torch's default; on a machine with few cores the
    background writers take cores torch's parallel copy would use).
    """
    kv = random_kv(layout, layout.block_tokens)
    slots = repeat + 4
    lower = 2 * (repeat + 4) * (layout.block_bytes + 4096)
    cascade_config = StoreConfig(model_id="bench", host_bytes=slots * layout.block_bytes,
                                 disk_dir=str(directory / f"cascade-lmdb-{threads}"), disk_bytes=lower,
                                 files_dir=str(directory / f"cascade-files-{threads}"), files_bytes=lower)
    prompts = PromptSource(layout.block_tokens)
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        with KVStore(layout, cascade_config) as cascade, \
                KVStore(layout, StoreConfig(model_id="bench", host_bytes=slots * layout.block_bytes)) as host_only:
            subject_s, ceiling_s = [], []
            for _ in range(repeat + 1):  # the first round is a warm-up
                cascade.flush()
                ceiling_s.append(timed(lambda: host_only.put(prompts(), kv)))
                cascade.put(prompts(), kv)
                subject_s.append(timed(lambda: cascade.put(prompts(), kv)))
    finally:
        torch.set_num_threads(before)
    label = f"{threads} torch thread{'s' if threads != 1 else ''}" if threads else "default threads"
    return Pair(f"cascade put, {label}", layout.block_bytes, subject_s[1:], ceiling_s[1:],
                "quiet host-only put", 1 / 1.5)


@dataclass(frozen=True)
class LookupFigure:
    """Lookups timed against their floor: the same tokens packed to bytes and put through a plain sha256
    chain (what any lookup of them must do), timed in turn with them."""

    name: str
    times_s: list[float]
    floor_s: list[float]
    target_s: float = 0.001  # 131,072 tokens, hits or misses, in at most 1 ms

    def line(self) -> str:
        median, floor = statistics.median(self.times_s), statistics.median(self.floor_s)
        verdict = "met" if median <= self.target_s else "MISSED"
        return (f"{self.name:<36} median {median * 1e3:6.3f} ms  p90 {np.percentile(self.times_s, 90) * 1e3:6.3f} ms"
                f"  floor {floor * 1e3:6.3f} ms (pack + sha256 chain)  (target <= {self.target_s * 1e3:.0f} ms: "
                f"{verdict})")


def _hash_floor(tokens: np.ndarray | list[int], block_tokens: int, blocks: int) -> Callable[[], object]:
    """Pack ``tokens`` to u32 bytes and chain sha256 over their first ``blocks`` blocks, with nothing else."""
    step = 4 * block_tokens

    def floor() -> bytes:
        if isinstance(tokens, np.ndarray):
            view = memoryview(tokens.astype("<u4")).cast("B")
        else:
            packed = array.array("I")
            packed.fromlist(tokens)
            view = memoryview(packed).cast("B")
        digest = bytes(32)
        for offset in range(0, blocks * step, step):
            digest = hashlib.sha256(digest + view[offset:offset + step]).digest()
        return digest
    return floor


def lookup_figures(directory: Path, repeat: int) -> list[LookupFigure]:
    """``lookup`` of a 131,072-token prompt, all hits and all misses, as numpy array and as list; each
    against its floor (``_hash_floor``: every block hashed for hits, one for misses).

    The same prompt asked again (as vLLM's scheduler asks while a request
    waits, and its worker then loads and saves it) finds its keys in the key
    memo; "first sight" rows cycle through more stored prompts than the memo
    holds, so every block is hashed as a new prompt's would be.
    """
    layout = LOOKUP_LAYOUT
    blocks = LOOKUP_TOKENS // layout.block_tokens
    seen = MAX_ENTRIES + 1
    config = StoreConfig(model_id="bench", host_bytes=(seen * blocks + 1) * layout.block_bytes,
                         disk_dir=str(directory / "lookup-lmdb"), disk_bytes="64MiB")
    prompts = PromptSource(LOOKUP_TOKENS)
    hit, miss = prompts(), prompts()
    new_ones = [hit] + [prompts() for _ in range(seen - 1)]
    figures = []
    with KVStore(layout, config) as store:
        for tokens in new_ones:
            store.put(tokens, random_kv(layout, LOOKUP_TOKENS))
        if store.lookup(hit) != LOOKUP_TOKENS or store.lookup(miss) != 0:
            raise RuntimeError("lookup benchmark set-up did not store the prompt")
        lists = [tokens.tolist() for tokens in new_ones]
        cases = [("all hits", "numpy", itertools.repeat(hit), blocks),
                 ("all hits", "list", itertools.repeat(lists[0]), blocks),
                 ("all hits", "list, first sight", itertools.cycle(lists), blocks),
                 ("all misses", "numpy", itertools.repeat(miss), 1),
                 ("all misses", "list", itertools.repeat(miss.tolist()), 1)]
        for label, form, values, hashed in cases:
            value = next(values)
            store.lookup(value)
            times, floor_s = [], []
            for _ in range(repeat):
                floor_s.append(timed(_hash_floor(value, layout.block_tokens, hashed)))
                times.append(timed(lambda: store.lookup(value)))
                value = next(values)
            figures.append(LookupFigure(f"lookup 131072 tokens, {label}, {form}", times, floor_s))
    return figures


def run_quick(data_dir: str | os.PathLike[str], repeat: int = 5, echo: Callable[[str], None] = print) -> None:
    """Store and retrieve Llama-3-8B-shaped 32 MiB blocks through host RAM, LMDB and files; print ratios."""
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    directory = Path(tempfile.mkdtemp(prefix="bench-", dir=data_dir))
    try:
        echo(f"kvstore bench ({repeat} rounds a figure): {LLAMA3_8B.block_bytes >> 20} MiB blocks "
             f"(Llama-3-8B: 32 layers, 8 KV heads, head dim 128, bf16, 256 tokens); data in {directory}")
        for pair in host_pairs(repeat):
            echo(pair.line())
        for pair in disk_pairs(directory, repeat):
            echo(pair.line())
        echo(full_disk_put_pair(directory, repeat).line())
        echo(promoted_get_pair(directory, repeat).line())
        for pair in files_pairs(directory, repeat):
            echo(pair.line())
        for threads in (None, 1):
            echo(cascade_pair(directory, repeat, threads=threads).line())
        for figure in lookup_figures(directory, max(repeat * 10, 20)):
            echo(figure.line())
    finally:
        shutil.rmtree(directory, ignore_errors=True)
