"""The identity of a LoRA adapter's files, for the keys of the requests that use it.

vLLM names an adapter by its name and path, and so did the keys: an adapter
retrained and saved to the same path (a fine-tuning loop's usual shape) was
served the KV the old adapter computed, from tiers that outlive the engine
(LMDB, the files tier, the cache server). The digest of the adapter's files
goes into the keys instead; it is read again only when a file's size or
modification time changes, and is the same on every machine holding the
same files, so engines on other nodes still share the adapter's KV.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict

import xxhash

log = logging.getLogger(__name__)

MAX_ADAPTERS = 256  # adapters whose digest is remembered (the least recently used forgotten first)
MAX_FILES = 4096  # files of one adapter folder looked at; a folder with more is not digested
_CHUNK_BYTES = 8 << 20


class AdapterDigests:
    """A bounded, thread-safe memo of adapter folders' content digests, checked against their files' stats."""

    def __init__(self, max_adapters: int = MAX_ADAPTERS):
        if max_adapters < 1:
            raise ValueError(f"max_adapters: expected >= 1, got {max_adapters}")
        self._max = max_adapters
        self._memo: OrderedDict[str, tuple[tuple, str]] = OrderedDict()  # path -> (files' stats, digest)
        self._lock = threading.Lock()

    def digest(self, path: str | None) -> str | None:
        """The digest of the files at ``path`` (a folder or a file), or None where it is no local path (a hub
        name the workers resolve) or cannot be read: the keys then name the adapter by name and path only."""
        if not path or not isinstance(path, str):
            return None
        files = _files(path)
        if files is None:
            return None
        stats = tuple((name, st.st_size, st.st_mtime_ns) for name, _, st in files)
        with self._lock:
            known = self._memo.get(path)
            if known is not None and known[0] == stats:
                self._memo.move_to_end(path)
                return known[1]
        digest = _content_digest(files)
        if digest is None:
            return None
        with self._lock:
            self._memo[path] = (stats, digest)
            self._memo.move_to_end(path)
            while len(self._memo) > self._max:
                self._memo.popitem(last=False)
        return digest


def _files(path: str) -> list[tuple[str, str, os.stat_result]] | None:
    """(name relative to ``path``, full path, stat) of each regular file at ``path``, sorted by name."""
    try:
        if os.path.isfile(path):
            return [(os.path.basename(path), path, os.stat(path))]
        if not os.path.isdir(path):
            return None
        found = []
        for folder, dirs, names in os.walk(path):
            dirs.sort()
            for name in names:
                full = os.path.join(folder, name)
                st = os.stat(full)
                if os.path.isfile(full):
                    found.append((os.path.relpath(full, path), full, st))
                if len(found) > MAX_FILES:
                    log.warning("LoRA adapter %s: more than %d files; keyed by its name and path only", path,
                                MAX_FILES)
                    return None
        return sorted(found, key=lambda item: item[0])
    except OSError:
        return None


def _content_digest(files: list[tuple[str, str, os.stat_result]]) -> str | None:
    """xxh3-128 of each file's name, size and bytes, in order; None if one cannot be read."""
    h = xxhash.xxh3_128()
    try:
        for name, full, st in files:
            h.update(f"\0{name}\0{st.st_size}\0".encode())
            with open(full, "rb") as handle:
                while chunk := handle.read(_CHUNK_BYTES):
                    h.update(chunk)
    except OSError:
        return None
    return h.hexdigest()
