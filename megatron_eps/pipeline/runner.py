"""Issues a plan (``schedule.build_plan``) on the compute and communication streams."""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import torch

from megatron_eps.pipeline.schedule import COMM, COMPUTE, Step

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
