"""Host-RAM tier: a fixed pool of block-sized slots in (pinned, where CUDA exists) host memory."""

from __future__ import annotations

import torch

from kvstore.layout import KVLayout
from kvstore.tiers.base import EvictCallback
from kvstore.tiers.slots import SlotTier
from kvstore.tiers.spec import TierSpec

__all__ = ["EvictCallback", "HostTier"]


class HostTier(SlotTier):
    """Blocks in host RAM, in slots of one pool allocated once at start.

    The pool is pinned when CUDA is available so copies to and from the GPU
    can run asynchronously (the device tier stages its transfers through it).
    """

    name = "host"
    setting = "host_bytes"

    def __init__(self, layout: KVLayout, capacity_bytes: int, on_evict: EvictCallback | None = None,
                 pin_memory: bool | None = None):
        if pin_memory is None:
            pin_memory = torch.cuda.is_available()
        super().__init__(layout, capacity_bytes, torch.device("cpu"), on_evict=on_evict, pin_memory=pin_memory)


SPEC = TierSpec(
    name="host",
    wanted=lambda config: config.host_bytes > 0,
    build=lambda layout, config: HostTier(layout, config.host_bytes),
    persistent=False,
    bandwidth_prior=10e9,
)
