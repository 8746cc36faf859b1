"""Checks of a caller's arguments, made before any tier is touched.

A bad argument is the caller's error: a ``ValueError`` naming what was
expected and what came, raised before the store reads or writes anything,
so no tier is ever blamed (and bypassed) for it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from kvstore.layout import KVLayout

_FOREVER_SECONDS = 10 * 365 * 86400.0  # ten years: past it, a wait is a wait until done


def check_timeout(timeout: object, name: str = "timeout") -> float | None:
    """A wait's ``timeout`` in seconds: None (or longer than ten years: ``Condition.wait`` overflows) waits until
    done; a bool, a non-number or NaN is a ``ValueError`` (a string waited for ever, or raised a ``TypeError``
    only when there was something to wait for)."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or math.isnan(timeout):
        raise ValueError(f"{name}: expected seconds (a number) or None, got {timeout!r}")
    return None if timeout > _FOREVER_SECONDS else float(timeout)


def check_device(device: object) -> torch.device:
    """``device`` (a ``torch.device`` or a string such as ``"cpu"``, ``"cuda:0"``) as a usable torch device."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device: expected a torch device such as 'cpu' or 'cuda:0', got {device!r}") from None
    if parsed.type == "meta":
        raise ValueError("device: expected a device that holds data, got 'meta'")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: expected an available device, got {device!r} on a machine without CUDA")
    if parsed.type not in ("cpu", "cuda"):  # xla, mps, privateuseone...: usable only if a tensor can live there
        try:
            torch.empty(0, device=parsed)
        except Exception as error:  # each backend fails its own way (NotImplementedError, ModuleNotFoundError)
            raise ValueError(f"device: expected an available device, got {device!r} ({type(error).__name__}: "
                             f"{' '.join(str(error).split())[:200]})") from None
    return parsed


def may_overlap(tensor: torch.Tensor) -> bool:
    """Whether two elements of ``tensor`` may share memory, judged by its sizes and strides alone.

    Dimensions taken by increasing stride must each step past all that the
    smaller ones reach; a layout that interleaves dimensions without
    overlapping also fails this, and is refused as an output too.
    """
    reach = 1  # elements' offsets the dimensions so far span, plus one
    for stride, size in sorted((st, sz) for sz, st in zip(tensor.shape, tensor.stride()) if sz > 1):
        if stride < reach:
            return True
        reach += (size - 1) * stride
    return False


def check_out(layout: KVLayout, out: torch.Tensor, num_tokens: int, name: str = "out") -> None:
    """``out`` must be a writable ``[L, P, num_tokens, H, D]`` tensor of the layout's dtype, whose elements
    are each their own memory: a copy into an expanded or self-overlapping ``out`` raised inside every tier,
    which was then blamed and bypassed, and the files tier deleted the good block it had read as damaged."""
    layout.check_kv(out, num_tokens, name)
    if out.is_inference() and not torch.is_inference_mode_enabled():
        raise ValueError(f"{name}: expected a tensor writable here, got an inference tensor (made under "
                         f"torch.inference_mode()) outside inference mode")
    if out.requires_grad:
        raise ValueError(f"{name}: expected a tensor that does not require grad (the store writes into it), "
                         f"got one with requires_grad=True")
    if out.numel() and may_overlap(out):
        raise ValueError(f"{name}: expected a tensor whose elements do not share memory, got sizes "
                         f"{list(out.shape)} with strides {list(out.stride())}")


_MOST_RUNS = 1 << 20  # past this many contiguous runs in all, outs are not compared (a check costs no more)


def _run_dims(tensor: torch.Tensor) -> tuple[list[tuple[int, int]], int]:
    """The (size, stride) of ``tensor``'s dimensions outside its innermost contiguous run, and the run's
    length in elements (a KV block's token range of a larger buffer: a run per layer and part)."""
    dims = [(size, stride) for size, stride in zip(tensor.shape, tensor.stride()) if size > 1]
    run = 1
    while dims and dims[-1][1] == run:
        run *= dims.pop()[0]
    return dims, run


def check_disjoint(outs: Sequence[torch.Tensor], name: str = "outs") -> None:
    """A ``ValueError`` if two of ``outs`` share memory: each would be read into in turn, the later block's
    bytes left in both, and both counted read (``get_keyed(names, [buf, buf])`` returned 2 with page b's KV
    in the out for page a). Views of one buffer that do not overlap (its blocks' token ranges) are fine.
    Each out alone must already hold its own memory (``check_out``): two runs that meet are then two outs'.

    Sorted and compared with numpy: a Python loop over the runs took 6.7 ms for 128 pages of 64 runs each
    (an SGLang prefetch into its layer-first host pool), on the read's path."""
    by_storage: dict[tuple[str, int], list[int]] = {}
    for index, out in enumerate(outs):
        if out.numel():
            by_storage.setdefault((str(out.device), out.untyped_storage().data_ptr()), []).append(index)
    for indices in by_storage.values():
        shapes = {index: _run_dims(outs[index]) for index in indices}
        if len(indices) < 2 or sum(math.prod(size for size, _ in dims) for dims, _ in shapes.values()) > _MOST_RUNS:
            continue
        firsts, ends, owners = [], [], []  # each run's first byte from the storage's start, past its last, out
        for index, (dims, run) in shapes.items():
            starts = np.zeros(1, dtype=np.int64)
            for size, stride in dims:
                starts = (starts[:, None] + np.arange(size, dtype=np.int64) * stride).reshape(-1)
            element = outs[index].element_size()
            first = (starts + outs[index].storage_offset()) * element
            firsts.append(first)
            ends.append(first + run * element)
            owners.append(np.full(first.size, index))
        order = np.argsort(np.concatenate(firsts), kind="stable")
        first, end, owner = (np.concatenate(parts)[order] for parts in (firsts, ends, owners))
        reach = np.maximum.accumulate(end)  # past the last byte of every run up to each
        clash = np.flatnonzero(first[1:] < reach[:-1])  # a run starting inside an earlier one
        if clash.size:
            at = int(clash[0]) + 1
            holder = int(owner[np.argmax(end[:at])])
            raise ValueError(f"{name}: expected buffers that share no memory, got {name}[{holder}] and "
                             f"{name}[{int(owner[at])}] over the same bytes")


def check_counts(settings: object, names: Iterable[str], least: int = 1) -> None:
    """A ``ValueError`` naming the first of ``settings``' fields ``names`` that is not an integer >= ``least``
    (a bool is not a count)."""
    for name in names:
        value = getattr(settings, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name}: expected an integer >= {least}, got {value!r}")
