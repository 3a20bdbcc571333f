"""Overlap efficiency of one forward from a torch.profiler trace: transfer time hidden under
compute kernels / transfer time.

Transfers are the copy-engine copies (``gpu_memcpy`` events) and NCCL's kernels; compute is
every other kernel. A transfer instant counts as hidden when some compute kernel runs at the
same instant on another stream. Times are unions of intervals, so overlapping transfers are not
counted twice.
"""

from __future__ import annotations

import json
from typing import Iterable, List, Tuple

Interval = Tuple[float, float]


def union(intervals: Iterable[Interval]) -> List[Interval]:
    merged: List[Interval] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def length(intervals: Iterable[Interval]) -> float:
    return sum(end - start for start, end in intervals)


def intersect(a: List[Interval], b: List[Interval]) -> List[Interval]:
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if start < end:
            out.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def overlap_from_trace(path: str) -> dict:
    """{"transfer_us", "hidden_us", "efficiency", "compute_us", "span_us"} of a chrome trace."""
    with open(path) as f:
        events = json.load(f).get("traceEvents", [])
    transfers, compute = [], []
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        cat, name = e.get("cat", ""), e.get("name", "")
        interval = (float(e["ts"]), float(e["ts"]) + float(e["dur"]))
        if cat == "gpu_memcpy" or (cat == "kernel" and "nccl" in name.lower()):
            transfers.append(interval)
        elif cat == "kernel":
            compute.append(interval)
    t, c = union(transfers), union(compute)
    hidden = length(intersect(t, c))
    total = length(t)
    span = (max(i[1] for i in t + c) - min(i[0] for i in t + c)) if t or c else 0.0
    return {
        "transfer_us": total,
        "hidden_us": hidden,
        "efficiency": hidden / total if total else None,
        "compute_us": length(c),
        "span_us": span,
        "transfers": len(transfers),
    }
