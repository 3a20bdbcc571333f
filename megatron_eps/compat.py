"""Every difference between the supported Megatron-Core versions (0.16.x, 0.19.x and the 0.20.x
of Megatron-LM main) lives here.

The rest of megatron_eps imports Megatron-Core names through this module only where the two
versions disagree; everything else is imported directly.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from packaging.version import Version

try:
    from megatron.core.package_info import __version__ as _MCORE_VERSION_STR
except ImportError:  # pragma: no cover - very old releases
    import megatron.core as _mc

    _MCORE_VERSION_STR = getattr(_mc, "__version__", "0.0.0")

MCORE_VERSION = Version(_MCORE_VERSION_STR)
# 0.20: Megatron-LM main; the MoELayer, MoEAlltoAllTokenDispatcher, moe_utils, inference
# context/wrapper, spec and GPTModelBuilder names used here are those of 0.19 there.
SUPPORTED_RANGE = (Version("0.16.0"), Version("0.21.0"))

if not (SUPPORTED_RANGE[0] <= MCORE_VERSION < SUPPORTED_RANGE[1]):
    raise ImportError(
        f"megatron-eps supports megatron-core >=0.16,<0.21; found {MCORE_VERSION}. "
        "Install a supported release (pip install 'megatron-core>=0.16,<0.21')."
    )



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


# ---------------------------------------------------------------------------------------------
# Inference path (added for megatron_eps.inference.prefill, issue 5: model configs + inference).
# 0.16: GPTInferenceWrapper(model, InferenceWrapperConfig, inference_context); the context keeps
#       materialize_only_last_token_logits as an attribute.
# 0.19: GPTInferenceWrapper(model, inference_context) (the wrapper config is deprecated and
#       gone); the context keeps it in context.config (an InferenceConfig).
# ---------------------------------------------------------------------------------------------


def _inference_wrapper_takes_config(wrapper_cls) -> bool:
    import inspect

    try:
        params = inspect.signature(wrapper_cls.__init__).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return MCORE_VERSION < Version("0.18.0")
    return "inference_wrapper_config" in params


def make_static_inference_context(max_batch_size: int, max_sequence_length: int,
                                  materialize_only_last_token_logits: bool = True):
    """A ``StaticInferenceContext`` (KV cache for ``max_batch_size`` x ``max_sequence_length``)."""
    from megatron.core.inference.contexts import StaticInferenceContext

    context = StaticInferenceContext(max_batch_size, max_sequence_length)
    config = getattr(context, "config", None)
    if config is not None and hasattr(config, "materialize_only_last_token_logits"):
        config.materialize_only_last_token_logits = materialize_only_last_token_logits
    else:
        context.materialize_only_last_token_logits = materialize_only_last_token_logits
    return context


def inference_engine_mode():
    """A context in which the model runs as under Megatron's inference engines.

    0.19 reads ``InferenceMode`` (set by its static and dynamic engines) where 0.16 read
    ``inference_context is not None``: a forward outside an engine gets, among other things,
    the logits of every token although the context asked for the last token's only (at 32K
    tokens and a 100K vocabulary that is 6.7 GB of bf16 logits per step). 0.16 has no such
    flag: the context alone decides there.
    """
    import contextlib

    try:
        from megatron.core.inference.utils import InferenceMode
    except ImportError:
        return contextlib.nullcontext()
    return InferenceMode.active()


def make_gpt_inference_wrapper(model, inference_context, *, hidden_size: int, params_dtype,
                               padded_vocab_size: int, max_batch_size: int,
                               max_sequence_length: int):
    """``GPTInferenceWrapper`` for ``model`` around ``inference_context``, on 0.16 and 0.19."""
    from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import (
        GPTInferenceWrapper,
    )

    if _inference_wrapper_takes_config(GPTInferenceWrapper):
        from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import (
            InferenceWrapperConfig,
        )

        wrapper_config = InferenceWrapperConfig(
            hidden_size=hidden_size,
            params_dtype=params_dtype,
            inference_batch_times_seqlen_threshold=-1,
            padded_vocab_size=padded_vocab_size,
            inference_max_requests=max_batch_size,
            inference_max_seq_length=max_sequence_length,
        )
        return GPTInferenceWrapper(model, wrapper_config, inference_context)
    return GPTInferenceWrapper(model, inference_context)


# ---------------------------------------------------------------------------------------------
# MLA without Transformer Engine (added for megatron_eps.inference.model_config, issue 5).
# 0.16.x: multi_latent_attention.py sets HAVE_TE = True whenever megatron.core.extensions.
# transformer_engine imports, which it does without TE (TELinear is then a MagicMock
# placeholder, not a class), and
# MLASelfAttention.__init__ calls isinstance(self.linear_proj, TELinear) -> TypeError.
# 0.19.x takes HAVE_TE from the extension module and is correct. Idempotent; no-op with TE.
# ---------------------------------------------------------------------------------------------
def fix_mla_without_te() -> bool:
    """Make MLASelfAttention buildable from the local spec when TE is absent. Returns True if
    a fix was applied."""
    from megatron.core.transformer import multi_latent_attention as mla

    if getattr(mla, "HAVE_TE", False) and not isinstance(getattr(mla, "TELinear", None), type):
        mla.HAVE_TE = False
        return True
    return False


# ---------------------------------------------------------------------------------------------
# Process groups of the enclosing TransformerLayer (issue 10, item 9).
# 0.16.x: TransformerLayer passes pg_collection to its MLP only when the spec's module is exactly
#         MoELayer (``submodules.mlp.module in (MoELayer, ...)``), so a MoELayer subclass such as
#         EPSMoELayer gets no pg_collection and would fall back to the global default groups,
#         whatever groups the model was built with. The layer has already stored its groups in
#         ``self.pg_collection`` when it builds the MLP: take them from there.
# 0.19.x: partial specs are called with pg_collection; this lookup is then never needed.
# ---------------------------------------------------------------------------------------------
def enclosing_layer_pg_collection(max_depth: int = 8):
    """The ``pg_collection`` of the TransformerLayer whose ``__init__`` is building the caller,
    or None when the caller is not being built by one (e.g. constructed directly)."""
    import sys

    from megatron.core.transformer.transformer_layer import TransformerLayer

    frame = sys._getframe(1)
    for _ in range(max_depth):
        frame = frame.f_back
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if isinstance(owner, TransformerLayer) and frame.f_code.co_name == "__init__":
            return getattr(owner, "pg_collection", None)
    return None


def moe_pg_collection(pg_collection=None):
    """The process groups a MoELayer subclass should use: the ones it was given, else those of
    the TransformerLayer building it (0.16 passes them to the exact MoELayer class only), else
    Megatron's default MoE groups."""
    if pg_collection is not None:
        return pg_collection
    layer_groups = enclosing_layer_pg_collection()
    if layer_groups is not None and getattr(layer_groups, "ep", None) is not None:
        return layer_groups
    return default_pg_collection()


