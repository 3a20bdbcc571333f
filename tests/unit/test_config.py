"""EPSConfig validation, YAML loading and --eps-* flags."""

import argparse

import pytest

from megatron_eps.policy.profile import load_kernel_tables
from megatron_eps import EXPERT_KERNELS, EPSConfig, EPSConfigError, add_eps_args


def parse(argv, yaml_path=None):
    parser = add_eps_args(argparse.ArgumentParser())
    if yaml_path is not None:
        argv = argv + ["--eps-config", str(yaml_path)]
    return EPSConfig.from_args(parser.parse_args(argv))


def test_defaults_are_valid():
    config = EPSConfig()
    assert config.pipeline_degree == "auto"
    assert config.expert_kernel == "auto"
    assert config.enabled


@pytest.mark.parametrize("bad", [0, -1, 1.5, "abc", "", True, None, [2]])
def test_bad_pipeline_degree_names_setting_and_allowed_values(bad):
    with pytest.raises(EPSConfigError) as info:
        EPSConfig(pipeline_degree=bad)
    message = str(info.value)
    assert "pipeline_degree" in message and "'auto'" in message and ">= 1" in message


@pytest.mark.parametrize("good", [1, 8, "auto"])
def test_pipeline_degree_accepts(good):
    assert EPSConfig(pipeline_degree=good).pipeline_degree == good


@pytest.mark.parametrize("wrong_type", ["2", "4", 2.0, "AUTO", " auto"])
def test_pipeline_degree_of_the_wrong_type_is_refused_not_converted(wrong_type, tmp_path):
    """A str or float degree is refused in one line naming the setting and the allowed values,
    from the constructor and from YAML alike; the command line reads its text into an int."""
    with pytest.raises(EPSConfigError) as info:
        EPSConfig(pipeline_degree=wrong_type)
    message = str(info.value)
    assert "\n" not in message
    assert f"pipeline_degree={wrong_type!r}" in message and "an integer >= 1 or 'auto'" in message
    path = tmp_path / "eps.yaml"
    path.write_text(f"pipeline_degree: {wrong_type!r}\n")
    with pytest.raises(EPSConfigError, match="pipeline_degree=.*an integer >= 1 or 'auto'"):
        EPSConfig.from_yaml(path)
    assert parse(["--eps-moe", "--eps-pipeline-degree", "4"]).pipeline_degree == 4


def test_misspelt_keyword_names_the_key_the_closest_setting_and_all_settings():
    from megatron_eps.config import settings

    with pytest.raises(EPSConfigError) as info:  # not a bare TypeError
        EPSConfig(pipline_degree=2)
    message = str(info.value)
    assert "\n" not in message
    assert "unknown eps key(s) 'pipline_degree' (did you mean 'pipeline_degree'?)" in message
    assert message.startswith("EPSConfig(): ")
    assert all(name in message.split("allowed keys: ")[1] for name in settings())
    with pytest.raises(EPSConfigError, match="'zzz'; allowed keys: enabled"):
        EPSConfig(zzz=1)  # nothing close: no suggestion
    config = EPSConfig(pipeline_degree=2)
    with pytest.raises(EPSConfigError, match="did you mean 'expert_kernel'"):
        config.replace(expert_kernal="dense")


def test_unknown_kernel_lists_allowed():
    with pytest.raises(EPSConfigError) as info:
        EPSConfig(expert_kernel="cutlass")
    for name in EXPERT_KERNELS:
        assert name in str(info.value)
    assert "expert_kernel" in str(info.value)


@pytest.mark.parametrize(
    "field,value",
    [("min_tokens_to_pipeline", -1), ("max_pipeline_degree", 0), ("comm_num_ctas", 0),
     ("gemm_sm_carveout", -2), ("enabled", "yes"), ("chunk_split", "rows")],
)
def test_other_bad_values(field, value):
    with pytest.raises(EPSConfigError) as info:
        EPSConfig(**{field: value})
    assert field.split("_")[0] in str(info.value)


def test_missing_cost_profile_file(tmp_path):
    with pytest.raises(EPSConfigError, match="cost_profile"):
        EPSConfig(cost_profile=str(tmp_path / "nope.json"))


def test_yaml_top_level_and_eps_section(tmp_path):
    flat = tmp_path / "flat.yaml"
    flat.write_text("pipeline_degree: 4\nexpert_kernel: dense\n")
    assert EPSConfig.from_yaml(flat).pipeline_degree == 4
    nested = tmp_path / "model.yaml"
    nested.write_text("model:\n  hidden_size: 64\neps:\n  pipeline_degree: auto\n  min_tokens_to_pipeline: 7\n")
    config = EPSConfig.from_yaml(nested)
    assert config.pipeline_degree == "auto" and config.min_tokens_to_pipeline == 7
    model_only = tmp_path / "model_only.yaml"
    model_only.write_text("model:\n  hidden_size: 64\n")
    assert EPSConfig.from_yaml(model_only) == EPSConfig()


