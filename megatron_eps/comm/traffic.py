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
