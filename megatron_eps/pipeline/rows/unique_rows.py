"""Device-side rows of the deduplicated scheme: one row per (token, destination rank, chunk).

The source rank sends a token once to each rank that holds at least one of its experts in the
chunk, with the token's expert indices (relative to the chunk's first expert on that rank) and
their routing weights packed behind the hidden state. The expert rank expands each received row
into one row per (row, expert), runs the experts, and sums a row's weighted expert outputs in
fp32 (``row_kernels.sum_rows``) before sending one row back; the source sums the returned
rows of each token the same way. Every sum adds its terms in a fixed order, so the result is deterministic.

Everything here is sized from host numbers every rank derives from the all-gathered statistics
(``range_unique_counts``), so no step waits on the device for a size.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch

from megatron_eps.row_kernels import count_values, row_block, use_triton
from megatron_eps.triton_launch import CachedLauncher

# Index of an empty slot in the packed expert indices.
NO_EXPERT = -1


def _power_of_two(n: int) -> int:
    return 1 << max(1, (max(n, 1) - 1).bit_length())


def range_unique_counts(routing_map: torch.Tensor, ep_size: int,
                        top_k: Optional[int] = None) -> torch.Tensor:
    """[D, L, L + 1] int64: entry [d, a, b] (a < b) counts the tokens routed to at least one of
    rank d's local experts a .. b-1, for every contiguous range of local experts.

    Any chunking of the local experts into contiguous ranges reads its unique-token counts from
    this table, so it can be gathered before the chunks are chosen. routing_map: [T, E] bool;
    top_k: the most experts a token is routed to (the router's k), which the GPU path needs.

    Each token adds one to bin [d, a, next] for every a, where next is its first expert at or
    after a on rank d (L: none): it counts for [a, b) exactly when next < b, so a prefix sum of
    the bins over next gives the table. On GPUs one Triton pass fills the bins (this runs before
    the forward's one host sync, where each launch delays it); elsewhere torch does.
    """
    num_tokens, num_experts = routing_map.shape
    local = num_experts // ep_size
    if (top_k is not None and use_triton(routing_map) and routing_map.is_contiguous()
            and num_tokens):
        histogram = _next_expert_histogram_triton(routing_map, ep_size, top_k)
    else:
        histogram = _next_expert_histogram_torch(routing_map, ep_size)
    below = torch.cumsum(histogram.view(ep_size, local, local + 1), dim=2)
    return torch.nn.functional.pad(below[:, :, :-1], (1, 0))


def _next_expert_histogram_torch(routing_map: torch.Tensor, ep_size: int) -> torch.Tensor:
    num_tokens, num_experts = routing_map.shape
    local = num_experts // ep_size
    mask = routing_map.reshape(num_tokens, ep_size, local)
    ids = torch.arange(local, device=routing_map.device).expand_as(mask)
    ids = torch.where(mask, ids, torch.full_like(ids, local))
    next_expert = torch.flip(torch.cummin(torch.flip(ids, [2]), dim=2).values, [2])
    base = (torch.arange(ep_size * local, device=routing_map.device) * (local + 1)).view(
        1, ep_size, local
    )
    return count_values((base + next_expert).reshape(-1), ep_size * local * (local + 1))


@functools.lru_cache(maxsize=None)
def _histogram_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def next_expert_histogram_kernel(routing_map, histogram, map_stride, ep_size, local,
                                     BLOCK_L: tl.constexpr, TOP_K: tl.constexpr):
        # One program per token. Per rank d: its routed local experts in order (at most TOP_K),
        # then for every local expert a the first of them at or after a (local: none).
        t = tl.program_id(0).to(tl.int64)
        a = tl.arange(0, BLOCK_L)
        valid = a < local
        k = tl.arange(0, TOP_K)
        for d in range(ep_size):
            routed = tl.load(routing_map + t * map_stride + d * local + a, mask=valid, other=0)
            routed = (routed != 0).to(tl.int32)
            rank = tl.cumsum(routed, axis=0) - 1
            hit = (rank[None, :] == k[:, None]) & (routed[None, :] > 0)  # [TOP_K, BLOCK_L]
            kth = tl.sum(tl.where(hit, a[None, :], 0), axis=1)
            kth = tl.where(tl.sum(hit.to(tl.int32), axis=1) > 0, kth, local)  # [TOP_K]
            after = tl.where(kth[None, :] >= a[:, None], kth[None, :], local)  # [BLOCK_L, TOP_K]
            first = tl.min(after, axis=1)
            tl.atomic_add(histogram + (d * local + a) * (local + 1) + first, 1, mask=valid)

    return CachedLauncher(next_expert_histogram_kernel)


def _next_expert_histogram_triton(routing_map: torch.Tensor, ep_size: int, top_k: int,
                                  through_jit: bool = False) -> torch.Tensor:
    """The GPU path of the bins (``through_jit``: launched through Triton's JIT, as Triton's
    CPU interpreter needs)."""
    num_tokens, num_experts = routing_map.shape
    local = num_experts // ep_size
    histogram = torch.zeros(ep_size * local * (local + 1), dtype=torch.int64,
                            device=routing_map.device)
    grid = (num_tokens,)
    args = (routing_map.view(torch.uint8), histogram, routing_map.stride(0), ep_size, local)
    constants = {"BLOCK_L": _power_of_two(local), "TOP_K": _power_of_two(min(top_k, local))}
    launcher = _histogram_kernel()
    (launcher.through_jit if through_jit else launcher)(grid, args, constants, num_warps=4)
    return histogram


def routing_statistics(routing_map: torch.Tensor, ep_size: int, with_range_counts: bool,
                       top_k: Optional[int] = None) -> torch.Tensor:
    """The vector each rank contributes to the forward's one all-gather: its [E] token counts
    per expert, followed (``with_range_counts``) by its flattened ``range_unique_counts``."""
    counts = routing_map.sum(dim=0).to(torch.int64)
    if not with_range_counts:
        return counts
    return torch.cat([counts, range_unique_counts(routing_map, ep_size, top_k).reshape(-1)])


def split_statistics(gathered, ep_size: int, num_experts: int):
    """(counts [ep, E], range_counts [src, dst, L, L + 1]) from the gathered vectors (numpy)."""
    local = num_experts // ep_size
    per_rank = gathered.reshape(ep_size, -1)
    ranges = per_rank[:, num_experts:].reshape(ep_size, ep_size, local, local + 1)
    return per_rank[:, :num_experts].copy(), ranges


def _meta_views(rows: torch.Tensor, hidden: int, slots: int, probs_dtype: torch.dtype):
    """(expert indices [R, slots] int32, weights [R, slots]) viewed inside packed rows [R, W]
    (``dedup.meta_columns`` sizes them).

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


@functools.lru_cache(maxsize=None)
def _place_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def place_unique_rows_kernel(tokens, routing_map, probs, sent_row, dst_rows, out,
                                 out_experts, out_weights, num_tokens, hidden,
                                 token_stride, map_stride, probs_stride, out_stride,
                                 experts_stride, weights_stride, local, first, width,
                                 BLOCK: tl.constexpr, BLOCK_W: tl.constexpr, SLOTS: tl.constexpr,
                                 SLOTS_P2: tl.constexpr, IDENTITY: tl.constexpr):
        # One program per (destination rank d, token t), d-major. sent_row: the chunk's send
        # row that (d, t) fills, or -1 when t has no expert of the chunk on d.
        i = tl.program_id(0).to(tl.int64)
        r = tl.load(sent_row + i)
        if r >= 0:
            t = i % num_tokens
            d = i // num_tokens
            if IDENTITY:
                dst = r
            else:
                dst = tl.load(dst_rows + r)
            j = tl.arange(0, BLOCK_W)
            in_chunk = j < width
            column = d * local + first + j
            routed = tl.load(routing_map + t * map_stride + column, mask=in_chunk, other=0)
            routed = (routed != 0).to(tl.int32)
            weight = tl.load(probs + t * probs_stride + column, mask=in_chunk, other=0.0)
            # Slot k of the row: its k-th expert of the chunk, in expert order.
            slot = tl.cumsum(routed, axis=0) - 1
            k = tl.arange(0, SLOTS_P2)
            hit = (slot[None, :] == k[:, None]) & (routed[None, :] > 0)
            expert = tl.sum(tl.where(hit, j[None, :], 0), axis=1)
            found = tl.sum(hit.to(tl.int32), axis=1) > 0
            expert = tl.where(found, expert, -1)
            slot_weight = tl.sum(tl.where(hit, weight[None, :], 0.0), axis=1)
            keep = k < SLOTS
            tl.store(out_experts + dst * experts_stride + k, expert, mask=keep)
            tl.store(out_weights + dst * weights_stride + k,
                     slot_weight.to(out_weights.dtype.element_ty), mask=keep)
            for start in range(0, hidden, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < hidden
                row = tl.load(tokens + t * token_stride + cols, mask=mask)
                tl.store(out + dst * out_stride + cols, row, mask=mask)

    return CachedLauncher(place_unique_rows_kernel)


def place_unique_rows(
    tokens: torch.Tensor,
    probs: torch.Tensor,
    routing_map: torch.Tensor,
    ep_size: int,
    expert_range: Tuple[int, int],
    out: torch.Tensor,
    slots: int,
    dst_rows: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Write one chunk's send rows, ordered by (destination rank, token), into ``out``.

    Args:
        tokens: [T, H]; probs: [T, E]; routing_map: [T, E] bool.
        expert_range: [start, end) local experts of the chunk (the same on every rank).
        out: [R, W] rows, W = H + dedup.meta_columns(...): the chunk's send rows, or (``dst_rows``)
            a buffer the rows are placed into.
        slots: most experts one token has in one chunk of one rank.
        dst_rows: [Q] int64, the row of ``out`` each send row goes to; None: row q of ``out``.
            Q = tokens with an expert of the chunk, summed over the destination ranks (the host
            knows it from the gathered counts).
    Returns:
        [D * T] int64, destination-major: the send row (0 .. Q-1) of (rank d, token t), -1 where
        t has no expert of the chunk on d (``return_table`` turns these into the final sum).

    On GPUs a scan numbers the rows and one Triton pass writes each row (hidden state and
    packed fields) straight to its place; elsewhere torch does the same in several passes.
    """
    num_rows = out.shape[0] if dst_rows is None else dst_rows.numel()
    sent_row = _send_rows(routing_map, ep_size, expert_range)
    if (use_triton(tokens, out, probs, routing_map) and tokens.stride(1) == 1
            and out.stride(1) == 1 and routing_map.is_contiguous() and probs.stride(1) == 1):
        _place_unique_rows_triton(tokens, probs, routing_map, ep_size, expert_range, out, slots,
                                  dst_rows, num_rows, sent_row)
    elif dst_rows is None:
        _place_unique_rows_torch(tokens, probs, routing_map, ep_size, expert_range, out, slots,
                                 sent_row)
    else:
        rows = out.new_empty((num_rows, out.shape[1]))
        _place_unique_rows_torch(tokens, probs, routing_map, ep_size, expert_range, rows, slots,
                                 sent_row)
        out.index_copy_(0, dst_rows, rows)
    return sent_row


def _send_rows(routing_map: torch.Tensor, ep_size: int, expert_range: Tuple[int, int]):
    """[D * T] int64, d-major: the send row of (destination rank d, token t), or -1 when t has
    no expert of the chunk on d."""
    num_tokens, num_experts = routing_map.shape
    start, end = expert_range
    chunk_map = routing_map.view(num_tokens, ep_size, num_experts // ep_size)[:, :, start:end]
    sent = chunk_map.any(dim=2).t().reshape(-1)
    row = torch.cumsum(sent, dim=0) - 1
    return torch.where(sent, row, -1)


def _place_unique_rows_triton(tokens, probs, routing_map, ep_size, expert_range, out, slots,
                              dst_rows, num_rows, sent_row, through_jit: bool = False):
    """The GPU path of place_unique_rows (``through_jit``: launched through Triton's JIT, as
    Triton's CPU interpreter needs)."""
    num_tokens, num_experts = routing_map.shape
    hidden = tokens.shape[1]
    if num_rows == 0:
        return
    start, end = expert_range
    out_experts, out_weights = _meta_views(out, hidden, slots, probs.dtype)
    grid = (ep_size * num_tokens,)
    args = (tokens, routing_map.view(torch.uint8), probs, sent_row,
            dst_rows if dst_rows is not None else sent_row, out, out_experts, out_weights,
            num_tokens, hidden, tokens.stride(0), routing_map.stride(0),
            probs.stride(0), out.stride(0), out_experts.stride(0), out_weights.stride(0),
            num_experts // ep_size, start, end - start)
    constants = {"BLOCK": row_block(hidden), "BLOCK_W": _power_of_two(end - start),
                 "SLOTS": slots, "SLOTS_P2": _power_of_two(slots), "IDENTITY": dst_rows is None}
    launcher = _place_kernel()
    (launcher.through_jit if through_jit else launcher)(grid, args, constants, num_warps=4)


def _place_unique_rows_torch(tokens, probs, routing_map, ep_size, expert_range, out, slots,
                             sent_row):
    """place_unique_rows in torch into ``out`` [Q, W] (CPU, and the reference of the GPU
    kernel's tests); ``sent_row``: ``_send_rows``."""
    num_tokens, num_experts = routing_map.shape
    hidden = tokens.shape[1]
    local = num_experts // ep_size
    start, end = expert_range
    width = end - start
    num_rows = out.shape[0]
    device = routing_map.device
    if num_rows == 0:
        return
    chunk_map = routing_map.reshape(num_tokens, ep_size, local)[:, :, start:end]
    chunk_probs = probs.reshape(num_tokens, ep_size, local)[:, :, start:end]
    chunk_map = chunk_map.transpose(0, 1).reshape(ep_size * num_tokens, width)  # [(d, t), c]
    chunk_probs = chunk_probs.transpose(0, 1).reshape(ep_size * num_tokens, width)
    # Pairs that send nothing land in a spare row past the end, which is dropped.
    row = torch.where(sent_row >= 0, sent_row, num_rows)
    token_index = torch.empty(num_rows + 1, dtype=torch.long, device=device)
    token_index.scatter_(0, row, torch.arange(num_tokens, device=device).repeat(ep_size))
    token_index = token_index[:num_rows]
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
    placed_experts = experts.new_empty((num_rows + 1, slots)).index_copy_(0, row, experts[:, :slots])
    placed_weights = weights.new_empty((num_rows + 1, slots)).index_copy_(0, row, weights[:, :slots])
    out_experts.copy_(placed_experts[:num_rows])
    out_weights.copy_(placed_weights[:num_rows])


def return_table(sent_rows, chunk_offsets, num_tokens: int, num_returned: int) -> torch.Tensor:
    """[T, C * D] int64: the slot table (``row_kernels.sum_rows``) of the source's final sum.

    sent_rows: per chunk (C of them), ``place_unique_rows``'s [D * T] send rows; chunk_offsets:
    the first row of each chunk among the ``num_returned`` returned rows, which come back in
    send order. Token t's slots are its returned rows in (chunk, rank) order, ``num_returned``
    (an empty slot) where it sent nothing, so the sum adds them in that order.
    """
    rows = [torch.where(sent >= 0, sent + int(offset), num_returned)
            for sent, offset in zip(sent_rows, chunk_offsets)]
    slots = sum(r.numel() for r in rows) // num_tokens if num_tokens else len(rows)
    if not num_tokens:
        return torch.empty((0, slots), dtype=torch.long, device=rows[0].device)
    return torch.stack(rows).view(slots, num_tokens).t()


def expand_rows(
    received: torch.Tensor, hidden: int, slots: int, num_experts: int, num_pairs: int,
    probs_dtype: torch.dtype,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One row per (received row, expert), grouped by expert, and where each output goes back.

    Args:
        received: [R, W] one chunk's received rows, by source rank, then token.
        num_experts: experts in the chunk on this rank; num_pairs: M, the (row, expert) pairs
            (the chunk's tokens_per_expert summed).
    Returns:
        rows [M, H] and weights [M], ordered by expert, then source rank, then token (the order
        Megatron's dispatcher hands its experts), and the slot table [R, slots] int64 of the
        pre-reduction (``row_kernels.sum_rows``): entry [r, k] is the pair of row r's k-th
        expert (in expert order), M for an empty slot.

    The pairs are the filled slots sorted by expert, stably (so by row within an expert); the
    table is that order inverted. No step reads a size from the device.
    """
    num_rows = received.shape[0]
    device = received.device
    if num_rows == 0 or num_pairs == 0:
        return (received.new_empty((0, hidden)), torch.empty(0, dtype=probs_dtype, device=device),
                torch.full((num_rows, slots), num_pairs, dtype=torch.long, device=device))
    experts, weights = _meta_views(received, hidden, slots, probs_dtype)
    # Empty slots (-1) sort after every expert.
    expert_of_cell = experts.reshape(-1).remainder(num_experts + 1)  # cells (row, slot)
    pair_cell = torch.sort(expert_of_cell, stable=True).indices[:num_pairs]
    pair_row = torch.div(pair_cell, slots, rounding_mode="floor")
    table = torch.full((num_rows * slots,), num_pairs, dtype=torch.long, device=device)
    table.scatter_(0, pair_cell, torch.arange(num_pairs, device=device))
    return (received[:, :hidden].index_select(0, pair_row), torch.take(weights, pair_cell),
            table.view(num_rows, slots))
