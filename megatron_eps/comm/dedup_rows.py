"""Device-side rows of the deduplicated scheme: one row per (token, destination rank, chunk).

The source rank sends a token once to each rank that holds at least one of its experts in the
chunk, with the token's expert indices (relative to the chunk's first expert on that rank) and
their routing weights packed behind the hidden state. The expert rank expands each received row
into one row per (row, expert), runs the experts, and sums a row's weighted expert outputs in
fp32 (``permute_kernels.sum_rows``) before sending one row back; the source sums the returned
rows of each token the same way. Every sum adds its terms in a fixed order, so the result is deterministic.

Everything here is sized from host numbers every rank derives from the all-gathered statistics
(``range_unique_counts``), so no step waits on the device for a size.
"""

from __future__ import annotations

from typing import Tuple

import torch

from megatron_eps.pipeline.permute_kernels import count_values

# Index of an empty slot in the packed expert indices.
NO_EXPERT = -1
_ALIGN_BYTES = 16


def range_unique_counts(routing_map: torch.Tensor, ep_size: int) -> torch.Tensor:
    """[D, L, L + 1] int64: entry [d, a, b] (a < b) counts the tokens routed to at least one of
    rank d's local experts a .. b-1, for every contiguous range of local experts.

    Any chunking of the local experts into contiguous ranges reads its unique-token counts from
    this table, so it can be gathered before the chunks are chosen. routing_map: [T, E] bool.
    """
    num_tokens, num_experts = routing_map.shape
    local = num_experts // ep_size
    mask = routing_map.reshape(num_tokens, ep_size, local)
    ids = torch.arange(local, device=routing_map.device).expand_as(mask)
    ids = torch.where(mask, ids, torch.full_like(ids, local))
    # next_expert[t, d, a]: the token's first expert at or after a on rank d (local: none).
    next_expert = torch.flip(torch.cummin(torch.flip(ids, [2]), dim=2).values, [2])
    base = (torch.arange(ep_size * local, device=routing_map.device) * (local + 1)).view(
        1, ep_size, local
    )
    histogram = count_values((base + next_expert).reshape(-1), ep_size * local * (local + 1))
    histogram = histogram.view(ep_size, local, local + 1)
    table = torch.zeros_like(histogram)
    # A token counts for [a, b) when its next expert from a lies below b.
    table[:, :, 1:] = torch.cumsum(histogram, dim=2)[:, :, :-1]
    return table


def routing_statistics(routing_map: torch.Tensor, ep_size: int,
                       with_range_counts: bool) -> torch.Tensor:
    """The vector each rank contributes to the forward's one all-gather: its [E] token counts
    per expert, followed (``with_range_counts``) by its flattened ``range_unique_counts``."""
    counts = routing_map.sum(dim=0).to(torch.int64)
    if not with_range_counts:
        return counts
    return torch.cat([counts, range_unique_counts(routing_map, ep_size).reshape(-1)])


def split_statistics(gathered, ep_size: int, num_experts: int):
    """(counts [ep, E], range_counts [src, dst, L, L + 1]) from the gathered vectors (numpy)."""
    local = num_experts // ep_size
    per_rank = gathered.reshape(ep_size, -1)
    ranges = per_rank[:, num_experts:].reshape(ep_size, ep_size, local, local + 1)
    return per_rank[:, :num_experts].copy(), ranges


