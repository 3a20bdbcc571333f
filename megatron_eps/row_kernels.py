"""The two row permutations around the experts, one pass over the rows each (Triton on GPUs).

* ``scatter_routed_rows``: every routed (token, expert) pair's row, the token's hidden state and
  its routing weight, written to its row of the send (or receive) buffer. Torch needs three
  passes for it: widen the tokens by the weight columns, gather the rows, write the weights
  (and, for rows placed straight into a receive area, an extra index_copy).
* ``sum_rows``: rows summed per output row (a token's k expert outputs; in the deduplicated
  scheme, a received row's expert outputs and a token's returned partial sums) in fp32 in a
  fixed order (one rounding, deterministic), plus the shared experts' output. Torch: a gather,
  an add, a cast and an add per slot.

Each has a torch path (CPU, and the reference the GPU tests compare against) with the same
arithmetic.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from megatron_eps.triton_launch import CachedLauncher, triton_imports


def use_triton(*tensors) -> bool:
    return all(t.is_cuda for t in tensors if t is not None) and triton_imports()


@functools.lru_cache(maxsize=None)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def scatter_rows_kernel(tokens, token_index, dst_rows, probs, out, out_probs,
                            hidden, token_stride, out_stride, probs_stride,
                            BLOCK: tl.constexpr, IDENTITY: tl.constexpr, WITH_PROBS: tl.constexpr):
        i = tl.program_id(0)
        src = tl.load(token_index + i).to(tl.int64)
        if IDENTITY:
            dst = i.to(tl.int64)
        else:
            dst = tl.load(dst_rows + i).to(tl.int64)
        for start in range(0, hidden, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < hidden
            row = tl.load(tokens + src * token_stride + cols, mask=mask)
            tl.store(out + dst * out_stride + cols, row, mask=mask)
        if WITH_PROBS:
            tl.store(out_probs + dst * probs_stride, tl.load(probs + i))

    @triton.jit
    def sum_rows_kernel(rows, table, shared, out, hidden, rows_stride, num_rows,
                        SLOTS: tl.constexpr, BLOCK: tl.constexpr, WITH_SHARED: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        for start in range(0, hidden, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < hidden
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for j in tl.static_range(SLOTS):
                r = tl.load(table + t * SLOTS + j).to(tl.int64)
                # an empty slot (r >= num_rows) reads no column
                width = tl.where(r < num_rows, hidden, 0)
                acc += tl.load(rows + r * rows_stride + cols, mask=cols < width,
                               other=0.0).to(tl.float32)
            result = acc.to(out.dtype.element_ty)
            if WITH_SHARED:
                s = tl.load(shared + t * hidden + cols, mask=mask)
                result = (result.to(tl.float32) + s.to(tl.float32)).to(out.dtype.element_ty)
            tl.store(out + t * hidden + cols, result, mask=mask)

    return CachedLauncher(scatter_rows_kernel), CachedLauncher(sum_rows_kernel)


# Tokens one program of the routing pass numbers: the pass runs on (expert, split) programs, so
# that a long prompt spreads over the GPU instead of one program per expert walking every token.
TOKENS_PER_SPLIT = 512


@functools.lru_cache(maxsize=None)
def _route_kernels():
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["num_tokens"])
    def count_split_kernel(routing_map, split_counts, num_tokens, num_experts, map_stride,
                           tokens_per_split, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
        # Program (j, s): the routed tokens of experts [j * BLOCK_E, ...) among tokens
        # [s * tokens_per_split, ...). A program per expert tile and split, reading its part of
        # the split in few loads, keeps the chain of dependent loads short: one program per
        # split walking it in small blocks waits on each load in turn (latency, not bandwidth).
        cols = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
        s = tl.program_id(1).to(tl.int64)
        in_range = cols < num_experts
        acc = tl.zeros([BLOCK_E], dtype=tl.int32)
        first = s * tokens_per_split
        for start in range(0, tokens_per_split, BLOCK_T):
            t = first + start + tl.arange(0, BLOCK_T)
            tile = tl.load(routing_map + t[:, None] * map_stride + cols[None, :],
                           mask=(t < num_tokens)[:, None] & in_range[None, :], other=0)
            acc += tl.sum((tile != 0).to(tl.int32), axis=0)
        tl.store(split_counts + s * num_experts + cols, acc, mask=in_range)

    @triton.jit(do_not_specialize=["num_tokens"])
    def route_rows_kernel(routing_map, probs, first_row, sorted_indices, permuted_probs,
                          position, token_rows, split_counts, num_tokens, num_experts, map_stride,
                          probs_stride, top_k, tokens_per_split, BLOCK_T: tl.constexpr,
                          BLOCK_E: tl.constexpr, BLOCK_S: tl.constexpr,
                          WITH_TABLE: tl.constexpr, IDENTITY: tl.constexpr):
        # Program (e, s): expert e's routed tokens of split s, in token order, take the rows
        # from first_row[e] + (e's routed tokens in the earlier splits) on (a running count
        # over blocks of tokens numbers them).
        e = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        row = tl.load(first_row + e)
        for s0 in range(0, split, BLOCK_S):
            earlier_splits = s0 + tl.arange(0, BLOCK_S)
            row += tl.sum(tl.load(split_counts + earlier_splits.to(tl.int64) * num_experts + e,
                                  mask=earlier_splits < split, other=0).to(tl.int64), axis=0)
        if WITH_TABLE:
            if IDENTITY:
                column = e
            else:
                column = tl.load(position + e).to(tl.int64)
        first = split.to(tl.int64) * tokens_per_split
        for start in range(0, tokens_per_split, BLOCK_T):
            t = first + start + tl.arange(0, BLOCK_T)
            t64 = t.to(tl.int64)
            routed = tl.load(routing_map + t64 * map_stride + e, mask=t < num_tokens,
                             other=0) != 0
            rows = row + tl.cumsum(routed.to(tl.int64), axis=0) - 1
            tl.store(sorted_indices + rows, t64, mask=routed)
            weight = tl.load(probs + t64 * probs_stride + e, mask=routed)
            tl.store(permuted_probs + rows, weight, mask=routed)
            if WITH_TABLE:
                # The token's rows in row order: this pair is its slot-th, slot = the token's
                # routed experts that come before e in the row order.
                slot = tl.zeros([BLOCK_T], dtype=tl.int32)
                if IDENTITY:
                    # the experts before e in the row order are those with smaller ids
                    last = tl.program_id(0)
                else:
                    last = num_experts
                for e0 in range(0, last, BLOCK_E):
                    cols = e0 + tl.arange(0, BLOCK_E)
                    in_range = cols < num_experts
                    if IDENTITY:
                        earlier = cols < column
                    else:
                        place = tl.load(position + cols, mask=in_range, other=0)
                        earlier = place < column
                    # The mask stays constant along a row's bytes so that they load as vectors;
                    # the experts after e are dropped from the tile afterwards.
                    tile = tl.load(routing_map + t64[:, None] * map_stride + cols[None, :],
                                   mask=routed[:, None] & in_range[None, :], other=0)
                    slot += tl.sum(((tile != 0) & earlier[None, :]).to(tl.int32), axis=1)
                tl.store(token_rows + t64 * top_k + slot, rows, mask=routed)
            row += tl.sum(routed.to(tl.int64), axis=0)

    return CachedLauncher(count_split_kernel), CachedLauncher(route_rows_kernel)


def count_routed_per_split(map_bytes: torch.Tensor, tokens_per_split: int, token_block: int,
                           through_jit: bool = False) -> torch.Tensor:
    """[splits, E] int32: the routed tokens of each expert in each split of ``tokens_per_split``
    tokens (the last split may be shorter), the routing pass's first step.

    map_bytes: the routing map [T, E] viewed as uint8 (rows contiguous); ``tokens_per_split`` a
    multiple of ``token_block``; ``through_jit`` as in ``route_rows``.
    """
    num_tokens, num_experts = map_bytes.shape
    splits = -(-num_tokens // tokens_per_split)
    split_counts = torch.empty((splits, num_experts), dtype=torch.int32, device=map_bytes.device)
    counter, _ = _route_kernels()
    count_t, count_e = _count_tile(num_experts, tokens_per_split, token_block)
    (counter.through_jit if through_jit else counter)(
        (-(-num_experts // count_e), splits),
        (map_bytes, split_counts, num_tokens, num_experts, map_bytes.stride(0), tokens_per_split),
        {"BLOCK_T": count_t, "BLOCK_E": count_e}, num_warps=4)
    return split_counts


@functools.lru_cache(maxsize=None)
def _count_tile(num_experts: int, tokens_per_split: int, token_block: int):
    """(tokens, experts) of the count pass's tile: about 4096 map bytes, 512 tokens (a default
    split in one load) where the split is a multiple of that, else the routing pass's token
    block; the experts cut into as many tiles as that size leaves."""
    tokens = 512 if tokens_per_split % 512 == 0 else token_block
    experts_pow2 = 1 << max(0, (num_experts - 1).bit_length())
    return tokens, max(1, min(experts_pow2, 4096 // tokens))


def route_rows(routing_map: torch.Tensor, probs: torch.Tensor, first_row: torch.Tensor,
               num_rows: int, through_jit: bool = False, top_k: int = 0,
               position: Optional[torch.Tensor] = None, tokens_per_split: Optional[int] = None):
    """(token of each row [num_rows] int64, its routing weight [num_rows], the rows of each
    token [T, top_k] int64 or None): every routed (token, expert) pair numbered from
    ``first_row[expert]`` on in token order.

    routing_map: [T, E] bool (contiguous); probs: [T, E]; first_row: [E] int64 on the device,
    the first row of each expert (the experts' rows laid out in the row order, without gaps).
    With ``top_k`` > 0, where every token has exactly ``top_k`` routed pairs
    (``num_rows == T * top_k``), the same pass also writes each token's rows in row order: the
    table ``sum_expert_rows`` sums by, without sorting ``sorted_indices`` for it.
    ``position`` [E] (int64, on the device): each expert's place in the row order; None: the
    experts in id order. ``through_jit``: launched through Triton's JIT, as Triton's CPU
    interpreter needs. ``tokens_per_split``: tokens per program (a multiple of the kernel's
    token block; default TOKENS_PER_SPLIT): a first pass counts each split's routed tokens per
    expert, so the numbering runs on (expert, split) programs.
    """
    num_tokens, num_experts = routing_map.shape
    device = routing_map.device
    sorted_indices = torch.empty(num_rows, dtype=torch.long, device=device)
    permuted_probs = torch.empty(num_rows, dtype=probs.dtype, device=device)
    with_table = top_k > 0 and num_rows == num_tokens * top_k
    table = torch.empty((num_tokens, max(top_k, 0)), dtype=torch.long, device=device) \
        if with_table else None
    if num_rows == 0:
        return sorted_indices, permuted_probs, table
    # A token's slot reads its routing row in tiles of BLOCK_T x BLOCK_E: fewer tokens per
    # block keep that tile in registers.
    block_t = 256 if with_table else 512
    split = tokens_per_split or TOKENS_PER_SPLIT
    if split % block_t:
        raise ValueError(f"route_rows: tokens_per_split={split} must be a multiple of {block_t}")
    map_bytes = routing_map.view(torch.uint8)
    split_counts = count_routed_per_split(map_bytes, split, block_t, through_jit)
    splits = split_counts.shape[0]
    _, router = _route_kernels()
    args = (map_bytes, probs, first_row, sorted_indices, permuted_probs,
            position if position is not None else first_row,
            table if with_table else sorted_indices, split_counts, num_tokens, num_experts,
            routing_map.stride(0), probs.stride(0), top_k if with_table else 1, split)
    constants = {"BLOCK_T": block_t, "BLOCK_E": 16, "BLOCK_S": 64,
                 "WITH_TABLE": with_table, "IDENTITY": position is None}
    (router.through_jit if through_jit else router)((num_experts, splits), args, constants,
                                                    num_warps=4)
    return sorted_indices, permuted_probs, table


def row_block(hidden: int) -> int:
    """Columns a row kernel's program moves per step: a power of two, 16 to 2048."""
    return min(2048, 1 << max(4, (hidden - 1).bit_length()))


def scatter_routed_rows(
    tokens: torch.Tensor,
    token_index: torch.Tensor,
    probs: torch.Tensor,
    out: torch.Tensor,
    prob_columns: int,
    dst_rows: Optional[torch.Tensor] = None,
) -> None:
    """``out[dst_rows[i], :H] = tokens[token_index[i]]``, and the weight ``probs[i]`` in the
    row's prob columns (bit-exact, in its own dtype) when ``prob_columns`` > 0.

    tokens: [T, H]; token_index, probs: [M]; out: [R, H + prob_columns] (rows contiguous);
    dst_rows: [M] distinct rows of ``out``, or None for rows 0..M-1.
    """
    hidden = tokens.shape[1]
    num = token_index.numel()
    if num == 0:
        return
    out_probs = None
    if prob_columns:
        width = probs.element_size() // out.element_size()
        out_probs = out[:, hidden : hidden + width].view(probs.dtype)[:, 0]
    if use_triton(tokens, out) and tokens.stride(1) == 1 and out.stride(1) == 1:
        scatter, _ = _kernels()
        scatter(
            (num,),
            (tokens, token_index, dst_rows if dst_rows is not None else token_index, probs, out,
             out_probs if out_probs is not None else probs, hidden, tokens.stride(0),
             out.stride(0), out_probs.stride(0) if out_probs is not None else 0),
            {"BLOCK": row_block(hidden), "IDENTITY": dst_rows is None, "WITH_PROBS": bool(prob_columns)},
            num_warps=4,
        )
        return
    rows = tokens.index_select(0, token_index)
    if dst_rows is None:
        out[:num, :hidden] = rows
        if out_probs is not None:
            out_probs[:num] = probs
    else:
        out[:, :hidden].index_copy_(0, dst_rows, rows)
        if out_probs is not None:
            out_probs.index_copy_(0, dst_rows, probs)


def copy_rows(src: torch.Tensor, src_rows: torch.Tensor, dst: torch.Tensor,
              dst_rows: torch.Tensor) -> None:
    """``dst[dst_rows[i]] = src[src_rows[i]]`` in one pass (src, dst: [*, H] with unit column
    stride; src_rows, dst_rows: [M] int64, distinct destination rows)."""
    scatter_routed_rows(src, src_rows, src_rows, dst, 0, dst_rows=dst_rows)


def sum_expert_rows(
    rows: torch.Tensor, sorted_indices: torch.Tensor, num_tokens: int,
    shared: Optional[torch.Tensor] = None, token_rows: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """[T, H]: each token's rows (``sorted_indices`` [T*k]: the token of each row; every token
    has exactly k) summed as ``sum_rows`` sums them, in row order, rounded to the rows' dtype.
    ``token_rows`` [T, k]: each token's rows in row order, where the routing pass made them
    (``route_rows``); else they are sorted out of ``sorted_indices``."""
    hidden = rows.shape[1]
    if num_tokens == 0:
        return rows.new_zeros((0, hidden))
    top_k = rows.shape[0] // num_tokens
    table = token_rows
    if table is None:
        table = torch.argsort(sorted_indices, stable=True).view(num_tokens, top_k)
    return sum_rows(rows, table, rows.dtype, shared)


def count_values(values: torch.Tensor, size: int) -> torch.Tensor:
    """[size] int64 occurrences of each value in ``values`` (all in [0, size)); unlike
    ``torch.bincount`` no host sync on GPUs (bincount reads the maximum to size its output)."""
    counts = torch.zeros(size, dtype=torch.int64, device=values.device)
    return counts.scatter_add_(0, values.reshape(-1), torch.ones_like(values.reshape(-1)))


def sum_rows(rows: torch.Tensor, table: torch.Tensor, out_dtype: torch.dtype,
             shared: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[N, H]: out[n] = the sum of rows[table[n, j]] over the slots j, accumulated in fp32 (fp64
    for fp64 rows) in slot order and rounded once to ``out_dtype``, then ``shared`` [N, H]
    added (after the rounding, as the stock layer adds the shared experts' output).

    rows: [Q, H]; table: [N, S] int64, an entry >= Q an empty slot. One pass
    over the output on GPUs; deterministic everywhere (a fixed order of additions).
    """
    num_out, slots = table.shape
    num_rows, hidden = rows.shape
    if num_out == 0:
        return rows.new_zeros((0, hidden), dtype=out_dtype)
    if use_triton(rows, table) and rows.stride(1) == 1 and rows.dtype != torch.float64:
        _, summer = _kernels()
        out = rows.new_empty((num_out, hidden), dtype=out_dtype)
        shared_c = shared.reshape(num_out, hidden).contiguous() if shared is not None else None
        summer(
            (num_out,),
            (rows, table.contiguous(), shared_c if shared_c is not None else out, out, hidden,
             rows.stride(0), num_rows),
            {"SLOTS": slots, "BLOCK": row_block(hidden), "WITH_SHARED": shared is not None},
            num_warps=4,
        )
        return out
    accumulate = torch.promote_types(rows.dtype, torch.float32)
    total = torch.zeros((num_out, hidden), dtype=accumulate, device=rows.device)
    zero = torch.zeros((), dtype=accumulate, device=rows.device)
    for j in range(slots if num_rows else 0):
        index = table[:, j]
        picked = rows.index_select(0, index.clamp(max=num_rows - 1)).to(accumulate)
        total += torch.where((index < num_rows).unsqueeze(1), picked, zero)
    out = total.to(out_dtype)
    if shared is not None:
        out = out + shared.reshape(num_out, hidden)
    return out
