"""NCCLTransport: one ``all_to_all_single`` per chunk and direction, rows regrouped on the receiver.

The all-to-all delivers a chunk's rows in (source rank, expert) order; the experts need them
in (expert, source rank) order, so the receiver regroups them before the GEMMs and regroups the
outputs back before the combine. On GPUs the all-to-all kernels need SMs: beside a persistent
grouped GEMM that holds every SM they wait (docs/pipeline.md). Works on any group, across nodes
and on CPU (gloo).
"""

from __future__ import annotations

from typing import List, Optional

import torch

from megatron_eps.comm.all_to_all import AllToAll
from megatron_eps.comm.base import ExpertTransport, SendRows


class NCCLTransport(ExpertTransport):
    name = "nccl"
    supports_dedup = True

    def __init__(self, all_to_all: AllToAll):
        self.all_to_all = all_to_all
        self._comm_stream_reads = False

    @property
    def moves_rows(self) -> bool:
        return self.all_to_all.group_size > 1 or self.all_to_all.occupies_link

    def begin(self, layout, counts, width, hidden, dtype, device):
        self.layout = layout
        self.hidden = hidden
        self.width = width
        self.device = device
        self.dtype = dtype
        chunks = layout.num_chunks
        self._received: List[Optional[torch.Tensor]] = [None] * chunks
        self._outputs: List[Optional[torch.Tensor]] = [None] * chunks
        num_rows = layout.send_offsets[-1]
        combine_dtype = getattr(layout, "combine_dtype", None) or dtype
        self._combined_like = ((num_rows, hidden), combine_dtype)
        # Without a link, one chunk's expert output already is the combined rows (combine).
        self._combined = (None if not self.moves_rows and chunks == 1 else
                          torch.empty((num_rows, hidden), dtype=combine_dtype, device=device))

    def send_rows(self, chunk, weights=None):
        if chunk == 0:
            # Allocated on the comm stream, where the rows are written and sent.
            self._send = torch.empty((self.layout.send_offsets[-1], self.width),
                                     dtype=self.dtype, device=self.device)
            self._send_weights = [None] * self.layout.num_chunks
        self._send_weights[chunk] = weights
        return SendRows(self._chunk(self._send, chunk), None)

    def rows_placed(self, chunk):
        pass

    def _chunk(self, tensor, chunk):
        offsets = self.layout.send_offsets
        return tensor[offsets[chunk] : offsets[chunk + 1]]

    def dispatch(self, chunk):
        send = self._chunk(self._send, chunk)
        if not self.moves_rows:
            self._received[chunk] = (send, self._send_weights[chunk])
            return None
        splits_out = self.layout.recv_splits[chunk]
        splits_in = self.layout.send_splits[chunk]
        recv = send.new_empty((sum(splits_out), send.shape[1]))
        self.all_to_all(recv, send, splits_out, splits_in)
        recv_probs = None
        send_probs = self._send_weights[chunk]
        if send_probs is not None:
            recv_probs = send_probs.new_empty((recv.shape[0],))
            self.all_to_all(recv_probs, send_probs, splits_out, splits_in)
        self._received[chunk] = (recv, recv_probs)
        return None

    def received(self, chunk):
        """([rows, W], None), or without packed prob columns ([rows, H], [rows])."""
        x, p = self._received[chunk]
        self._received[chunk] = None
        if x.is_cuda and self.moves_rows:
            # Allocated on the comm stream, read on the compute stream: keep the allocator
            # from reusing the memory before these reads ran.
            x.record_stream(torch.cuda.current_stream())
            if p is not None:
                p.record_stream(torch.cuda.current_stream())
        regroup = self.layout.rank_major_to_expert_major(chunk)
        if regroup is not None:
            x = regroup_rows(x, *regroup)
            p = regroup_rows(p, *regroup) if p is not None else None
        return x, p

    def hand_back(self, chunk, outputs):
        regroup = self.layout.expert_major_to_rank_major(chunk)
        if regroup is not None:
            outputs = regroup_rows(outputs, *regroup)
        self._outputs[chunk] = outputs

    def combine(self, chunk):
        if self._combined is None:
            # One chunk, no link: the all-to-all would copy the output onto itself elsewhere.
            shape, dtype = self._combined_like
            output = self._outputs[chunk]
            if tuple(output.shape) == shape and output.dtype == dtype:
                self._combined = output
                return None
            self._combined = torch.empty(shape, dtype=dtype, device=self.device)
        self.all_to_all(
            self._chunk(self._combined, chunk),
            self._outputs[chunk],
            self.layout.send_splits[chunk],
            self.layout.recv_splits[chunk],
        )
        return None

    def combined_rows(self):
        return self._combined

    def end(self):
        # Referenced until here, after the compute stream waited for the last combine, so the
        # caching allocator cannot hand a buffer to new work while the comm stream uses it.
        self._send = self._send_weights = self._combined = None
        self._outputs = self._received = []


def regroup_rows(tensor: torch.Tensor, sizes, order) -> torch.Tensor:
    """Split ``tensor`` along rows into pieces of ``sizes`` and concatenate them in ``order``."""
    pieces = torch.split(tensor, list(sizes), dim=0)
    return torch.cat([pieces[i] for i in order], dim=0)
