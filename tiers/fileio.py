"""The files tier's low-level file operations: vectored reads and writes, checksummed reads in pieces,
removals that never follow a symlink nor remove another file put in place, and the errors that say why.

The directory is shared and untrusted (``tiers/files.py``): these helpers
judge what stands at a path without following, waiting on or reading it.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import stat
import time
from collections.abc import Callable, Sequence

import xxhash

ALIGN = 4096  # O_DIRECT alignment of buffers, file offsets and lengths, bytes
MAX_IOVECS = 512  # pieces of one preadv/pwritev (the kernel's limit is 1024, with the header and a spare)
GONE = (errno.ENOENT, errno.ESTALE)  # ESTALE: deleted by another NFS client
# The directory is shared, so whatever sits at a block's path is untrusted: never follow a symlink there
# (ELOOP), never wait on a FIFO (O_NONBLOCK), never take a terminal; then fstat must show a regular file.
READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
# open() of something at a block's path that is no block file: a symlink (ELOOP; EMLINK on the BSDs), a
# socket (ENXIO), a device node without a driver (ENODEV).
NOT_A_FILE = (errno.ELOOP, errno.EMLINK, errno.ENXIO, errno.ENODEV)
# open() that finds no block there: a fan-out directory is a file (ENOTDIR), or another process holds a
# lease on the file (EAGAIN: O_NONBLOCK instead of waiting for it).
NO_FILE = (*GONE, errno.ENOTDIR, errno.EAGAIN)
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)  # a full filesystem, or the writer's quota
STAMP_REFUSED = (errno.EROFS, errno.EACCES, errno.EPERM)  # atime stamp on a read-only or foreign file
HASH_PIECE_BYTES = 4 << 20  # a raw payload is read and checksummed this much at a time, while it is in cache


def chain_stamps(n: int) -> list[int]:
    """File times (ns) for a chain of ``n`` blocks written or read in order: now, the first the newest.

    A file's mtime is the directory's access stamp, shared by every process;
    a scan evicts the oldest first. Stamped in the order written or read, a
    prompt's head was the oldest of its blocks, so after a restart or in
    another process the head went first and the blocks kept behind it were
    ones no lookup reaches (a prefix is read from its first block).
    """
    now = time.time_ns()
    return [now + n - i for i in range(n)]


def round_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def transfer(call: Callable[[int, list, int], int], fd: int, buffers: Sequence[object], offset: int = 0,
              nbytes: int | None = None) -> int:
    """``os.preadv``/``os.pwritev`` ``buffers`` from file ``offset`` until done or end of file; bytes moved.

    ``nbytes``: their total, where the caller knows it. Then the first call
    takes ``buffers`` as they are, and only a short transfer pays for a byte
    view of each (the 66 of a 2 MiB block cost about 10 us a block).
    """
    done = 0
    if nbytes is not None:
        done = call(fd, buffers, offset)
        if done >= nbytes or done == 0:
            return done
    views = [v for v in (memoryview(b).cast("B") for b in buffers) if v.nbytes]
    moved = done
    while True:
        while moved and views:  # drop what has been moved
            if moved >= views[0].nbytes:
                moved -= views.pop(0).nbytes
            else:
                views[0], moved = views[0][moved:], 0
        if not views:
            return done
        moved = call(fd, views, offset + done)
        if moved == 0:
            return done
        done += moved


def read_hashed(fd: int, header: bytearray, views: Sequence[memoryview], tail: list[bytearray],
                 digest: "xxhash.xxh3_64", nbytes: int) -> int:
    """``header``, ``views`` (``nbytes`` in all) and ``tail`` read from the file's start in pieces of about
    ``HASH_PIECE_BYTES``, each piece of ``views`` checksummed as soon as it is in; bytes read, up to the
    first short read.

    A piece is checksummed while it is still in the CPU's cache: checksumming
    a 32 MiB block after reading it all read it from memory a second time
    (256 MiB of such blocks read through a store: 26-31 ms before, 24-27 ms
    after, three alternating runs). A 2 MiB block is one piece, and its
    views are not cut (cutting 64 views cost 26 us a block). A piece that
    ends where the file does (the tail byte not read, as it must not be) is
    whole: asking again to learn that cost a second ``preadv`` a block and
    a byte view of each of its buffers.
    """
    parts = nbytes // HASH_PIECE_BYTES
    pieces = split_views(views, parts) if parts > 1 else [views]
    last = len(pieces) - 1
    total = 0
    for n, piece in enumerate(pieces):
        before, after = [header] if n == 0 else [], tail if n == last else []
        buffers = [*before, *piece, *after]
        wanted = sum(map(len, before)) + (nbytes if last == 0 else sum(view.nbytes for view in piece))
        got = transfer(os.preadv, fd, buffers, total, wanted)  # the tail byte, if read, shows a longer file
        total += got
        for view in piece:
            digest.update(view)
        if got < wanted:
            break
    return total


def split_views(views: Sequence[memoryview], parts: int) -> list[list[memoryview]]:
    """``views`` cut into ``parts`` runs of about equal bytes, in order (a view may be cut in two)."""
    total = sum(view.nbytes for view in views)
    ends = [(n + 1) * total // parts for n in range(parts)]  # where each run ends, in bytes
    groups: list[list[memoryview]] = [[] for _ in range(parts)]
    at = group = 0
    for view in views:
        while view.nbytes:
            while at >= ends[group]:
                group += 1
            take = min(view.nbytes, ends[group] - at)
            groups[group].append(view[:take])
            view, at = view[take:], at + take
    return [group for group in groups if group]


def process_scope() -> str:
    """This host and PID namespace, as temp file names carry it: a writer's pid is judged alive or dead only
    by a process of both. Containers of one node share its hostname (host networking) but not their pids:
    one's cleanup at open removed another's temp files as it wrote them, and that writer's tier was blamed."""
    host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "host"
    try:
        return f"{host}.pidns{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:  # no /proc (another platform): the hostname alone
        return host


def unlink_file(path: str, same: os.stat_result | None = None) -> bool:
    """Remove ``path`` if it is a regular file (and the inode of ``same``, if given); False if it was
    already gone (another process may have removed it) or is something else: a directory is never
    removed, and a symlink is not followed."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        if exc.errno in GONE or exc.errno == errno.ENOTDIR:
            return False
        raise
    if not stat.S_ISREG(st.st_mode):
        return False
    if same is not None and (st.st_dev, st.st_ino) != (same.st_dev, same.st_ino):
        return False  # a writer has renamed a new file over it since
    try:
        os.unlink(path)
    except OSError as exc:
        if exc.errno in GONE or exc.errno == errno.EISDIR:  # EISDIR: swapped for a directory meanwhile
            return False
        raise
    return True


def same_file(path: str, st: os.stat_result) -> bool:
    """Whether ``path`` is still the file ``st`` describes (not renamed away, replaced or removed)."""
    try:
        now = os.lstat(path)
    except OSError:
        return False
    return (now.st_ino, now.st_dev) == (st.st_ino, st.st_dev)


def vanished(path: str) -> bool:
    """Whether nothing is at ``path`` any more."""
    try:
        os.lstat(path)
    except OSError as exc:
        return exc.errno in GONE
    return False


def squatted(path: str) -> bool:
    """True if something other than a regular file is at ``path`` (False if nothing, or unknown)."""
    try:
        return not stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
