"""Checks of a caller's arguments, made before any tier is touched.

A bad argument is the caller's error: a ``ValueError`` naming what was
expected and what came, raised before the store reads or writes anything,
so no tier is ever blamed (and bypassed) for it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

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


def check_counts(settings: object, names: Iterable[str], least: int = 1) -> None:
    """A ``ValueError`` naming the first of ``settings``' fields ``names`` that is not an integer >= ``least``
    (a bool is not a count)."""
    for name in names:
        value = getattr(settings, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name}: expected an integer >= {least}, got {value!r}")
