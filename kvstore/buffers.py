"""Large host buffers that cost no more than the bytes written into them.

A fresh ``bytearray`` or ``torch.empty`` of tens of MiB faults in every
4 KiB page on first touch (on a shared VM about 2 us a page: 17-20 ms for
32 MiB, more than copying the bytes). numpy asks the kernel for transparent
huge pages on large arrays and does not zero-fill, so buffers a request
allocates (a staging area, a received blob) come from here.
"""

from __future__ import annotations

import math
import threading
import weakref

import numpy as np
import torch

# From this size up, buffers come from numpy (below it the allocator's reuse is cheaper).
LARGE_BYTES = 1 << 20


def alloc_bytes(num_bytes: int) -> bytearray | memoryview:
    """A writable, uninitialised buffer of ``num_bytes`` (a ``bytearray`` when small)."""
    if num_bytes < LARGE_BYTES:
        return bytearray(num_bytes)
    return memoryview(np.empty(num_bytes, dtype=np.uint8)).cast("B")


def empty_host(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype)`` on the CPU, from huge pages when it is large."""
    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    if nbytes < LARGE_BYTES:
        return torch.empty(shape, dtype=dtype)
    return torch.from_numpy(np.empty(nbytes, dtype=np.uint8)).view(dtype).view(shape)


IOV_MAX = 512  # buffers per ``sendmsg`` (Linux allows 1024)


def byte_view(part: bytes | bytearray | memoryview) -> memoryview:
    """A flat unsigned-byte view of ``part`` (no copy; no new view when it already is one)."""
    view = part if isinstance(part, memoryview) else memoryview(part)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def after_sent(views: list[memoryview], sent: int) -> list[memoryview]:
    """What is left of ``views`` (in order) once a scatter-gather send took their first ``sent`` bytes."""
    first = 0
    while first < len(views) and sent >= views[first].nbytes:
        sent -= views[first].nbytes
        first += 1
    rest = views[first:]
    if sent:
        rest[0] = rest[0][sent:]
    return rest


def writable_bytes(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory (no copy).

    Flattened with ``as_strided``: ``view(-1)`` keeps the stride of a
    one-element tensor's last dimension, which the byte view then refused.
    """
    return memoryview(tensor.as_strided((tensor.numel(),), (1,)).view(torch.uint8).numpy()).cast("B")


def _viewable(out: torch.Tensor) -> bool:
    """Whether each (layer, part) of ``out`` ([L, P, tokens, H, D]) is contiguous CPU memory holding its values
    as they are (a negated or conjugated view's memory holds other values, and numpy refuses it)."""
    if out.device.type != "cpu" or out.dim() != 5 or out.is_neg() or out.is_conj():
        return False
    if out.is_contiguous():
        return True
    _, _, tokens, heads, dim = out.shape
    return out.stride(4) == 1 and out.stride(3) == dim and (tokens <= 1 or out.stride(2) == heads * dim)


def payload_view_count(out: torch.Tensor) -> int | None:
    """How many views ``payload_views(out)`` gives (None where it gives None), without making them.

    A block store that writes on other threads checks here and makes the
    views there, just before they are written: 128 blocks' 64 views each,
    made up front, lived through two garbage collections and so reached the
    oldest generation, whose full collections (70 ms each with torch
    imported, holding the GIL) then ran every few puts of 256 MiB.
    """
    if not _viewable(out):
        return None
    return 1 if out.is_contiguous() else out.shape[0] * out.shape[1]


def payload_views(out: torch.Tensor) -> list[memoryview] | None:
    """Byte views of ``out`` ([L, P, tokens, H, D] on the CPU) in raw-payload order, one per (layer, part).

    A token range of a larger buffer is strided, but each (layer, part) of
    it is contiguous: a raw block can be read from the socket straight into
    it, or sent from where it lies. None if ``out`` is not laid out that way.
    The views are slices of one flat byte view spanning ``out``'s storage
    (a slice is a tenth of a microsecond; a numpy row view or a torch slice
    per view costs one to several): a block store makes this call per block,
    and on a thread competing for the GIL with its I/O threads.
    """
    if not _viewable(out):
        return None
    if out.is_contiguous():
        return [writable_bytes(out)]
    layers, parts, tokens, heads, dim = out.shape
    if out.numel() == 0:
        return [memoryview(bytearray())] * (layers * parts)  # writable, as a read into them needs
    size = out.element_size()
    row = tokens * heads * dim * size
    layer_step, part_step = out.stride(0) * size, out.stride(1) * size
    span = (layers - 1) * layer_step + (parts - 1) * part_step + row
    flat = torch.empty(0, dtype=torch.uint8).set_(out.untyped_storage(), out.storage_offset() * size, (span,), (1,))
    base = memoryview(flat.numpy())  # holds the storage alive, as the views do
    starts = [layer * layer_step + part * part_step for layer in range(layers) for part in range(parts)]
    return [base[start:start + row] for start in starts]


class BufferPool:
    """Keeps released large host buffers for the next request instead of handing them back to the kernel.

    A fresh buffer, even from huge pages, is zero-filled by the kernel on
    first touch: for a 64 MiB layer-wise staging area that costs as much as
    the copy it stages. ``take`` reuses an idle buffer of at least the
    bytes asked for (and at most twice, so a small request does not pin a
    large one); ``give`` keeps a buffer while the idle total stays within
    ``max_idle_bytes``, dropping the oldest idle ones past it. Only what is
    idle is bounded here: buffers in use belong to their requests.
    """

    def __init__(self, max_idle_bytes: int):
        if isinstance(max_idle_bytes, bool) or not isinstance(max_idle_bytes, int) or max_idle_bytes < 0:
            raise ValueError(f"max_idle_bytes: expected an integer >= 0, got {max_idle_bytes!r}")
        self.max_idle_bytes = max_idle_bytes
        self._idle: list[np.ndarray] = []  # oldest first
        # data_ptr -> the buffer behind a taken tensor; weak, so a tensor never given back is simply freed
        self._lent: weakref.WeakValueDictionary[int, np.ndarray] = weakref.WeakValueDictionary()
        self._lock = threading.Lock()

    @property
    def idle_bytes(self) -> int:
        with self._lock:
            return sum(buf.nbytes for buf in self._idle)

    def take(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised CPU tensor of ``shape`` and ``dtype``; give it back with ``give`` when done."""
        nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        if nbytes < LARGE_BYTES:
            return torch.empty(shape, dtype=dtype)
        with self._lock:
            fits = [b for b in self._idle if nbytes <= b.nbytes <= 2 * nbytes]
            buf = min(fits, key=lambda b: b.nbytes) if fits else None
            if buf is not None:
                self._idle = [b for b in self._idle if b is not buf]
        if buf is None:
            buf = np.empty(nbytes, dtype=np.uint8)
        tensor = torch.from_numpy(buf[:nbytes]).view(dtype).view(shape)
        with self._lock:
            self._lent[tensor.data_ptr()] = buf
        return tensor

    def give(self, tensor: torch.Tensor) -> None:
        """Return a tensor from ``take`` (its views must no longer be used); anything else is ignored."""
        with self._lock:
            buf = self._lent.pop(tensor.data_ptr(), None)
            if buf is None or buf.nbytes > self.max_idle_bytes:
                return
            self._idle.append(buf)
            total = sum(b.nbytes for b in self._idle)
            while total > self.max_idle_bytes:
                total -= self._idle.pop(0).nbytes

    def clear(self) -> None:
        """Drop every idle buffer."""
        with self._lock:
            self._idle = []
