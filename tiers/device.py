"""Device (HBM) tier: a slot pool on a torch device, filled and drained on its own CUDA stream.

On CUDA every copy into or out of the pool runs on a dedicated stream:
the copy first waits (on the GPU, not the host) for the engine's current
stream, so the bytes it reads are final, and records an event per slot.
The engine's stream is never blocked by a put or a promotion; a read into a
CUDA tensor makes the engine's stream wait on the copy's event (GPU-side
ordering only), a read into host memory waits for it on the host. Source
tensors on the GPU are kept alive for the side stream with
``record_stream``. All writes into the pool are on the one side stream, so
a slot is never overwritten before an earlier copy out of it has finished.

On a CPU device (machines without a GPU) the very same class runs with
plain synchronous copies, so the tests cover its bookkeeping everywhere.
"""

from __future__ import annotations

import torch

from kvstore.layout import KVLayout
from kvstore.tiers.base import EvictCallback
from kvstore.tiers.slots import SlotTier
from kvstore.tiers.spec import TierSpec


class DeviceTier(SlotTier):
    """Blocks in HBM (or any torch device), in slots of one pool allocated once."""

    name = "device"
    setting = "device_bytes"

    def __init__(self, layout: KVLayout, capacity_bytes: int, device: str | torch.device = "cuda",
                 on_evict: EvictCallback | None = None):
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as error:
            raise ValueError(f"device: expected a torch device such as 'cuda:0' or 'cpu', got {device!r}") from error
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"device: expected a CUDA device to be available for {device}, got none")
            device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        super().__init__(layout, capacity_bytes, device, on_evict=on_evict)
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._events: list[torch.cuda.Event | None] = [None] * self.num_slots

    def _copy_in(self, slot: int, dst: torch.Tensor, block: torch.Tensor) -> None:
        if self._stream is None:
            dst.copy_(block)
            return
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        if block.is_cuda and block.device != self.device:  # the source's writes are ordered on its own device
            self._stream.wait_stream(torch.cuda.current_stream(block.device))
        with torch.cuda.stream(self._stream):
            dst.copy_(block, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._stream)
        self._events[slot] = event
        if block.is_cuda:
            block.record_stream(self._stream)
            # the caller's later kernels (which may overwrite its tensor) wait for the copy on the GPU,
            # never on the host: the stored bytes are those of the put
            torch.cuda.current_stream(block.device).wait_event(event)
        else:
            event.synchronize()  # the caller may reuse its host buffer as soon as put returns

    def _copy_out(self, slot: int, out: torch.Tensor, src: torch.Tensor) -> None:
        if self._stream is None:
            out.copy_(src)
            return
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            out.copy_(src, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._stream)
        if out.is_cuda:
            torch.cuda.current_stream(out.device).wait_event(done)
        else:
            done.synchronize()

    def _ready(self, slot: int) -> None:
        event = self._events[slot]
        if event is not None:
            event.synchronize()


SPEC = TierSpec(
    name="device",
    wanted=lambda config: config.device_bytes > 0,
    build=lambda layout, config: DeviceTier(layout, config.device_bytes, config.device),
    persistent=False,
    bandwidth_prior=20e9,
)
