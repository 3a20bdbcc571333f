"""Issues a plan (``schedule.build_plan``) on the compute and communication streams."""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import torch

from megatron_eps.policy.schedule import COMM, COMPUTE, Step


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
    issuer = PlanIssuer(stages, comm_stream, profiler_ranges=profiler_ranges, routed=routed)
    for step in plan:
        issuer.issue(step)
    issuer.finish()


class PlanIssuer:
    """``run_plan`` one step at a time: ``issue(step)`` for each step of the plan in order, then
    ``finish()``. Tests of several simulated ranks on one GPU interleave their ranks' issuers
    step by step, each rank with streams of its own."""

    def __init__(
        self,
        stages: Dict[str, Callable[[int], object]],
        comm_stream: Optional["torch.cuda.Stream"],
        compute_stream: Optional["torch.cuda.Stream"] = None,
        profiler_ranges: bool = False,
        routed=None,
    ):
        self.stages, self.profiler_ranges = stages, profiler_ranges
        self.streams = None
        self.last_comm = None
        if comm_stream is None:
            return
        compute_stream = compute_stream or torch.cuda.current_stream()
        self.streams = {COMM: comm_stream, COMPUTE: compute_stream}
        self.events: Dict[str, object] = {
            "routed": routed if routed is not None else compute_stream.record_event()
        }

    def issue(self, step: Step) -> None:
        if self.streams is None:
            _issue(step, self.stages, self.profiler_ranges)
            return
        stream = self.streams[step.stream]
        if step.wait is not None:
            self.events[step.wait].wait(stream)
        with torch.cuda.stream(stream):
            completion = _issue(step, self.stages, self.profiler_ranges)
        if step.record is not None:
            if completion is None:
                completion = stream.record_event()
            self.events[step.record] = completion
            if step.stream == COMM:
                self.last_comm = completion

    def finish(self) -> None:
        """The compute stream waits for the last communication (the comm stream runs in issue
        order, so for all of it)."""
        if self.last_comm is not None:
            self.last_comm.wait(self.streams[COMPUTE])


def _issue(step: Step, stages, profiler_ranges: bool):
    if profiler_ranges:
        with torch.profiler.record_function(f"eps.{step.stage}[{step.chunk}]"):
            return stages[step.stage](step.chunk)
    return stages[step.stage](step.chunk)
