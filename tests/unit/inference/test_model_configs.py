"""configs/*.yaml -> Megatron TransformerConfig / spec: shapes as published, clear errors."""

import glob
import os

import pytest
import torch
import yaml

from megatron_eps.config import EPSConfig, EPSConfigError
from megatron_eps.inference.model_config import (
    ModelConfigError,
    load_model_config,
    model_config_from_dict,
)
from megatron_eps.inference.spec_edits import replace_core_attention

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
CONFIGS = os.path.join(ROOT, "configs")


def cfg_path(name):
    return os.path.join(CONFIGS, f"{name}.yaml")


# name: (class, expected TransformerConfig values, expected builder values)
EXPECTED = {
    "deepseek_v2_lite": (
        "MLATransformerConfig",
        dict(num_layers=27, hidden_size=2048, num_attention_heads=16, num_moe_experts=64,
             moe_ffn_hidden_size=1408, moe_router_topk=6, moe_shared_expert_intermediate_size=2816,
             ffn_hidden_size=10944, q_lora_rank=None, kv_lora_rank=512, qk_head_dim=128,
             qk_pos_emb_head_dim=64, v_head_dim=128, multi_latent_attention=True,
             normalization="RMSNorm", gated_linear_unit=True),
        dict(vocab_size=102400, attention="mla", first_k_dense_layers=1),
    ),
    "deepseek_v2": (
        "MLATransformerConfig",
        dict(num_layers=60, hidden_size=5120, num_attention_heads=128, num_moe_experts=160,
             moe_ffn_hidden_size=1536, moe_router_topk=6, moe_shared_expert_intermediate_size=3072,
             q_lora_rank=1536, kv_lora_rank=512, multi_latent_attention=True),
        dict(vocab_size=102400, attention="mla", first_k_dense_layers=1),
    ),
    "mixtral_8x7b": (
        "TransformerConfig",
        dict(num_layers=32, hidden_size=4096, num_attention_heads=32, num_query_groups=8,
             num_moe_experts=8, moe_ffn_hidden_size=14336, moe_router_topk=2,
             moe_shared_expert_intermediate_size=None, multi_latent_attention=False),
        dict(vocab_size=32000, attention="gqa", first_k_dense_layers=0),
    ),
    "dbrx": (
        "TransformerConfig",
        dict(num_layers=40, hidden_size=6144, num_attention_heads=48, num_query_groups=8,
             num_moe_experts=16, moe_ffn_hidden_size=10752, moe_router_topk=4,
             multi_latent_attention=False),
        dict(vocab_size=100352, attention="gqa", first_k_dense_layers=0),
    ),
    "tiny": (
        "TransformerConfig",
        dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_moe_experts=8,
             moe_ffn_hidden_size=32, moe_router_topk=2, moe_shared_expert_intermediate_size=32),
        dict(vocab_size=128, attention="gqa", first_k_dense_layers=0),
    ),
    "tiny_mla": (
        "MLATransformerConfig",
        dict(num_layers=3, hidden_size=64, num_moe_experts=8, moe_router_topk=2,
             multi_latent_attention=True, kv_lora_rank=32),
        dict(vocab_size=128, attention="mla", first_k_dense_layers=1),
    ),
}


def test_every_config_file_is_covered():
    names = sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(f"{CONFIGS}/*.yaml"))
    assert names == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_with_published_shapes(name):
    cls_name, fields, builder = EXPECTED[name]
    mc = load_model_config(cfg_path(name))
    config = mc.transformer_config(dtype=torch.bfloat16)
    assert type(config).__name__ == cls_name
    for key, value in fields.items():
        assert getattr(config, key) == value, key
    for key, value in builder.items():
        assert getattr(mc, key) == value, key
    k = mc.first_k_dense_layers
    assert config.moe_layer_freq == [0] * k + [1] * (config.num_layers - k)
    assert config.params_dtype == torch.bfloat16 and config.bf16
    assert config.moe_token_dispatcher_type == "alltoall"
    assert config.add_bias_linear is False
    # Every config has an eps section that --eps-config reads, and a parallel section.
    with open(cfg_path(name)) as f:
        raw = yaml.safe_load(f)
    assert set(raw["parallel"]) >= {"expert_model_parallel_size", "tensor_model_parallel_size"}
    assert "eps" in raw
    eps = EPSConfig.from_yaml(cfg_path(name))
    for key, value in raw["eps"].items():
        assert getattr(eps, key) == value


def test_dsv2_lite_sizes():
    mc = load_model_config(cfg_path("deepseek_v2_lite"))
    # 64 experts x 3 x 2048 x 1408 x 2 bytes
    assert mc.expert_weight_bytes_per_layer() == 64 * 3 * 2048 * 1408 * 2
    assert mc.num_moe_layers == 26


