"""The protocol every storage tier implements, and helpers they share."""

from __future__ import annotations

import enum
import logging
import os
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Protocol, runtime_checkable

import torch

from kvstore.blockformat import HEADER_BYTES, BlockHeader
from kvstore.compression.stored import CORRUPT, BlockEncoding
from kvstore.layout import KVLayout
from kvstore.metrics import Counters, LogLimit

# Counters every tier reports in ``stats()``.
TIER_COUNTERS = ("hits", "misses", "bytes_read", "bytes_written", "blocks_written",
                 "evictions", "rejected", "corrupt")


@runtime_checkable
class Tier(Protocol):
    """A storage medium for KV blocks, addressed by prefix-chained key.

    Blocks travel as canonical tensors ``[L, P, tokens, H, D]`` (a view into a
    caller's buffer may be strided). A tier never raises on a miss or on a
    damaged block: ``get_into`` returns False and the event is counted.
    """

    name: str
    # Whether what it holds survives the process (a disk, a server), as opposed to a memory pool.
    persistent: bool
    # The blocks it holds: a store refuses a tier of another layout (its bytes would be read as this one's).
    layout: KVLayout

    @property
    def capacity_bytes(self) -> int:
        """The most bytes the tier holds (a server tier may report its server's; 0: unlimited or not known)."""
        ...

    def used_bytes(self) -> int:
        """Bytes the tier holds now, counted as ``capacity_bytes`` counts them."""
        ...

    def contains(self, key: bytes) -> bool:
        """True if the tier holds block ``key``; its bytes are not read or verified (a server tier may raise)."""
        ...

    def put_many(self, items: Sequence[tuple[bytes, torch.Tensor]]) -> int:
        """Store blocks; returns how many are stored afterwards (already present counts)."""
        ...

    def get_into(self, key: bytes, out: torch.Tensor) -> bool:
        """Copy block ``key`` into ``out`` (its shape says how many tokens); False on a miss."""
        ...

    def delete(self, key: bytes) -> bool:
        """Remove block ``key``; True if it was held and is now removed, False otherwise."""
        ...

    def keys(self) -> Iterator[bytes]:
        """Stored keys, least recently used first."""
        ...

    def stats(self) -> dict[str, int]:
        """``TIER_COUNTERS`` (counts), plus ``blocks`` held, ``used_bytes`` and ``capacity_bytes`` (bytes)."""
        ...

    def close(self) -> None:
        """Release the tier's threads, connections and memory; returns None. What a persistent tier stored stays."""
        ...


class Capability(enum.Flag):
    """What a tier can do beyond ``Tier``, declared by its class (``capabilities``) and checked once at open.

    The store never probes a tier with ``hasattr``: a tier declares its
    capabilities, ``declared_capabilities`` verifies that it has every member
    the matching protocol names (a misspelt method is an error at open, not
    a silent slow path), and the store uses the declaration from then on.
    """

    NONE = 0
    SLOTS = enum.auto()  # ``MemorySlots``: a memory slot pool with pins and a lossy mark per block
    BATCH = enum.auto()  # ``BatchTier``: one round trip answers for many keys (cache server, Redis)
    EVICTS = enum.auto()  # ``EvictingTier``: hands each block it evicts for room to ``on_evict``
    ENCODED = enum.auto()  # ``EncodedTier``: stores blocks serialized by a ``BlockEncoding`` (raw or a codec)
    RUNS = enum.auto()  # ``RunReader``: reads a run of blocks on several threads side by side (the files tier)
    CHAINS = enum.auto()  # ``ChainTier``: keeps a chain's head the most recently used (``touch_chain``)


# Sees a block a tier evicts for room: (key, its bytes, the lossy codec they went through or None).
EvictCallback = Callable[[bytes, torch.Tensor, "str | None"], None]


class MemorySlots(Tier, Protocol):
    """A pool of block slots in memory (host RAM, HBM): pins, in-place fills and a lossy mark per block.

    A block that went through a lossy codec (read from a tier that stores
    with one) is written with ``put_lossy`` and keeps that mark while it is
    held; ``get_into_marked`` returns it with the bytes.
    """

    @property
    def num_slots(self) -> int: ...

    @property
    def fills_in_place(self) -> bool: ...

    def put_lossy(self, items: Sequence[tuple[bytes, torch.Tensor]], codec: str) -> int: ...

    def get_into_marked(self, key: bytes, out: torch.Tensor) -> tuple[bool, str | None]: ...

    def get_run_marked(self, keys: Sequence[bytes], outs: Sequence[torch.Tensor]) -> list[str | None]: ...

    def count_misses(self, count: int) -> None:
        """Count ``count`` reads this pool did not hold, served below without asking it block by block."""
        ...

    def lossy_of(self, key: bytes) -> str | None: ...

    def pin(self, key: bytes) -> torch.Tensor | None: ...

    def unpin(self, key: bytes) -> None: ...

    def pinned_marked(self, key: bytes) -> tuple[torch.Tensor, str | None] | None: ...

    def reading(self, key: bytes) -> AbstractContextManager[torch.Tensor | None]: ...


