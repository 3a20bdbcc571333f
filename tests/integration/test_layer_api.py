"""EPSMoELayer construction checks, spec wiring and state_dict compatibility."""

import pytest

from megatron_eps.testing import run_distributed, skip_unless_ranks_fit
from tests.integration import layer_cases
from tests.marks import ranks


@pytest.mark.parametrize("world", ranks(1, 2))
def test_unsupported_configs_raise_clear_errors(world):
    skip_unless_ranks_fit(world)
    messages = run_distributed(layer_cases.construction_errors, world)[0]
    assert "moe_token_dispatcher_type" in messages["allgather"]
    assert "alltoall" in messages["allgather"]
    assert "moe_expert_capacity_factor" in messages["capacity"]
    if world > 1:
        assert "num_moe_experts" in messages["indivisible"]
        assert "expert_model_parallel_size" in messages["indivisible"]


@pytest.mark.parametrize("world", ranks(1, 2))
def test_spec_state_dict_and_fallback(world):
    skip_unless_ranks_fit(world)
    out = run_distributed(layer_cases.spec_and_state_dict, world)[0]
    assert out["spec_class"] == "EPSMoELayer"
    assert out["original_untouched"]
    assert out["dense_spec_error"] and "no MoELayer" in out["dense_spec_error"]
    assert out["same_keys"] and out["is_moe_layer"]
    assert out["dispatcher"] == "EPSAlltoAllTokenDispatcher"
    assert out["no_grad_diff"] <= 1e-5 and out["chunks"] == 2
    assert out["grad_path_record"] is None  # the stock path ran
    assert out["grad_diff"] <= 1e-5 and out["input_grad_finite"]


def test_layer_built_under_inference_mode_runs_stock_steps_after_packing():
    out = run_distributed(layer_cases.built_under_inference_mode, 1)[0]
    assert out["packed"] and out["inference_params"]
    assert out["diff"] <= 1e-5


@pytest.mark.slow
def test_inference_mode_forward_keeps_parameters_trainable():
    out = run_distributed(layer_cases.inference_mode_then_training, 1)[0]
    assert out["ran_pipeline"]
    assert out["inference_params"] == []
    assert out["grads"]
    assert out["diff"] <= 1e-5


@pytest.mark.slow
@pytest.mark.multigpu
@pytest.mark.parametrize(
    "field, values",
    [("pipeline_degree", (2, 4)), ("enabled", (True, False)), ("expert_kernel", ("dense", "auto"))],
)
def test_ranks_with_different_settings_get_an_eps_error(field, values):
    skip_unless_ranks_fit(2)
    messages = run_distributed(layer_cases.different_settings_across_ranks, 2, field, values)
    for rank, message in enumerate(messages):
        assert message is not None, rank
        assert f"{field}: rank 0={values[0]!r}, rank 1={values[1]!r}" in message
        assert "different EPS settings" in message


@pytest.mark.slow
@pytest.mark.multigpu
def test_eps_layer_gets_the_groups_of_its_transformer_layer():
    skip_unless_ranks_fit(2)
    for out in run_distributed(layer_cases.layer_uses_model_groups, 2):
        assert out["class"] == "EPSMoELayer"
        assert out["same_group"] and out["ep_size"] == 1 and out["num_local_experts"] == 8
        assert out["default_ep_size"] == 2
        assert out["finite"]


def test_settings_cannot_be_made_invalid_after_validation():
    from megatron_eps import EPSConfig, EPSConfigError

    cfg = EPSConfig(pipeline_degree=2)
    with pytest.raises(EPSConfigError, match="pipeline_degree=-3"):
        cfg.pipeline_degree = -3
    assert cfg.pipeline_degree == 2
    with pytest.raises(EPSConfigError, match="expert_kernel"):
        cfg.expert_kernel = "cutlass"
    cfg.pipeline_degree = 4  # a valid change is validated
    assert cfg.pipeline_degree == 4
    assert cfg.digest() == EPSConfig(pipeline_degree=4).digest() != EPSConfig().digest()