def test_layers_override():
    mc = load_model_config(cfg_path("deepseek_v2_lite"), num_layers=4)
    config = mc.transformer_config()
    assert config.num_layers == 4
    assert config.moe_layer_freq == [0, 1, 1, 1]
    # The original is unchanged.
    assert load_model_config(cfg_path("deepseek_v2_lite")).num_layers == 27
    with pytest.raises(ModelConfigError, match="leaves no MoE layer"):
        load_model_config(cfg_path("deepseek_v2_lite"), num_layers=1)
    with pytest.raises(ModelConfigError, match="integers >= 1"):
        load_model_config(cfg_path("tiny"), num_layers=0)


def raw(name="tiny"):
    with open(cfg_path(name)) as f:
        return yaml.safe_load(f)


@pytest.mark.parametrize(
    "mutate, pattern",
    [
        (lambda d: d.update(modle={}), r"unknown top-level key\(s\) 'modle'"),
        (lambda d: d["model"].update(num_expert=8), r"unknown model key 'num_expert'"),
        (lambda d: d["model"].update(moe_router_top_k=2), r"did you mean 'moe_router_topk'"),
        (lambda d: d["model"].update(kv_lora_rank=32), r"kv_lora_rank is an MLA setting"),
        (lambda d: d["model"].update(attention="mha"), r"attention='mha'.*allowed values: mla, gqa"),
        (lambda d: d["model"].update(activation="tanh"), r"activation='tanh'.*allowed values"),
        (lambda d: d["model"].update(core_attention="flash"), r"core_attention='flash'"),
        (lambda d: d["model"].update(bf16=True), r"model.bf16 is set by the builder; use --dtype"),
        (lambda d: d["model"].update(expert_model_parallel_size=2),
         r"use parallel.expert_model_parallel_size"),
        (lambda d: d["model"].update(moe_layer_freq=2), r"use model.first_k_dense_layers"),
        (lambda d: d["model"].pop("num_moe_experts"), r"model.num_moe_experts is required"),
        (lambda d: d["model"].update(moe_router_topk=9), r"moe_router_topk=9 exceeds"),
        (lambda d: d["model"].update(first_k_dense_layers=2), r"leaves no MoE layer"),
        (lambda d: d["parallel"].update(pipeline_model_parallel_size=2),
         r"unknown parallel key\(s\) 'pipeline_model_parallel_size'"),
        (lambda d: d["parallel"].update(tensor_model_parallel_size=0), r"parallel.tensor_model_parallel_size=0"),
        (lambda d: d.pop("model"), r"'model:' section"),
    ],
)
def test_bad_keys_raise_clear_errors(mutate, pattern):
    data = raw()
    mutate(data)
    with pytest.raises(ModelConfigError, match=pattern):
        model_config_from_dict(data, "tiny.yaml")


def test_bad_eps_section_names_the_file():
    data = raw()
    data["eps"]["pipeline_degre"] = 2
    with pytest.raises(EPSConfigError, match=r"tiny.yaml: eps.*pipeline_degre"):
        model_config_from_dict(data, "tiny.yaml")


def test_mla_with_local_attention_is_refused():
    data = raw("tiny_mla")
    data["model"]["core_attention"] = "local"
    with pytest.raises(ModelConfigError, match="cannot run MLA"):
        model_config_from_dict(data, "tiny_mla.yaml")


def test_megatron_rejections_name_the_file():
    data = raw()
    data["model"]["moe_shared_expert_intermediate_size"] = -1
    mc = model_config_from_dict(data, "tiny.yaml")
    with pytest.raises(ModelConfigError, match="tiny.yaml: Megatron-Core rejected"):
        mc.transformer_config()


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ModelConfigError, match="no such file"):
        load_model_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ModelConfigError, match="not valid YAML"):
        load_model_config(bad)


def test_resolve_parallel():
    mc = load_model_config(cfg_path("tiny"))
    assert mc.resolve_parallel(2) == {
        "tensor_model_parallel_size": 1,
        "expert_model_parallel_size": 2,
        "expert_tensor_parallel_size": 1,
    }
    assert mc.resolve_parallel(4, tensor_model_parallel_size=2)["expert_model_parallel_size"] == 4
    with pytest.raises(ModelConfigError, match="does not divide num_moe_experts=8"):
        mc.resolve_parallel(3)
    with pytest.raises(ModelConfigError, match="does not divide the world size"):
        mc.resolve_parallel(2, expert_model_parallel_size=4)
    mla = load_model_config(cfg_path("tiny_mla"))
    with pytest.raises(ModelConfigError, match="MLA models use data-parallel attention"):
        mla.resolve_parallel(2, tensor_model_parallel_size=2)


