"""Model configs (configs/*.yaml) -> Megatron-Core TransformerConfig / layer spec / GPTModel.

A model config file has these top-level keys (anything else is an error):

    name:        short name (used in reports)
    description: free text
    model:       model shape. Keys are either builder keys (BUILDER_KEYS below) or Megatron-Core
                 ``TransformerConfig`` field names (``MLATransformerConfig`` ones too when
                 ``attention: mla``), spelled exactly as in megatron.core.
    parallel:    expert_model_parallel_size (null = world size), tensor_model_parallel_size,
                 expert_tensor_parallel_size (must be 1)
    eps:         EPS settings, read by ``EPSConfig.from_yaml`` (so ``--eps-config x.yaml`` works)

Typical use::

    mc = load_model_config("configs/deepseek_v2_lite.yaml", num_layers=4)
    config = mc.transformer_config(dtype=torch.bfloat16, expert_model_parallel_size=8)
    spec = mc.layer_spec(config)                     # local spec, no TE
    spec = megatron_eps.apply_eps(spec, eps_config)  # optional
    model = mc.build_gpt_model(config, spec)

Attention: ``core_attention: sdpa`` (default) swaps Megatron's local DotProductAttention for
``megatron_eps.inference.sdpa_attention.SDPAttention`` (torch SDPA). It is required for MLA without
Transformer Engine (DotProductAttention rejects MLA's k_channels/v_channels arguments) and for
long prompts (DotProductAttention materialises the s x s score matrix). ``local`` keeps
Megatron's DotProductAttention (GQA/MHA only).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Union


TOP_LEVEL_KEYS = ("name", "description", "model", "parallel", "eps")

ATTENTION_KINDS = ("mla", "gqa")
CORE_ATTENTIONS = ("sdpa", "local")
ACTIVATIONS = ("swiglu", "silu", "gelu", "geglu", "relu", "squared_relu")
POSITION_EMBEDDINGS = ("rope", "learned_absolute", "none")

# Keys of the ``model:`` section that are not TransformerConfig fields.
BUILDER_KEYS = {
    "attention": "mla | gqa (gqa also covers MHA: num_query_groups = num_attention_heads)",
    "core_attention": "sdpa | local",
    "activation": "swiglu | silu | gelu | geglu | relu | squared_relu",
    "first_k_dense_layers": "number of leading dense (non-MoE) layers",
    "vocab_size": "GPTModel vocab_size",
    "max_sequence_length": "GPTModel max_sequence_length",
    "position_embedding_type": "rope | learned_absolute | none",
    "share_embeddings_and_output_weights": "tie input embedding and output layer",
    "rotary_base": "RoPE base (GPTModel arg for gqa, MLATransformerConfig field for mla)",
    "rotary_percent": "fraction of the head dim rotated (gqa)",
}

# TransformerConfig fields the builder owns: set them through another key or a flag instead.
RESERVED_FIELDS = {
    "tensor_model_parallel_size": "parallel.tensor_model_parallel_size",
    "expert_model_parallel_size": "parallel.expert_model_parallel_size",
    "expert_tensor_parallel_size": "parallel.expert_tensor_parallel_size",
    "pipeline_model_parallel_size": "(pipeline parallelism is not supported)",
    "context_parallel_size": "(context parallelism is not supported)",
    "sequence_parallel": "(set automatically: on when tensor_model_parallel_size > 1)",
    "params_dtype": "--dtype",
    "bf16": "--dtype",
    "fp16": "--dtype",
    "activation_func": "model.activation",
    "gated_linear_unit": "model.activation",
    "moe_layer_freq": "model.first_k_dense_layers",
    "multi_latent_attention": "model.attention",
    "use_cpu_initialization": "(set automatically: on without CUDA)",
    "attention_backend": "model.core_attention",
}

PARALLEL_KEYS = (
    "expert_model_parallel_size",
    "tensor_model_parallel_size",
    "expert_tensor_parallel_size",
)

# Defaults the builder applies unless the file sets the field (inference, no TE, no fusions).
FIELD_DEFAULTS = {
    "add_bias_linear": False,
    "hidden_dropout": 0.0,
    "attention_dropout": 0.0,
    "bias_activation_fusion": False,
    "bias_dropout_fusion": False,
    "masked_softmax_fusion": False,
    "apply_rope_fusion": False,
    "gradient_accumulation_fusion": False,
    "persist_layer_norm": False,
    "moe_token_dispatcher_type": "alltoall",
    "moe_grouped_gemm": False,
    "moe_router_load_balancing_type": "none",
    "moe_aux_loss_coeff": 0.0,
    "moe_permute_fusion": False,
}


class ModelConfigError(ValueError):
    """A model config file is malformed; the message names the file, the key and what is allowed."""


def _suggest(key: str, allowed) -> str:
    close = difflib.get_close_matches(key, list(allowed), n=3, cutoff=0.7)
    return f" (did you mean {', '.join(map(repr, close))}?)" if close else ""


def _reject_unknown_keys(section: Mapping, allowed, what: str, path: str) -> None:
    unknown = sorted(set(section) - set(allowed))
    if unknown:
        raise ModelConfigError(
            f"{path}: unknown {what} key(s) {', '.join(map(repr, unknown))}"
            f"{_suggest(unknown[0], allowed)}; allowed keys: {', '.join(allowed)}"
        )


def _transformer_config_classes():
    from megatron.core.transformer.transformer_config import (
        MLATransformerConfig,
        TransformerConfig,
    )

    return TransformerConfig, MLATransformerConfig


def _field_names(cls) -> set:
    return {f.name for f in dataclasses.fields(cls) if f.init}


@dataclass
class ModelConfig:
    """A validated model config file. ``model`` holds only TransformerConfig fields."""

    name: str
    path: str
    attention: str
    core_attention: str
    activation: str
    first_k_dense_layers: int
    vocab_size: int
    max_sequence_length: int
    position_embedding_type: str
    share_embeddings_and_output_weights: bool
    rotary_base: Optional[float]
    rotary_percent: float
    fields: Dict[str, Any]
    parallel: Dict[str, Any]
    eps: Dict[str, Any] = field(default_factory=dict)
    description: str = ""

    # ------------------------------------------------------------------ shape accessors
    @property
    def num_layers(self) -> int:
        return int(self.fields["num_layers"])

    @property
    def hidden_size(self) -> int:
        return int(self.fields["hidden_size"])

    @property
    def num_moe_experts(self) -> int:
        return int(self.fields["num_moe_experts"])

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.first_k_dense_layers

    def expert_weight_bytes_per_layer(self, bytes_per_param: int = 2) -> int:
        """Bytes of routed-expert weights in one MoE layer (all experts, gate/up/down)."""
        ffn = int(self.fields["moe_ffn_hidden_size"])
        mult = 3 if self.activation in ("swiglu", "geglu") else 2
        return self.num_moe_experts * mult * self.hidden_size * ffn * bytes_per_param

    def parameter_counts(self) -> Dict[str, int]:
        """Approximate parameter counts (norms and biases left out): per dense layer, per MoE
        layer (and its routed experts), embeddings, total. For sizing runs to GPU memory."""
        f = self.fields
        h = self.hidden_size
        heads = int(f["num_attention_heads"])
        if self.attention == "mla":
            qk = int(f.get("qk_head_dim", 128)) + int(f.get("qk_pos_emb_head_dim", 64))
            v = int(f.get("v_head_dim", 128))
            q_lora = f.get("q_lora_rank", 512)
            kv_lora = int(f.get("kv_lora_rank", 512))
            q = h * heads * qk if q_lora is None else h * int(q_lora) + int(q_lora) * heads * qk
            attn = (q + h * (kv_lora + int(f.get("qk_pos_emb_head_dim", 64)))
                    + kv_lora * heads * (int(f.get("qk_head_dim", 128)) + v) + heads * v * h)
        else:
            d = int(f.get("kv_channels") or h // heads)
            groups = int(f.get("num_query_groups") or heads)
            attn = h * (heads + 2 * groups) * d + heads * d * h
        mult = 3 if self.activation in ("swiglu", "geglu") else 2
        dense_mlp = mult * h * int(f.get("ffn_hidden_size") or 4 * h)
        experts = self.num_moe_experts * mult * h * int(f["moe_ffn_hidden_size"])
        shared = mult * h * int(f.get("moe_shared_expert_intermediate_size") or 0)
        router = self.num_moe_experts * h
        embed = self.vocab_size * h * (1 if self.share_embeddings_and_output_weights else 2)
        dense_layer = attn + dense_mlp
        moe_layer = attn + experts + shared + router
        total = (self.first_k_dense_layers * dense_layer + self.num_moe_layers * moe_layer + embed)
        return {
            "attention_per_layer": attn,
            "dense_layer": dense_layer,
            "moe_layer": moe_layer,
            "routed_experts_per_layer": experts,
            "embeddings": embed,
            "total": total,
        }

    def with_num_layers(self, num_layers: int) -> "ModelConfig":
        """A copy with ``num_layers`` layers (the reduced-depth knob; ``--layers``)."""
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ModelConfigError(
                f"{self.path}: --layers/num_layers={num_layers!r} is not allowed; "
                "allowed values: integers >= 1"
            )
        if num_layers <= self.first_k_dense_layers:
            raise ModelConfigError(
                f"{self.path}: --layers {num_layers} leaves no MoE layer "
                f"(first_k_dense_layers={self.first_k_dense_layers}); allowed values: integers "
                f"> {self.first_k_dense_layers}"
            )
        new = copy.deepcopy(self)
        new.fields["num_layers"] = num_layers
        return new

    # ------------------------------------------------------------------ Megatron objects
    def resolve_parallel(self, world_size: int, tensor_model_parallel_size=None,
                         expert_model_parallel_size=None) -> Dict[str, int]:
        """Parallel sizes for ``world_size`` ranks: explicit args > file > defaults."""
        tp = tensor_model_parallel_size or self.parallel.get("tensor_model_parallel_size") or 1
        ep = expert_model_parallel_size or self.parallel.get("expert_model_parallel_size") or world_size
        etp = self.parallel.get("expert_tensor_parallel_size") or 1
        where = f"{self.path}: parallel"

        def named(key, value, flag, given):  # the flag when the value came from it
            return f"{flag} {value}" if given else f"{where}.{key}={value}"

        tp_name = named("tensor_model_parallel_size", tp, "--tensor-model-parallel-size",
                        tensor_model_parallel_size)
        ep_name = named("expert_model_parallel_size", ep, "--expert-model-parallel-size",
                        expert_model_parallel_size)
        if world_size % tp:
            raise ModelConfigError(
                f"{tp_name} does not divide the world size "
                f"{world_size}; allowed values: divisors of {world_size}"
            )
        if world_size % ep:
            raise ModelConfigError(
                f"{ep_name} does not divide the world size "
                f"{world_size}; allowed values: divisors of {world_size}"
            )
        if self.num_moe_experts % ep:
            raise ModelConfigError(
                f"{ep_name} does not divide num_moe_experts="
                f"{self.num_moe_experts}; allowed values: divisors of {self.num_moe_experts} "
                f"that divide the world size {world_size}"
            )
        heads = int(self.fields["num_attention_heads"])
        groups = int(self.fields.get("num_query_groups") or heads)
        if heads % tp or groups % tp:
            raise ModelConfigError(
                f"{tp_name} must divide num_attention_heads={heads} "
                f"and num_query_groups={groups}"
            )
        if tp > 1 and self.attention == "mla":
            raise ModelConfigError(
                f"{tp_name}: MLA models use data-parallel attention "
                "(EPS-MoE sec. 6); allowed value: 1"
            )
        if etp != 1:
            raise ModelConfigError(
                f"{where}.expert_tensor_parallel_size={etp} is not supported; allowed value: 1"
            )
        return {
            "tensor_model_parallel_size": tp,
            "expert_model_parallel_size": ep,
            "expert_tensor_parallel_size": etp,
        }

    def transformer_config(
        self,
        dtype=None,
        tensor_model_parallel_size: int = 1,
        expert_model_parallel_size: int = 1,
        use_cpu_initialization: Optional[bool] = None,
        **overrides,
    ):
        """Build the Megatron ``TransformerConfig`` (``MLATransformerConfig`` for ``mla``)."""
        import torch
        import torch.nn.functional as F

        TransformerConfig, MLATransformerConfig = _transformer_config_classes()
        cls = MLATransformerConfig if self.attention == "mla" else TransformerConfig
        dtype = dtype if dtype is not None else torch.float32
        if use_cpu_initialization is None:
            use_cpu_initialization = not torch.cuda.is_available()
        kwargs = dict(FIELD_DEFAULTS)
        allowed = _field_names(cls)
        kwargs = {k: v for k, v in kwargs.items() if k in allowed}
        kwargs.update(self.fields)
        if self.activation in ("swiglu", "silu"):
            kwargs["activation_func"] = F.silu
            kwargs["gated_linear_unit"] = self.activation == "swiglu"
        elif self.activation in ("geglu", "gelu"):
            kwargs["activation_func"] = F.gelu
            kwargs["gated_linear_unit"] = self.activation == "geglu"
        elif self.activation == "relu":
            kwargs["activation_func"] = F.relu
            kwargs["gated_linear_unit"] = False
        else:  # squared_relu
            from megatron.core.activations import squared_relu

            kwargs["activation_func"] = squared_relu
            kwargs["gated_linear_unit"] = False
        num_layers = self.num_layers
        k = self.first_k_dense_layers
        kwargs["moe_layer_freq"] = [0] * k + [1] * (num_layers - k)
        if self.attention == "mla":
            kwargs["multi_latent_attention"] = True
            if self.rotary_base is not None:
                kwargs["rotary_base"] = self.rotary_base
        from megatron.core.transformer.enums import AttnBackend

        kwargs["attention_backend"] = (
            AttnBackend.local if self.core_attention == "local" else AttnBackend.auto
        )
        kwargs["params_dtype"] = dtype
        kwargs["bf16"] = dtype == torch.bfloat16
        kwargs["fp16"] = dtype == torch.float16
        kwargs["pipeline_dtype"] = dtype
        kwargs["tensor_model_parallel_size"] = tensor_model_parallel_size
        kwargs["expert_model_parallel_size"] = expert_model_parallel_size
        kwargs["expert_tensor_parallel_size"] = 1
        kwargs["sequence_parallel"] = tensor_model_parallel_size > 1
        kwargs["use_cpu_initialization"] = use_cpu_initialization
        kwargs.update(overrides)
        kwargs = {k: v for k, v in kwargs.items() if k in allowed}
        try:
            return cls(**kwargs)
        except (AssertionError, ValueError, TypeError) as exc:
            raise ModelConfigError(
                f"{self.path}: Megatron-Core rejected the model config: {exc}"
            ) from exc

    def layer_spec(self, config):
        """Block spec from Megatron's local spec (no TE), core attention per ``core_attention``."""
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

        if self.attention == "mla":
            from megatron_eps.compat import fix_mla_without_te

            fix_mla_without_te()
        spec = get_gpt_decoder_block_spec(
            # pp_rank=0: no pipeline parallelism, and no parallel state needed to build the spec.
            config, use_transformer_engine=False, normalization=config.normalization, pp_rank=0
        )
        from megatron_eps.inference.spec_edits import replace_core_attention, replace_torch_norm

        if self.core_attention == "sdpa":
            from megatron_eps.inference.sdpa_attention import SDPAttention

            spec = replace_core_attention(spec, SDPAttention)
        if config.sequence_parallel:
            spec = replace_torch_norm(spec)
        return spec

    def build_gpt_model(self, config, spec, parallel_output: bool = False):
        """``GPTModel`` from ``config`` and ``spec`` with this file's vocab/embedding settings."""
        from megatron.core.models.gpt import GPTModel

        kwargs = dict(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=self.vocab_size,
            max_sequence_length=self.max_sequence_length,
            pre_process=True,
            post_process=True,
            parallel_output=parallel_output,
            share_embeddings_and_output_weights=self.share_embeddings_and_output_weights,
            position_embedding_type=self.position_embedding_type,
            rotary_percent=self.rotary_percent,
        )
        if self.attention != "mla" and self.rotary_base is not None:
            kwargs["rotary_base"] = self.rotary_base
        return GPTModel(**kwargs)


