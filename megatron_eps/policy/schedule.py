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

The first dispatch and the last combine have no GEMM of their own chunk beside them. With the
local rows apart (``local_apart``; a rank's rows for its own experts are never transferred),
X(i) is two GEMM calls: L(i) over whole row tiles of the rank's own rows, which waits only for
P(i), and X(i) over the rest (the rows its peers sent, and its own rows left over). L(0) runs
beside D0, and the last chunk's L runs beside its combine:

    P(i)  records placed[i]
    L(i)  waits  placed[i]; before X(i), except in the last chunk of several, where it follows
          X(i) and C(i) is issued in between
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import List, Optional, Sequence

PLACE = "place_rows"
DISPATCH = "dispatch"
EXPERTS = "experts"
LOCAL_EXPERTS = "local_experts"
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


def build_plan(num_chunks: int, dispatch_ahead: Optional[int] = None,
               local_apart: bool = False) -> List[Step]:
    """The ordered steps of one pipelined MoE forward after the host's planning (module docstring).

    ``dispatch_ahead``: how many dispatches the comm stream runs ahead of the experts. 1
    interleaves D(i+1) before X(i), then C(i); None (default) issues every dispatch before the
    first combine. The comm stream runs in issue order, so with 1 a combine that waits for its
    GEMMs also holds back the next dispatch; dispatches depend on nothing, so issuing them all
    first leaves the link idle only when it waits for the last GEMMs (measured and modeled in
    docs/pipeline.md).
    ``local_apart``: each chunk's GEMMs over the rank's own rows are a step of their own,
    LOCAL_EXPERTS, and EXPERTS covers the rows the peers sent.
    """
    if num_chunks < 1:
        raise ValueError(f"num_chunks must be >= 1, got {num_chunks}")
    if dispatch_ahead is not None and dispatch_ahead < 1:
        raise ValueError(f"dispatch_ahead must be >= 1 or None, got {dispatch_ahead}")

    def place(chunk):
        return Step(PLACE, chunk, COMM, "routed" if chunk == 0 else None,
                    f"placed[{chunk}]" if local_apart else None)

    def local(chunk):
        return Step(LOCAL_EXPERTS, chunk, COMPUTE, f"placed[{chunk}]", None)

    plan = [place(0), Step(DISPATCH, 0, COMM, None, "dispatched[0]")]
    issued = 1
    for i in range(num_chunks):
        last = num_chunks - 1 if dispatch_ahead is None else min(num_chunks - 1, i + dispatch_ahead)
        while issued <= last:
            plan.append(place(issued))
            plan.append(Step(DISPATCH, issued, COMM, None, f"dispatched[{issued}]"))
            issued += 1
        local_last = local_apart and num_chunks > 1 and i == num_chunks - 1
        if local_apart and not local_last:
            plan.append(local(i))
        plan.append(Step(EXPERTS, i, COMPUTE, f"dispatched[{i}]", f"computed[{i}]"))
        plan.append(Step(COMBINE, i, COMM, f"computed[{i}]", f"combined[{i}]"))
        if local_last:
            plan.append(local(i))
    return plan


def simulate_plan(
    dispatch: Sequence[float],
    experts: Sequence[float],
    combine: Sequence[float],
    shared: float = 0.0,
    dispatch_ahead: Optional[int] = None,
    local_experts: Optional[Sequence[float]] = None,
) -> float:
    """Makespan of ``build_plan(N)`` on two in-order streams with the plan's events.

    ``local_experts``: the seconds of each chunk's GEMMs over the rank's own rows, run apart
    (``build_plan(local_apart=True)``); ``experts`` are then those over the peers' rows.

    The compute stream starts with the shared experts (``shared`` seconds; they are issued
    before the plan, see the module docstring); the placement of the rows is fixed work the model
    leaves out. Each step starts when its stream is free and its awaited event has been
    recorded; the compute stream finally waits for the last combine (as ``runner.run_plan`` does). It
    walks the plan itself (compiled once per N to integer steps), so a change of the schedule
    is made once.
    """
    steps, num_events = _compiled_plan(len(experts), dispatch_ahead, local_experts is not None)
    durations = ((), dispatch, experts, combine, local_experts)
    free = [shared, 0.0]  # compute, comm
    events = [0.0] * num_events
    for on_comm, wait, record, stage, chunk in steps:
        start = free[on_comm]
        if wait >= 0 and events[wait] > start:
            start = events[wait]
        end = start + (durations[stage][chunk] if stage else 0.0)
        free[on_comm] = end
        if record >= 0:
            events[record] = end
    return max(free)


@functools.lru_cache(maxsize=512)
def _compiled_plan(num_chunks: int, dispatch_ahead: Optional[int], local_apart: bool = False):
    """build_plan's steps as (on comm stream, awaited event, recorded event, stage, chunk)
    integers (events numbered, -1: none; stage: 0 placement, 1 dispatch, 2 experts, 3 combine,
    4 local experts)."""
    stage_index = {PLACE: 0, DISPATCH: 1, EXPERTS: 2, COMBINE: 3, LOCAL_EXPERTS: 4}
    names = {"routed": 0}
    steps = []
    for step in build_plan(num_chunks, dispatch_ahead=dispatch_ahead, local_apart=local_apart):
        wait = names[step.wait] if step.wait is not None else -1
        record = names.setdefault(step.record, len(names)) if step.record is not None else -1
        steps.append((int(step.stream == COMM), wait, record, stage_index[step.stage], step.chunk))
    return tuple(steps), len(names)
