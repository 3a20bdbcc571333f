"""How calibrations time a call: ``back_to_back_seconds`` for expert calls (the tables, the
self-calibration and bench_experts alike), ``median_seconds`` for link and pipeline timings."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Tuple

import torch
import torch.distributed as dist


# Calls per back-to-back sample: a few, so a host-bound backend cannot hide its issue time
# behind a queue filled before the sample started.
BACK_TO_BACK_CALLS = 3


def back_to_back_seconds(
    fn: Callable[[int], object], device: torch.device, calls: int = BACK_TO_BACK_CALLS,
    first_index: int = 0,
) -> Tuple[float, object]:
    """Seconds per call of ``fn(first_index + i)`` for ``calls`` calls issued back to back from
    an idle device, and the last call's output.

    That is the larger of the host's issue time and the device's time, as a forward pays it.
    Events around each call of a backed-up queue would time the GPU alone; events around each
    call of a host-bound one would count the host's gaps inside the call but not between calls
    (at 8 tokens/expert the triton backend's kernels took 236 us per call and its host 393 us;
    benchmarks/results/experts/trace_expert_point_dsv2_ep8_8.json).
    """
    out = None
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(calls):
            out = fn(first_index + i)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / calls, out
    t0 = time.perf_counter()
    for i in range(calls):
        out = fn(first_index + i)
    return (time.perf_counter() - t0) / calls, out


def median_seconds(
    fn: Callable[[], object],
    device: torch.device,
    repeats: int = 10,
    warmup: int = 3,
    group=None,
) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls.

    CUDA events around each call on a GPU, the host clock on CPU. With a process ``group`` of
    more than one rank the ranks start each call together (a barrier) and the result is the
    slowest rank's median: a collective is over when its last rank is.
    """
    together = group is not None and dist.is_initialized() and dist.get_world_size(group) > 1
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    samples = []
    for _ in range(repeats):
        if together:
            dist.barrier(group)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    median = statistics.median(samples)
    if together:
        worst = torch.tensor([median], dtype=torch.float64, device=device)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=group)
        median = float(worst.item())
    return median


def fit_line(xs, ys):
    """Theil-Sen line (median of the pairwise slopes): one noisy timing cannot swing it.
    Returns (slope, intercept)."""
    pairs = [(ys[j] - ys[i]) / (xs[j] - xs[i]) for i in range(len(xs)) for j in range(i + 1, len(xs))
             if xs[j] != xs[i]]
    if not pairs:
        raise ValueError("need at least two distinct x values to fit a line")
    slope = statistics.median(pairs)
    intercept = statistics.median(y - slope * x for x, y in zip(xs, ys))
    return float(slope), float(intercept)


def fit_latency_bandwidth(points):
    """Least-squares fit of t = a + b * x over (x bytes, t seconds); returns (a s, 1/b B/s)."""
    n = len(points)
    if n < 2:
        raise ValueError("need at least two message sizes to fit latency and bandwidth")
    mean_x = sum(x for x, _ in points) / n
    mean_t = sum(t for _, t in points) / n
    var_x = sum((x - mean_x) ** 2 for x, _ in points)
    cov = sum((x - mean_x) * (t - mean_t) for x, t in points)
    if var_x == 0:
        raise ValueError("need at least two distinct message sizes to fit latency and bandwidth")
    slope = cov / var_x
    intercept = mean_t - slope * mean_x
    if slope <= 0:
        raise ValueError(f"non-positive time per byte ({slope}); timings too noisy to fit")
    return max(intercept, 0.0), 1.0 / slope
