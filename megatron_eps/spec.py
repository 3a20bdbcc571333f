"""Wiring: make a Megatron GPT layer/block spec build EPSMoELayer instead of MoELayer."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Optional

from megatron_eps import compat
from megatron_eps.config import EPSConfig


def apply_eps(spec: Any, eps_config: Optional[EPSConfig] = None) -> Any:
    """Return a copy of ``spec`` whose MoE layers are ``EPSMoELayer(eps_config=...)``.

    ``spec`` may be a transformer layer ModuleSpec (``get_gpt_layer_local_spec(...)``), a block
    spec (``TransformerBlockSubmodules`` from ``get_gpt_decoder_block_spec``), a list of layer
    specs, or the MoE spec itself (a ModuleSpec on <=0.17, a functools.partial on >=0.18).
    Dense layers are left alone. Raises ValueError if the spec builds no MoE layer at all.

    Typical use in a Megatron-LM model provider::

        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False)
        spec = megatron_eps.apply_eps(spec, megatron_eps.EPSConfig.from_args(args))
        model = GPTModel(config=config, transformer_layer_spec=spec, ...)
    """
    from megatron_eps.moe_layer import EPSMoELayer

    eps_config = eps_config if eps_config is not None else EPSConfig()
    if not isinstance(eps_config, EPSConfig):
        raise TypeError(f"apply_eps: eps_config must be an EPSConfig, got {type(eps_config)}")
    # 0.16's TransformerLayer warns "Unknown MLP type" for every MoELayer subclass; EPS layers
    # are handled (compat.moe_pg_collection), so that warning is dropped for them only.
    compat.quiet_unknown_mlp_warning_for_eps()
    replaced = [0]

    def swap(node):
        swapped = compat.swap_moe_layer_class(node, EPSMoELayer, {"eps_config": eps_config})
        if swapped is not None:
            replaced[0] += 1
        return swapped

    result = map_spec(copy.copy(spec), swap)
    if replaced[0] == 0:
        raise ValueError(
            "apply_eps: the spec builds no MoELayer; build it with num_experts set "
            "(e.g. get_gpt_layer_local_spec(num_experts=...)) before applying EPS"
        )
    return result


def map_spec(node: Any, replace) -> Any:
    """Rebuild a spec tree (lists, tuples, dataclasses such as ModuleSpec and submodules) with
    every node for which ``replace(node)`` returns something other than None replaced by it.
    Unchanged subtrees are returned as they are (no copies)."""
    new = replace(node)
    if new is not None:
        return new
    if isinstance(node, list):
        return [map_spec(item, replace) for item in node]
    if isinstance(node, tuple):
        return tuple(map_spec(item, replace) for item in node)
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        changes = {}
        for field in dataclasses.fields(node):
            value = getattr(node, field.name)
            new_value = map_spec(value, replace)
            if new_value is not value:
                changes[field.name] = new_value
        return dataclasses.replace(node, **changes) if changes else node
    return node
