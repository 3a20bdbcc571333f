"""Small MoE layers for tests, demos and benchmarks: a stock MoELayer and an EPSMoELayer with
identical weights."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megatron_eps import compat
from megatron_eps.config import EPSConfig


def moe_config(
    num_experts: int = 8,
    topk: int = 2,
    hidden_size: int = 32,
    ffn_hidden_size: int = 16,
    shared_expert_size: Optional[int] = None,
    ep_size: int = 1,
    dtype: torch.dtype = torch.float32,
    **overrides,
):
    """A TransformerConfig for one dropless SwiGLU MoE layer with the alltoall dispatcher."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    values = dict(
        num_layers=1,
        hidden_size=hidden_size,
        num_attention_heads=4,
        num_moe_experts=num_experts,
        moe_router_topk=topk,
        moe_ffn_hidden_size=ffn_hidden_size,
        ffn_hidden_size=ffn_hidden_size,
        moe_shared_expert_intermediate_size=shared_expert_size,
        moe_token_dispatcher_type="alltoall",
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        expert_model_parallel_size=ep_size,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        use_cpu_initialization=not torch.cuda.is_available(),
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        # Megatron requires pre-softmax routing for top-1 (softmax over one value is 1).
        moe_router_pre_softmax=topk == 1,
    )
    values.update(overrides)
    return TransformerConfig(**values)


def build_moe_pair(config, eps_config: Optional[EPSConfig] = None, seed: int = 1234):
    """(stock MoELayer, EPSMoELayer) built from the same spec, with identical weights."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_eps.inference.parallel import seed_model_parallel
    from megatron_eps.moe_layer import EPSMoELayer

    submodules = compat.moe_submodules_from_spec(compat.local_moe_spec(config.num_moe_experts))
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    seed_model_parallel(seed)
    stock = MoELayer(config, submodules=submodules).to(device)
    eps = EPSMoELayer(config, submodules=submodules, eps_config=eps_config or EPSConfig()).to(device)
    eps.load_state_dict(stock.state_dict())
    stock.eval()
    eps.eval()
    return stock, eps
