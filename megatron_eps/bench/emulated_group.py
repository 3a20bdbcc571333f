"""The cost model's view of a single GPU that emulates one rank of an expert-parallel group.

The link emulator runs a layer at ep_size 1 and makes its all-to-alls cost what rank 0 of a
group of G ranks would send (``(G - 1) / G`` of its rows). The cost model charges the link for
rows that cross between ranks, so it sees the same traffic through the count matrix of that
group: G ranks that all route like this one, each receiving what this GPU computes.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from megatron_eps.policy.cost_model import LayerShape


def emulated_group_counts(counts: np.ndarray, group_size: int) -> np.ndarray:
    """[G, G * E] counts of a group whose ranks each route ``counts`` ([1, E]) spread evenly over
    the G ranks: every rank computes exactly ``counts`` rows per local expert, and sends
    (G - 1) / G of its rows to the others (to within one row per pair)."""
    counts = np.asarray(counts, dtype=np.int64).reshape(-1)
    g = int(group_size)
    out = np.zeros((g, g, counts.size), dtype=np.int64)  # [src, dst, local expert]
    base, extra = np.divmod(counts, g)
    out += base
    for expert, remainder in enumerate(extra):
        for k in range(int(remainder)):
            out[(expert + k) % g, :, expert] += 1
    return out.reshape(g, g * counts.size)


def emulated_group_shape(shape: LayerShape, group_size: int) -> LayerShape:
    """``shape`` (ep_size 1) as one rank of a group of ``group_size`` ranks."""
    return dataclasses.replace(shape, ep_size=int(group_size))