def load_model_config(
    path: Union[str, os.PathLike], num_layers: Optional[int] = None
) -> ModelConfig:
    """Read and validate a model config YAML file; ``num_layers`` overrides ``model.num_layers``."""
    from megatron_eps.config import EPSConfigError, read_yaml_file

    path = os.fspath(path)
    data = read_yaml_file(path, "--config", ModelConfigError)

    try:
        mc = model_config_from_dict(data, path)
        if num_layers is not None:
            mc = mc.with_num_layers(num_layers)
    except (ModelConfigError, EPSConfigError) as exc:
        # Name the option the file came from (not --eps-config, even for its eps: section).
        raise ModelConfigError(f"--config {exc}") from None
    return mc


def model_config_from_dict(data: Any, path: str = "<dict>") -> ModelConfig:
    if data is None:
        raise ModelConfigError(f"{path}: the file is empty; allowed: a YAML mapping with a "
                               "'model:' section (see configs/tiny.yaml)")
    if not isinstance(data, Mapping):
        raise ModelConfigError(f"{path}: expected a mapping at top level")
    _reject_unknown_keys(data, TOP_LEVEL_KEYS, "top-level", path)
    model = data.get("model")
    if not isinstance(model, Mapping):
        raise ModelConfigError(f"{path}: a 'model:' section (mapping) is required")
    model = dict(model)

    def pop_choice(key, default, allowed):
        value = model.pop(key, default)
        if value not in allowed:
            raise ModelConfigError(
                f"{path}: model.{key}={value!r} is not allowed; allowed values: "
                f"{', '.join(allowed)}"
            )
        return value

    attention = pop_choice("attention", "gqa", ATTENTION_KINDS)
    core_attention = pop_choice("core_attention", "sdpa", CORE_ATTENTIONS)
    if attention == "mla" and core_attention == "local":
        raise ModelConfigError(
            f"{path}: model.core_attention='local' cannot run MLA (Megatron's local "
            "DotProductAttention takes no k_channels/v_channels); allowed value with "
            "attention: mla: 'sdpa'"
        )
    activation = pop_choice("activation", "swiglu", ACTIVATIONS)
    position_embedding_type = pop_choice("position_embedding_type", "rope", POSITION_EMBEDDINGS)

    def pop_int(key, default=None, minimum=0):
        value = model.pop(key, default)
        if value is None:
            raise ModelConfigError(f"{path}: model.{key} is required (an integer >= {minimum})")
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ModelConfigError(
                f"{path}: model.{key}={value!r} is not allowed; allowed values: integers >= "
                f"{minimum}"
            )
        return value

    first_k = pop_int("first_k_dense_layers", 0, 0)
    vocab_size = pop_int("vocab_size", None, 1)
    max_sequence_length = pop_int("max_sequence_length", 4096, 1)
    share = model.pop("share_embeddings_and_output_weights", False)
    if not isinstance(share, bool):
        raise ModelConfigError(
            f"{path}: model.share_embeddings_and_output_weights={share!r}; allowed: true, false"
        )
    rotary_base = model.pop("rotary_base", None)
    rotary_percent = model.pop("rotary_percent", 1.0)

    TransformerConfig, MLATransformerConfig = _transformer_config_classes()
    base_fields = _field_names(TransformerConfig)
    mla_fields = _field_names(MLATransformerConfig) - base_fields
    for key in list(model):
        if key in RESERVED_FIELDS:
            raise ModelConfigError(
                f"{path}: model.{key} is set by the builder; use {RESERVED_FIELDS[key]} instead"
            )
        if key in mla_fields and attention != "mla":
            raise ModelConfigError(
                f"{path}: model.{key} is an MLA setting; it is only allowed with attention: mla "
                f"(this file has attention: {attention})"
            )
        if key not in base_fields and key not in mla_fields:
            allowed = sorted(set(BUILDER_KEYS) | base_fields | (mla_fields if attention == "mla" else set()))
            raise ModelConfigError(
                f"{path}: unknown model key {key!r}{_suggest(key, allowed)}; allowed keys: the "
                f"builder keys ({', '.join(BUILDER_KEYS)}) and Megatron-Core "
                f"{'MLA' if attention == 'mla' else ''}TransformerConfig field names"
            )
    for key in ("num_layers", "hidden_size", "num_attention_heads", "num_moe_experts",
                "moe_ffn_hidden_size", "moe_router_topk"):
        if key not in model:
            raise ModelConfigError(f"{path}: model.{key} is required")
        value = model[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ModelConfigError(
                f"{path}: model.{key}={value!r} is not allowed; allowed values: integers >= 1"
            )
    if model["moe_router_topk"] > model["num_moe_experts"]:
        raise ModelConfigError(
            f"{path}: model.moe_router_topk={model['moe_router_topk']} exceeds num_moe_experts="
            f"{model['num_moe_experts']}"
        )
    if first_k >= model["num_layers"]:
        raise ModelConfigError(
            f"{path}: model.first_k_dense_layers={first_k} leaves no MoE layer in "
            f"num_layers={model['num_layers']}"
        )

    parallel = data.get("parallel") or {}
    if not isinstance(parallel, Mapping):
        raise ModelConfigError(f"{path}: 'parallel' must be a mapping")
    _reject_unknown_keys(parallel, PARALLEL_KEYS, "parallel", path)
    for key, value in parallel.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ModelConfigError(
                f"{path}: parallel.{key}={value!r} is not allowed; allowed values: null or "
                "integers >= 1"
            )

    eps = data.get("eps") or {}
    if eps:
        # Validate now so that a bad eps section fails at load time, naming the file.
        from megatron_eps.config import EPSConfig

        EPSConfig.from_dict(eps, source=f"{path}: eps")

    return ModelConfig(
        name=str(data.get("name") or os.path.splitext(os.path.basename(path))[0]),
        path=path,
        attention=attention,
        core_attention=core_attention,
        activation=activation,
        first_k_dense_layers=first_k,
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        position_embedding_type=position_embedding_type,
        share_embeddings_and_output_weights=share,
        rotary_base=rotary_base,
        rotary_percent=rotary_percent,
        fields=model,
        parallel=dict(parallel),
        eps=dict(eps),
        description=str(data.get("description") or ""),
    )
