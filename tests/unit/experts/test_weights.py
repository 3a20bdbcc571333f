"""Packing SequentialMLP weights into stacked storage: shared, not copied; keys unchanged."""

from __future__ import annotations

import torch

from megatron_eps.experts import LocalExperts, get_backend
from megatron_eps.experts.reference import relative_error
from megatron_eps.experts.weights import ExpertWeights

from .conftest import build_sequential_experts, random_call


def test_packing_shares_storage_and_keeps_state_dict(megatron_parallel):
    module, config = build_sequential_experts(num_experts=4, hidden=32, ffn=16)
    keys_before = list(module.state_dict().keys())
    params_before = [id(p) for p in module.parameters()]
    values_before = {k: v.clone() for k, v in module.state_dict().items() if torch.is_tensor(v)}
    experts = LocalExperts(module, config)
    weights = experts.weights()

    assert weights.fc1.shape == (4, 32, 32) and weights.fc2.shape == (4, 32, 16)
    assert list(module.state_dict().keys()) == keys_before
    assert [id(p) for p in module.parameters()] == params_before  # same Parameter objects
    for i, expert in enumerate(module.local_experts):
        assert expert.linear_fc1.weight.data_ptr() == weights.fc1[i].data_ptr()
        assert expert.linear_fc2.weight.data_ptr() == weights.fc2[i].data_ptr()
        assert torch.equal(expert.linear_fc1.weight, values_before[f"local_experts.{i}.linear_fc1.weight"])
    assert weights.is_current(module)
    assert experts.weights() is weights  # no re-pack while current


def test_load_state_dict_writes_into_stacked_storage(megatron_parallel):
    module, config = build_sequential_experts(num_experts=3, hidden=32, ffn=16)
    experts = LocalExperts(module, config)
    weights = experts.weights()
    new_state = {
        k: torch.randn_like(v) if torch.is_tensor(v) else v for k, v in module.state_dict().items()
    }
    module.load_state_dict(new_state)
    assert experts.weights() is weights
    assert torch.equal(weights.fc1[2], new_state["local_experts.2.linear_fc1.weight"])
    assert torch.equal(weights.fc2[0], new_state["local_experts.0.linear_fc2.weight"])
    counts = [2, 3, 1]
    x, probs = random_call(3, 32, counts, torch.float32, "cpu")
    out = get_backend("dense").forward(experts, x, counts, probs, 0)
    assert relative_error(out, get_backend("megatron").forward(experts, x, counts, probs, 0)) < 1e-5


def test_repack_after_data_is_replaced(megatron_parallel):
    module, config = build_sequential_experts(num_experts=3, hidden=32, ffn=16)
    experts = LocalExperts(module, config)
    first = experts.weights()
    module.to(torch.float64)  # replaces every Parameter's .data
    assert not first.is_current(module)
    second = experts.weights()
    assert second is not first and second.dtype == torch.float64
    assert second.fc1[1].data_ptr() == module.local_experts[1].linear_fc1.weight.data_ptr()


def test_already_stacked_parameters_are_viewed_not_copied(megatron_parallel):
    module, config = build_sequential_experts(num_experts=3, hidden=32, ffn=16)
    first = ExpertWeights.from_module(module, config)
    again = ExpertWeights.from_module(module, config)  # parameters already live in one stack
    assert again.fc1.data_ptr() == first.fc1.data_ptr()
    assert again.fc2.data_ptr() == first.fc2.data_ptr()


def test_the_per_forward_check_sees_one_replaced_parameter(megatron_parallel):
    from megatron_eps.experts import weights as weights_module

    module, config = build_sequential_experts(num_experts=4, hidden=32, ffn=16)
    experts = LocalExperts(module, config)
    first = experts.weights()
    fc1, fc2 = weights_module._per_expert_params(module, "sequential")
    walked = tuple(w.data_ptr() for w in fc1) + tuple(w.data_ptr() for w in fc2)
    assert weights_module._sequential_pointers(module) == walked
    # load_state_dict(assign=True) puts new Parameter objects in place of the packed ones
    state = {k: torch.randn_like(v) for k, v in module.state_dict().items() if torch.is_tensor(v)}
    module.load_state_dict({"local_experts.2.linear_fc2.weight":
                            state["local_experts.2.linear_fc2.weight"]}, strict=False, assign=True)
    assert not first.is_current(module)
    experts.begin_forward()
    second = experts.weights()
    assert second is not first
    assert torch.equal(second.fc2[2], state["local_experts.2.linear_fc2.weight"])
