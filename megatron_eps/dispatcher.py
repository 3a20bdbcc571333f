"""EPSAlltoAllTokenDispatcher: Megatron's all-to-all dispatcher, pipelined over expert groups."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

from megatron_eps import compat
from megatron_eps.comm import AllToAll, ProcessGroupAllToAll
from megatron_eps.config import EPSConfig
from megatron_eps.sm_control import gemm_sm_carveout
from megatron_eps.schedule import (
    COMBINE,
    DISPATCH,
    EXPERTS,
    SHARED,
    ChunkLayout,
    Chunking,
    build_plan,
    chunk_sizes,
    regroup_rows,
    run_plan,
)

# (tokens [M, H] grouped by expert, tokens_per_expert, probs [M], first local expert) -> [M, H]
ExpertsFn = Callable[[torch.Tensor, Sequence[int], torch.Tensor, int], torch.Tensor]
# (global counts [ep_size, num_experts]) -> number of chunks N (equal chunks), or the number of
# local experts in each chunk
ChunkCountFn = Callable[[np.ndarray], Chunking]


def permute_chunk_major(
    tokens: torch.Tensor,
    probs: torch.Tensor,
    routing_map: torch.Tensor,
    expert_order: np.ndarray,
    num_rows: int,
):
    """Megatron's permute with the experts taken in ``expert_order``, without a host sync.

    Megatron's unfused ``permute`` sizes its output with ``masked_select`` (a device sync); here
    the row count is already known on the host (from the count matrix), so every routed
    (expert, token) pair is scattered to its row with a cumulative sum. Row order is the same
    as Megatron's: by expert in ``expert_order``, then by token index.

    Args:
        tokens: [T, H]; probs: [T, E]; routing_map: [T, E] bool.
        expert_order: [E] expert ids, chunk-major (ChunkLayout.expert_order).
        num_rows: number of routed pairs (sum of routing_map).
    Returns:
        (permuted tokens [num_rows, H], permuted probs [num_rows], token index per row
        [num_rows], the ``sorted_indices`` Megatron's unpermute takes).
    """
    num_tokens, num_experts = routing_map.shape
    device = routing_map.device
    identity = bool((expert_order == np.arange(num_experts)).all())
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
    return tokens.index_select(0, sorted_indices), permuted_probs, sorted_indices


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


def row_probs(packed: torch.Tensor, hidden_size: int, probs_dtype: torch.dtype) -> torch.Tensor:
    """The routing weight of every packed row (a strided view into ``packed``)."""
    width = torch.empty((), dtype=probs_dtype).element_size() // packed.element_size()
    return packed[:, hidden_size : hidden_size + width].view(probs_dtype)[:, 0]


def pack_rows_with_probs(
    tokens: torch.Tensor, sorted_indices: torch.Tensor, permuted_probs: torch.Tensor, columns: int
) -> torch.Tensor:
    """[num_rows, H + columns]: each permuted token row with its routing weight appended, so one
    all-to-all per chunk dispatches both (Megatron sends the weights in a second one)."""
    num_tokens, hidden = tokens.shape
    extended = tokens.new_empty((num_tokens, hidden + columns))
    extended[:, :hidden] = tokens
    packed = extended.index_select(0, sorted_indices)
    row_probs(packed, hidden, permuted_probs.dtype).copy_(permuted_probs)
    return packed


def unpermute_sum_per_token(
    combined: torch.Tensor, sorted_indices: torch.Tensor, num_tokens: int
) -> torch.Tensor:
    """Sum each token's top-k expert rows, in fp32 and in a fixed order.

    Used when every token has exactly k rows (``combined`` [T*k, H], ``sorted_indices`` [T*k]
    the token of each row). Megatron's unpermute scatter-adds the rows with atomics in the
    activation dtype, so in bf16 its result depends on the arrival order of the k additions;
    gathering the k rows of each token and reducing them in fp32 gives one rounding and the
    same bits on every run, at the same memory traffic.
    """
    if num_tokens == 0:
        return combined.new_zeros((0, combined.shape[-1]))
    top_k = combined.shape[0] // num_tokens
    rows_by_token = torch.argsort(sorted_indices, stable=True)
    gathered = combined.index_select(0, rows_by_token).view(num_tokens, top_k, -1)
    return gathered.sum(dim=1, dtype=torch.float32).to(combined.dtype)


@dataclass
class PipelineRecord:
    """What the last pipelined forward did (for tests, logging and benchmarks)."""

    num_chunks: int
    tokens_per_chunk: List[int]
    global_counts: np.ndarray
    experts_per_chunk: Tuple[int, ...] = ()


class EPSAlltoAllTokenDispatcher(MoEAlltoAllTokenDispatcher):
    """The stock all-to-all dispatcher plus ``pipelined_forward``.

    The six stock methods (dispatch_preprocess ... combine_postprocess) are inherited unchanged,
    so every Megatron code path that drives a dispatcher step by step still works (and is the
    N = 1 path). ``pipelined_forward`` runs dispatch -> experts -> combine chunk by chunk,
    overlapping chunk i's expert GEMMs with chunk i+1's dispatch and chunk i-1's combine.

    Only dropless routing with expert-tensor-parallel size 1 is pipelined (EPSMoELayer checks
    this at construction, before any collective).
    """

    # One communication stream per process, shared by all layers (they run one at a time).
    comm_stream = None

    def __init__(
        self,
        num_local_experts: int,
        local_expert_indices: List[int],
        config,
        pg_collection=None,
        eps_config: Optional[EPSConfig] = None,
    ):
        super().__init__(num_local_experts, local_expert_indices, config, pg_collection)
        self.eps_config = eps_config if eps_config is not None else EPSConfig()
        self.ep_rank = dist.get_rank(self.ep_group) if self.ep_size > 1 else 0
        self.all_to_all: AllToAll = ProcessGroupAllToAll(self.ep_group if self.ep_size > 1 else None)
        self.overlap = True
        self.profiler_ranges = False
        # Dispatches the comm stream may run ahead of the experts (schedule.build_plan); None:
        # all of them before the first combine.
        self.dispatch_ahead: Optional[int] = None
        self.last_record: Optional[PipelineRecord] = None

    # ------------------------------------------------------------------ public entry
    def global_token_counts(self, routing_map: torch.Tensor) -> np.ndarray:
        """counts[src_rank, expert] for the whole EP group: one all-gather, one host copy.

        This is the only host synchronization of the pipelined forward (stock Megatron also
        needs one to size its all-to-alls).
        """
        local = routing_map.sum(dim=0).to(torch.int64)
        if self.ep_size > 1:
            gathered = torch.empty(
                self.ep_size * local.numel(), dtype=local.dtype, device=local.device
            )
            dist.all_gather_into_tensor(gathered, local, group=self.ep_group)
        else:
            gathered = local
        return gathered.cpu().numpy().reshape(self.ep_size, self.num_experts)

    def pipelined_forward(
        self,
        hidden_states: torch.Tensor,
        probs: torch.Tensor,
        routing_map: torch.Tensor,
        run_experts: ExpertsFn,
        choose_num_chunks: ChunkCountFn,
        shared_experts: Optional[Callable[[], torch.Tensor]] = None,
        prepare_experts: Optional[Callable[[ChunkLayout], None]] = None,
    ) -> torch.Tensor:
        """Route-to-output of one MoE layer, pipelined.

        Args:
            hidden_states: [S, B, H] layer input.
            probs: [T, E] routing probabilities (T = S * B), as the router returns them.
            routing_map: [T, E] bool, as the router returns it.
            run_experts: computes one chunk's experts (see ExpertsFn).
            choose_num_chunks: maps the global count matrix to N (equal chunks) or to the
                local experts of each chunk; it must be a pure function of that matrix (and
                of state every rank shares) so that every EP rank picks the same chunks.
            shared_experts: optional thunk computing the shared-expert output [S, B, H]; it is
                issued while the first dispatch is in flight.
            prepare_experts: optional hook given the chunk layout before any chunk runs (the
                layer uses it to stage every chunk's expert offsets in one host-to-device copy).

        Returns:
            [S, B, H] output (routed experts combined, plus shared experts).
        """
        hidden_shape = hidden_states.shape
        tokens = hidden_states.reshape(-1, hidden_shape[-1])
        counts = self.global_token_counts(routing_map)
        choice = choose_num_chunks(counts)
        if isinstance(choice, (int, np.integer)):
            choice = max(1, min(int(choice), self.num_local_experts))
        sizes = chunk_sizes(self.num_local_experts, choice)
        num_chunks = len(sizes)
        layout = ChunkLayout.build(counts, self.ep_rank, self.num_local_experts, sizes)
        self.last_record = PipelineRecord(
            num_chunks=num_chunks,
            tokens_per_chunk=[sum(t) for t in layout.tokens_per_expert],
            global_counts=counts,
            experts_per_chunk=sizes,
        )

        if prepare_experts is not None:
            prepare_experts(layout)
        # Permutation 1 (chunk-major): each chunk's send buffer becomes one contiguous slice.
        num_rows = layout.send_offsets[-1]
        hidden_size = tokens.shape[-1]
        permuted_tokens, permuted_probs, sorted_indices = permute_chunk_major(
            tokens, probs, routing_map, layout.expert_order, num_rows
        )
        over_link = self.ep_size > 1 or self.all_to_all.occupies_link
        packed_columns = probs_columns(tokens, probs) if over_link else 0
        if packed_columns:
            permuted_tokens = pack_rows_with_probs(
                tokens, sorted_indices, permuted_probs, packed_columns
            )
        combined = tokens.new_empty((num_rows, hidden_size))

        received_tokens: List[Optional[torch.Tensor]] = [None] * num_chunks
        received_probs: List[Optional[torch.Tensor]] = [None] * num_chunks
        expert_outputs: List[Optional[torch.Tensor]] = [None] * num_chunks
        shared_output: List[Optional[torch.Tensor]] = [None]

        comm_stream = self._comm_stream(tokens)

        def chunk_slice(tensor, chunk):
            return tensor[layout.send_offsets[chunk] : layout.send_offsets[chunk + 1]]

        def dispatch(chunk):
            send_tokens = chunk_slice(permuted_tokens, chunk)
            send_probs = chunk_slice(permuted_probs, chunk)
            if not over_link:
                received_tokens[chunk], received_probs[chunk] = send_tokens, send_probs
                return
            rows = sum(layout.recv_splits[chunk])
            splits_in, splits_out = layout.send_splits[chunk], layout.recv_splits[chunk]
            recv_tokens = send_tokens.new_empty((rows, send_tokens.shape[1]))
            self.all_to_all(recv_tokens, send_tokens, splits_out, splits_in)
            recv_probs = None
            if not packed_columns:
                recv_probs = send_probs.new_empty((rows,))
                self.all_to_all(recv_probs, send_probs, splits_out, splits_in)
            received_tokens[chunk], received_probs[chunk] = recv_tokens, recv_probs

        def experts(chunk):
            x, p = received_tokens[chunk], received_probs[chunk]
            if comm_stream is not None:
                # Allocated on the comm stream, read here on the compute stream: keep the
                # allocator from reusing the memory before these reads ran (the plan orders
                # the next comm-stream allocation after them too; this does not rely on it).
                x.record_stream(torch.cuda.current_stream())
                if p is not None:
                    p.record_stream(torch.cuda.current_stream())
            regroup = layout.rank_major_to_expert_major(chunk)
            if regroup is not None:
                x = regroup_rows(x, *regroup)
                p = regroup_rows(p, *regroup) if p is not None else None
            if packed_columns:
                p = row_probs(x, hidden_size, probs.dtype).contiguous()
                x = x[:, :hidden_size]
            first_expert = layout.expert_ranges[chunk][0]
            y = run_experts(x, layout.tokens_per_expert[chunk], p, first_expert)
            regroup = layout.expert_major_to_rank_major(chunk)
            if regroup is not None:
                y = regroup_rows(y, *regroup)
            expert_outputs[chunk] = y
            received_tokens[chunk] = received_probs[chunk] = None

        def combine(chunk):
            self.all_to_all(
                chunk_slice(combined, chunk),
                expert_outputs[chunk],
                layout.send_splits[chunk],
                layout.recv_splits[chunk],
            )

        def shared(_chunk):
            shared_output[0] = shared_experts()

        plan = build_plan(
            num_chunks,
            with_shared_experts=shared_experts is not None,
            dispatch_ahead=self.dispatch_ahead,
        )
        stages = {DISPATCH: dispatch, EXPERTS: experts, COMBINE: combine, SHARED: shared}
        # The carve-out leaves SMs free for the all-to-all kernels while GEMMs overlap them; a
        # GEMM that holds every SM would keep them waiting (unpipelined: nothing to leave).
        overlapping = comm_stream is not None and num_chunks > 1
        with gemm_sm_carveout(self.eps_config.gemm_sm_carveout if overlapping else None):
            run_plan(plan, stages, comm_stream, self.profiler_ranges)
        # Every chunk buffer above stays referenced until here, after the compute stream has
        # waited for the last combine, so the caching allocator cannot hand a buffer to new
        # work while the comm stream may still read or write it.

        if num_rows == tokens.shape[0] * self.config.moe_router_topk:
            output = unpermute_sum_per_token(combined, sorted_indices, tokens.shape[0])
        else:  # some tokens route to fewer than top-k experts (padding mask): Megatron's way
            output = compat.unpermute_tokens(
                combined, sorted_indices, restore_shape=tokens.shape, routing_map=routing_map
            )
        output = output.view(hidden_shape)
        if shared_output[0] is not None:
            output = output + shared_output[0]
        return output

    # ------------------------------------------------------------------ streams
    def _comm_stream(self, like: torch.Tensor):
        if not (self.overlap and like.is_cuda):
            return None
        if self.ep_size == 1 and not self.all_to_all.occupies_link:
            return None  # nothing to overlap with: dispatch/combine are local slices
        if EPSAlltoAllTokenDispatcher.comm_stream is None:
            # High priority: when SMs free up, the block scheduler starts pending all-to-all
            # CTAs before the next GEMM's, so a GEMM queued behind the comm work does not hold
            # the link back for its whole duration.
            EPSAlltoAllTokenDispatcher.comm_stream = torch.cuda.Stream(
                device=like.device, priority=-1
            )
        return EPSAlltoAllTokenDispatcher.comm_stream