class _QuietUnknownMLPForEPS:
    """logging filter for 0.16's TransformerLayer: drop its 'Unknown MLP type ... Using default
    kwargs' warning when the MLP being built is an EPSMoELayer (a MoELayer subclass, handled by
    moe_pg_collection); the warning stays for every other MLP."""

    def filter(self, record) -> bool:
        if not str(record.msg).startswith("Unknown MLP type"):
            return True
        import sys

        from megatron.core.transformer.moe.moe_layer import MoELayer

        frame = sys._getframe(1)
        for _ in range(12):
            if frame is None:
                break
            submodules = frame.f_locals.get("submodules")
            mlp = getattr(submodules, "mlp", None)
            module = getattr(mlp, "module", None)
            if isinstance(module, type) and issubclass(module, MoELayer):
                return False
            frame = frame.f_back
        return True


def quiet_unknown_mlp_warning_for_eps() -> None:
    """Install _QuietUnknownMLPForEPS on Megatron's transformer_layer logger (idempotent)."""
    import logging

    log = logging.getLogger("megatron.core.transformer.transformer_layer")
    if not any(isinstance(f, _QuietUnknownMLPForEPS) for f in log.filters):
        log.addFilter(_QuietUnknownMLPForEPS())


# ---------------------------------------------------------------------------------------------
# Megatron-LM's default GPT spec (megatron_eps.megatron_lm).
# 0.19+: the inference scripts build through megatron.training.models.gpt.GPTModelBuilder, which
#        calls a callable --spec with its GPTModelConfig; Megatron's own choice of spec for that
#        config is megatron.training.models.gpt.default_layer_spec(config, vp_stage).
# 0.16:  no GPTModelBuilder (gpt_builders.gpt_builder picks the spec inline); the callable form
#        is then only reached by a caller of our own, and the choice is made from the arguments.
# ---------------------------------------------------------------------------------------------
def megatron_lm_default_layer_spec(model_config, vp_stage=None):
    """The layer/block spec Megatron-LM builds for ``model_config`` (a GPTModelConfig) when
    ``--spec`` is absent, or None where Megatron-LM has no GPTModelBuilder (0.16)."""
    try:
        from megatron.training.models.gpt import default_layer_spec
    except ImportError:
        return None
    return default_layer_spec(model_config, vp_stage)


# ---------------------------------------------------------------------------------------------
# Megatron-LM start-up (the project's scripts under scripts/).
# 0.16: initialize_megatron(extra_args_provider=..., args_defaults=...) parses the arguments.
# 0.19+: the scripts call parse_and_validate_args(extra_args_provider, args_defaults=...) first;
#        initialize_megatron() then takes no parsing arguments.
# ---------------------------------------------------------------------------------------------
def initialize_megatron_lm(extra_args_provider=None, args_defaults=None, allow_no_cuda=False):
    """Parse Megatron-LM's arguments (with ``extra_args_provider``) and initialize it."""
    from megatron.training import arguments
    from megatron.training.initialize import initialize_megatron

    if hasattr(arguments, "parse_and_validate_args"):
        arguments.parse_and_validate_args(extra_args_provider=extra_args_provider,
                                          args_defaults=args_defaults or {})
        initialize_megatron(allow_no_cuda=allow_no_cuda)
    else:
        initialize_megatron(extra_args_provider=extra_args_provider,
                            args_defaults=args_defaults or {}, allow_no_cuda=allow_no_cuda)
