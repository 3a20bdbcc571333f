"""How a Megatron-LM script turns EPS on, checked with a stand-in of Megatron-LM's parse_args
and a pretrain_gpt.py-style model provider (see docs/inference.md):

    initialize_megatron(extra_args_provider=megatron_eps.add_eps_args)   # --eps-* flags
    ...
    spec = megatron_eps.apply_eps(spec, megatron_eps.EPSConfig.from_args(args))  # model_provider
"""

import argparse
import os

import pytest
import torch

import megatron_eps
from megatron_eps import EPSConfig, EPSConfigError, add_eps_args
from megatron_eps.testing import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# --------------------------------------------------------------------------- Megatron-LM stand-in
def megatron_lm_parse_args(extra_args_provider=None, argv=None, ignore_unknown_args=False):
    """The shape of megatron.training.arguments.parse_args: Megatron's own flags (a subset),
    then ``extra_args_provider(parser)``, parsed with allow_abbrev=False."""
    parser = argparse.ArgumentParser(description="Megatron-LM Arguments", allow_abbrev=False)
    g = parser.add_argument_group("network size")
    g.add_argument("--num-layers", type=int, default=2)
    g.add_argument("--hidden-size", type=int, default=64)
    g.add_argument("--num-attention-heads", type=int, default=4)
    g.add_argument("--ffn-hidden-size", type=int, default=128)
    g.add_argument("--normalization", default="RMSNorm", choices=["LayerNorm", "RMSNorm"])
    g.add_argument("--swiglu", action="store_true")
    g.add_argument("--padded-vocab-size", type=int, default=128)
    g.add_argument("--max-position-embeddings", type=int, default=256)
    g.add_argument("--disable-bias-linear", action="store_false", dest="add_bias_linear")
    g = parser.add_argument_group("moe")
    g.add_argument("--num-experts", type=int, default=None)
    g.add_argument("--moe-ffn-hidden-size", type=int, default=None)
    g.add_argument("--moe-router-topk", type=int, default=2)
    g.add_argument("--moe-token-dispatcher-type", default="allgather",
                   choices=["allgather", "alltoall", "flex"])
    g.add_argument("--moe-shared-expert-intermediate-size", type=int, default=None)
    g.add_argument("--expert-model-parallel-size", type=int, default=1)
    g.add_argument("--bf16", action="store_true")
    if extra_args_provider is not None:
        parser = extra_args_provider(parser)
    if ignore_unknown_args:
        args, _ = parser.parse_known_args(argv)
    else:
        args = parser.parse_args(argv)
    return args


def core_transformer_config_from_args(args):
    """Stand-in for megatron.training.arguments.core_transformer_config_from_args."""
    import torch
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        ffn_hidden_size=args.ffn_hidden_size,
        normalization=args.normalization,
        gated_linear_unit=args.swiglu,
        activation_func=F.silu if args.swiglu else F.gelu,
        add_bias_linear=args.add_bias_linear,
        num_moe_experts=args.num_experts,
        moe_ffn_hidden_size=args.moe_ffn_hidden_size,
        moe_router_topk=args.moe_router_topk,
        moe_token_dispatcher_type=args.moe_token_dispatcher_type,
        moe_shared_expert_intermediate_size=args.moe_shared_expert_intermediate_size,
        moe_router_load_balancing_type="none",
        expert_model_parallel_size=args.expert_model_parallel_size,
        params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        bf16=args.bf16,
        use_cpu_initialization=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
    )


