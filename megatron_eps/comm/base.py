"""The transport interface the pipeline drives, one forward at a time.

Per forward, with ``L`` = the chunk layout (``layout.ChunkLayout``, identical on every rank
but for ``ep_rank``), ``W`` = row width (hidden size plus the columns carrying the routing
weight) and ``H`` = hidden size:

1. ``begin(layout, counts, width, hidden, dtype, device)`` on the host: size buffers.
2. For each chunk g, in the plan's order:
   * ``send_rows(g, weights)`` on the comm stream, before ``dispatch(g)``: where chunk g's
     send rows go (``SendRows``), the rows ``L.send_offsets[g]`` to ``L.send_offsets[g + 1]``
     of the send order (chunk, destination rank, expert). The row scheme (``pipeline.rows``)
     writes them, each W columns (the hidden state and what rides behind it), then calls
     ``rows_placed(g)`` on the same stream. ``weights``: the chunk's routing weights [rows]
     where they travel apart from the rows (None: packed into the rows).
   * ``dispatch(g)`` on the comm stream; returns the ``Completion`` the experts wait on (None:
     the plan records an event on the comm stream).
   * ``received(g)`` on the compute stream after that wait: ([rows of g, W], None) expert-major
     (experts of the chunk in order, each expert's rows by source rank, then token), which is
     the order Megatron's stock dispatcher hands its experts.
   * ``hand_back(g, outputs)`` on the compute stream: the experts' [rows of g, H] outputs in
     the order of ``received(g)``. (A transport that sends the weights apart returns
     ([rows, H], [rows]) from ``received``.)
   * ``combine(g)`` on the comm stream; returns the ``Completion`` the final wait uses.
3. ``combined_rows()`` on the compute stream, after the last combine's completion: [rows this
   rank routed, H] in send order, each row the output of the expert it was sent to.

A transport with ``splits_local_rows`` also takes a layout with ``local_rows_apart``: then
each chunk has two parts, ``LOCAL_PART`` (whole row tiles of the rows this rank routed to its
own experts, ready after ``rows_placed(g)``, before any transfer) and ``PEER_PART`` (the rest:
the rows its peers sent and its own left over, ready after ``dispatch(g)``'s completion), each
expert-major with the layout's ``part_tokens_per_expert``. ``received(g, part)`` and
``hand_back(g, outputs, part)`` take one part at a time; ``combine(g)`` needs only the second
part's outputs.

A transport with ``supports_dedup`` also takes the deduplicated scheme's layout
(``pipeline.rows.dedup``): its splits count one row per (token, destination rank, chunk), its
``unique_rows`` [src, dst, chunk] holds every rank's, and W = H + the packed expert indices and
weights. Then ``received(g)`` returns the
rows in (source rank, token) order, ``hand_back(g, sums)`` takes one pre-reduced row per
received row (in ``layout.combine_dtype``), and ``combined_rows()`` holds one returned sum per
sent row.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import numpy as np
import torch

# The two parts of a chunk whose local rows are apart (``ChunkLayout.local_rows_apart``): the
# rows this rank routed to its own experts (whole tiles of them, ``local_head_rows``), and the
# rest, mostly the rows its peers sent.
LOCAL_PART = "local"
PEER_PART = "peer"


class SendRows(NamedTuple):
    """Where one chunk's send rows are written: send row i of the chunk goes to row
    ``dst_rows[i]`` of ``rows`` [R, W] (``dst_rows``: [rows of the chunk] int64), or to row i
    where ``dst_rows`` is None."""

    rows: torch.Tensor
    dst_rows: Optional[torch.Tensor]


class Completion:
    """Something a stream can wait for: ``wait(stream)`` orders the stream's later work after
    it, without blocking the host (``torch.cuda.Event`` has the same method)."""

    def wait(self, stream) -> None:
        raise NotImplementedError


class ExpertTransport:
    """The exchange of one MoE layer's rows between EP ranks (see the module docstring)."""

    name = "transport"
    # False when no row crosses a rank (EP size 1, no emulated link): dispatch and combine
    # are slices of local buffers and the pipeline has nothing to overlap.
    moves_rows = True
    # True when the streams wait for peers in ways nothing times out (stream memory
    # operations): the pipeline then hands each forward's end to the watchdog.
    waits_without_timeout = False
    # True when the transport moves the deduplicated scheme's rows (module docstring).
    supports_dedup = False
    # True when it takes layouts with ``local_rows_apart`` (module docstring).
    splits_local_rows = False

    def begin(
        self,
        layout,
        counts: np.ndarray,
        width: int,
        hidden: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        raise NotImplementedError

    def send_rows(self, chunk: int, weights: Optional[torch.Tensor] = None) -> SendRows:
        raise NotImplementedError

    def rows_placed(self, chunk: int) -> None:
        """Chunk ``chunk``'s send rows are written (on the stream they were written on)."""

    def dispatch(self, chunk: int) -> Optional[Completion]:
        raise NotImplementedError

    def received(self, chunk: int, part: Optional[str] = None
                 ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """part: None (the whole chunk), or LOCAL_PART / PEER_PART (``splits_local_rows``)."""
        raise NotImplementedError

    def hand_back(self, chunk: int, outputs: torch.Tensor, part: Optional[str] = None) -> None:
        raise NotImplementedError

    def combine(self, chunk: int) -> Optional[Completion]:
        raise NotImplementedError

    def combined_rows(self) -> torch.Tensor:
        raise NotImplementedError

    def end(self) -> None:
        """Drop the forward's references (called after ``combined_rows`` was consumed)."""


def row_probs(packed: torch.Tensor, hidden_size: int, probs_dtype: torch.dtype) -> torch.Tensor:
    """The routing weight of every packed row (a strided view into ``packed``)."""
    width = torch.empty((), dtype=probs_dtype).element_size() // packed.element_size()
    return packed[:, hidden_size : hidden_size + width].view(probs_dtype)[:, 0]
