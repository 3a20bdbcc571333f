"""EPS inside Megatron-LM's own, unmodified scripts.

``gpt_layer_spec`` is the object ``--spec megatron_eps.megatron_lm gpt_layer_spec`` names. It
yields the layer/block spec Megatron-LM would have built for the run's config (local or
Transformer Engine, MLA, the decoder-block spec of a MoE model) with EPSMoELayer in its MoE
layers. Megatron-LM consumes ``--spec`` in two ways, and the object serves both:

* called with the model config (and ``vp_stage``): ``GPTModelBuilder`` (the inference scripts of
  megatron-core 0.19 and later) calls a callable spec with its ``GPTModelConfig``;
* used as the spec itself: ``gpt_builders.gpt_builder`` (every script on 0.16, ``pretrain_gpt.py``
  on 0.19) passes ``import_module(args.spec)`` straight to ``GPTModel``. There the object is a
  ``TransformerBlockSubmodules`` whose fields are built on first use from Megatron's parsed
  arguments (``megatron.training.get_args()``).

EPS settings, later ones winning: the defaults, the YAML file named by ``$MEGATRON_EPS_CONFIG``
(``CONFIG_ENV``), the file of ``--eps-config``, the ``--eps-*`` flags (the flags exist where the
launcher, ``python -m megatron_eps.launch``, added them to Megatron's parser). Naming this spec
turns EPS on; ``enabled: false`` in a file turns it off again (EPSMoELayer then runs the stock
forward).

A setting EPS cannot run with stops the run with one line naming the setting and the
alternative (``SystemExit``), before any EPS collective.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from megatron_eps.config import EPSConfig, EPSConfigError, flag_settings

CONFIG_ENV = "MEGATRON_EPS_CONFIG"
SPEC_ARGUMENT = ("megatron_eps.megatron_lm", "gpt_layer_spec")
"""The value of Megatron-LM's ``--spec`` that selects ``gpt_layer_spec``."""


class MegatronLMSettingError(EPSConfigError):
    """A Megatron-LM or EPS setting EPS cannot run with; the message names it and the way out."""


def refuse(message: str):
    """Stop the run with one line (no traceback): a user's setting, not a bug."""
    raise SystemExit(f"megatron-eps: {message}")


# --------------------------------------------------------------------------- settings
def settings_file(args: Any) -> tuple:
    """(path, name of where it came from) of the EPS YAML file, or (None, None)."""
    path = getattr(args, "eps_config", None) if args is not None else None
    if path:
        return path, "--eps-config"
    path = os.environ.get(CONFIG_ENV) or None
    if path:
        return path, f"${CONFIG_ENV}"
    return None, None


def eps_config_for(args: Any = None) -> EPSConfig:
    """The EPS settings of a Megatron-LM run whose parsed arguments are ``args`` (None: no
    arguments, e.g. a config built without Megatron-LM's parser). EPSConfigError on a bad one."""
    flags = flag_settings(args) if args is not None else {}
    path, source = settings_file(args)
    if path:
        return EPSConfig.from_yaml(path, overrides=flags, flag=source)
    return EPSConfig.from_dict(flags, source="--eps-* flags")


def check_run_settings(config: Any, eps_config: EPSConfig, expert_parallel_size: int) -> None:
    """MegatronLMSettingError for a Megatron setting EPS cannot run with, naming it and the
    alternative. ``config`` holds TransformerConfig field names (a TransformerConfig or any
    object with those attributes)."""
    from megatron_eps.moe_layer import check_megatron_config

    if not eps_config.enabled:
        return
    if getattr(config, "virtual_pipeline_model_parallel_size", None):
        raise MegatronLMSettingError(
            "EPS does not run with virtual pipeline stages (--num-virtual-stages-per-pipeline-rank"
            " / --num-layers-per-virtual-pipeline-stage); drop them or drop --eps-moe")
    try:
        check_megatron_config(config, eps_config, expert_parallel_size)
    except EPSConfigError as exc:
        raise MegatronLMSettingError(_with_flag_names(str(exc))) from None


_FLAG_OF_FIELD = {
    "moe_token_dispatcher_type": "--moe-token-dispatcher-type",
    "moe_expert_capacity_factor": "--moe-expert-capacity-factor",
    "moe_pad_expert_input_to_capacity": "--moe-pad-expert-input-to-capacity",
    "expert_tensor_parallel_size": "--expert-tensor-parallel-size",
    "num_moe_experts": "--num-experts",
    "expert_model_parallel_size": "--expert-model-parallel-size",
    "moe_permute_fusion": "--moe-permute-fusion",
    "moe_router_padding_for_quantization": "--moe-router-padding-for-quantization",
    "moe_latent_size": "--moe-latent-size",
    "transformer_impl": "--transformer-impl",
}


def _with_flag_names(message: str) -> str:
    """A TransformerConfig-field message with each field followed by its Megatron-LM flag."""
    for field, flag in _FLAG_OF_FIELD.items():
        if field in message and flag not in message:
            message = message.replace(field, f"{field} ({flag})", 1)
    return message


class ArgsConfigView:
    """The TransformerConfig fields ``check_run_settings`` reads, taken from Megatron-LM's
    parsed (not yet validated) arguments, so the launcher can refuse a run before
    ``initialize_megatron`` starts any process group."""

    def __init__(self, args: Any):
        self.moe_token_dispatcher_type = getattr(args, "moe_token_dispatcher_type", None)
        self.num_moe_experts = getattr(args, "num_experts", None)
        self.moe_expert_capacity_factor = getattr(args, "moe_expert_capacity_factor", None)
        self.moe_pad_expert_input_to_capacity = getattr(
            args, "moe_pad_expert_input_to_capacity", False)
        # validate_args sets an unset expert TP to the attention's TP
        self.expert_tensor_parallel_size = (getattr(args, "expert_tensor_parallel_size", None)
                                            or getattr(args, "tensor_model_parallel_size", 1) or 1)
        self.transformer_impl = getattr(args, "transformer_impl", None)
        self.virtual_pipeline_model_parallel_size = getattr(
            args, "virtual_pipeline_model_parallel_size", None)
        for flag in ("moe_latent_size", "moe_router_padding_for_quantization",
                     "moe_permute_fusion"):
            setattr(self, flag, getattr(args, flag, None))


