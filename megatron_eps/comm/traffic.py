"""How many rows a forward moves: the per-(token, expert) scheme EPS and Megatron's alltoall
dispatcher use, against one row per (token, destination rank, chunk).

Megatron's alltoall dispatcher sends a token once for every expert it routes to. A token bound
for several experts of one rank could travel once to that rank and be expanded there, and the
combine could send one pre-reduced row back per (token, rank, chunk). ``routed_traffic`` counts
both schemes for one rank's routing map, so the saving can be read before the scheme exists.
Chunks are groups of local experts (the pipeline's split), so a token whose experts on one rank
fall into two chunks travels once per chunk: more chunks save less.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

import torch


@dataclass(frozen=True)
class Traffic:
    """Rows one rank sends in one direction (dispatch; the combine sends as many back)."""

    per_pair_remote: int  # one row per (token, expert on another rank)
    per_pair_local: int  # one row per (token, expert on this rank)
    per_rank_remote: int  # one row per (token, other rank, chunk) with at least one expert
    per_rank_local: int  # one row per (token, chunk) with at least one expert on this rank

    @property
    def remote_reduction(self) -> float:
        """per-pair remote rows / per-rank remote rows (inf when nothing crosses a link)."""
        return self.per_pair_remote / self.per_rank_remote if self.per_rank_remote else float("inf")


def routed_traffic(
    routing_map: torch.Tensor, ep_size: int, ep_rank: int,
    expert_ranges: Sequence[Tuple[int, int]],
) -> Traffic:
    """routing_map: [T, E] bool of this rank; experts are split evenly over ``ep_size`` ranks and
    each rank's local experts into the chunks ``expert_ranges`` ([start, end) local indices)."""
    num_tokens, num_experts = routing_map.shape
    local = num_experts // ep_size
    per_rank = routing_map.reshape(num_tokens, ep_size, local)  # [T, dst, local expert]
    pairs = per_rank.sum(dim=(0, 2)).to(torch.int64)  # [dst]
    chunks = torch.stack([per_rank[:, :, a:b].any(dim=2) for a, b in expert_ranges], dim=2)
    unique = chunks.sum(dim=(0, 2)).to(torch.int64)  # [dst]: (token, chunk) rows per rank
    remote = torch.ones(ep_size, dtype=torch.bool)
    remote[ep_rank] = False
    return Traffic(
        per_pair_remote=int(pairs[remote].sum()),
        per_pair_local=int(pairs[ep_rank]),
        per_rank_remote=int(unique[remote].sum()),
        per_rank_local=int(unique[ep_rank]),
    )


@dataclass(frozen=True)
class BytesSent:
    """Bytes one rank sends in one forward, by direction and by whether they cross a link."""

    dispatch_remote: int
    dispatch_local: int
    combine_remote: int
    combine_local: int

    @property
    def remote(self) -> int:
        return self.dispatch_remote + self.combine_remote

    @property
    def local(self) -> int:
        return self.dispatch_local + self.combine_local

    def __add__(self, other: "BytesSent") -> "BytesSent":
        return BytesSent(
            self.dispatch_remote + other.dispatch_remote,
            self.dispatch_local + other.dispatch_local,
            self.combine_remote + other.combine_remote,
            self.combine_local + other.combine_local,
        )

    def to_dict(self) -> dict:
        return {"dispatch_remote": self.dispatch_remote, "dispatch_local": self.dispatch_local,
                "combine_remote": self.combine_remote, "combine_local": self.combine_local,
                "remote": self.remote, "local": self.local}


def bytes_sent(send_splits, recv_splits, ep_rank: int, dispatch_row_bytes: int,
               combine_row_bytes: int) -> BytesSent:
    """What rank ``ep_rank`` sends: its dispatch rows ``send_splits[chunk][dst]`` and, back to
    each source, the combine rows ``recv_splits[chunk][src]`` (one per row it received)."""
    dispatched = [sum(col) for col in zip(*send_splits)] if send_splits else []
    returned = [sum(col) for col in zip(*recv_splits)] if recv_splits else []
    local_d = dispatched[ep_rank] if dispatched else 0
    local_c = returned[ep_rank] if returned else 0
    return BytesSent(
        dispatch_remote=(sum(dispatched) - local_d) * dispatch_row_bytes,
        dispatch_local=local_d * dispatch_row_bytes,
        combine_remote=(sum(returned) - local_c) * combine_row_bytes,
        combine_local=local_c * combine_row_bytes,
    )
