"""EPSMoELayer construction checks, spec wiring and state_dict compatibility."""

import pytest

from megatron_eps.testing import run_distributed, skip_unless_ranks_fit
from tests.unit_tests import layer_cases


@pytest.mark.parametrize("world", [1, 2])
def test_unsupported_configs_raise_clear_errors(world):
    skip_unless_ranks_fit(world)
    messages = run_distributed(layer_cases.construction_errors, world)[0]
    assert "moe_token_dispatcher_type" in messages["allgather"]
    assert "alltoall" in messages["allgather"]
    assert "moe_expert_capacity_factor" in messages["capacity"]
    if world > 1:
        assert "num_moe_experts" in messages["indivisible"]
        assert "expert_model_parallel_size" in messages["indivisible"]


@pytest.mark.parametrize("world", [1, 2])
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
