"""Rank-side bodies for the EPSMoELayer API tests (construction errors, spec wiring)."""

import torch
import torch.distributed as dist

from megatron_eps import EPSConfig, EPSConfigError
from megatron_eps.testing import Utils
from megatron_eps.testing.models import build_moe_pair, moe_config


def construction_errors():
    """Build EPSMoELayer from unsupported Megatron configs; return each error message."""
    from megatron_eps import compat
    from megatron_eps.moe_layer import EPSMoELayer

    world = dist.get_world_size()
    Utils.initialize_model_parallel(1, 1, expert_model_parallel_size=world)
    Utils.set_seed(1)
    submodules = compat.moe_submodules_from_spec(compat.local_moe_spec(8))
    bad_configs = {
        "allgather": dict(moe_token_dispatcher_type="allgather"),
        "capacity": dict(moe_expert_capacity_factor=1.0),
    }
    messages = {}
    try:
        for name, overrides in bad_configs.items():
            config = moe_config(num_experts=8, ep_size=world, **overrides)
            try:
                EPSMoELayer(config, submodules=submodules, eps_config=EPSConfig())
                messages[name] = None
            except EPSConfigError as exc:
                messages[name] = str(exc)
        # The same configs are fine with EPS switched off (stock behaviour).
        config = moe_config(num_experts=8, ep_size=world, moe_token_dispatcher_type="allgather")
        EPSMoELayer(config, submodules=submodules, eps_config=EPSConfig(enabled=False))
        if world > 1:
            config = moe_config(num_experts=8, ep_size=world)
            object.__setattr__(config, "num_moe_experts", 8 * world + 1)
            try:
                EPSMoELayer(config, submodules=compat.moe_submodules_from_spec(
                    compat.local_moe_spec(8 * world + 1)), eps_config=EPSConfig())
                messages["indivisible"] = None
            except EPSConfigError as exc:
                messages["indivisible"] = str(exc)
    finally:
        Utils.destroy_model_parallel()
    return messages


def spec_and_state_dict():
    """apply_eps on Megatron's local GPT layer spec; state_dict interchange; grad fallback."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_eps import apply_eps
    from megatron_eps.moe_layer import EPSMoELayer

    world = dist.get_world_size()
    Utils.initialize_model_parallel(1, 1, expert_model_parallel_size=world)
    out = {}
    try:
        layer_spec = get_gpt_layer_local_spec(num_experts=8, moe_grouped_gemm=False)
        eps_spec = apply_eps(layer_spec, EPSConfig(pipeline_degree=2))
        mlp = eps_spec.submodules.mlp
        target = mlp.module if hasattr(mlp, "module") else mlp.func
        out["spec_class"] = target.__name__
        out["original_untouched"] = (
            (layer_spec.submodules.mlp.module if hasattr(layer_spec.submodules.mlp, "module")
             else layer_spec.submodules.mlp.func) is MoELayer
        )
        try:
            apply_eps(get_gpt_layer_local_spec(), EPSConfig())
            out["dense_spec_error"] = None
        except ValueError as exc:
            out["dense_spec_error"] = str(exc)

        config = moe_config(num_experts=8, ep_size=world, shared_expert_size=24)
        stock, eps = build_moe_pair(
            config, EPSConfig(pipeline_degree=2, min_tokens_to_pipeline=0, expert_kernel="megatron")
        )
        out["same_keys"] = sorted(stock.state_dict()) == sorted(eps.state_dict())
        out["is_moe_layer"] = isinstance(eps, MoELayer) and isinstance(eps, EPSMoELayer)
        out["dispatcher"] = type(eps.token_dispatcher).__name__
        # Stock loads an EPS state_dict too.
        stock.load_state_dict(eps.state_dict())
        x = torch.randn(6, 2, 32, device=next(stock.parameters()).device)
        with torch.no_grad():
            y_stock, _ = stock(x)
            y_eps, _ = eps(x)
        out["no_grad_diff"] = (y_stock - y_eps).abs().max().item()
        out["chunks"] = eps.token_dispatcher.last_record.num_chunks
        # With autograd on, EPS falls back to the stock forward (same result, differentiable).
        eps.token_dispatcher.last_record = None
        x.requires_grad_(True)
        y_grad, _ = eps(x)
        y_grad.sum().backward()
        out["grad_path_record"] = eps.token_dispatcher.last_record
        out["grad_diff"] = (y_grad.detach() - y_stock).abs().max().item()
        out["input_grad_finite"] = bool(torch.isfinite(x.grad).all())
    finally:
        Utils.destroy_model_parallel()
    return out
