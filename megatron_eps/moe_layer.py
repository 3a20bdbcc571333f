"""EPSMoELayer: Megatron's MoELayer with the EPS pipelined forward."""

from __future__ import annotations

import logging
from typing import Optional

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer

from megatron_eps import compat
from megatron_eps.config import EPSConfig, EPSConfigError
from megatron_eps.policy.cost_model import LayerShape
from megatron_eps.pipeline.dispatcher import EPSAlltoAllTokenDispatcher
from megatron_eps.experts.base import LocalExperts
from megatron_eps.comm.selection import TransportChoice
from megatron_eps.experts.chunk_runner import ExpertRunner
from megatron_eps.experts.shared import SharedExpertRunner
from megatron_eps.policy.degree import ChunkingPolicy

logger = logging.getLogger(__name__)

STOCK_FORWARD_BELOW_TOKENS = 256
"""Without expert parallelism, forwards with fewer tokens than this and than
``min_tokens_to_pipeline`` (decode steps, small batches) run Megatron's stock MoELayer forward:
one chunk cannot overlap anything, and the stock path adds no host work (``takes_stock_path``).
Per layer: ``EPSMoELayer.stock_forward_below_tokens``."""


def check_megatron_config(config, eps_config: EPSConfig, ep_size: int) -> None:
    """Raise EPSConfigError for Megatron settings the pipelined forward does not support.

    Called at construction, before any collective can start.
    """
    if not eps_config.enabled:
        return
    dispatcher = config.moe_token_dispatcher_type
    if dispatcher != "alltoall":
        raise EPSConfigError(
            f"EPS needs moe_token_dispatcher_type='alltoall', got {dispatcher!r}; allowed "
            "values with EPS: alltoall (or turn EPS off: --eps-moe absent / eps.enabled: false)"
        )
    if config.num_moe_experts is None or config.num_moe_experts < 1:
        raise EPSConfigError("EPS needs num_moe_experts >= 1")
    if config.num_moe_experts % ep_size != 0:
        raise EPSConfigError(
            f"num_moe_experts={config.num_moe_experts} is not divisible by "
            f"expert_model_parallel_size={ep_size}; allowed: a multiple of {ep_size}"
        )
    if config.moe_expert_capacity_factor is not None or config.moe_pad_expert_input_to_capacity:
        raise EPSConfigError(
            "EPS pipelines dropless routing only: moe_expert_capacity_factor must be None and "
            f"moe_pad_expert_input_to_capacity False (got {config.moe_expert_capacity_factor!r}, "
            f"{config.moe_pad_expert_input_to_capacity!r})"
        )
    etp = getattr(config, "expert_tensor_parallel_size", 1) or 1
    if etp != 1:
        raise EPSConfigError(
            f"EPS needs expert_tensor_parallel_size=1, got {etp}; allowed values: 1 "
            "(attention may still use tensor parallelism)"
        )
    for flag in ("moe_latent_size", "moe_router_padding_for_quantization", "moe_permute_fusion"):
        if getattr(config, flag, None):
            raise EPSConfigError(f"EPS does not support {flag}={getattr(config, flag)!r}")
    if getattr(config, "transformer_impl", None) == "inference_optimized":
        raise EPSConfigError(
            "EPS does not support transformer_impl='inference_optimized' (it swaps in its own "
            "dispatcher); allowed values with EPS: 'local', 'transformer_engine'"
        )


