"""A stand-in for a multi-GPU link on one GPU, for unit tests of the plan only.

It uses neither SMs nor link bandwidth the way a real link does, so on two H200s its predicted
gains did not hold (docs/transports.md): performance claims about overlap come from a real
multi-GPU link (benchmarks/bench_layer_multigpu.py), never from this emulator. It wraps as
``NCCLTransport(EmulatedLinkAllToAll(...))`` (``EPSMoELayer.use_transport``).

``EmulatedLinkAllToAll`` does the local data movement an all-to-all of one rank would do
(``output`` rows from ``input`` rows: with ep_size 1 the splits are a single block, so it is a
copy) and keeps the *current stream* (the pipeline's comm stream) busy for the modeled link time
``remote bytes / bandwidth + latency``. Two kernels can do it:

* ``"timer"`` (default when Triton is importable): one launch of a few CTAs, as NCCL uses a few
  channels, that copy the rows and then spin on the GPU's nanosecond ``%globaltimer`` until the
  modeled time since the kernel started has passed. The copy is hidden inside the link time
  (as a real link's local copy is), and the duration does not depend on the SM clock, which
  drops under a heavy GEMM load. Its CTAs need SMs like NCCL's do: a GEMM that holds every SM
  delays them, which is what ``gemm_sm_carveout`` exists for.
* ``"sleep"``: ``Tensor.copy_`` then ``torch.cuda._sleep`` (a one-block spin counted in SM clock
  cycles, calibrated at idle clocks, so it stretches when the clock drops).

Emulating rank 0 of an EP group of size G on one GPU: run the layer with ep_size 1 (all experts
local) and set ``remote_fraction=(G-1)/G``, so only the bytes that would leave the GPU are
charged (with balanced routing, rank 0 of EP=G sends (G-1)/G of its rows away and receives as
many). The cost model sees the same traffic through ``bench.emulated_group``.

What it does not model: NCCL's SM usage beyond one block, link contention between ranks, load
imbalance between ranks (every rank's collective ends with the slowest), and the time of the
copy itself is added to the modeled link time (a real intra-node all-to-all moves the same
bytes through HBM, so this is conservative by ~2 x bytes / HBM bandwidth).
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch

from megatron_eps.comm import AllToAll

SPIN_KINDS = ("timer", "sleep")
# Words (int32) each CTA of the timer kernel copies per loop step.
_TIMER_COPY_BLOCK = 16384


@functools.lru_cache(maxsize=None)
def _timer_link_kernel():
    """The Triton kernel behind spin="timer" (built on first use; needs a CUDA GPU)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _globaltimer_ns():
        tick = tl.inline_asm_elementwise(
            "mov.u64 $0, %globaltimer;",
            "=l,r",
            [tl.zeros([1], dtype=tl.int32)],
            dtype=tl.int64,
            is_pure=False,
            pack=1,
        )
        return tl.max(tick, axis=0)

    @triton.jit
    def emulated_link_kernel(src, dst, num_words, duration_ns, BLOCK: tl.constexpr):
        start = _globaltimer_ns()
        pid = tl.program_id(0)
        stride = tl.num_programs(0) * BLOCK
        for block_start in range(pid * BLOCK, num_words, stride):
            offsets = block_start.to(tl.int64) + tl.arange(0, BLOCK)
            mask = offsets < num_words
            tl.store(dst + offsets, tl.load(src + offsets, mask=mask), mask=mask)
        elapsed = _globaltimer_ns() - start
        while elapsed < duration_ns:
            elapsed = _globaltimer_ns() - start

    from megatron_eps.triton_launch import CachedLauncher

    return CachedLauncher(emulated_link_kernel)


def _as_words(t: torch.Tensor) -> Optional[torch.Tensor]:
    """``t`` as a flat int32 view (no copy), or None when its bytes cannot be viewed so."""
    if not t.is_contiguous() or (t.numel() * t.element_size()) % 4 or t.data_ptr() % 4:
        return None
    flat = t.view(-1)
    return flat if flat.dtype == torch.int32 else flat.view(torch.int32)


def timer_spin_available() -> bool:
    import importlib.util

    return torch.cuda.is_available() and importlib.util.find_spec("triton") is not None


def emulated_link_transfer(
    output: torch.Tensor, input: torch.Tensor, seconds: float, num_ctas: int, copy: bool = True
):
    """Copy ``input`` into ``output`` with ``num_ctas`` CTAs and hold the current stream until
    ``seconds`` have passed since the kernel started (GPU wall clock). One launch when the
    bytes can be viewed as int32 words (else a ``copy_`` first)."""
    kernel = _timer_link_kernel()
    words = 0
    if copy and output.numel() and output.data_ptr() != input.data_ptr():
        src, dst = _as_words(input), _as_words(output)
        if src is not None and dst is not None and src.numel() == dst.numel():
            words = src.numel()
        else:
            output.copy_(input)
    if words == 0:
        if seconds <= 0:
            return
        src = dst = torch.empty(1, dtype=torch.int32, device=output.device)
    grid = (max(1, min(int(num_ctas), -(-words // _TIMER_COPY_BLOCK))),)
    kernel(grid, (src, dst, words, int(seconds * 1e9)), {"BLOCK": _TIMER_COPY_BLOCK}, num_warps=8)


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
        cycles_per_ms: ``spin="sleep"`` calibration; measured here (with device syncs, so never
            inside the pipeline) when None and CUDA is available.
        copy: do the local data movement (off only to time the link alone).
        spin: "timer" (Triton, GPU wall clock; the default when Triton is importable) or
            "sleep" (torch.cuda._sleep, SM clock cycles).
        num_ctas: CTAs of the "timer" kernel (NCCL's channels; pair with gemm_sm_carveout).
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
        spin: Optional[str] = None,
        num_ctas: int = 16,
    ):
        if not bandwidth_gbps > 0:
            raise ValueError(f"bandwidth_gbps must be > 0, got {bandwidth_gbps}")
        if latency_us < 0 or not 0.0 <= remote_fraction <= 1.0:
            raise ValueError("latency_us must be >= 0 and remote_fraction in [0, 1]")
        self.bandwidth_gbps = float(bandwidth_gbps)
        self.latency_us = float(latency_us)
        self.remote_fraction = float(remote_fraction)
        if spin is None:
            spin = "timer" if timer_spin_available() else "sleep"
        if spin not in SPIN_KINDS:
            raise ValueError(f"spin must be one of {', '.join(SPIN_KINDS)}, got {spin!r}")
        if num_ctas < 1:
            raise ValueError(f"num_ctas must be >= 1, got {num_ctas}")
        self.spin = spin
        self.num_ctas = int(num_ctas)
        if spin == "sleep" and cycles_per_ms is None and torch.cuda.is_available():
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
        num_bytes = max(input.numel() * input.element_size(), output.numel() * output.element_size())
        seconds = self.link_seconds(num_bytes)
        self.calls += 1
        self.modeled_seconds += seconds
        if output.is_cuda and self.spin == "timer":
            emulated_link_transfer(output, input, seconds, self.num_ctas, copy=self.copy)
            return
        if self.copy and output.numel() and output.data_ptr() != input.data_ptr():
            output.copy_(input)
        if seconds > 0 and output.is_cuda:
            torch.cuda._sleep(int(round(seconds * 1e3 * self.cycles_per_ms)))

    def reset_counters(self):
        self.calls = 0
        self.modeled_seconds = 0.0
