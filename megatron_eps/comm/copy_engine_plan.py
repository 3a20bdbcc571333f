"""Where every row of one forward lives in the copy-engine transport's buffers (host arithmetic).

Each rank holds two buffers of the same size on every rank (symmetric memory):

* the dispatch buffer: a receive area of ``recv_capacity`` rows at offset 0, then a staging area
  of ``staging_capacity`` rows. Rank d's receive area holds, expert by expert (its local
  experts in order, which is chunk by chunk), each expert's rows from source rank 0, 1, ...,
  each source's rows in token order: the order the expert GEMMs read, so nothing is regrouped.
  With the local rows apart (``local_head``), each chunk holds first the local part:
  whole row tiles of d's own rows (``ChunkLayout.local_head_rows``), expert by
  expert; then the rest, expert by expert and by source as above (d's remaining own rows in
  their source's place). Two grouped-GEMM inputs, the first of which is ready before any
  transfer, and together no more row tiles than the chunk's rows in one.
  A rank's rows for its own experts are written straight into its receive area by the
  permutation; the rows for other ranks' experts are staged in send order and copied by the
  copy engines straight to their final row in the peer's receive area.
* the return buffer: ``return_capacity`` rows; rank s's rows in its send order (chunk,
  destination rank, expert, token), the layout the final unpermutation reads. Each expert's
  outputs are copied back to their source rank's return buffer.

Everything here derives from the all-gathered count matrix ``counts[src, expert]`` and the
chunk ranges, which every rank holds, so the capacities are the same on every rank and every
rank knows where its rows land in every peer's buffers without asking.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np


@dataclass(frozen=True)
class RowCopies:
    """Copies of whole rows: ``num_rows[i]`` rows from row ``src_rows[i]`` of the source buffer
    to row ``dst_rows[i]`` of the destination buffer."""

    src_rows: np.ndarray
    dst_rows: np.ndarray
    num_rows: np.ndarray

    def __len__(self) -> int:
        return len(self.num_rows)

    @property
    def total_rows(self) -> int:
        return int(self.num_rows.sum())

    @classmethod
    def nonempty(cls, src_rows, dst_rows, num_rows) -> "RowCopies":
        """The copies with at least one row."""
        keep = num_rows > 0
        return cls(src_rows[keep], dst_rows[keep], num_rows[keep])


@dataclass
class CopyEngineLayout:
    """The copy-engine transport's plan for one forward, as seen from rank ``ep_rank``.

    Row indices: "send order" = the permuted order of this rank's routed rows (chunk-major, see
    ``ChunkLayout``); "receive area" / "staging" / "return" = rows of the buffers above.
    """

    ep_size: int
    ep_rank: int
    recv_capacity: int  # rows of every rank's receive area
    staging_capacity: int  # rows of every rank's staging area
    return_capacity: int  # rows of every rank's return buffer
    recv_chunk_offsets: List[int]  # [chunk + 1] first receive-area row of each chunk (this rank)
    # [chunk] rows of each chunk's local part, at its head (all zero without local_head: a
    # chunk is then one part)
    recv_local_rows: List[int]
    # This rank's send order as runs of rows: each piece (chunk, destination rank, expert) is one
    # run, or two for its own experts with a local part (the local part's rows, then the rest).
    run_sizes: np.ndarray  # rows per run
    run_send_start: np.ndarray  # first send-order row of each run
    run_is_local: np.ndarray  # bool: bound for this rank's own experts
    # first dispatch-buffer row each run is placed at by the permutation: its receive-area row
    # (local runs) or recv_capacity + its staging row (runs bound for peers)
    run_buffer_row: np.ndarray
    dispatch: List[Dict[int, RowCopies]]  # [chunk][peer] staging row -> peer receive-area row
    # [chunk][rank] output row of the chunk (of its second part, with a local part) -> that
    # rank's return row
    combine: List[Dict[int, RowCopies]]
    # [chunk] output row of the chunk's local part -> this rank's return row (empty without one)
    combine_local: List[RowCopies]

    @classmethod
    def build(
        cls, counts: np.ndarray, ep_rank: int, expert_ranges: Sequence[Tuple[int, int]],
        local_head: Optional[Callable[[np.ndarray], np.ndarray]] = None,
    ) -> "CopyEngineLayout":
        """counts: [ep_size, num_experts] rows each rank routes to each expert (global ids);
        expert_ranges: [start, end) local-expert range of each chunk (the same on every rank);
        local_head: gives every chunk a local part: of each rank's own rows per expert
        [rank, local expert], the rows its local part takes (``ChunkLayout.local_head_rows``,
        module docstring); None: no local part."""
        counts = np.asarray(counts, dtype=np.int64)
        ep_size, num_experts = counts.shape
        num_local = num_experts // ep_size
        if num_local * ep_size != num_experts:
            raise ValueError(f"{num_experts} experts do not split over {ep_size} ranks")
        if not 0 <= ep_rank < ep_size:
            raise ValueError(f"ep_rank {ep_rank} outside [0, {ep_size})")
        per = counts.reshape(ep_size, ep_size, num_local)  # [src, dst, local expert]
        ranks = np.arange(ep_size)
        # head[d, l]: rank d's own rows for its expert l that its local part takes
        head = (np.asarray(local_head(per[ranks, ranks]), dtype=np.int64) if local_head
                else np.zeros((ep_size, num_local), dtype=np.int64))

        # send_start[s, d, l]: first send-order row of rank s's rows for expert l of rank d.
        dst_idx = np.concatenate(
            [np.repeat(np.arange(ep_size), b - a) for a, b in expert_ranges]
        ).astype(np.int64)
        loc_idx = np.concatenate(
            [np.tile(np.arange(a, b), ep_size) for a, b in expert_ranges]
        ).astype(np.int64)
        sizes_send = per[:, dst_idx, loc_idx]  # [src, piece] in send order
        starts_send = np.cumsum(sizes_send, axis=1) - sizes_send
        send_start = np.zeros((ep_size, ep_size, num_local), dtype=np.int64)
        send_start[:, dst_idx, loc_idx] = starts_send

        # recv_start[d, l, s]: first receive-area row on rank d of source s's rows for expert l
        # (for s = d, those after the head); slot s = ep_size: the head.
        slots = np.zeros((ep_size, num_local, ep_size + 1), dtype=np.int64)
        slots[:, :, :ep_size] = per.transpose(1, 2, 0)
        slots[ranks, :, ranks] -= head
        slots[:, :, ep_size] = head
        flat = slots.reshape(ep_size, -1)
        recv_start = (_starts_in_order(flat, _receive_order(expert_ranges, ep_size, num_local))
                      .reshape(ep_size, num_local, ep_size + 1))

        recv_rows = flat.sum(axis=1)  # per rank
        sent_rows = counts.sum(axis=1)
        local_rows = per[ranks, ranks].sum(axis=1)
        me = ep_rank

        chunk_rows = [int(per[:, me, a:b].sum()) for a, b in expert_ranges]
        chunk_offsets = np.concatenate([[0], np.cumsum(chunk_rows)]).astype(int).tolist()
        recv_local = [int(head[me, a:b].sum()) for a, b in expert_ranges]

        # This rank's runs in send order; own rows go to the receive area, others are staged.
        is_local = dst_idx == me
        # staging_start[d, l]: first staging row of this rank's rows for (d, l), d != me.
        staged_sizes = np.where(is_local, 0, sizes_send[me])
        staging_start = np.zeros((ep_size, num_local), dtype=np.int64)
        staging_start[dst_idx, loc_idx] = np.cumsum(staged_sizes) - staged_sizes
        recv_capacity = int(recv_rows.max())
        # Each piece as two runs: its rows in the local part (own experts only), then the rest.
        head_run = np.where(is_local, head[me, loc_idx], 0)
        rest_row = np.where(
            is_local,
            recv_start[me, loc_idx, me],
            recv_capacity + staging_start[dst_idx, loc_idx],
        )
        run_sizes = np.stack([head_run, sizes_send[me] - head_run], axis=1).reshape(-1)
        run_send_start = np.stack([starts_send[me], starts_send[me] + head_run], axis=1).reshape(-1)
        run_buffer_row = np.stack([recv_start[me, loc_idx, ep_size], rest_row], axis=1).reshape(-1)

        dispatch, combine, combine_local = [], [], []
        for g, (a, b) in enumerate(expert_ranges):
            chunk_dispatch, chunk_combine = {}, {}
            rest_base = chunk_offsets[g] + recv_local[g]  # the chunk's second part
            for peer in range(ep_size):
                if peer != me:
                    chunk_dispatch[peer] = RowCopies.nonempty(
                        staging_start[peer, a:b],
                        recv_start[peer, a:b, me],
                        per[me, peer, a:b],
                    )
                # Outputs of my experts for rows that `peer` sent, back to its return buffer
                # (my own rows: those after the local part's).
                own_head = head[me, a:b] if peer == me else 0
                chunk_combine[peer] = RowCopies.nonempty(
                    recv_start[me, a:b, peer] - rest_base,
                    send_start[peer, me, a:b] + own_head,
                    per[peer, me, a:b] - own_head,
                )
            dispatch.append(chunk_dispatch)
            combine.append(chunk_combine)
            combine_local.append(RowCopies.nonempty(
                recv_start[me, a:b, ep_size] - chunk_offsets[g],
                send_start[me, me, a:b],
                head[me, a:b],
            ))

        return cls(
            ep_size=ep_size,
            ep_rank=me,
            recv_capacity=recv_capacity,
            staging_capacity=int((sent_rows - local_rows).max()),
            return_capacity=int(sent_rows.max()),
            recv_chunk_offsets=chunk_offsets,
            recv_local_rows=recv_local,
            run_sizes=run_sizes,
            run_send_start=run_send_start,
            run_is_local=np.repeat(is_local, 2),
            run_buffer_row=run_buffer_row,
            dispatch=dispatch,
            combine=combine,
            combine_local=combine_local,
        )

    @classmethod
    def for_unique_rows(cls, unique_rows: np.ndarray, ep_rank: int) -> "CopyEngineLayout":
        """The plan of the deduplicated scheme (``rows.dedup.DedupChunkLayout``).

        unique_rows: [src, dst, chunk] rows each rank sends each rank in each chunk (one per
        token with an expert of the chunk there). Each (rank, chunk) is planned as one expert
        of one-expert chunks, so a chunk's rows land in the receive area by source rank, then
        token (the order the expansion reads), and return to the source in send order
        (chunk, destination rank, token)."""
        unique_rows = np.asarray(unique_rows, dtype=np.int64)
        ep_size, _, num_chunks = unique_rows.shape
        return cls.build(unique_rows.reshape(ep_size, ep_size * num_chunks), ep_rank,
                         [(g, g + 1) for g in range(num_chunks)])


def _receive_order(expert_ranges, ep_size: int, num_local: int) -> np.ndarray:
    """[(local expert, slot)] the position of every piece in a receive area (slots: the sources
    0 .. ep_size - 1, then the local part's head): chunk by chunk; within a chunk the heads by
    expert, then the rest by expert and source."""
    chunk_of = np.empty(num_local, dtype=np.int64)
    for g, (a, b) in enumerate(expert_ranges):
        chunk_of[a:b] = g
    slots = ep_size + 1
    expert = np.repeat(np.arange(num_local), slots)
    slot = np.tile(np.arange(slots), num_local)
    pieces = num_local * slots
    return (chunk_of[expert] * 2 + (slot != ep_size)) * pieces + expert * slots + slot


def _starts_in_order(sizes: np.ndarray, order: np.ndarray) -> np.ndarray:
    """[rank, piece] first row of each piece when every rank's pieces are laid out by
    ``order`` [piece]."""
    position = np.argsort(order, kind="stable")
    laid = sizes[:, position]
    starts = np.empty_like(laid)
    starts[:, position] = np.cumsum(laid, axis=1) - laid
    return starts
