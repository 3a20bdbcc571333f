"""Small host arrays to the GPU without a host sync.

A forward stages a few host-computed arrays (expert row offsets, each expert's first routed
row) on the host's critical path before the first expert GEMM. ``tensor.pin_memory()`` on a
pageable tensor checks the pointer, allocates and copies before the device copy is queued; here
the values are written once, straight into a block of torch's pinned host cache. That cache
keeps the block from reuse until the non-blocking copy that read it has run, so the host never
waits and never overwrites a pending copy.
"""

from __future__ import annotations

import numpy as np
import torch


def to_device(values, device: torch.device, dtype=None) -> torch.Tensor:
    """``values`` (a numpy array or a sequence of numbers, cast to ``dtype`` if given) as a
    tensor on ``device``, copied on the current stream without blocking the host; elsewhere
    than on a GPU a host tensor that does not share memory with ``values``."""
    array = np.asarray(values, dtype=dtype)
    device = torch.device(device)
    if device.type != "cuda":
        return torch.from_numpy(array.copy())
    host = torch.empty(array.shape, dtype=torch.from_numpy(array[:0].reshape(-1)).dtype,
                       pin_memory=True)
    if array.size:
        host.numpy()[...] = array
    return host.to(device, non_blocking=True)
