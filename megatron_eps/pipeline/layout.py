"""How one forward's local experts are grouped into chunks, and where each chunk's rows go.

A chunking is N (equal chunks, the paper's split) or the number of local experts in each
chunk; ``chunk_sizes`` turns either into sizes, and ``ChunkLayout`` turns sizes and the
all-gathered count matrix into every split and offset the transports and the experts need.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

# The two parts of a chunk whose local rows are apart (``ChunkLayout.local_rows_apart``): the
# rows this rank routed to its own experts (whole tiles of them, ``local_head_rows``), and the
# rest, mostly the rows its peers sent.
LOCAL_PART = "local"
PEER_PART = "peer"
# The largest row tile of the expert GEMMs (torch._grouped_mm's and the Triton kernel's).
LOCAL_ROWS_ALIGN = 128


def local_head_rows(own_rows, align: int = LOCAL_ROWS_ALIGN) -> np.ndarray:
    """Of each expert's rows from its own rank, those its local part takes: whole multiples of
    ``align`` rows. The rest runs with the peers' rows, so the two GEMM calls of a chunk run no
    more row tiles than one call would (one H200: own rows split off whole cost DSV2's experts
    17-33% more GEMM time at 4K-8K tokens/rank; benchmarks/local_rows_tradeoff.py)."""
    own = np.asarray(own_rows, dtype=np.int64)
    return (own // align) * align


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
    """Experts per chunk for ``chunking`` (the one place a chunking is normalised).

    An int N is clamped to [1, local experts] (a chunk holds at least one expert) and split as
    ``split`` says (equal or tail); sizes must be >= 1 each and cover the local experts.
    """
    if isinstance(chunking, (int, np.integer)):
        n = max(1, min(int(chunking), num_local_experts))
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
