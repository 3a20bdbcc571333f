"""The interface between the dispatcher's forward and a row scheme (``pipeline.rows``)."""

from __future__ import annotations

from typing import Optional

import torch

from megatron_eps.comm.base import ExpertTransport
from megatron_eps.comm.traffic import BytesSent


class RowScheme:
    """One forward's rows in one scheme. Built on the host from the forward's layout; then, per
    chunk g in the plan's order, ``place(g)`` on the comm stream before the transport's
    ``dispatch(g)``, ``run_experts(g, part)`` on the compute stream after its completion, and
    once after the last combine ``output(shared_output)`` on the compute stream."""

    name = "rows"
    layout = None  # what the transport moves (``ChunkLayout`` or a subclass)
    width = 0  # columns of a dispatched row (hidden state and what rides behind it)

    def __init__(self, transport: ExpertTransport, experts):
        self.transport = transport
        self.experts = experts

    def bytes_sent(self) -> BytesSent:
        """What this rank sends in this scheme."""
        raise NotImplementedError

    def pair_bytes_sent(self) -> BytesSent:
        """What it would send with one row per (token, expert)."""
        raise NotImplementedError

    def place(self, chunk: int) -> None:
        raise NotImplementedError

    def run_experts(self, chunk: int, part: Optional[str] = None) -> None:
        """part: None (the whole chunk), or ``comm.base.LOCAL_PART`` / ``PEER_PART``."""
        raise NotImplementedError

    def output(self, shared_output: Optional[torch.Tensor]) -> torch.Tensor:
        """[T, H]: the returned rows summed per token, plus the shared experts' output."""
        raise NotImplementedError