def check_same_eps_config(eps_config: EPSConfig, group) -> None:
    """Raise EPSConfigError on every rank of ``group`` unless all hold equal EPS settings.

    Ranks with different settings would pick different chunks (or one would run the stock
    forward) and their collectives would not match: gloo/NCCL would abort with a collective
    mismatch or hang. One all-reduce of a hash of the settings (a cost profile by its contents)
    finds it at construction; on a mismatch one all-gather names the settings that differ.
    """
    import torch.distributed as dist

    if group is None or not dist.is_initialized() or dist.get_world_size(group) < 2:
        return
    device = torch.device("cpu")
    if "nccl" in str(dist.get_backend(group)).lower() and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    digest = int(eps_config.digest()[:15], 16)
    both = torch.tensor([digest, -digest], dtype=torch.int64, device=device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    if int(both[0]) == -int(both[1]):
        return
    mine = eps_config.comparable_dict()
    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    ranks = dist.get_process_group_ranks(group)
    differing = sorted({k for other in everyone for k in mine if other.get(k) != mine.get(k)})
    detail = "; ".join(
        f"{key}: " + ", ".join(f"rank {r}={values[key]!r}" for r, values in zip(ranks, everyone))
        for key in differing
    )
    raise EPSConfigError(
        f"the ranks of the expert-parallel group have different EPS settings ({detail}); "
        "every rank of the group must use the same eps config"
    )


def route_allowing_empty(layer, hidden_states, padding_mask=None):
    """``layer.route`` that also accepts a rank holding no tokens.

    Megatron's router cannot reshape an empty logits tensor, yet under expert parallelism a
    rank with no tokens must still join every collective of the layer. The empty result has
    the dtype the router would produce, so the all-to-alls of all ranks agree.
    """
    if hidden_states.numel() > 0:
        return MoELayer.route(layer, hidden_states, padding_mask)
    router_dtype = {"fp32": torch.float32, "fp64": torch.float64}.get(
        layer.config.moe_router_dtype, hidden_states.dtype
    )
    num_experts = layer.config.num_moe_experts
    probs = hidden_states.new_zeros((0, num_experts), dtype=router_dtype)
    routing_map = hidden_states.new_zeros((0, num_experts), dtype=torch.bool)
    return probs, routing_map


class EPSMoELayer(MoELayer):
    """A MoELayer whose forward pipelines dispatch, experts and combine over expert groups.

    Same constructor as MoELayer plus ``eps_config``; same parameters, so its ``state_dict`` is
    interchangeable with a stock MoELayer built from the same config and submodules.

    The pipelined forward runs for inference (no autograd). With gradients enabled, or with
    ``eps_config.enabled`` False, the stock MoELayer forward runs instead.
    """

    def __init__(
        self,
        config,
        submodules=None,
        layer_number: Optional[int] = None,
        pg_collection=None,
        eps_config: Optional[EPSConfig] = None,
        **kwargs,
    ):
        eps_config = eps_config if eps_config is not None else EPSConfig()
        if not isinstance(eps_config, EPSConfig):
            raise TypeError(f"eps_config must be an EPSConfig, got {type(eps_config).__name__}")
        # The model's groups: on megatron-core 0.16 a TransformerLayer passes them to the exact
        # MoELayer class only, so take them from the layer building this one (compat).
        pg_collection = compat.moe_pg_collection(pg_collection)
        ep_size = pg_collection.ep.size() if pg_collection.ep is not None else 1
        # Before anything that may differ between ranks: every EP rank must hold the same
        # settings, or their chunked collectives would not match.
        check_same_eps_config(eps_config, pg_collection.ep if ep_size > 1 else None)
        check_megatron_config(config, eps_config, ep_size)
        super().__init__(
            config,
            submodules=submodules,
            layer_number=layer_number,
            pg_collection=pg_collection,
            **kwargs,
        )
        self.eps_config = eps_config
        if eps_config.enabled and eps_config.comm_num_ctas is not None:
            from megatron_eps.comm.sm_control import apply_comm_cta_cap

            # Effective for EP communicators NCCL has not created yet (it creates them at a
            # group's first collective); set it before init_process_group to be sure.
            apply_comm_cta_cap(eps_config.comm_num_ctas)
        self.token_dispatcher = EPSAlltoAllTokenDispatcher(
            self.num_local_experts,
            self.local_expert_indices,
            config=self.config,
            pg_collection=pg_collection,
            eps_config=eps_config,
        )
        if self.use_shared_expert and self.shared_expert_overlap:
            self.token_dispatcher.set_shared_experts(self.shared_experts)
        # The transport the pipeline runs over; an impossible copy_engine fails here, before
        # any collective.
        self.transport_choice = TransportChoice(
            eps_config.transport, self.token_dispatcher.ep_group, self.token_dispatcher.ep_size,
            check=eps_config.enabled)
        # Not a submodule (the runner only views self.experts), so the state_dict is the stock one.
        self.expert_runner = ExpertRunner(LocalExperts(self.experts, self.config), eps_config)
        # Fewer tokens on the rank: the stock forward (``takes_stock_path``).
        self.stock_forward_below_tokens = STOCK_FORWARD_BELOW_TOKENS
        # A chunking policy that replaces the one built from the settings (``use_chunking``).
        self.chunking_override = None
        # Whether the pipelined forward issues the shared experts on a side stream of their own
        # (``experts.shared.SharedExpertRunner``) where no transfer runs beside them: under
        # expert parallelism they would take SMs from the all-to-alls that the GEMMs' carve-out
        # keeps free.
        self.shared_experts_side_stream = True
        self._shared_runner: Optional[SharedExpertRunner] = None
        self._warned_fallback = False

    # ------------------------------------------------------------------ forward
    def route(self, hidden_states, padding_mask=None):
        return route_allowing_empty(self, hidden_states, padding_mask)

    def uses_pipeline(self) -> bool:
        return self.eps_config.enabled and not torch.is_grad_enabled()

    def takes_stock_path(self, hidden_states) -> bool:
        """True for a forward that runs Megatron's own path at its own cost: a decode step or
        small batch without expert parallelism (fewer tokens than ``stock_forward_below_tokens``
        and than ``min_tokens_to_pipeline``, read from the shape), a
        CUDA-graph capture (the pipelined forward syncs with the host), and Megatron's
        run-time drop-and-pad for graphed decode (``set_decode_expert_padding`` flips the
        config and the dispatcher after construction)."""
        # The shape is this rank's alone: under expert parallelism a rank of few tokens taking
        # the stock path while a peer pipelines would pair unlike collectives. There the group
        # decides from the counts every rank holds (one chunk below min_tokens_to_pipeline).
        if self.token_dispatcher.ep_size == 1:
            tokens = hidden_states.shape[0] * hidden_states.shape[1]
            if (tokens < self.stock_forward_below_tokens
                    and tokens < self.eps_config.min_tokens_to_pipeline):
                return True
        if hidden_states.is_cuda and torch.cuda.is_current_stream_capturing():
            return True
        config = self.config
        return bool(config.moe_pad_expert_input_to_capacity
                    or config.moe_expert_capacity_factor is not None
                    or getattr(self.token_dispatcher, "drop_and_pad", False))

    def forward(self, hidden_states, intermediate_tensors=None, padding_mask=None):
        if self.eps_config.enabled and intermediate_tensors is None and self.takes_stock_path(
                hidden_states):
            return super().forward(hidden_states, intermediate_tensors, padding_mask)
        if intermediate_tensors is not None or not self.uses_pipeline():
            if self.eps_config.enabled and not self._warned_fallback:
                logger.warning(
                    "EPSMoELayer: gradients are enabled (or partial CUDA-graph capture is on); "
                    "running the stock MoELayer forward. EPS pipelines inference only."
                )
                self._warned_fallback = True
            return super().forward(hidden_states, intermediate_tensors, padding_mask)
        if padding_mask is not None:
            padding_mask = padding_mask.transpose(0, 1).bool()
        probs, routing_map = self.route(hidden_states, padding_mask)
        self.expert_runner.begin_forward(self.eps_config)
        chunking = self.chunking_override or self.chunking_policy(hidden_states)
        transport = self.transport_choice.resolve(hidden_states.device)
        shared = None
        if self.use_shared_expert:
            runner = self.shared_expert_runner()
            side_stream = self.shared_experts_side_stream and not transport.moves_rows
            shared = lambda: runner.issue(hidden_states, side_stream)  # noqa: E731
        # The dispatcher reads the current settings (dispatch_dedup, gemm_sm_carveout).
        self.token_dispatcher.eps_config = self.eps_config
        output = self.token_dispatcher.pipelined_forward(
            hidden_states,
            probs,
            routing_map,
            experts=self.expert_runner,
            chunking=chunking,
            shared_experts=shared,
            transport=transport,
            all_tokens_routed=padding_mask is None,
        )
        return output, None

    def shared_expert_runner(self) -> SharedExpertRunner:
        """The runner of ``self.shared_experts`` (rebuilt when the module is replaced)."""
        runner = self._shared_runner
        if runner is None or runner.module is not self.shared_experts:
            runner = SharedExpertRunner(self.shared_experts)
            self._shared_runner = runner
        return runner

    @property
    def last_expert_backends(self):
        """The expert backend of each chunk of the last pipelined forward."""
        return self.expert_runner.backends_used

    def use_transport(self, transport) -> None:
        """Run the next forwards over ``transport`` (an ``comm.ExpertTransport``), e.g.
        ``NCCLTransport(EmulatedLinkAllToAll(...))`` for the single-GPU link emulator."""
        self.transport_choice.use(transport)

    @property
    def transport(self):
        """The transport the layer runs over (None before the first forward resolves it)."""
        return self.transport_choice.transport

    def use_chunking(self, chunking) -> None:
        """Chunk the next forwards with ``chunking`` (an object with ``choose(counts,
        transport)``, e.g. ``policy.degree.FixedChunking``); None: from the settings."""
        self.chunking_override = chunking

    def chunking_policy(self, hidden_states) -> ChunkingPolicy:
        """This forward's chunking policy (from the current settings)."""
        shape = LayerShape.from_megatron(
            self.config,
            self.num_local_experts,
            self.token_dispatcher.ep_size,
            hidden_states.element_size(),
        )
        return ChunkingPolicy(shape, self.eps_config, hidden_states.device,
                              self.token_dispatcher.dispatch_ahead)
