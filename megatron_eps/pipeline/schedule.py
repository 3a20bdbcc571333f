"""The EPS pipeline as a plan: which stage of which chunk runs on which stream, after which event.

One forward, for N chunks (P = the routed rows placed in the send buffers, D = dispatch,
X = expert GEMMs, C = combine, S = shared experts, R = router and count all-gather,
U = the final sum of each token's expert outputs):

    host:            R  issue S  wait for the counts  plan  issue P0 D0 P1 D1 ... X0 ...
    compute stream:  R  S .............................  X0          X1          ...  U
    comm stream:                                  P0 D0 P1 D1 P2 D2  C0          C1  ...

The shared experts depend only on the layer's input, so they are issued before the host
blocks on the count matrix: the GPU computes them while the host plans the chunks (the host
work before the first dispatch left the GPUs idle ~2.5 ms per layer in a profiled trace; see
docs/transports.md). The placement therefore runs on the comm stream, beside S, so that the
first dispatch does not wait for S, and chunk by chunk (P(i) places chunk i's rows), so that
the first dispatch waits for one chunk's rows only. The plan below (``build_plan``) is what
follows the host's planning:

    P0    waits  routed (router output and counts, on the compute stream)
    D(i)  follows P(i) on the comm stream                                  records dispatched[i]
    X(i)  waits  dispatched[i]                                             records computed[i]
    C(i)  waits  computed[i]                                               records combined[i]
    the compute stream finally waits combined[N-1] (the comm stream runs in issue order).

With ``dispatch_ahead=1`` the comm stream interleaves D0 D1 C0 D2 C1 ...; the default
(``dispatch_ahead=None``) issues D0 .. D(N-1) before C0, so a combine that waits for its GEMMs
never holds back a dispatch; the events are the same. While X(i) runs, the comm stream carries
C(i-1) and D(i+1): the paper's overlap. On CPU (no streams) the same steps run one after
another in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

PLACE = "place_rows"
DISPATCH = "dispatch"
EXPERTS = "experts"
COMBINE = "combine"

COMM = "comm"
COMPUTE = "compute"


@dataclass(frozen=True)
class Step:
    stage: str
    chunk: int
    stream: str
    wait: Optional[str]
    record: Optional[str]

    def __str__(self):
        waits = f" after {self.wait}" if self.wait else ""
        return f"{self.stream:>7}: {self.stage}[{self.chunk}]{waits}"


def build_plan(num_chunks: int, dispatch_ahead: Optional[int] = None) -> List[Step]:
    """The ordered steps of one pipelined MoE forward after the host's planning (module docstring).

    ``dispatch_ahead``: how many dispatches the comm stream runs ahead of the experts. 1
    interleaves D(i+1) before X(i), then C(i); None (default) issues every dispatch before the
    first combine. The comm stream runs in issue order, so with 1 a combine that waits for its
    GEMMs also holds back the next dispatch; dispatches depend on nothing, so issuing them all
    first leaves the link idle only when it waits for the last GEMMs (measured and modeled in
    docs/pipeline.md).
    """
    if num_chunks < 1:
        raise ValueError(f"num_chunks must be >= 1, got {num_chunks}")
    if dispatch_ahead is not None and dispatch_ahead < 1:
        raise ValueError(f"dispatch_ahead must be >= 1 or None, got {dispatch_ahead}")
    plan = [
        Step(PLACE, 0, COMM, "routed", None),
        Step(DISPATCH, 0, COMM, None, "dispatched[0]"),
    ]
    issued = 1
    for i in range(num_chunks):
        last = num_chunks - 1 if dispatch_ahead is None else min(num_chunks - 1, i + dispatch_ahead)
        while issued <= last:
            plan.append(Step(PLACE, issued, COMM, None, None))
            plan.append(Step(DISPATCH, issued, COMM, None, f"dispatched[{issued}]"))
            issued += 1
        plan.append(Step(EXPERTS, i, COMPUTE, f"dispatched[{i}]", f"computed[{i}]"))
        plan.append(Step(COMBINE, i, COMM, f"computed[{i}]", f"combined[{i}]"))
    return plan


def run_plan(
    plan: Sequence[Step],
    stages: Dict[str, Callable[[int], object]],
    comm_stream: Optional["torch.cuda.Stream"],
    profiler_ranges: bool = False,
    routed=None,
) -> None:
    """Execute ``plan``. ``stages[name](chunk)`` issues that stage's work on the current stream.

    A stage may return what its consumers wait on (an object with ``wait(stream)``, e.g. the
    copy-engine transport's flag waits); otherwise the plan records an event on the stage's
    stream after it. With ``comm_stream`` None everything runs on the current stream in plan
    order (CPU, or a GPU run with overlap switched off). Otherwise COMM steps are issued under
    ``comm_stream`` and steps are ordered only by the plan's events: no device-wide sync.
    ``routed``: the event after the router's output on the compute stream (None: recorded
    now, on the current stream).
    """
    if comm_stream is None:
        for step in plan:
            _issue(step, stages, profiler_ranges)
        return
    compute_stream = torch.cuda.current_stream()
    events: Dict[str, object] = {
        "routed": routed if routed is not None else compute_stream.record_event()
    }
    streams = {COMM: comm_stream, COMPUTE: compute_stream}
    last_comm = None
    for step in plan:
        stream = streams[step.stream]
        if step.wait is not None:
            events[step.wait].wait(stream)
        with torch.cuda.stream(stream):
            completion = _issue(step, stages, profiler_ranges)
        if step.record is not None:
            if completion is None:
                completion = stream.record_event()
            events[step.record] = completion
            if step.stream == COMM:
                last_comm = completion
    if last_comm is not None:
        last_comm.wait(compute_stream)


def _issue(step: Step, stages, profiler_ranges: bool):
    if profiler_ranges:
        with torch.profiler.record_function(f"eps.{step.stage}[{step.chunk}]"):
            return stages[step.stage](step.chunk)
    return stages[step.stage](step.chunk)


# ---------------------------------------------------------------------------- chunk layout
def split_local_experts(num_local_experts: int, num_chunks: int) -> List[Tuple[int, int]]:
    """Contiguous local-expert ranges [start, end) for each chunk, sizes differing by <= 1."""
    if not 1 <= num_chunks <= num_local_experts:
        raise ValueError(
            f"num_chunks must be in [1, {num_local_experts}] (local experts), got {num_chunks}"
        )
    base, extra = divmod(num_local_experts, num_chunks)
    ranges, start = [], 0
    for i in range(num_chunks):
        end = start + base + (1 if i < extra else 0)
        ranges.append((start, end))
        start = end
    return ranges


# How a layer's local experts are grouped into chunks: an int N (N chunks of equal size, the
# paper's split) or the number of experts in each chunk, in order.
Chunking = Union[int, Sequence[int]]

def tail_split(num_local_experts: int, num_chunks: int) -> Tuple[int, ...]:
    """Experts per chunk for N chunks whose last chunk holds a single expert.

    The last combine cannot overlap any GEMM (it waits for the last one), so it is the
    pipeline's drain; one expert instead of 1/N of them shrinks it (the first dispatch, the
    fill, overlaps the shared experts). The other chunks split the rest evenly.
    """
    if not 1 <= num_chunks <= num_local_experts:
        raise ValueError(
            f"num_chunks must be in [1, {num_local_experts}] (local experts), got {num_chunks}"
        )
    if num_chunks == 1:
        return (num_local_experts,)
    head = split_local_experts(num_local_experts - 1, num_chunks - 1)
    return tuple(end - start for start, end in head) + (1,)


def chunk_sizes(num_local_experts: int, chunking: Chunking, split: str = "equal") -> Tuple[int, ...]:
    """Experts per chunk for ``chunking`` (an int N is split as ``split`` says: equal or tail)."""
    if isinstance(chunking, (int, np.integer)):
        n = int(chunking)
        if split == "tail":
            return tail_split(num_local_experts, n)
        if split != "equal":
            raise ValueError(f"chunk split must be one of equal, tail for a fixed N, got {split!r}")
        return tuple(end - start for start, end in split_local_experts(num_local_experts, n))
    sizes = tuple(int(s) for s in chunking)
    if not sizes or min(sizes) < 1 or sum(sizes) != num_local_experts:
        raise ValueError(
            f"chunk sizes {list(sizes)} must be >= 1 each and sum to the {num_local_experts} "
            "local experts"
        )
    return sizes


def ranges_of_sizes(sizes: Sequence[int]) -> List[Tuple[int, int]]:
    """[start, end) local-expert ranges of chunks holding ``sizes`` experts each."""
    ranges, start = [], 0
    for size in sizes:
        ranges.append((start, start + int(size)))
        start += int(size)
    return ranges


@dataclass
class ChunkLayout:
    """Everything the pipeline needs to know on the host about one forward's chunks.

    Built from the global count matrix ``counts[src_rank, global_expert]`` (tokens each EP rank
    routes to each expert), which every rank of the EP group holds after one all-gather, so
    every rank derives the same chunking.

    Rows are permuted chunk-major: chunk g holds, for each destination rank r, the rows for
    r's local experts ``expert_ranges[g]`` (in expert order). So each chunk's send buffer is
    one contiguous slice, and each chunk carries whole experts (every expert's GEMM keeps its
    full size and its weights are read once).
    """

    num_chunks: int
    ep_size: int
    ep_rank: int
    num_local_experts: int
    expert_ranges: List[Tuple[int, int]]
    expert_order: np.ndarray  # [num_experts] global expert ids in chunk-major order
    send_splits: List[List[int]]  # [chunk][dst rank] rows this rank sends
    recv_splits: List[List[int]]  # [chunk][src rank] rows this rank receives
    recv_counts: List[np.ndarray]  # [chunk] -> [src rank, expert in chunk]
    tokens_per_expert: List[List[int]]  # [chunk][expert in chunk] rows after dispatch
    send_offsets: List[int]  # [chunk + 1] row offsets of the chunks in the permuted buffer

    @classmethod
    def build(
        cls, counts: np.ndarray, ep_rank: int, num_local_experts: int, chunking: Chunking
    ) -> "ChunkLayout":
        """``chunking``: N (equal chunks) or the number of local experts in each chunk."""
        counts = np.asarray(counts, dtype=np.int64)
        ep_size, num_experts = counts.shape
        if num_experts != ep_size * num_local_experts:
            raise ValueError(
                f"count matrix has {num_experts} experts, expected ep_size * local experts = "
                f"{ep_size} * {num_local_experts}"
            )
        ranges = ranges_of_sizes(chunk_sizes(num_local_experts, chunking))
        # [src, dst, local expert]
        per_dst = counts.reshape(ep_size, ep_size, num_local_experts)
        order, send_splits, recv_splits, recv_counts, tpe = [], [], [], [], []
        offsets = [0]
        for start, end in ranges:
            order.extend(
                r * num_local_experts + l for r in range(ep_size) for l in range(start, end)
            )
            sends = per_dst[ep_rank, :, start:end].sum(axis=1)
            received = per_dst[:, ep_rank, start:end]  # [src, expert in chunk]
            send_splits.append([int(x) for x in sends])
            recv_splits.append([int(x) for x in received.sum(axis=1)])
            recv_counts.append(received.copy())
            tpe.append([int(x) for x in received.sum(axis=0)])
            offsets.append(offsets[-1] + int(sends.sum()))
        return cls(
            num_chunks=len(ranges),
            ep_size=ep_size,
            ep_rank=ep_rank,
            num_local_experts=num_local_experts,
            expert_ranges=ranges,
            expert_order=np.asarray(order, dtype=np.int64),
            send_splits=send_splits,
            recv_splits=recv_splits,
            recv_counts=recv_counts,
            tokens_per_expert=tpe,
            send_offsets=offsets,
        )

    def rank_major_to_expert_major(self, chunk: int) -> Optional[Tuple[List[int], List[int]]]:
        """(split sizes, piece order) that regroup a received chunk from (src rank, expert)
        order to (expert, src rank) order, or None when it is already in expert order."""
        counts = self.recv_counts[chunk]
        num_src, num_exp = counts.shape
        if num_src == 1 or num_exp == 1:
            return None
        sizes = [int(x) for x in counts.reshape(-1)]  # piece (s, e) at index s * num_exp + e
        order = [s * num_exp + e for e in range(num_exp) for s in range(num_src)]
        return sizes, order

    def expert_major_to_rank_major(self, chunk: int) -> Optional[Tuple[List[int], List[int]]]:
        """The inverse regrouping, applied to the expert outputs before the combine."""
        counts = self.recv_counts[chunk]
        num_src, num_exp = counts.shape
        if num_src == 1 or num_exp == 1:
            return None
        sizes = [int(x) for x in counts.T.reshape(-1)]  # piece (e, s) at index e * num_src + s
        order = [e * num_src + s for s in range(num_src) for e in range(num_exp)]
        return sizes, order
