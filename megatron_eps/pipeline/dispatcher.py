"""EPSAlltoAllTokenDispatcher: Megatron's all-to-all dispatcher, pipelined over expert groups."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

from megatron_eps.comm import ExpertTransport, ProcessGroupAllToAll
from megatron_eps.comm.base import LOCAL_PART, PEER_PART
from megatron_eps.comm.nccl import NCCLTransport
from megatron_eps.comm.sm_control import gemm_sm_carveout
from megatron_eps.comm.traffic import BytesSent
from megatron_eps.comm.watchdog import peer_wait_watchdog, wait_for_event, wait_timeout_s
from megatron_eps.config import EPSConfig
from megatron_eps.experts.shared import SharedOutput
from megatron_eps.pipeline.rows import unique_rows
from megatron_eps.pipeline.rows.choice import choose_row_scheme
from megatron_eps.pipeline.rows.dedup import DedupRows
from megatron_eps.pipeline.runner import run_plan
from megatron_eps.policy.chunks import chunk_sizes
from megatron_eps.policy.schedule import (COMBINE, DISPATCH, EXPERTS, LOCAL_EXPERTS, PLACE,
                                          build_plan)


@dataclass
class PipelineRecord:
    """What the last pipelined forward did (for tests, logging and benchmarks)."""

    num_chunks: int
    tokens_per_chunk: List[int]
    host_counts: Optional[np.ndarray]  # the count matrix the host read, if it read one
    experts_per_chunk: Tuple[int, ...] = ()
    transport: str = ""
    dedup: bool = False  # one row per (token, rank, chunk) instead of per (token, expert)
    local_rows_apart: bool = False  # a chunk's own rows ran as a GEMM call of their own
    bytes_sent: Optional[BytesSent] = None  # what this rank sent, in the scheme that ran
    pair_bytes_sent: Optional[BytesSent] = None  # the same forward with one row per pair
    # Rows planned on the device (the host never read the counts): their [E] counts there.
    device_counts: Optional[torch.Tensor] = None

    @property
    def global_counts(self) -> np.ndarray:
        """counts[src_rank, expert] of the forward; where only the device held them, read now
        (a host sync, for tests and benchmarks, after the forward)."""
        if self.host_counts is None and self.device_counts is not None:
            self.host_counts = self.device_counts.cpu().numpy().astype(np.int64).reshape(1, -1)
        return self.host_counts


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
        self._default_transport: Optional[ExpertTransport] = None
        self.overlap = True
        self.profiler_ranges = False
        # Dispatches the comm stream may run ahead of the experts (schedule.build_plan); None:
        # all of them before the first combine.
        self.dispatch_ahead: Optional[int] = None
        self.last_record: Optional[PipelineRecord] = None
        self._host_counts = {}

    # ------------------------------------------------------------------ transport
    def default_transport(self) -> ExpertTransport:
        """all_to_all_single over the EP group: what a caller that hands no transport gets
        (EPSMoELayer hands down the one its ``transport`` setting resolves to)."""
        if self._default_transport is None:
            self._default_transport = NCCLTransport(
                ProcessGroupAllToAll(self.ep_group if self.ep_size > 1 else None))
        return self._default_transport

    # ------------------------------------------------------------------ public entry
    def global_token_counts(self, routing_map: torch.Tensor) -> np.ndarray:
        """counts[src_rank, expert] for the whole EP group (``start_token_counts``, then waits)."""
        return self.start_token_counts(routing_map)[0]()

    def start_token_counts(self, routing_map: torch.Tensor, with_range_counts: bool = False):
        """Issue the count all-gather; returns (wait, routed).

        ``wait()`` -> counts[src_rank, expert] for the whole EP group, the host's copy; with
        ``with_range_counts`` (counts, range_counts[src, dst, L, L + 1]): the same all-gather
        also carries every rank's unique-token counts of every contiguous range of local experts
        (``unique_rows.range_unique_counts``), which size the deduplicated scheme. It is
        the only host synchronization of the pipelined forward (stock Megatron also needs one
        to size its all-to-alls). On GPUs, under expert parallelism, the host polls for it
        with a deadline (``wait_timeout_s``): it also waits for everything the streams were
        ordered after, such as the previous forward's waits for peers, so a lost peer ends in a
        clear error; without peers (EP=1) it blocks on the event.
        ``routed``: the CUDA event after the all-gather and its copy to the host (None on CPU);
        work issued on the compute stream after this call (the shared experts) runs while the
        host waits and plans.
        """
        local = unique_rows.routing_statistics(routing_map, self.ep_size, with_range_counts,
                                               self.config.moe_router_topk)
        if self.ep_size > 1:
            gathered = torch.empty(
                self.ep_size * local.numel(), dtype=local.dtype, device=local.device
            )
            dist.all_gather_into_tensor(gathered, local, group=self.ep_group)
        else:
            gathered = local
        split = self._split_gathered if with_range_counts else self._counts_only
        if not gathered.is_cuda:
            return (lambda: split(gathered.numpy())), None
        host = self._host_counts_buffer(gathered)
        host.copy_(gathered, non_blocking=True)
        routed = torch.cuda.current_stream().record_event()

        def wait():
            if self.ep_size == 1:
                # No peer to lose: block on the event itself instead of polling with pauses
                # (a pause can outlast the router's few kernels the event follows).
                routed.synchronize()
            else:
                wait_for_event(routed, wait_timeout_s(),
                               "the expert-parallel token counts (all-gather over the EP group)")
            # A copy: the buffer takes the next forward's counts.
            return split(host.numpy().copy())

        return wait, routed

    def _host_counts_buffer(self, like: torch.Tensor) -> torch.Tensor:
        """The pinned host buffer the counts are copied into, one per layer and size, reused
        every forward: the host has read it (``wait``) before the next forward's copy is
        queued, and a fresh pinned block per forward costs the host allocator an event record
        and queries."""
        key = (tuple(like.shape), like.dtype)
        buffer = self._host_counts.get(key)
        if buffer is None:
            buffer = torch.empty(like.shape, dtype=like.dtype, pin_memory=True)
            self._host_counts[key] = buffer
        return buffer

    def _counts_only(self, gathered: np.ndarray) -> np.ndarray:
        return gathered.reshape(self.ep_size, self.num_experts)

    def _split_gathered(self, gathered: np.ndarray):
        return unique_rows.split_statistics(gathered, self.ep_size, self.num_experts)

    def pipelined_forward(
        self,
        hidden_states: torch.Tensor,
        probs: torch.Tensor,
        routing_map: torch.Tensor,
        experts,
        chunking,
        shared_experts: Optional[Callable[[], SharedOutput]] = None,
        transport: Optional[ExpertTransport] = None,
        all_tokens_routed: bool = True,
    ) -> torch.Tensor:
        """Route-to-output of one MoE layer, pipelined.

        Args:
            hidden_states: [S, B, H] layer input.
            probs: [T, E] routing probabilities (T = S * B), as the router returns them.
            routing_map: [T, E] bool, as the router returns it.
            experts: the expert runner (``experts.chunk_runner.ExpertRunner``): ``prepare(calls, device)`` once,
                then ``run(tokens [M, H] grouped by expert, tokens_per_expert, probs [M],
                first local expert)`` -> [M, H] per chunk.
            chunking: the chunking policy (``policy.degree.ChunkingPolicy``): ``choose(counts,
                transport name)`` -> N (equal chunks) or the local experts of each chunk; a pure
                function of the count matrix and of state every rank shares, so that every EP
                rank picks the same chunks.
            shared_experts: optional thunk issuing the shared experts
                (``experts.shared.SharedExpertRunner.issue``): an ``experts.shared.SharedOutput``
                whose ``join()`` gives [S, B, H] (a plain tensor is taken too). It is issued
                before the host waits for the count matrix, so the GPU computes it while the host
                plans the chunks (schedule's module docstring); it is joined only before the
                combined output, so on a side stream it also overlaps the routed work.
            transport: how the chunks travel (``comm``); the same on every EP rank (the layer's
                ``TransportChoice`` agrees on it). None: ``default_transport()`` (NCCL).
            all_tokens_routed: every token has top-k routed pairs (no padding mask), so the
                rows can be planned on the device (``plans_rows_on_device``).

        Returns:
            [S, B, H] output (routed experts combined, plus shared experts).
        """
        hidden_shape = hidden_states.shape
        tokens = hidden_states.reshape(-1, hidden_shape[-1])
        transport = transport or self.default_transport()
        dedup_wanted = self.eps_config.dispatch_dedup != "off"
        on_device = self.plans_rows_on_device(tokens, transport, experts, chunking,
                                              all_tokens_routed)
        if not on_device:
            with self._phase("counts"):
                wait_for_counts, routed = self.start_token_counts(routing_map, dedup_wanted)
        else:
            routed = None
        shared_pending = None
        if shared_experts is not None:
            with self._phase("shared_experts"):
                shared_pending = shared_experts()
        comm_stream = self._comm_stream(tokens, transport)
        compute_stream = torch.cuda.current_stream() if comm_stream is not None else None
        # The same on every rank: the settings and the transport are agreed.
        local_apart = (self.eps_config.local_rows == "apart" and transport.splits_local_rows
                       and transport.moves_rows and not dedup_wanted)
        if on_device:
            counts = range_counts = None
            sizes = (self.num_local_experts,)
        else:
            with self._phase("counts.wait"):
                counts, range_counts = (wait_for_counts() if dedup_wanted
                                        else (wait_for_counts(), None))
            if not transport.supports_dedup:
                range_counts = None  # the same on every rank: the transport is agreed
            with self._phase("choose"):
                link = transport.name if transport.moves_rows else None
                # Only what applies is passed, so a chunking policy of two arguments still works.
                model_inputs = {}
                if range_counts is not None:
                    model_inputs["range_counts"] = range_counts
                if local_apart:
                    model_inputs["local_rows_apart"] = True
                choice = chunking.choose(counts, link, **model_inputs)
            sizes = chunk_sizes(self.num_local_experts, choice)
        with self._phase("layout"):
            rows = choose_row_scheme(transport, experts, counts, range_counts, sizes, tokens,
                                     probs, routing_map, self.ep_rank,
                                     self.config.moe_router_topk, local_apart, self.eps_config,
                                     compute_stream)
        num_chunks = len(sizes)
        self.last_record = PipelineRecord(
            num_chunks=num_chunks,
            tokens_per_chunk=[rows.layout.send_offsets[-1]] if on_device else
            [sum(t) for t in rows.layout.tokens_per_expert],
            host_counts=counts,
            experts_per_chunk=sizes,
            transport=transport.name if transport.moves_rows else "local",
            dedup=rows.name == DedupRows.name,
            local_rows_apart=local_apart,
            bytes_sent=rows.bytes_sent(),
            pair_bytes_sent=rows.pair_bytes_sent(),
            device_counts=rows.on_device.counts if on_device else None,
        )

        with self._phase("experts.prepare"):
            # The expert calls count (token, expert) rows in either scheme.
            experts.prepare(rows.layout.expert_calls(), tokens.device,
                            beside_copy=num_chunks > 1 and transport.moves_rows)
        with self._phase("transport.begin"):
            transport.begin(rows.layout, counts, rows.width, tokens.shape[-1], tokens.dtype,
                            tokens.device)
        stages = {PLACE: rows.place, DISPATCH: transport.dispatch,
                  EXPERTS: lambda chunk: rows.run_experts(chunk, PEER_PART if local_apart else None),
                  LOCAL_EXPERTS: lambda chunk: rows.run_experts(chunk, LOCAL_PART),
                  COMBINE: transport.combine}
        plan = build_plan(num_chunks, dispatch_ahead=self.dispatch_ahead, local_apart=local_apart)
        # The carve-out leaves SMs free for the all-to-all kernels while GEMMs overlap them; a
        # GEMM that holds every SM would keep them waiting (unpipelined, or on the copy
        # engines, which need no SM: nothing to leave).
        overlapping = comm_stream is not None and num_chunks > 1 and transport.name == "nccl"
        with gemm_sm_carveout(self.eps_config.gemm_sm_carveout if overlapping else None):
            run_plan(plan, stages, comm_stream, self.profiler_ranges, routed=routed)
        if comm_stream is not None and transport.waits_without_timeout:
            peer_wait_watchdog(wait_timeout_s()).watch(
                compute_stream.record_event(),
                f"the {transport.name} transfers of an MoE layer's forward (EP rank {self.ep_rank})",
            )
        shared_output = shared_pending
        if isinstance(shared_pending, SharedOutput):
            shared_output = shared_pending.join()
        with self._phase("unpermute"):
            output = rows.output(shared_output)
        transport.end()
        return output.view(hidden_shape)

    def plans_rows_on_device(self, tokens: torch.Tensor, transport: ExpertTransport, experts,
                             chunking, all_tokens_routed: bool) -> bool:
        """Whether this forward runs without the host reading the routing counts: the rows are
        numbered, the experts' offsets taken and the grouped GEMMs run from counts that stay on
        the device, so the host never waits for the GPU and runs ahead (``plan_rows_on_device``).
        Only where nothing needs the counts on the host: no expert parallelism (no all-to-all
        to size, nothing to overlap), one chunk whatever the load, every token routed top-k
        times, one row per pair, and an expert backend that takes device offsets."""
        setting = self.eps_config.plan_rows_on_device
        if setting == "off" or (setting == "auto" and not tokens.is_cuda):
            return False
        if self.ep_size != 1 or transport.moves_rows or not all_tokens_routed:
            return False
        if self.eps_config.dispatch_dedup == "on":
            return False
        fixed = getattr(chunking, "chunking_without_counts", lambda: None)()
        if fixed is None or len(chunk_sizes(self.num_local_experts, fixed)) != 1:
            return False
        backend_for = getattr(experts, "device_row_ends_backend", None)
        return backend_for is not None and backend_for(tokens.device, tokens.dtype) is not None

    def _phase(self, name: str):
        if self.profiler_ranges:
            return torch.profiler.record_function(f"eps.{name}")
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ streams
    def _comm_stream(self, like: torch.Tensor, transport: ExpertTransport):
        if not (self.overlap and like.is_cuda):
            return None
        if not transport.moves_rows:
            return None  # nothing to overlap with: dispatch/combine are local slices
        if EPSAlltoAllTokenDispatcher.comm_stream is None:
            # High priority: when SMs free up, the block scheduler starts pending all-to-all
            # CTAs before the next GEMM's, so a GEMM queued behind the comm work does not hold
            # the link back for its whole duration.
            EPSAlltoAllTokenDispatcher.comm_stream = torch.cuda.Stream(
                device=like.device, priority=-1
            )
        return EPSAlltoAllTokenDispatcher.comm_stream