def checked_settings(args: Any, config: Any = None, expert_parallel_size: Optional[int] = None,
                     ) -> EPSConfig:
    """The run's EPS settings, checked against its Megatron settings; ``refuse`` (one line)
    where EPS cannot run. ``config``: a TransformerConfig, else read from ``args``."""
    try:
        eps_config = eps_config_for(args)
        if expert_parallel_size is None:
            expert_parallel_size = getattr(config, "expert_model_parallel_size", None) or getattr(
                args, "expert_model_parallel_size", 1) or 1
        check_run_settings(config if config is not None else ArgsConfigView(args), eps_config,
                           expert_parallel_size)
    except EPSConfigError as exc:
        refuse(str(exc))
    return eps_config


# --------------------------------------------------------------------------- the spec
def _megatron_args():
    """Megatron-LM's parsed arguments, or None where none were parsed (or no megatron.training)."""
    try:
        from megatron.training import global_vars
    except ImportError:
        return None
    return getattr(global_vars, "_GLOBAL_ARGS", None)


def stock_spec_for_args(args: Any, config: Any, vp_stage: Optional[int] = None):
    """The spec ``gpt_builders.gpt_builder`` builds when ``--spec`` is absent, for a MoE model."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    if getattr(args, "experimental_attention_variant", None) is not None:
        from megatron.core.models.gpt.experimental_attention_variant_module_specs import (
            get_transformer_block_with_experimental_attention_variant_spec,
        )

        return get_transformer_block_with_experimental_attention_variant_spec(
            config=config, vp_stage=vp_stage)
    return get_gpt_decoder_block_spec(
        config,
        use_transformer_engine=args.transformer_impl == "transformer_engine",
        normalization=args.normalization,
        qk_l2_norm=getattr(args, "qk_l2_norm", False),
        vp_stage=vp_stage,
    )


def eps_spec(stock_spec: Any, config: Any, eps_config: EPSConfig):
    """``stock_spec`` with EPSMoELayer in its MoE layers (``apply_eps``), MLA made buildable
    without Transformer Engine where the version needs it (compat). ``stock_spec`` as it is
    with EPS off (Megatron's own layers, dispatcher included) and for a pipeline stage that
    holds no MoE layer (a legal split of a model whose first layers are dense)."""
    from megatron_eps import compat
    from megatron_eps.spec import apply_eps

    if not eps_config.enabled:
        return stock_spec
    if getattr(config, "multi_latent_attention", False):
        compat.fix_mla_without_te()
    try:
        return apply_eps(stock_spec, eps_config)
    except ValueError:  # the only ValueError of apply_eps: this stage builds no MoELayer
        return stock_spec


class MegatronLMSpec(TransformerBlockSubmodules):
    """The ``--spec`` object (see the module's docstring). Not a dataclass instance of its own:
    ``layer_specs`` and ``layer_norm`` come from the spec built for the current arguments."""

    def __init__(self):  # the fields are properties, resolved on use
        self._built = None

    # GPTModelBuilder (megatron-core 0.19+): spec(GPTModelConfig, vp_stage=...)
    def __call__(self, model_config, vp_stage: Optional[int] = None):
        from megatron_eps import compat

        transformer_config = getattr(model_config, "transformer", model_config)
        eps_config = checked_settings(_megatron_args(), transformer_config)
        stock = compat.megatron_lm_default_layer_spec(model_config, vp_stage)
        if stock is None:
            stock = stock_spec_for_args(_megatron_args(), transformer_config, vp_stage)
        return eps_spec(stock, transformer_config, eps_config)

    # gpt_builders.gpt_builder: the object is the block spec
    def block_for_current_args(self) -> TransformerBlockSubmodules:
        args = _megatron_args()
        if args is None:
            refuse(f"--spec {' '.join(SPEC_ARGUMENT)} is read inside a Megatron-LM run "
                   "(after its parse_args); outside one, call megatron_eps.apply_eps on a spec")
        from megatron.core import parallel_state

        pp_rank = (parallel_state.get_pipeline_model_parallel_rank()
                   if parallel_state.model_parallel_is_initialized() else 0)
        key = (id(args), pp_rank)
        if self._built is not None and self._built[0] == key:
            return self._built[1]
        if getattr(args, "yaml_cfg", None) is not None:
            from megatron.training.yaml_arguments import core_transformer_config_from_yaml

            config = core_transformer_config_from_yaml(args, "language_model")
        else:
            from megatron.training.arguments import core_transformer_config_from_args

            config = core_transformer_config_from_args(args)
        eps_config = checked_settings(args, config)
        block = eps_spec(stock_spec_for_args(args, config), config, eps_config)
        if not isinstance(block, TransformerBlockSubmodules):
            refuse("the model's stock spec is a single layer spec, not a block spec; "
                   "EPS through --spec needs a MoE model (--num-experts)")
        self._built = (key, block)
        return block

    @property
    def layer_specs(self):
        return self.block_for_current_args().layer_specs

    @property
    def layer_norm(self):
        return self.block_for_current_args().layer_norm

    def __repr__(self):
        return f"MegatronLMSpec({'.'.join(SPEC_ARGUMENT)})"


gpt_layer_spec = MegatronLMSpec()
