"""The per-pair row scheme: one row per (token, expert), as Megatron's dispatcher sends them.

A forward's routed rows are permuted chunk-major (``permute_chunk_major``), each with its routing
weight packed behind the hidden state (``probs_columns``) where the dtypes allow; the experts
run on the received rows as the transport hands them; the source sums each token's k returned
rows (``row_kernels.sum_expert_rows``).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import torch

from megatron_eps import compat, row_kernels, staging
from megatron_eps.comm.base import ExpertTransport, row_probs
from megatron_eps.experts.gemm_common import DeviceRowEnds
from megatron_eps.pipeline.layout import ChunkLayout
from megatron_eps.pipeline.rows.scheme import RowScheme


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
    first_rows: Optional[torch.Tensor] = None,
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
            (``row_kernels.route_rows``) instead of a dozen torch ops on the host's
            critical path.
        top_k: the router's k; with it, that pass also lists each token's rows (``token_rows``,
            where every token has k), which the final sum reads instead of sorting.
        first_rows: [E] int64 on the device, each expert's first row, where the counts stay on
            the device (``expert_order`` the identity); the same one pass numbers the rows.
    """
    num_tokens, num_experts = routing_map.shape
    device = routing_map.device
    identity = bool((expert_order == np.arange(num_experts)).all())
    routes_on_gpu = (row_kernels.use_triton(routing_map, probs) and routing_map.is_contiguous()
                     and probs.stride(1) == 1)
    from_device = first_rows is not None and identity
    if routes_on_gpu and (from_device or rows_per_expert is not None):
        position = None
        if not from_device:
            sizes = np.asarray(rows_per_expert, dtype=np.int64)[expert_order]
            # One staging: each expert's first row and its place in the row order.
            host = np.empty((2, num_experts), dtype=np.int64)
            host[0, expert_order] = np.cumsum(sizes) - sizes
            host[1, expert_order] = np.arange(num_experts)
            staged = staging.to_device(host if not identity else host[:1], device)
            first_rows, position = staged[0], None if identity else staged[1]
        sorted_indices, permuted_probs, token_rows = row_kernels.route_rows(
            routing_map, probs, first_rows, num_rows, top_k=top_k, position=position)
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


def pair_row_bytes(tokens: torch.Tensor, probs: torch.Tensor, packed_columns: int):
    """(dispatch, combine) bytes of one row of the per-(token, expert) scheme: the hidden state
    and its weight (packed in ``packed_columns`` columns, or sent apart), and the output."""
    hidden_bytes = tokens.shape[-1] * tokens.element_size()
    weight_bytes = packed_columns * tokens.element_size() if packed_columns else probs.element_size()
    return hidden_bytes + weight_bytes, hidden_bytes


def place_pair_rows(transport: ExpertTransport, layout: ChunkLayout, chunk: int,
                    tokens: torch.Tensor, sorted_indices: torch.Tensor,
                    permuted_probs: torch.Tensor, packed_columns: int) -> None:
    """Chunk ``chunk``'s rows into the transport's send rows: row i of the chunk is the token row
    ``tokens[sorted_indices[i]]`` [H] followed by its weight ``permuted_probs[i]`` in
    ``packed_columns`` columns (0: the weights travel apart, handed to the transport)."""
    rows = slice(layout.send_offsets[chunk], layout.send_offsets[chunk + 1])
    send = transport.send_rows(chunk, None if packed_columns else permuted_probs[rows])
    row_kernels.scatter_routed_rows(tokens, sorted_indices[rows], permuted_probs[rows], send.rows,
                                    packed_columns, dst_rows=send.dst_rows)
    transport.rows_placed(chunk)


def run_chunk_experts(transport: ExpertTransport, layout: ChunkLayout, experts, chunk: int,
                      part: Optional[str], hidden_size: int, packed_columns: int,
                      probs_dtype: torch.dtype) -> None:
    """The EXPERTS (or LOCAL_EXPERTS) step of a chunk: the experts of chunk ``chunk`` over the
    rows of ``part`` (None: the whole chunk; comm.base.LOCAL_PART / PEER_PART), handed back to
    the transport. A row's routing weight rides in its last ``packed_columns`` columns (0: the
    transport returns it apart)."""
    x, p = transport.received(chunk) if part is None else transport.received(chunk, part)
    if packed_columns:
        p = row_probs(x, hidden_size, probs_dtype).contiguous()
        x = x[:, :hidden_size]
    first_expert = layout.expert_ranges[chunk][0]
    out = experts.run(x, layout.part_tokens_per_expert(chunk, part), p, first_expert)
    if part is None:
        transport.hand_back(chunk, out)
    else:
        transport.hand_back(chunk, out, part)


