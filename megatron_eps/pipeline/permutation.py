"""A forward's routed rows in chunk-major order, and the routing weight packed into each row."""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import torch

from megatron_eps import staging
from megatron_eps.pipeline import permute_kernels


class Permutation(NamedTuple):
    """A forward's routed rows, chunk-major (``permute_chunk_major``)."""

    tokens: Optional[torch.Tensor]  # [num_rows, H], or None where the caller gathers them
    probs: torch.Tensor  # [num_rows] the routing weight of each row
    sorted_indices: torch.Tensor  # [num_rows] the token of each row (Megatron's unpermute takes it)
    token_rows: Optional[torch.Tensor]  # [T, k] each token's rows in row order, or None


def permute_chunk_major(
    tokens: torch.Tensor,
    probs: torch.Tensor,
    routing_map: torch.Tensor,
    expert_order: np.ndarray,
    num_rows: int,
    gather_tokens: bool = True,
    rows_per_expert: Optional[np.ndarray] = None,
    top_k: int = 0,
) -> Permutation:
    """Megatron's permute with the experts taken in ``expert_order``, without a host sync.

    Megatron's unfused ``permute`` sizes its output with ``masked_select`` (a device sync); here
    the row count is already known on the host (from the count matrix), so every routed
    (expert, token) pair is scattered to its row with a cumulative sum. Row order is the same
    as Megatron's: by expert in ``expert_order``, then by token index.

    Args:
        tokens: [T, H]; probs: [T, E]; routing_map: [T, E] bool.
        expert_order: [E] expert ids, chunk-major (ChunkLayout.expert_order).
        num_rows: number of routed pairs (sum of routing_map).
        rows_per_expert: [E] this rank's routed pairs per expert (its row of the count
            matrix), if known: on GPUs the rows are then numbered in one Triton pass
            (``permute_kernels.route_rows``) instead of a dozen torch ops on the host's
            critical path.
        top_k: the router's k; with it, that pass also lists each token's rows (``token_rows``,
            where every token has k), which the final sum reads instead of sorting.
    """
    num_tokens, num_experts = routing_map.shape
    device = routing_map.device
    identity = bool((expert_order == np.arange(num_experts)).all())
    if (rows_per_expert is not None and permute_kernels.use_triton(routing_map, probs)
            and routing_map.is_contiguous() and probs.stride(1) == 1):
        sizes = np.asarray(rows_per_expert, dtype=np.int64)[expert_order]
        # One staging: each expert's first row and its place in the row order.
        host = np.empty((2, num_experts), dtype=np.int64)
        host[0, expert_order] = np.cumsum(sizes) - sizes
        host[1, expert_order] = np.arange(num_experts)
        staged = staging.to_device(host if not identity else host[:1], device)
        sorted_indices, permuted_probs, token_rows = permute_kernels.route_rows(
            routing_map, probs, staged[0], num_rows, top_k=top_k,
            position=None if identity else staged[1])
        permuted = tokens.index_select(0, sorted_indices) if gather_tokens else None
        return Permutation(permuted, permuted_probs, sorted_indices, token_rows)
    order = None if identity else torch.as_tensor(expert_order, device=device)
    mask = routing_map if order is None else routing_map.index_select(1, order)
    mask = mask.t().reshape(-1)  # [E * T], expert-major
    row = torch.cumsum(mask, dim=0) - 1
    # Pairs that are not routed all land in one spare slot past the end, which is dropped.
    row = torch.where(mask, row, torch.full_like(row, num_rows))
    token_ids = torch.arange(num_tokens, device=device).repeat(num_experts)
    sorted_indices = torch.empty(num_rows + 1, dtype=torch.long, device=device)
    sorted_indices.scatter_(0, row, token_ids)
    sorted_indices = sorted_indices[:num_rows]
    expert_probs = probs if order is None else probs.index_select(1, order)
    permuted_probs = probs.new_empty(num_rows + 1)
    permuted_probs.scatter_(0, row, expert_probs.t().reshape(-1))
    permuted_probs = permuted_probs[:num_rows]
    permuted = tokens.index_select(0, sorted_indices) if gather_tokens else None
    return Permutation(permuted, permuted_probs, sorted_indices, None)


def probs_columns(tokens: torch.Tensor, probs: torch.Tensor) -> int:
    """Columns (of the token dtype) appended to each dispatched row to carry its routing weight,
    or 0 when the weight cannot ride along (then it gets an all-to-all of its own).

    The extra columns span 16 bytes (at least the weight's size), so 16-byte aligned rows stay so
    for the grouped GEMM, and the weight's bytes sit at an offset aligned to its own size.
    """
    token_bytes, prob_bytes = tokens.element_size(), probs.element_size()
    width = max(16, prob_bytes)
    hidden_bytes = tokens.shape[-1] * token_bytes
    if width % token_bytes or prob_bytes % token_bytes or hidden_bytes % prob_bytes:
        return 0
    return width // token_bytes
