"""Settings of a Megatron-LM run with EPS (megatron_eps.megatron_lm): flags > --eps-config >
$MEGATRON_EPS_CONFIG > defaults; refusals are one line (SystemExit) naming the setting."""

import argparse

import pytest

from megatron_eps.arguments import add_eps_args
from megatron_eps.megatron_lm import (
    CONFIG_ENV,
    ArgsConfigView,
    checked_settings,
    eps_config_for,
    gpt_layer_spec,
)


def parsed(argv, **megatron):
    parser = add_eps_args(argparse.ArgumentParser(allow_abbrev=False))
    args = parser.parse_args(argv)
    values = dict(moe_token_dispatcher_type="alltoall", num_experts=8, expert_model_parallel_size=1,
                  tensor_model_parallel_size=1, expert_tensor_parallel_size=None,
                  moe_expert_capacity_factor=None, moe_pad_expert_input_to_capacity=False,
                  transformer_impl="local")
    values.update(megatron)
    for key, value in values.items():
        setattr(args, key, value)
    return args


def test_precedence(tmp_path, monkeypatch):
    env_file = tmp_path / "env.yaml"
    env_file.write_text("pipeline_degree: 3\nexpert_kernel: dense\nchunk_split: tail\n")
    flag_file = tmp_path / "flag.yaml"
    flag_file.write_text("eps:\n  pipeline_degree: 5\n")
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    assert eps_config_for(None).enabled is True  # naming the spec turns EPS on
    assert eps_config_for(parsed(["--eps-pipeline-degree", "2"])).pipeline_degree == 2
    monkeypatch.setenv(CONFIG_ENV, str(env_file))
    from_env = eps_config_for(parsed([]))
    assert (from_env.pipeline_degree, from_env.expert_kernel, from_env.chunk_split) == (3, "dense", "tail")
    both = eps_config_for(parsed(["--eps-expert-kernel", "grouped"]))
    assert (both.pipeline_degree, both.expert_kernel) == (3, "grouped")
    # --eps-config replaces the environment's file; flags still win
    over = eps_config_for(parsed(["--eps-config", str(flag_file), "--eps-chunk-split", "equal"]))
    assert (over.pipeline_degree, over.expert_kernel, over.chunk_split) == (5, "auto", "equal")
    off = tmp_path / "off.yaml"
    off.write_text("enabled: false\n")
    monkeypatch.setenv(CONFIG_ENV, str(off))
    assert eps_config_for(parsed([])).enabled is False
    assert eps_config_for(parsed(["--eps-moe"])).enabled is True


@pytest.mark.parametrize("megatron, needles", [
    (dict(moe_token_dispatcher_type="allgather"), ["--moe-token-dispatcher-type", "'allgather'"]),
    (dict(tensor_model_parallel_size=2), ["--expert-tensor-parallel-size", "got 2"]),
    (dict(expert_model_parallel_size=3), ["--num-experts", "--expert-model-parallel-size", "=3"]),
    (dict(num_experts=None), ["--num-experts"]),
    (dict(transformer_impl="inference_optimized"), ["inference_optimized", "local"]),
])
def test_refusals_are_one_line(megatron, needles, monkeypatch):
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    args = parsed(["--eps-moe"], **megatron)
    with pytest.raises(SystemExit) as exc:
        checked_settings(args)
    message = str(exc.value)
    assert message.startswith("megatron-eps: ") and "\n" not in message
    for needle in needles:
        assert needle in message, message


def test_settings_off_are_not_checked(monkeypatch, tmp_path):
    off = tmp_path / "off.yaml"
    off.write_text("enabled: false\n")
    monkeypatch.setenv(CONFIG_ENV, str(off))
    args = parsed([], moe_token_dispatcher_type="allgather")
    assert checked_settings(args).enabled is False
    assert ArgsConfigView(args).expert_tensor_parallel_size == 1


def test_spec_outside_a_megatron_lm_run_is_refused():
    with pytest.raises(SystemExit, match="read inside a Megatron-LM run"):
        gpt_layer_spec.layer_specs