@pytest.mark.parametrize("name", ["tiny", "tiny_mla", "deepseek_v2_lite", "mixtral_8x7b"])
def test_layer_spec_uses_sdpa_and_moe_where_expected(name):
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_eps.inference.sdpa_attention import SDPAttention

    mc = load_model_config(cfg_path(name), num_layers=min(3, load_model_config(cfg_path(name)).num_layers))
    spec = mc.layer_spec(mc.transformer_config())
    assert len(spec.layer_specs) == mc.num_layers
    for i, layer in enumerate(spec.layer_specs):
        attn = layer.submodules.self_attention
        assert attn.submodules.core_attention is SDPAttention
        mlp = layer.submodules.mlp
        module = getattr(mlp, "module", getattr(mlp, "func", None))
        is_moe = isinstance(module, type) and issubclass(module, MoELayer)
        assert is_moe == (i >= mc.first_k_dense_layers), i


def test_replace_core_attention_requires_attention():
    with pytest.raises(ValueError, match="no core_attention"):
        replace_core_attention([1, 2], object)


def test_apply_eps_on_config_spec():
    pytest.importorskip("megatron_eps.moe_layer")
    import megatron_eps
    from megatron_eps.moe_layer import EPSMoELayer

    mc = load_model_config(cfg_path("deepseek_v2_lite"), num_layers=3)
    spec = mc.layer_spec(mc.transformer_config())
    eps_spec = megatron_eps.apply_eps(spec, EPSConfig(pipeline_degree=2))
    kinds = []
    for layer in eps_spec.layer_specs:
        mlp = layer.submodules.mlp
        module = getattr(mlp, "module", getattr(mlp, "func", None))
        kinds.append(module is EPSMoELayer)
    assert kinds == [False, True, True]


# Published totals (billions of parameters): the config shapes reproduce them.
PUBLISHED_B = {"deepseek_v2_lite": 15.7, "deepseek_v2": 236, "mixtral_8x7b": 46.7, "dbrx": 132}


@pytest.mark.parametrize("name", sorted(PUBLISHED_B))
def test_parameter_count_matches_published_total(name):
    total = load_model_config(cfg_path(name)).parameter_counts()["total"] / 1e9
    assert total == pytest.approx(PUBLISHED_B[name], rel=0.01)


def build_models_and_count(names_and_attention):
    """Per rank (world 1): build each config's GPTModel; return its parameter count (matrices
    only) and the logits of a plain forward."""
    import torch
    from megatron.core import parallel_state

    from megatron_eps.inference.parallel import seed_model_parallel

    parallel_state.initialize_model_parallel()
    out = {}
    for name, core_attention in names_and_attention:
        with open(cfg_path(name)) as f:
            data = yaml.safe_load(f)
        data["model"]["core_attention"] = core_attention
        # GPTModel pins NVTE_*_ATTN to its attention_backend (auto: 1, local: 0) and refuses a
        # second model with the other backend in the same process.
        for var in ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN"):
            os.environ.pop(var, None)
        mc = model_config_from_dict(data, name)
        config = mc.transformer_config()
        seed_model_parallel(3, on_cuda=False)
        model = mc.build_gpt_model(config, mc.layer_spec(config)).eval()
        count = sum(p.numel() for p in model.parameters() if p.dim() >= 2)
        device = next(model.parameters()).device
        tokens = torch.randint(0, mc.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            logits = model(tokens.to(device), torch.arange(40, device=device).expand(2, 40), None)
        out[f"{name}/{core_attention}"] = (count, mc.parameter_counts()["total"], logits.cpu())
    parallel_state.destroy_model_parallel()
    return out


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="builds the model on CPU ranks (gloo) as CI "
                    "does; on a GPU machine Megatron places part of it on CUDA")
def test_built_models_match_counts_and_sdpa_matches_local_attention():
    from megatron_eps.testing import run_distributed

    out = run_distributed(
        build_models_and_count, 1, [("tiny", "sdpa"), ("tiny", "local"), ("tiny_mla", "sdpa")]
    )[0]
    for key, (built, counted, logits) in out.items():
        assert built == counted, key
        assert torch.isfinite(logits).all() and logits.std() > 0, key
    # Same weights, Megatron's DotProductAttention vs SDPAttention: same logits.
    sdpa, local = out["tiny/sdpa"][2], out["tiny/local"][2]
    assert sdpa.shape == (2, 40, 128)
    assert torch.allclose(sdpa, local, atol=1e-5, rtol=1e-5)
