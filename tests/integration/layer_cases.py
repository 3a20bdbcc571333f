"""Rank-side bodies for the EPSMoELayer API tests (construction errors, spec wiring)."""

import torch
import torch.distributed as dist

from megatron_eps import EPSConfig, EPSConfigError
from megatron_eps.testing import Utils
from megatron_eps.inference.layers import build_moe_pair, moe_config


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


def inference_mode_then_training():
    """An EPS forward under torch.inference_mode() leaves the expert Parameters normal tensors,
    so a later grad-enabled (stock) forward and backward still work."""
    Utils.initialize_model_parallel(1, 1, expert_model_parallel_size=dist.get_world_size())
    out = {}
    try:
        config = moe_config(num_experts=8, ep_size=dist.get_world_size())
        stock, eps = build_moe_pair(config, EPSConfig(pipeline_degree=2, min_tokens_to_pipeline=0))
        x = torch.randn(6, 2, 32, device=next(eps.parameters()).device)
        with torch.inference_mode():
            y_inf, _ = eps(x)
        out["ran_pipeline"] = eps.token_dispatcher.last_record is not None
        out["inference_params"] = [n for n, p in eps.named_parameters() if p.is_inference()]
        x2 = x.clone().requires_grad_(True)
        y, _ = eps(x2)
        y.sum().backward()
        out["grads"] = all(p.grad is not None for p in eps.experts.parameters())
        with torch.no_grad():
            y_stock, _ = stock(x)
        out["diff"] = (y_inf - y_stock).abs().max().item()
    finally:
        Utils.destroy_model_parallel()
    return out


def built_under_inference_mode():
    """Megatron-LM's inference scripts build and load the model inside torch.inference_mode(),
    so the Parameters are inference tensors. A pipelined prefill packs the expert weights; the
    decode steps after it take the stock path, whose Linear views those weights (weight.t()).
    Returns whether the weights were packed, whether they stayed inference tensors, and the
    largest difference to the stock layer over prefill, decode and a second prefill."""
    Utils.initialize_model_parallel(1, 1, expert_model_parallel_size=1)
    out = {}
    try:
        config = moe_config(num_experts=8)
        eps_config = EPSConfig(pipeline_degree=2, expert_kernel="dense")
        with torch.inference_mode():
            stock, eps = build_moe_pair(config, eps_config)
            device = next(eps.parameters()).device
            diffs = []
            for tokens in (512, 1, 3, 512):
                x = torch.randn(tokens, 1, 32, device=device,
                                generator=torch.Generator(device=device).manual_seed(tokens))
                got, _ = eps(x)
                want, _ = stock(x)
                diffs.append((got - want).abs().max().item())
        weights = [e.linear_fc1.weight for e in eps.experts.local_experts]
        step = weights[0].numel() * weights[0].element_size()
        out["packed"] = all(w.data_ptr() == weights[0].data_ptr() + i * step
                            for i, w in enumerate(weights))
        out["inference_params"] = all(p.is_inference() for p in eps.parameters())
        out["diff"] = max(diffs)
    finally:
        Utils.destroy_model_parallel()
    return out


def different_settings_across_ranks(field, values):
    """Each rank builds EPSMoELayer with its own value of ``field``: an EPSConfigError naming
    the setting on every rank, no collective mismatch."""
    from megatron_eps.moe_layer import EPSMoELayer
    from megatron_eps import compat

    world = dist.get_world_size()
    Utils.initialize_model_parallel(1, 1, expert_model_parallel_size=world)
    try:
        config = moe_config(num_experts=8, ep_size=world)
        submodules = compat.moe_submodules_from_spec(compat.local_moe_spec(8))
        eps_config = EPSConfig(**{field: values[dist.get_rank()]})
        try:
            EPSMoELayer(config, submodules=submodules, eps_config=eps_config)
            message = None
        except EPSConfigError as exc:
            message = str(exc)
        # Equal settings on every rank still build (and the group is still usable).
        EPSMoELayer(config, submodules=submodules, eps_config=EPSConfig(pipeline_degree=2))
    finally:
        Utils.destroy_model_parallel()
    return message


def layer_uses_model_groups():
    """A TransformerLayer built with non-default process groups gives them to its EPSMoELayer
    (megatron-core 0.16 passes them to the exact MoELayer class only)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.spec_utils import build_module

    from megatron_eps import apply_eps

    world, rank = dist.get_world_size(), dist.get_rank()
    Utils.initialize_model_parallel(1, 1, expert_model_parallel_size=world)
    out = {}
    try:
        # Non-default groups: each rank its own expert-parallel group of one.
        solo = [dist.new_group([r]) for r in range(world)]
        groups = ProcessGroupCollection.use_mpu_process_groups()
        groups.ep = solo[rank]
        groups.tp_ep = solo[rank]
        groups.expt_dp = solo[rank]
        config = moe_config(num_experts=8, ep_size=1)
        spec = apply_eps(get_gpt_layer_local_spec(num_experts=8, moe_grouped_gemm=False),
                         EPSConfig(pipeline_degree=2, min_tokens_to_pipeline=0))
        layer = build_module(spec, config=config, layer_number=1, pg_collection=groups)
        mlp = layer.mlp
        out["class"] = type(mlp).__name__
        out["same_group"] = mlp.token_dispatcher.ep_group is solo[rank]
        out["ep_size"] = mlp.token_dispatcher.ep_size
        out["num_local_experts"] = mlp.num_local_experts
        # Default-built layer, for contrast: the global EP group of all ranks.
        default_layer = build_module(spec, config=moe_config(num_experts=8, ep_size=world),
                                     layer_number=1)
        out["default_ep_size"] = default_layer.mlp.token_dispatcher.ep_size
        x = torch.randn(4, 2, 32)
        with torch.no_grad():
            y, _ = mlp(x)  # runs on the rank's own group: no collective with the other rank
        out["finite"] = bool(torch.isfinite(y).all())
    finally:
        Utils.destroy_model_parallel()
    return out