class BatchTier(Tier, Protocol):
    """A tier that answers for many keys in one round trip."""

    def prefix_length(self, keys: Sequence[bytes]) -> int: ...

    def held(self, keys: Sequence[bytes]) -> set[bytes]:
        """Of ``keys``, those stored, asked in one round trip (a cache server answers for their leading run);
        raises if the server cannot be reached."""
        ...

    def get_many_into(self, keys: Sequence[bytes], outs: Sequence[torch.Tensor]) -> list[bool]: ...

    def cached_stats(self) -> dict[str, int]:
        """``stats()`` without asking the server: the tier's counters, and the server's figures as last read
        (a bypassed server that hangs costs ``stats()`` nothing)."""
        ...


class EvictingTier(Tier, Protocol):
    """A tier that evicts for room and lets the store see each evicted block (write-back below it)."""

    on_evict: EvictCallback | None


class EncodedTier(Tier, Protocol):
    """A tier that serializes blocks (disk, files, servers): ``encoding`` says raw or which codec."""

    encoding: BlockEncoding


class ChainTier(Tier, Protocol):
    """A tier whose eviction takes a prompt's blocks tail first.

    A prefix is read from its first block: a chain that lost its head to
    eviction keeps only blocks no lookup reaches, while one that lost its
    tail still serves its head (vLLM frees a request's blocks tail first for
    the same reason). Blocks used in token order would leave the head the
    least recently used; ``touch_chain`` (and the tier's own batch puts)
    make it the most recently used instead.
    """

    def touch_chain(self, keys: Sequence[bytes]) -> None:
        """``keys``, a prompt's blocks in order, were just used: those held here become the most recently
        used, the first one most of all."""
        ...

    def put_keeping(self, items: Sequence[tuple[bytes, torch.Tensor]], lossy: str | None,
                    keep: Collection[bytes]) -> int:
        """``put_many`` that evicts none of ``keep`` (``lossy``: the lossy codec the blocks went through, for
        memory slots only; a tier below takes exact bytes). ``keep`` is the prompt's blocks before these (and a
        read's own, for its promotions): a prompt whose head was stored already lost it to its own tail,
        which no lookup then reached. Blocks with no room beside them are ``rejected``."""
        ...


class RunReader(Tier, Protocol):
    """A tier that reads a run of blocks side by side: one thread copying from the page cache leaves the
    other cores idle."""

    def get_run_into(self, keys: Sequence[bytes], outs: Sequence[torch.Tensor]) -> int:
        """Read the leading ``keys`` into ``outs``; how many leading blocks were read and verified.

        ``outs`` past the returned count may have been read into as well
        (another thread was reading them); only the count is valid.
        """
        ...


_PROTOCOLS: dict[Capability, type] = {Capability.SLOTS: MemorySlots, Capability.BATCH: BatchTier,
                                      Capability.EVICTS: EvictingTier, Capability.ENCODED: EncodedTier,
                                      Capability.RUNS: RunReader, Capability.CHAINS: ChainTier}


def _members(protocol: type, inherited: type | None = None) -> tuple[str, ...]:
    """The public members ``protocol`` declares (annotated attributes, methods, properties), in declaration
    order, less ``inherited``'s."""
    names: dict[str, None] = {}
    for klass in protocol.__mro__:
        if klass in (Protocol, object, inherited) or klass.__module__ == "typing":
            continue
        names.update(dict.fromkeys(n for n in (*vars(klass).get("__annotations__", {}), *vars(klass))
                                   if not n.startswith("_")))
    return tuple(names)


_TIER_MEMBERS = _members(Tier)


def check_tier(tier: object) -> None:
    """``ValueError`` unless ``tier`` has every member of the ``Tier`` protocol (checked once, at open)."""
    missing = [name for name in _TIER_MEMBERS if not hasattr(tier, name)]
    if missing:
        raise ValueError(f"tier {getattr(tier, 'name', tier)!r}: expected the Tier protocol "
                         f"({', '.join(_TIER_MEMBERS)}), got one without {missing}")


def check_tier_layout(tier: Tier, layout: KVLayout, before: Sequence[Tier]) -> None:
    """``ValueError`` unless ``tier`` holds blocks of ``layout`` and is none of the tiers ``before`` it.

    A host tier made for a bf16 layout took a store's fp16 blocks and gave
    back other bytes of the same size; one made for fewer layers promised
    blocks it could not return.
    """
    if any(tier is other for other in before):
        raise ValueError(f"tiers: expected each tier once, got tier {tier.name!r} twice")
    held = tier.layout
    if not isinstance(held, KVLayout) or held.fingerprint != layout.fingerprint:
        got = held.describe() if isinstance(held, KVLayout) else repr(held)
        raise ValueError(f"tier {tier.name!r}: expected a tier of the store's layout ({layout.describe()}), "
                         f"got one of {got}")


