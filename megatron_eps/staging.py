"""Small host arrays to the GPU without a host sync and without pinning memory per call.

A forward stages a few host-computed arrays (expert row offsets, each expert's first routed
row) on the host's critical path before the first expert GEMM. ``tensor.pin_memory().to(device,
non_blocking=True)`` allocates and registers a pinned block and copies twice for each of them;
a ring of pinned slots that are reused once their copy has run costs one host copy and one
asynchronous host-to-device copy.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import torch

# Slots per device: a slot is reused after ``SLOTS - 1`` later stagings, by when its copy has
# long run (a copy not yet run is waited for, never overwritten).
SLOTS = 16


class PinnedRing:
    """Reusable pinned host slots for one CUDA device, each guarded by the event of its copy."""

    def __init__(self, device: torch.device, slots: int = SLOTS):
        self.device = device
        self._buffers: List[Optional[torch.Tensor]] = [None] * slots
        self._copied: List[Optional[torch.cuda.Event]] = [None] * slots
        self._next = 0

    def to_device(self, values: np.ndarray) -> torch.Tensor:
        """A device tensor with ``values`` (any numeric numpy array), copied on the current
        stream without blocking the host."""
        values = np.ascontiguousarray(values)
        slot = self._next
        self._next = (slot + 1) % len(self._buffers)
        if self._copied[slot] is not None:
            self._copied[slot].synchronize()  # done long ago in practice: returns at once
        buffer = self._buffers[slot]
        if buffer is None or buffer.numel() < values.nbytes:
            size = max(values.nbytes, 2 * (buffer.numel() if buffer is not None else 256))
            buffer = torch.empty(size, dtype=torch.uint8, pin_memory=True)
            self._buffers[slot] = buffer
        host = buffer[: values.nbytes].numpy()
        host[:] = values.reshape(-1).view(np.uint8)
        dtype = torch.from_numpy(values[:0]).dtype
        out = torch.empty(values.shape, dtype=dtype, device=self.device)
        out.view(-1).view(torch.uint8).copy_(buffer[: values.nbytes], non_blocking=True)
        event = self._copied[slot] or torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self._copied[slot] = event
        return out


_RINGS: Dict[torch.device, PinnedRing] = {}


def to_device(values, device: torch.device, dtype=None) -> torch.Tensor:
    """``values`` (a numpy array or a sequence of numbers) as a tensor on ``device``: on a GPU
    through the device's pinned ring (no host sync), elsewhere a plain host tensor."""
    array = np.asarray(values, dtype=dtype)
    device = torch.device(device)
    if device.type != "cuda":
        return torch.from_numpy(array.copy())
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    ring = _RINGS.get(device)
    if ring is None:
        ring = _RINGS[device] = PinnedRing(device)
    if array.size == 0:
        return torch.empty(array.shape, dtype=torch.from_numpy(array[:0]).dtype, device=device)
    return ring.to_device(array)
