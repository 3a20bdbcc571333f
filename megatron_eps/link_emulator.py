"""A stand-in for a multi-GPU link on one GPU, for benchmarks only (never for correctness).

``EmulatedLinkAllToAll`` does the local data movement an all-to-all of one rank would do
(``output`` rows from ``input`` rows: with ep_size 1 the splits are a single block, so it is a
copy) and then keeps the *current stream* (the pipeline's comm stream) busy for the modeled link
time ``remote bytes / bandwidth + latency`` with ``torch.cuda._sleep``: a one-block spin kernel,
so like NCCL it occupies the stream and a sliver of the SMs while the GEMMs keep the rest.

Emulating rank 0 of an EP group of size G on one GPU: run the layer with ep_size 1 (all experts
local) and set ``remote_fraction=(G-1)/G``, so only the bytes that would leave the GPU are
charged (with balanced routing, rank 0 of EP=G sends (G-1)/G of its rows away and receives as
many). The cost model learns the same through ``PipelineProfile.emulated_remote_fraction``.

What it does not model: NCCL's SM usage beyond one block, link contention between ranks, load
imbalance between ranks (every rank's collective ends with the slowest), and the time of the
copy itself is added to the modeled link time (a real intra-node all-to-all moves the same
bytes through HBM, so this is conservative by ~2 x bytes / HBM bandwidth).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from megatron_eps.comm import AllToAll


def calibrate_sleep_cycles_per_ms(device=None, spins: Sequence[int] = (200_000, 2_000_000)) -> float:
    """Cycles of ``torch.cuda._sleep`` per millisecond on ``device``, measured with CUDA events.

    Two spin lengths, so the launch cost cancels: (c2 - c1) / (t2 - t1).
    """
    if not torch.cuda.is_available():
        raise RuntimeError("calibrate_sleep_cycles_per_ms needs a CUDA device")
    device = torch.device(device or "cuda")
    with torch.cuda.device(device):
        for c in spins:  # warm-up
            torch.cuda._sleep(int(c))
        torch.cuda.synchronize()
        times = []
        for c in spins:
            samples = []
            for _ in range(5):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                torch.cuda._sleep(int(c))
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end))
            samples.sort()
            times.append(samples[len(samples) // 2])
    if times[1] <= times[0]:
        raise RuntimeError(f"torch.cuda._sleep did not scale with cycles: {times}")
    return (spins[1] - spins[0]) / (times[1] - times[0])


class EmulatedLinkAllToAll(AllToAll):
    """An all-to-all that costs ``bytes * remote_fraction / bandwidth + latency`` of stream time.

    Args:
        bandwidth_gbps: link bandwidth per rank and direction, GB/s (e.g. 160 for H800 NVLink as
            achieved, 450 for H100 NVLink nominal). ``float('inf')`` charges no byte time.
        latency_us: fixed cost of every call.
        remote_fraction: share of the bytes that would cross the link (7/8 for rank 0 of EP=8).
        cycles_per_ms: spin-kernel calibration; measured here (with device syncs, so never
            inside the pipeline) when None and CUDA is available.
        copy: do the local data movement (off only to time the link alone).
    """

    occupies_link = True
    group_size = 1

    def __init__(
        self,
        bandwidth_gbps: float,
        latency_us: float = 0.0,
        remote_fraction: float = 1.0,
        cycles_per_ms: Optional[float] = None,
        copy: bool = True,
    ):
        if not bandwidth_gbps > 0:
            raise ValueError(f"bandwidth_gbps must be > 0, got {bandwidth_gbps}")
        if latency_us < 0 or not 0.0 <= remote_fraction <= 1.0:
            raise ValueError("latency_us must be >= 0 and remote_fraction in [0, 1]")
        self.bandwidth_gbps = float(bandwidth_gbps)
        self.latency_us = float(latency_us)
        self.remote_fraction = float(remote_fraction)
        if cycles_per_ms is None and torch.cuda.is_available():
            cycles_per_ms = calibrate_sleep_cycles_per_ms()
        self.cycles_per_ms = cycles_per_ms
        self.copy = copy
        self.calls = 0
        self.modeled_seconds = 0.0  # sum of modeled link time of all calls (host bookkeeping)

    def link_seconds(self, num_bytes: int) -> float:
        """Modeled time of one call moving ``num_bytes`` (before the remote fraction)."""
        if num_bytes <= 0:
            return 0.0
        byte_time = num_bytes * self.remote_fraction / (self.bandwidth_gbps * 1e9)
        return byte_time + self.latency_us * 1e-6

    def __call__(self, output, input, output_splits, input_splits):
        if list(output_splits) != list(input_splits) or len(list(input_splits)) != 1:
            raise ValueError(
                "EmulatedLinkAllToAll emulates one rank (ep_size 1): expected one equal split, got "
                f"{list(input_splits)} -> {list(output_splits)}"
            )
        if self.copy and output.numel() and output.data_ptr() != input.data_ptr():
            output.copy_(input)
        num_bytes = max(input.numel() * input.element_size(), output.numel() * output.element_size())
        seconds = self.link_seconds(num_bytes)
        self.calls += 1
        self.modeled_seconds += seconds
        if seconds > 0 and output.is_cuda:
            torch.cuda._sleep(int(round(seconds * 1e3 * self.cycles_per_ms)))

    def reset_counters(self):
        self.calls = 0
        self.modeled_seconds = 0.0
