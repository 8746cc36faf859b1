"""Manners for kvstore's background threads: they leave the cores to the engine's threads.

A write-behind worker encodes and copies blocks while the engine prefills
the next request. On a machine with few cores it slowed that prefill in two
ways (the no-reuse workload's first pass, ec4 disk tier, 2 cores):

- Priority: the scheduler shares a core equally between runnable threads of
  the same nice value. A niced thread gets what the engine leaves.
- torch's intra-op threads: a torch op on a new thread runs on an OpenMP
  team of its own, as many threads as cores, whose threads spin after each
  op on the cores the engine's own team needs. A background thread's ops
  run on that thread alone.
"""

from __future__ import annotations

import ctypes
import os
import threading

import torch

# Nice value added to a background thread (Linux: per-thread).
BACKGROUND_NICENESS = 10


def lower_priority() -> None:
    """Lower the calling thread's scheduling priority by ``BACKGROUND_NICENESS``, where the OS allows it."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICENESS)
    except (AttributeError, OSError):
        pass  # not Linux, or not permitted: the thread keeps its priority


def single_threaded_torch() -> None:
    """Make torch's CPU ops on the calling thread use this thread alone; other threads keep theirs.

    ``torch.set_num_threads`` cannot do it: it also sets the count every
    thread started later begins with (an engine's threads included). The
    OpenMP thread count is a per-thread setting; torch sets it once, on a
    thread's first parallel op, so it is asked first and then lowered.
    Without an OpenMP runtime (a build on torch's own pool) nothing changes.
    """
    torch.get_num_threads()
    try:
        set_threads = ctypes.CDLL(None).omp_set_num_threads
    except (AttributeError, OSError):
        return
    set_threads(1)


def become_background_worker() -> None:
    """Called first by a thread that encodes or copies blocks in the background."""
    lower_priority()
    single_threaded_torch()