def test_yaml_unknown_key_lists_allowed_keys(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("pipeline_degre: 4\n")
    with pytest.raises(EPSConfigError) as info:
        EPSConfig.from_yaml(path)
    assert "'pipeline_degre' (did you mean 'pipeline_degree'?); allowed keys:" in str(info.value)


@pytest.mark.parametrize("text", ["pipeline_degree: [1, 2\n", "- 1\n- 2\n", "eps: 3\n"])
def test_malformed_yaml(tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(EPSConfigError, match="eps-config"):
        EPSConfig.from_yaml(path)


def test_missing_yaml_file(tmp_path):
    with pytest.raises(EPSConfigError, match="no such file"):
        EPSConfig.from_yaml(tmp_path / "missing.yaml")


def test_flags_override_yaml(tmp_path):
    path = tmp_path / "eps.yaml"
    path.write_text("eps:\n  pipeline_degree: 4\n  expert_kernel: dense\n")
    config = parse(["--eps-moe", "--eps-pipeline-degree", "2"], yaml_path=path)
    assert config.enabled and config.pipeline_degree == 2 and config.expert_kernel == "dense"
    # Without --eps-moe the file decides: no 'enabled' key means true (as for every YAML).
    config = parse([], yaml_path=path)
    assert config.enabled and config.pipeline_degree == 4


def test_enabled_from_yaml_on_the_command_line_path(tmp_path):
    off = tmp_path / "off.yaml"
    off.write_text("eps:\n  enabled: false\n")
    assert not parse([], yaml_path=off).enabled
    assert parse(["--eps-moe"], yaml_path=off).enabled  # the flag wins
    assert not parse([]).enabled  # neither flag nor file: off
    bad = tmp_path / "bad.yaml"
    bad.write_text("eps:\n  enabled: 'yes'\n")
    for argv in ([], ["--eps-moe"]):  # the file is checked even where the flag overrides it
        with pytest.raises(EPSConfigError, match="enabled must be true or false") as info:
            parse(argv, yaml_path=bad)
        assert "bad.yaml" in str(info.value)


def test_flags_alone():
    config = parse(["--eps-moe", "--eps-expert-kernel", "grouped", "--eps-pipeline-degree", "auto",
                    "--eps-min-tokens-to-pipeline", "0"])
    assert (config.expert_kernel, config.pipeline_degree, config.min_tokens_to_pipeline) == (
        "grouped", "auto", 0)


@pytest.mark.parametrize(
    "argv",
    [["--eps-pipeline-degree", "0"], ["--eps-pipeline-degree", "x"],
     ["--eps-expert-kernel", "foo"], ["--eps-min-tokens-to-pipeline", "-3"]],
)
def test_bad_flags_exit_with_message(argv, capsys):
    parser = add_eps_args(argparse.ArgumentParser())
    with pytest.raises(SystemExit):
        parser.parse_args(argv)
    err = capsys.readouterr().err
    assert argv[0] in err


def test_megatron_extra_args_provider_signature():
    parser = argparse.ArgumentParser()
    assert add_eps_args(parser) is parser


# --------------------------------------------------------------------------- cost profiles
BAD_PROFILES = {
    "corrupt": ('{"format": "megatron-eps-cost-profile", ', "not valid JSON"),
    "list": ("[1, 2, 3]", "expected a JSON object, got a JSON list"),
    "empty": ("{}", "holds neither expert-kernel tables"),
    "other_format": ('{"format": "something else"}', "is not a megatron-eps cost profile"),
    "bad_tables": ('{"format": "megatron-eps-cost-profile", "device": {}}', "malformed"),
    "bad_pipeline": ('{"pipeline": {"link_bandwidth_gbps": 1}}', "lacks pipeline key"),
    "pipeline_list": ('{"pipeline": [1]}', "'pipeline' must be a JSON object"),
}


@pytest.mark.parametrize("kind", sorted(BAD_PROFILES))
def test_bad_cost_profiles_are_refused_naming_the_setting(tmp_path, kind):
    from megatron_eps.policy.profile import load_pipeline_profile
    from megatron_eps.experts import selector

    text, message = BAD_PROFILES[kind]
    path = tmp_path / f"{kind}.json"
    path.write_text(text)
    with pytest.raises(EPSConfigError, match="cost_profile") as info:
        EPSConfig(cost_profile=str(path))
    assert message in str(info.value)
    # The loaders the forward uses say the same (not a raw JSONDecodeError / AttributeError).
    selector.clear_caches()
    with pytest.raises(EPSConfigError, match="cost_profile"):
        load_kernel_tables(str(path), "cpu")
    with pytest.raises(EPSConfigError, match="cost_profile"):
        load_pipeline_profile(str(path), "cpu")
    # And through --eps-cost-profile.
    with pytest.raises(EPSConfigError, match=message.split("(")[0][:20]):
        parse(["--eps-moe", "--eps-cost-profile", str(path)])


def test_cost_profile_for_another_device_warns_once(caplog):
    import logging
    import os

    import megatron_eps
    from megatron_eps.policy.profile import load_pipeline_profile
    from megatron_eps.experts import selector

    profiles = os.path.join(os.path.dirname(megatron_eps.__file__), "profiles")
    kernel = pipeline = os.path.join(profiles, "nvidia_h100_80gb_hbm3.json")  # one file per GPU
    assert EPSConfig(cost_profile=kernel).cost_profile == kernel  # accepted ...
    selector.clear_caches()
    __import__("megatron_eps.policy.profile").policy.profile._WARNED_DEVICES.clear()  # other tests loaded it
    with caplog.at_level(logging.WARNING, logger="megatron_eps"):
        tables = load_kernel_tables(kernel, "cpu")
        load_kernel_tables(kernel, "cpu")
        assert load_pipeline_profile(pipeline, "cpu") is not None
    warnings = [r.getMessage() for r in caplog.records if "measured on" in r.getMessage()]
    # ... with one warning per file that names both devices.
    assert len(warnings) == 1, warnings
    assert all("NVIDIA H100 80GB HBM3" in w and "'cpu'" in w for w in warnings)
    assert not tables.covers("cpu", __import__("torch").bfloat16)


def test_every_setting_has_a_flag_from_the_dataclass():
    """The flags are generated from EPSConfig: each field has one, with its help text, and a
    value given by flag equals the same value given in Python."""
    from megatron_eps.config import flag_of, settings

    parser = add_eps_args(argparse.ArgumentParser())
    flags = {a.option_strings[0]: a for a in parser._actions if a.option_strings}
    for name, setting in settings().items():
        assert flag_of(name) in flags, name
        assert flags[flag_of(name)].help == setting.help
    values = {"pipeline_degree": "3", "expert_kernel": "dense", "min_tokens_to_pipeline": "7",
              "chunk_split": "tail", "max_pipeline_degree": "5", "comm_num_ctas": "4",
              "gemm_sm_carveout": "8", "transport": "nccl", "kernel_autotune": "off",
              "kernel_cache": "/tmp/eps-kernels.json", "dispatch_dedup": "on",
              "dedup_combine_dtype": "fp32", "local_rows": "apart", "plan_rows_on_device": "on"}
    argv = ["--eps-moe"] + [x for k, v in values.items() for x in (flag_of(k), v)]
    from_flags = EPSConfig.from_args(parser.parse_args(argv))
    assert from_flags == EPSConfig(pipeline_degree=3, expert_kernel="dense",
                                   min_tokens_to_pipeline=7, chunk_split="tail",
                                   max_pipeline_degree=5, comm_num_ctas=4, gemm_sm_carveout=8,
                                   transport="nccl", kernel_autotune="off",
                                   kernel_cache="/tmp/eps-kernels.json", dispatch_dedup="on",
                                   dedup_combine_dtype="fp32", local_rows="apart",
                                   plan_rows_on_device="on")
    # every field except the switch and the profile path was exercised
    assert set(values) == set(settings()) - {"enabled", "cost_profile"}


def test_registering_a_backend_is_all_it_takes_to_select_it():
    import argparse as _argparse

    from megatron_eps.experts import base

    with pytest.raises(EPSConfigError, match="expert_kernel"):
        EPSConfig(expert_kernel="mine")

    @base.register_backend
    class MineBackend(base.ExpertBackend):
        name = "mine"

        def forward(self, local_experts, hidden, tokens_per_expert, probs, first_expert):
            return hidden

    try:
        assert EPSConfig(expert_kernel="mine").expert_kernel == "mine"
        args = add_eps_args(_argparse.ArgumentParser()).parse_args(["--eps-expert-kernel", "mine"])
        assert EPSConfig.from_args(args).expert_kernel == "mine"
        assert "mine" in __import__("megatron_eps").EXPERT_KERNELS
    finally:
        base._REGISTRY.pop("mine", None)
        base._INSTANCES.pop("mine", None)