def declared_capabilities(tier: object) -> Capability:
    """The capabilities ``tier``'s class declares, after checking it has every member they promise.

    Called once per tier when a store opens; raises ``ValueError`` naming
    the tier and the missing member.
    """
    check_tier(tier)
    declared = getattr(type(tier), "capabilities", Capability.NONE)
    if not isinstance(declared, Capability):
        raise ValueError(f"tier {getattr(tier, 'name', tier)!r}: capabilities: expected a Capability, "
                         f"got {declared!r}")
    for capability, protocol in _PROTOCOLS.items():
        if capability in declared:
            missing = [name for name in _members(protocol, Tier) if not hasattr(tier, name)]
            if missing:
                raise ValueError(f"tier {getattr(tier, 'name', tier)!r}: declares {capability.name} but lacks "
                                 f"{missing}")
    return declared


class RefusalLog:
    """Writes a tier's medium refused, logged at most once per ``interval`` seconds for each reason, with the
    count since.

    Not failures: the tier answers, but keeps nothing (Redis out of memory
    under ``noeviction``, blocks larger than a cache server's frames). Only
    counted, such a tier read ``healthy`` while it stored nothing.
    """

    def __init__(self, logger: logging.Logger, tier: str, interval: float = 10.0, medium: str = "the server"):
        self._log = logger
        self._tier = tier
        self._interval = interval
        self._medium = medium  # who refused: "the server", "its directory"
        self._limits: dict[str, LogLimit] = {}  # one a reason: one reason's lines do not hide another's

    def refused(self, count: int, why: str) -> None:
        """``count`` blocks were refused, because ``why`` (what the operator can change, named)."""
        limit = self._limits.get(why) or self._limits.setdefault(why, LogLimit(self._interval))
        count = limit.due(count)
        if count:
            self._log.warning("%s tier: %s refused %d block%s: %s", self._tier, self._medium, count,
                              "" if count == 1 else "s", why)


def tier_stats(counters: Counters, blocks: int, used_bytes: int, capacity_bytes: int) -> dict[str, int]:
    """The ``stats()`` every tier returns: its counters plus blocks held, bytes used and byte capacity."""
    snapshot = counters.snapshot()
    snapshot.update(blocks=blocks, used_bytes=used_bytes, capacity_bytes=capacity_bytes)
    return snapshot



def decode_blob(encoding: BlockEncoding, key: bytes, fingerprint: bytes, blob: object, out: torch.Tensor) -> str:
    """Verdict of a stored blob (integrity header, then payload) read for ``key``: ``INTACT`` only if its
    header names ``key`` and ``fingerprint``, its checksum holds and ``encoding`` decoded it into ``out``."""
    header = BlockHeader.unpack(blob)
    payload = memoryview(blob)[HEADER_BYTES:]
    if header is None or not header.verifies(key, fingerprint, payload):
        return CORRUPT
    return encoding.decode_into(payload, out, header.encoding)


class Kept:
    """The blocks a write must not evict: several collections of keys, asked in turn and never copied (a
    prompt's head of thousands of blocks, copied into one set at every block of a ``put_from``, made it
    quadratic)."""

    def __init__(self, *parts: Collection[bytes]):
        self._parts = parts

    def __contains__(self, key: object) -> bool:
        return any(key in part for part in self._parts)


def exact_only(lossy: str | None, tier: str) -> None:
    """``put_keeping``'s ``ValueError`` for approximate bytes given to ``tier``, which stores exact ones only."""
    if lossy is not None:
        raise ValueError(f"lossy: expected None ({tier} takes exact bytes), got {lossy!r}")


def make_directory(path: str | os.PathLike[str], setting: str) -> None:
    """Create directory ``path`` (and its parents) if missing; a ``ValueError`` naming ``setting`` if a file
    or anything else not a directory is there or on the way (``FileExistsError`` named neither), an
    ``OSError`` naming it if the directory cannot be made."""
    try:
        if not os.path.isdir(path):  # mkdir of an existing name still waits on a frozen or hung filesystem
            os.makedirs(path, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"{setting}: expected a directory, got {os.fspath(path)!r}: something that is not a "
                         f"directory is there or on its path") from None
    except OSError as exc:  # a read-only or pseudo filesystem (/proc), another user's directory: named here
        raise OSError(exc.errno, f"{setting} {os.fspath(path)!r}: cannot create it ({exc.strerror})") from None


def check_one_block(layout: KVLayout, capacity_bytes: int, setting: str) -> int:
    """A ``ValueError`` naming ``setting`` unless ``capacity_bytes`` holds one block of ``layout``; else the bytes
    the largest stored block of ``layout`` takes (header and raw bytes)."""
    full = layout.block_bytes + HEADER_BYTES
    if capacity_bytes < full:
        raise ValueError(f"{setting}: expected at least one block ({full} bytes: its header and raw bytes, which "
                         f"a codec's frame of KV it cannot shrink may take), got {capacity_bytes}")
    return full
