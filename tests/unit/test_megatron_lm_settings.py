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
    (dict(virtual_pipeline_model_parallel_size=2), ["virtual pipeline stages", "--eps-moe"]),
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


def finished(argv, **megatron):
    """The launcher's step after Megatron's parser: the namespace, or the parser's exit."""
    from megatron_eps.launch import finish_parsed_args

    parser = add_eps_args(argparse.ArgumentParser(allow_abbrev=False))
    args = parsed(argv, **megatron)
    args.spec = None
    return finish_parsed_args(parser, args)


def test_launcher_refuses_eps_flags_without_eps_moe(monkeypatch, capsys):
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    assert finished([]).spec is None  # nothing asked: Megatron's own run
    with pytest.raises(SystemExit) as exc:
        finished(["--eps-pipeline-degree", "4"])
    assert exc.value.code == 2
    message = capsys.readouterr().err.strip()
    assert "--eps-pipeline-degree" in message and "--eps-moe" in message and "\n" not in message
    assert finished(["--eps-moe", "--eps-pipeline-degree", "4"]).spec == ["megatron_eps.megatron_lm",
                                                                         "gpt_layer_spec"]


def test_launcher_keeps_megatrons_layers_when_the_file_turns_eps_off(monkeypatch, tmp_path):
    off = tmp_path / "off.yaml"
    off.write_text("enabled: false\n")
    monkeypatch.setenv(CONFIG_ENV, str(off))
    # even with a dispatcher EPS cannot run: Megatron's own spec, untouched
    assert finished([], moe_token_dispatcher_type="flex").spec is None


def test_eps_spec_leaves_a_stage_without_moe_layers_and_eps_off_as_they_are():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_eps import EPSConfig
    from megatron_eps.megatron_lm import eps_spec

    dense = get_gpt_layer_local_spec()
    assert eps_spec(dense, None, EPSConfig(enabled=True)) is dense
    moe = get_gpt_layer_local_spec(num_experts=8)
    assert eps_spec(moe, None, EPSConfig(enabled=False)) is moe
    assert eps_spec(moe, None, EPSConfig(enabled=True)) is not moe
