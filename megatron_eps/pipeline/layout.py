"""Where each chunk's rows go in one forward: ``ChunkLayout`` turns the chunk sizes
(``policy.chunks``) and the all-gathered count matrix into every split and offset the transports
and the experts need.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np

from megatron_eps.comm.base import LOCAL_PART, PEER_PART
from megatron_eps.policy.chunks import (LOCAL_ROWS_ALIGN, Chunking, chunk_sizes, local_head_rows,
                                        ranges_of_sizes)


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
    # The GEMMs of the rows this rank routed to its own experts run apart from the peers' rows
    # (a transport with ``splits_local_rows``; comm.base): each chunk has two parts.
    local_rows_apart: bool = False
    local_rows_align: int = LOCAL_ROWS_ALIGN  # local_head_rows' alignment
    # [chunk][expert] rows of the local part (local_head_rows of the rank's own rows; empty
    # unless local_rows_apart)
    local_tokens_per_expert: List[List[int]] = field(default_factory=list)

    @classmethod
    def build(
        cls, counts: np.ndarray, ep_rank: int, num_local_experts: int, chunking: Chunking,
        local_rows_apart: bool = False, local_rows_align: int = LOCAL_ROWS_ALIGN,
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
        order, send_splits, recv_splits, recv_counts, tpe, local = [], [], [], [], [], []
        offsets = [0]
        for start, end in ranges:
            order.extend(
                r * num_local_experts + l for r in range(ep_size) for l in range(start, end)
            )
            sends = per_dst[ep_rank, :, start:end].sum(axis=1)
            received = per_dst[:, ep_rank, start:end]  # [src, expert in chunk]
            send_splits.append(sends.tolist())
            recv_splits.append(received.sum(axis=1).tolist())
            recv_counts.append(received.copy())
            tpe.append(received.sum(axis=0).tolist())
            if local_rows_apart:
                local.append(local_head_rows(received[ep_rank], local_rows_align).tolist())
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
            local_rows_apart=local_rows_apart,
            local_rows_align=local_rows_align,
            local_tokens_per_expert=local,
        )

    @classmethod
    def one_local_chunk(cls, num_local_experts: int, rows_per_expert) -> "ChunkLayout":
        """The layout of a forward without expert parallelism whose rows per expert stay on
        the device: one chunk of every expert, nothing sent to a peer. ``rows_per_expert``: an
        ``experts.gemm_common.DeviceRowEnds``, what the experts are handed for the chunk (the
        host knows only its total)."""
        num_rows = rows_per_expert.num_rows
        return cls(
            num_chunks=1,
            ep_size=1,
            ep_rank=0,
            num_local_experts=num_local_experts,
            expert_ranges=[(0, num_local_experts)],
            expert_order=np.arange(num_local_experts, dtype=np.int64),
            send_splits=[[num_rows]],
            recv_splits=[[num_rows]],
            # One source rank: nothing to regroup, whatever the counts (not known here).
            recv_counts=[np.zeros((1, num_local_experts), dtype=np.int64)],
            tokens_per_expert=[rows_per_expert],
            send_offsets=[0, num_rows],
        )

    def local_head_rows(self, own_rows) -> np.ndarray:
        """The local part's rows of each expert, of ``own_rows`` (the rows a rank routed to its
        own experts, any rank's): what every rank's layout takes as that rank's local part."""
        return local_head_rows(own_rows, self.local_rows_align)

    def part_tokens_per_expert(self, chunk: int, part: Optional[str] = None) -> List[int]:
        """Rows per expert of chunk ``chunk``'s part ``part`` (None: the whole chunk; else
        LOCAL_PART or PEER_PART)."""
        whole = self.tokens_per_expert[chunk]
        if part is None:
            return whole
        local = self.local_tokens_per_expert[chunk]
        if part == LOCAL_PART:
            return local
        return [w - l for w, l in zip(whole, local)]

    def expert_calls(self) -> List[List[int]]:
        """Rows per expert of every expert-GEMM call of the forward (one per chunk, or one per
        part with the local rows apart)."""
        if not self.local_rows_apart:
            return list(self.tokens_per_expert)
        return [self.part_tokens_per_expert(g, part) for g in range(self.num_chunks)
                for part in (LOCAL_PART, PEER_PART)]

    def bytes_sent(self, dispatch_row_bytes: int, combine_row_bytes: int):
        """``comm.traffic.BytesSent`` of this rank in one forward: dispatch rows of
        ``dispatch_row_bytes`` (hidden state and packed weight) and combine rows of
        ``combine_row_bytes``, remote and local."""
        from megatron_eps.comm.traffic import bytes_sent

        return bytes_sent(self.send_splits, self.recv_splits, self.ep_rank, dispatch_row_bytes,
                          combine_row_bytes)

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