class RowsOnDevice(NamedTuple):
    """A forward's rows per expert counted on the device (``count_rows_on_device``)."""

    counts: torch.Tensor  # [E] int32, routed rows per expert
    row_ends: DeviceRowEnds  # the experts' cumulative row ends, and their total (host int)
    first_rows: torch.Tensor  # [E] int64, each expert's first row


def count_rows_on_device(routing_map: torch.Tensor, top_k: int) -> RowsOnDevice:
    """The rows per expert of ``routing_map`` [T, E], where every token has ``top_k`` routed
    pairs (T * top_k rows), counted on the device: nothing the host waits for."""
    counts = routing_map.sum(dim=0, dtype=torch.int32)
    ends = torch.cumsum(counts, dim=0, dtype=torch.int32)
    first_rows = (ends - counts).to(torch.int64)
    return RowsOnDevice(counts, DeviceRowEnds(ends, routing_map.shape[0] * top_k), first_rows)


class PerPairRows(RowScheme):
    """One row per (token, expert) (module docstring)."""

    name = "per_pair"

    def __init__(self, transport: ExpertTransport, experts, counts: Optional[np.ndarray], sizes,
                 tokens: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor,
                 ep_rank: int, top_k: int, local_rows_apart: bool = False, compute_stream=None):
        """counts: the gathered [ep, experts] count matrix; sizes: local experts per chunk.
        counts None: rows planned on the device (no expert parallelism, one chunk, every token
        routed ``top_k`` times; ``planned_on_device``): the host never reads the counts."""
        super().__init__(transport, experts)
        self.counts, self.tokens, self.probs, self.routing_map = counts, tokens, probs, routing_map
        self.top_k, self.compute_stream = top_k, compute_stream
        # The weight rides in the rows where the dtypes allow (and anything moves at all).
        self.packed_columns = probs_columns(tokens, probs) if transport.moves_rows else 0
        self.row_bytes = pair_row_bytes(tokens, probs, self.packed_columns)
        self.width = tokens.shape[-1] + self.packed_columns
        self.permutation: Optional[Permutation] = None
        self.on_device: Optional[RowsOnDevice] = None
        if counts is None:
            self.on_device = count_rows_on_device(routing_map, top_k)
            self.layout = ChunkLayout.one_local_chunk(routing_map.shape[1], self.on_device.row_ends)
            return
        ep_size, num_experts = counts.shape
        self.layout = ChunkLayout.build(counts, ep_rank, num_experts // ep_size, sizes,
                                        local_rows_apart=local_rows_apart)

    @property
    def planned_on_device(self) -> bool:
        return self.on_device is not None

    def bytes_sent(self):
        return self.layout.bytes_sent(*self.row_bytes)

    def pair_bytes_sent(self):
        return self.bytes_sent()

    def place(self, chunk: int) -> None:
        if self.permutation is None:
            # Chunk-major: each chunk's rows become one contiguous slice (or, on the copy
            # engines, land in their final rows).
            layout = self.layout
            permutation = permute_chunk_major(
                self.tokens, self.probs, self.routing_map, layout.expert_order,
                layout.send_offsets[-1], gather_tokens=False,
                rows_per_expert=None if self.planned_on_device else self.counts[layout.ep_rank],
                top_k=self.top_k,
                first_rows=self.on_device.first_rows if self.planned_on_device else None,
            )
            if self.compute_stream is not None:
                # Made on the comm stream, read by the final sum on the compute stream.
                for made in (permutation.sorted_indices, permutation.token_rows):
                    if made is not None:
                        made.record_stream(self.compute_stream)
            self.permutation = permutation
        place_pair_rows(self.transport, self.layout, chunk, self.tokens,
                        self.permutation.sorted_indices, self.permutation.probs,
                        self.packed_columns)

    def run_experts(self, chunk: int, part: Optional[str] = None) -> None:
        run_chunk_experts(self.transport, self.layout, self.experts, chunk, part,
                          self.tokens.shape[-1], self.packed_columns, self.probs.dtype)

    def output(self, shared_output):
        combined = self.transport.combined_rows()
        tokens, permutation = self.tokens, self.permutation
        if combined.shape[0] == tokens.shape[0] * self.top_k:
            return row_kernels.sum_expert_rows(combined, permutation.sorted_indices,
                                               tokens.shape[0], shared_output,
                                               permutation.token_rows)
        # some tokens route to fewer than top-k experts (padding mask): Megatron's way
        output = compat.unpermute_tokens(
            combined, permutation.sorted_indices, restore_shape=tokens.shape,
            routing_map=self.routing_map
        )
        if shared_output is not None:
            output = output + shared_output.reshape(output.shape)
        return output