def model_provider(args, pre_process=True, post_process=True):
    """pretrain_gpt.py-style model provider; the apply_eps line is the only EPS change."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    config = core_transformer_config_from_args(args)
    spec = get_gpt_decoder_block_spec(
        config, use_transformer_engine=False, normalization=args.normalization
    )
    spec = megatron_eps.apply_eps(spec, megatron_eps.EPSConfig.from_args(args))  # <- EPS
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        position_embedding_type="rope",
    )


MOE = ["--num-experts", "8", "--moe-ffn-hidden-size", "32", "--swiglu", "--disable-bias-linear",
       "--moe-shared-expert-intermediate-size", "32"]


# --------------------------------------------------------------------------- argument tests
def test_eps_flags_parse_through_extra_args_provider():
    args = megatron_lm_parse_args(
        megatron_eps.add_eps_args,
        MOE + ["--moe-token-dispatcher-type", "alltoall", "--eps-moe",
               "--eps-pipeline-degree", "4", "--eps-expert-kernel", "dense",
               "--eps-min-tokens-to-pipeline", "0"],
    )
    assert args.num_experts == 8  # Megatron's own flags are untouched
    eps = EPSConfig.from_args(args)
    assert (eps.enabled, eps.pipeline_degree, eps.expert_kernel, eps.min_tokens_to_pipeline) == (
        True, 4, "dense", 0)
    # No --eps-moe: EPS is off (the layer runs Megatron's forward), settings still parse.
    off = EPSConfig.from_args(megatron_lm_parse_args(add_eps_args, MOE))
    assert off.enabled is False and off.pipeline_degree == "auto"


def test_eps_config_file_and_flag_precedence(tmp_path):
    path = tmp_path / "eps.yaml"
    path.write_text("eps:\n  pipeline_degree: 3\n  expert_kernel: grouped\n")
    args = megatron_lm_parse_args(add_eps_args, ["--eps-moe", "--eps-config", str(path),
                                                 "--eps-expert-kernel", "dense"])
    eps = EPSConfig.from_args(args)
    assert eps.pipeline_degree == 3 and eps.expert_kernel == "dense" and eps.enabled
    # A model config file works as --eps-config too (its eps: section).
    args = megatron_lm_parse_args(
        add_eps_args, ["--eps-moe", "--eps-config", os.path.join(ROOT, "configs/tiny.yaml")])
    assert EPSConfig.from_args(args).min_tokens_to_pipeline == 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--eps-pipeline-degree", "0"], "--eps-pipeline-degree '0': allowed values are an integer >= 1 or 'auto'"),
        (["--eps-pipeline-degree", "many"], "allowed values are an integer >= 1 or 'auto'"),
        (["--eps-expert-kernel", "cutlass"], "invalid choice: 'cutlass'"),
        (["--eps-min-tokens-to-pipeline", "-1"], "--eps-min-tokens-to-pipeline '-1': allowed values are integers >= 0"),
        (["--eps-max-pipeline-degree", "0"], "--eps-max-pipeline-degree '0': allowed values are integers >= 1"),
        # allow_abbrev=False, as in Megatron-LM: a misspelt or abbreviated flag is an error.
        (["--eps-pipeline", "2"], "unrecognized arguments: --eps-pipeline"),
        (["--eps-moes"], "unrecognized arguments: --eps-moes"),
    ],
)
def test_bad_eps_flags_are_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        megatron_lm_parse_args(add_eps_args, argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_expert_kernel_error_lists_allowed_values(capsys):
    with pytest.raises(SystemExit):
        megatron_lm_parse_args(add_eps_args, ["--eps-expert-kernel", "cutlass"])
    err = capsys.readouterr().err
    for kernel in megatron_eps.EXPERT_KERNELS:
        assert kernel in err


def test_bad_eps_config_file_is_an_error(tmp_path):
    path = tmp_path / "eps.yaml"
    path.write_text("eps:\n  pipeline_degre: 3\n")
    args = megatron_lm_parse_args(add_eps_args, ["--eps-moe", "--eps-config", str(path)])
    with pytest.raises(EPSConfigError, match="unknown eps key.*'pipeline_degre'.*allowed keys"):
        EPSConfig.from_args(args)
    args = megatron_lm_parse_args(add_eps_args, ["--eps-config", str(tmp_path / "missing.yaml")])
    with pytest.raises(EPSConfigError, match="no such file"):
        EPSConfig.from_args(args)


def test_flag_clash_with_an_existing_parser_is_reported():
    parser = argparse.ArgumentParser()
    parser.add_argument("--eps-moe", action="store_true")
    with pytest.raises(argparse.ArgumentError, match="--eps-moe"):
        add_eps_args(parser)


# --------------------------------------------------------------------------- model provider
def build_and_check(argv_sets):
    """Per rank: build the model provider's GPTModel for each argv; report what was built,
    or the construction error. With --eps-moe, also compare its forward to the stock model."""
    import torch
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_eps.moe_layer import EPSMoELayer

    parallel_state.initialize_model_parallel(expert_model_parallel_size=1)
    out = []
    for argv in argv_sets:
        args = megatron_lm_parse_args(add_eps_args, argv)
        torch.manual_seed(5)
        model_parallel_cuda_manual_seed(5, inference_rng_tracker=True)
        try:
            model = model_provider(args)
        except Exception as exc:  # noqa: BLE001 - reported to the test
            out.append({"error": f"{type(exc).__name__}: {exc}"})
            continue
        layers = [m for m in model.modules() if isinstance(m, MoELayer)]
        entry = {
            "moe_layers": len(layers),
            "eps_layers": sum(isinstance(m, EPSMoELayer) for m in layers),
            "eps_enabled": [m.eps_config.enabled for m in layers if isinstance(m, EPSMoELayer)],
            "pipeline_degree": [m.eps_config.pipeline_degree for m in layers
                                if isinstance(m, EPSMoELayer)],
        }
        if args.eps_moe:
            stock_args = megatron_lm_parse_args(
                add_eps_args, [a for a in argv if a != "--eps-moe"])
            torch.manual_seed(5)
            model_parallel_cuda_manual_seed(5, inference_rng_tracker=True)
            stock = model_provider(stock_args)
            stock.load_state_dict(model.state_dict())
            device = next(model.parameters()).device
            tokens = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
            tokens = tokens.to(device)
            pos = torch.arange(24, device=device).expand(2, 24)
            model.eval()
            stock.eval()
            with torch.inference_mode():
                a = model(tokens, pos, None)
                b = stock(tokens, pos, None)
            entry["max_abs_diff"] = (a - b).abs().max().item()
            entry["logit_scale"] = b.abs().max().item()
        out.append(entry)
    parallel_state.destroy_model_parallel()
    return out


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="builds the model on CPU ranks (gloo) as CI "
                    "does; on a GPU machine Megatron places part of it on CUDA")
def test_model_provider_with_and_without_eps():
    eps_flags = ["--eps-pipeline-degree", "2", "--eps-min-tokens-to-pipeline", "0"]
    (eps, off, gather_off, gather_on, flex_on) = run_distributed(
        build_and_check,
        1,
        [
            MOE + ["--moe-token-dispatcher-type", "alltoall", "--eps-moe"] + eps_flags,
            MOE + ["--moe-token-dispatcher-type", "alltoall"],
            MOE,  # Megatron's default dispatcher (allgather), EPS off: fine
            MOE + ["--eps-moe"],  # allgather + EPS: conflict
            MOE + ["--moe-token-dispatcher-type", "flex", "--eps-moe"],
        ],
    )[0]
    assert eps["moe_layers"] == 2 and eps["eps_layers"] == 2
    assert eps["eps_enabled"] == [True, True] and eps["pipeline_degree"] == [2, 2]
    assert eps["max_abs_diff"] <= 1e-5 * max(1.0, eps["logit_scale"])
    assert eps["logit_scale"] > 0
    # Without --eps-moe the layers are EPSMoELayer with EPS disabled (stock forward).
    assert off["eps_layers"] == 2 and off["eps_enabled"] == [False, False]
    assert "error" not in gather_off
    for result in (gather_on, flex_on):
        assert "EPSConfigError" in result["error"]
        assert "moe_token_dispatcher_type" in result["error"]
        assert "alltoall" in result["error"]
    assert "'allgather'" in gather_on["error"] and "'flex'" in flex_on["error"]


def test_apply_eps_without_moe_is_an_error():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    args = megatron_lm_parse_args(add_eps_args, ["--eps-moe"])  # no --num-experts
    config = core_transformer_config_from_args(args)
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, pp_rank=0)
    with pytest.raises(ValueError, match="builds no MoELayer"):
        megatron_eps.apply_eps(spec, EPSConfig.from_args(args))