def meta_columns(hidden: int, token_dtype: torch.dtype, probs_dtype: torch.dtype,
                 slots: int) -> int:
    """Columns (of the token dtype) behind the hidden state that carry ``slots`` int32 expert
    indices and ``slots`` weights; a multiple of 16 bytes, so aligned rows stay aligned. 0 when
    the hidden state's bytes do not keep the packed fields aligned (no dedup then)."""
    token_bytes = torch.empty((), dtype=token_dtype).element_size()
    prob_bytes = torch.empty((), dtype=probs_dtype).element_size()
    if (hidden * token_bytes) % max(8, prob_bytes):
        return 0
    need = slots * (4 + prob_bytes)
    padded = -(-need // _ALIGN_BYTES) * _ALIGN_BYTES
    return padded // token_bytes


def _meta_views(rows: torch.Tensor, hidden: int, slots: int, probs_dtype: torch.dtype):
    """(expert indices [R, slots] int32, weights [R, slots]) viewed inside packed rows [R, W].

    The wider of the two fields comes first, right after the hidden state, so both stay
    aligned to their own size."""
    raw = rows[:, hidden:].view(torch.uint8)
    prob_bytes = torch.empty((), dtype=probs_dtype).element_size()
    if prob_bytes >= 4:
        weights = raw[:, : prob_bytes * slots].view(probs_dtype)
        experts = raw[:, prob_bytes * slots : (prob_bytes + 4) * slots].view(torch.int32)
    else:
        experts = raw[:, : 4 * slots].view(torch.int32)
        weights = raw[:, 4 * slots : (prob_bytes + 4) * slots].view(probs_dtype)
    return experts, weights


def place_unique_rows(
    tokens: torch.Tensor,
    probs: torch.Tensor,
    routing_map: torch.Tensor,
    ep_size: int,
    expert_range: Tuple[int, int],
    out: torch.Tensor,
    slots: int,
) -> torch.Tensor:
    """Write one chunk's send rows, ordered by (destination rank, token), into ``out``.

    Args:
        tokens: [T, H]; probs: [T, E]; routing_map: [T, E] bool.
        expert_range: [start, end) local experts of the chunk (the same on every rank).
        out: [Q, W] rows of the chunk's send buffer, Q = tokens with an expert of the chunk,
            summed over the destination ranks (the host knows it from the gathered counts);
            W = H + meta_columns(...).
        slots: most experts one token has in one chunk of one rank.
    Returns:
        [Q] int64 token index of each row (where its returned partial sum belongs).
    """
    num_tokens, num_experts = routing_map.shape
    hidden = tokens.shape[1]
    local = num_experts // ep_size
    start, end = expert_range
    width = end - start
    num_rows = out.shape[0]
    device = routing_map.device
    chunk_map = routing_map.reshape(num_tokens, ep_size, local)[:, :, start:end]
    chunk_probs = probs.reshape(num_tokens, ep_size, local)[:, :, start:end]
    chunk_map = chunk_map.transpose(0, 1).reshape(ep_size * num_tokens, width)  # [(d, t), c]
    chunk_probs = chunk_probs.transpose(0, 1).reshape(ep_size * num_tokens, width)
    sent = chunk_map.any(dim=1)
    row = torch.cumsum(sent, dim=0) - 1
    # Pairs that send nothing land in a spare row past the end, which is dropped.
    row = torch.where(sent, row, torch.full_like(row, num_rows))
    token_index = torch.empty(num_rows + 1, dtype=torch.long, device=device)
    token_index.scatter_(0, row, torch.arange(num_tokens, device=device).repeat(ep_size))
    token_index = token_index[:num_rows]
    if num_rows == 0:
        return token_index
    # Slot j of a row holds the row's j-th expert in the chunk, in expert order.
    slot = torch.cumsum(chunk_map, dim=1) - 1
    slot = torch.where(chunk_map, slot, torch.full_like(slot, slots))
    experts = torch.full((ep_size * num_tokens, slots + 1), NO_EXPERT, dtype=torch.int32,
                         device=device)
    weights = torch.zeros((ep_size * num_tokens, slots + 1), dtype=probs.dtype, device=device)
    columns = torch.arange(width, dtype=torch.int32, device=device).expand_as(slot)
    experts.scatter_(1, slot, columns)
    weights.scatter_(1, slot, chunk_probs)
    out_experts, out_weights = _meta_views(out, hidden, slots, probs.dtype)
    out[:, :hidden] = tokens.index_select(0, token_index)
    # The spare row past the end collects the pairs that send nothing.
    placed_experts = experts.new_empty((num_rows + 1, slots)).index_copy_(0, row, experts[:, :slots])
    placed_weights = weights.new_empty((num_rows + 1, slots)).index_copy_(0, row, weights[:, :slots])
    out_experts.copy_(placed_experts[:num_rows])
    out_weights.copy_(placed_weights[:num_rows])
    return token_index


def expand_rows(
    received: torch.Tensor, hidden: int, slots: int, num_experts: int, num_pairs: int,
    probs_dtype: torch.dtype,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One row per (received row, expert), grouped by expert.

    Args:
        received: [R, W] one chunk's received rows, by source rank, then token.
        num_experts: experts in the chunk on this rank; num_pairs: M, the (row, expert) pairs
            (the chunk's tokens_per_expert summed).
    Returns:
        (rows [M, H], weights [M], received row of each pair [M]); rows ordered by expert,
        then source rank, then token: the order Megatron's dispatcher hands its experts.
    """
    num_rows = received.shape[0]
    device = received.device
    if num_rows == 0 or num_pairs == 0:
        empty = torch.empty(0, dtype=torch.long, device=device)
        return received.new_empty((0, hidden)), torch.empty(0, dtype=probs_dtype,
                                                            device=device), empty
    experts, weights = _meta_views(received, hidden, slots, probs_dtype)
    experts = experts.to(torch.long)
    row_ids = torch.arange(num_rows, device=device).unsqueeze(1).expand(-1, slots)
    # (expert, row) cells, expert-major; empty slots go to cells of their own past the end, so
    # no cell is written twice (index_fill_/index_copy_ take no host value: no host sync).
    spare = num_experts * num_rows + torch.arange(num_rows * slots, device=device).view(num_rows, slots)
    cell = torch.where(experts >= 0, experts * num_rows + row_ids, spare).reshape(-1)
    cells = num_experts * num_rows + num_rows * slots
    routed = torch.zeros(cells, dtype=torch.bool, device=device).index_fill_(0, cell, True)
    dense_weights = torch.zeros(cells, dtype=probs_dtype, device=device).index_copy_(
        0, cell, weights.reshape(-1))
    routed = routed[: num_experts * num_rows]
    position = torch.cumsum(routed, dim=0) - 1
    position = torch.where(routed, position, torch.full_like(position, num_pairs))
    pair_row = torch.empty(num_pairs + 1, dtype=torch.long, device=device)
    pair_row.scatter_(0, position, torch.arange(num_rows, device=device).repeat(num_experts))
    pair_weights = torch.empty(num_pairs + 1, dtype=probs_dtype, device=device)
    pair_weights.scatter_(0, position, dense_weights[: num_experts * num_rows])
    pair_row = pair_row[:num_pairs]
    return received[:, :hidden].index_select(0, pair_row), pair_weights[:num_pairs], pair_row
