"""Where the files tier keeps a block: ``<root>/<hex[0:2]>/<hex of key>.kvb``, and the layout before it.

One level of at most 256 fan-out directories. The tier used to keep block
``key`` two levels down (``<root>/<hex[0:2]>/<hex[2:4]>/<hex>.kvb``, up to
65,536 directories), so a fresh tier made a directory for nearly every
block it wrote until it held tens of thousands of blocks; on this VM's
ext4 a ``mkdir`` took 0.75 ms, three times the overwrite of a 2 MiB block,
and a put of 128 such blocks into a fresh tier spent most of its time
there. One level holds a million blocks at about 4,000 names a directory,
which ext4, XFS and NFS look up by hash.

A tier still finds what the old layout holds: a scan (on open, and each
rescan) renames each block file of an old two-level directory up into its
one-level path, on the same filesystem, and removes the emptied directory;
a file it cannot move (a read-only directory) is read where it is. The
first open of a large old directory renames every block file once.
A process of an older kvstore sharing the directory misses the blocks a
newer one moved (a miss, never other bytes) and writes them again where
it looks, and the next scan moves them up again.
"""

from __future__ import annotations

import os

SUFFIX, TEMP_SUFFIX = ".kvb", ".tmp"


def block_path(root: str, key: bytes) -> str:
    """The path of block ``key`` (2 to 32 bytes) under tier directory ``root``."""
    if not 2 <= len(key) <= 32:
        raise ValueError(f"key: expected 2 to 32 bytes, got {len(key)}")
    h = key.hex()
    return os.path.join(root, h[:2], h + SUFFIX)


def is_fanout(entry: os.DirEntry) -> bool:
    """Whether ``entry`` is a two-character fan-out directory (never a symlink to one)."""
    return len(entry.name) == 2 and entry.is_dir(follow_symlinks=False)


def fanout_dirs(path: str) -> list[str]:
    """The two-character fan-out directories directly under ``path``; none if it cannot be read."""
    try:
        with os.scandir(path) as entries:
            return [e.path for e in entries if is_fanout(e)]
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []  # gone, replaced, or another user's and unreadable: holds no block of ours


def entries_of(directory: str) -> list[os.DirEntry]:
    """What ``directory`` holds; nothing if it is gone, replaced or unreadable."""
    try:
        with os.scandir(directory) as it:
            return list(it)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []


def _key_of(name: str) -> bytes | None:
    stem = name[:-len(SUFFIX)]
    try:
        key = bytes.fromhex(stem)
    except ValueError:
        return None
    return key if 2 <= len(key) <= 32 and key.hex() == stem else None


def block_key(directory: str, name: str) -> bytes | None:
    """The key of block file ``name`` in fan-out ``directory``; None if no block's file has that name
    there (a key this tier could not address would break eviction)."""
    key = _key_of(name)
    return key if key is not None and os.path.basename(directory) == name[:2] else None


def old_block_key(directory: str, name: str) -> bytes | None:
    """``block_key`` for the two-level layout (``directory`` is ``<root>/<hex[0:2]>/<hex[2:4]>``)."""
    key = _key_of(name)
    level1, level2 = os.path.split(directory)
    return key if key is not None and (os.path.basename(level1), level2) == (name[:2], name[2:4]) else None
