"""Every difference between the supported Megatron-Core versions (0.16.x and 0.19.x) lives here.

The rest of megatron_eps imports Megatron-Core names through this module only where the two
versions disagree; everything else is imported directly.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Tuple

import torch
from packaging.version import Version

try:
    from megatron.core.package_info import __version__ as _MCORE_VERSION_STR
except ImportError:  # pragma: no cover - very old releases
    import megatron.core as _mc

    _MCORE_VERSION_STR = getattr(_mc, "__version__", "0.0.0")

MCORE_VERSION = Version(_MCORE_VERSION_STR)
SUPPORTED_RANGE = (Version("0.16.0"), Version("0.20.0"))

if not (SUPPORTED_RANGE[0] <= MCORE_VERSION < SUPPORTED_RANGE[1]):
    raise ImportError(
        f"megatron-eps supports megatron-core >=0.16,<0.20; found {MCORE_VERSION}. "
        "Install a supported release (pip install 'megatron-core>=0.16,<0.20')."
    )

# 0.18 moved module specs from ModuleSpec(module=MoELayer) to functools.partial(MoELayer, ...).
SPECS_ARE_PARTIALS = MCORE_VERSION >= Version("0.18.0")


def permute_tokens(
    tokens: torch.Tensor,
    routing_map: torch.Tensor,
    probs: Optional[torch.Tensor],
    num_out_tokens: int,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """Megatron's unfused ``moe_utils.permute``: (permuted tokens, permuted probs, sorted indices).

    0.16 returns 3 values, 0.19 returns 5 (the last two are padding bookkeeping we never use).
    """
    from megatron.core.transformer.moe.moe_utils import permute

    out = permute(tokens, routing_map, probs=probs, num_out_tokens=num_out_tokens, fused=False)
    return out[0], out[1], out[2]


def unpermute_tokens(
    permuted_tokens: torch.Tensor,
    sorted_indices: torch.Tensor,
    restore_shape: torch.Size,
    routing_map: torch.Tensor,
) -> torch.Tensor:
    """Megatron's unfused ``moe_utils.unpermute`` (scatter-add, probs already applied)."""
    from megatron.core.transformer.moe.moe_utils import unpermute

    return unpermute(
        permuted_tokens, sorted_indices, restore_shape=restore_shape, routing_map=routing_map
    )


def swap_moe_layer_class(mlp_spec: Any, new_cls: type, extra_params: dict) -> Any:
    """Return ``mlp_spec`` with its MoELayer class replaced by ``new_cls``.

    Accepts a ``ModuleSpec`` (<=0.17) or a ``functools.partial`` (>=0.18); returns the same kind.
    Returns ``None`` when ``mlp_spec`` does not build a MoELayer.
    """
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.spec_utils import ModuleSpec

    if isinstance(mlp_spec, ModuleSpec):
        module = mlp_spec.module
        if isinstance(module, type) and issubclass(module, MoELayer):
            params = dict(mlp_spec.params or {})
            params.update(extra_params)
            return ModuleSpec(module=new_cls, params=params, submodules=mlp_spec.submodules)
        return None
    if isinstance(mlp_spec, functools.partial):
        func = mlp_spec.func
        if isinstance(func, type) and issubclass(func, MoELayer):
            kwargs = dict(mlp_spec.keywords)
            kwargs.update(extra_params)
            return functools.partial(new_cls, *mlp_spec.args, **kwargs)
        return None
    if isinstance(mlp_spec, type) and issubclass(mlp_spec, MoELayer):
        return functools.partial(new_cls, **extra_params)
    return None


def default_pg_collection():
    """Megatron's default MoE process-group collection (global parallel_state)."""
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    return get_default_pg_collection()


def moe_submodules_from_spec(mlp_spec: Any):
    """The MoESubmodules inside a MoE spec (ModuleSpec on <=0.17, functools.partial on >=0.18)."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    if isinstance(mlp_spec, ModuleSpec):
        return mlp_spec.submodules
    if isinstance(mlp_spec, functools.partial):
        return mlp_spec.keywords["submodules"]
    raise TypeError(f"not a MoE spec: {mlp_spec!r}")


def local_moe_spec(num_experts: int):
    """The MoE part of Megatron's local (no Transformer Engine) GPT layer spec."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    layer_spec = get_gpt_layer_local_spec(num_experts=num_experts, moe_grouped_gemm=False)
    return layer_spec.submodules.mlp
