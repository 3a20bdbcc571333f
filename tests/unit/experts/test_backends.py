"""Every GEMM backend against the float64 reference and against Megatron's own experts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_eps.experts import LocalExperts, available_backends, get_backend
from megatron_eps.experts.reference import reference_for_experts, relative_error
from megatron_eps.experts.weights import ExpertWeights, StackedExperts

from .conftest import build_sequential_experts, count_cases, random_call

CPU_BACKENDS = ["dense", "grouped"]  # triton: test_triton_interpreter.py (needs its own process)
FP32_TOL = 1e-5


@pytest.fixture(scope="module")
def sequential(megatron_parallel):
    module, config = build_sequential_experts(num_experts=6, hidden=64, ffn=32)
    return LocalExperts(module, config)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", list(count_cases(6)))
def test_backend_matches_reference_and_megatron(sequential, backend, case):
    counts = count_cases(6)[case]
    device = sequential.weights().device
    x, probs = random_call(6, 64, counts, torch.float32, device, seed=len(case))
    out = get_backend(backend).forward(sequential, x, counts, probs, 0)
    assert out.shape == (sum(counts), 64) and out.dtype == x.dtype
    stock = get_backend("megatron").forward(sequential, x, counts, probs, 0)
    if sum(counts) == 0:
        assert out.numel() == 0
        return
    ref = reference_for_experts(sequential, x, counts, probs)
    assert relative_error(out, ref) < FP32_TOL
    assert relative_error(out, stock) < FP32_TOL
    # The reference itself must agree with Megatron, or the comparison above proves nothing.
    assert relative_error(stock, ref) < FP32_TOL


def test_dense_is_bitwise_megatron_on_cpu(sequential):
    counts = [4, 0, 9, 1, 0, 6]
    x, probs = random_call(6, 64, counts, torch.float32, "cpu", seed=3)
    out = get_backend("dense").forward(sequential, x, counts, probs, 0)
    stock = get_backend("megatron").forward(sequential, x, counts, probs, 0)
    assert torch.equal(out, stock)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_expert_subrange(sequential, backend):
    """A pipeline chunk runs experts first..first+n-1 on its own rows only."""
    counts = [7, 0, 3]
    x, probs = random_call(6, 64, counts, torch.float32, "cpu", seed=5)
    out = get_backend(backend).forward(sequential, x, counts, probs, 2)
    ref = reference_for_experts(sequential, x, counts, probs, first_expert=2)
    stock = get_backend("megatron").forward(sequential, x, counts, probs, 2)
    assert relative_error(out, ref) < FP32_TOL
    assert relative_error(out, stock) < FP32_TOL


def test_out_of_range_and_bad_counts_raise(sequential):
    x, probs = random_call(6, 64, [3, 3], torch.float32, "cpu")
    with pytest.raises(ValueError, match="out of range"):
        get_backend("dense").forward(sequential, x, [3, 3], probs, 5)
    with pytest.raises(ValueError, match="sum to"):
        get_backend("grouped").forward(sequential, x, [3, 2], probs, 0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_probs_on_input_top1(megatron_parallel, backend):
    module, config = build_sequential_experts(
        num_experts=4, hidden=32, ffn=16, topk=1, moe_apply_probs_on_input=True
    )
    experts = LocalExperts(module, config)
    counts = [5, 0, 2, 8]
    x, probs = random_call(4, 32, counts, torch.float32, "cpu", seed=11)
    out = get_backend(backend).forward(experts, x, counts, probs, 0)
    stock = get_backend("megatron").forward(experts, x, counts, probs, 0)
    ref = reference_for_experts(experts, x, counts, probs)
    assert relative_error(out, stock) < FP32_TOL
    assert relative_error(out, ref) < FP32_TOL
    # And the probs really moved to the input: the post-activation scaling would differ.
    no_probs = get_backend(backend).forward(experts, x, counts, torch.ones_like(probs), 0)
    assert relative_error(no_probs, stock) > 1e-3


@pytest.mark.parametrize("activation", ["gelu_gated", "relu_plain", "clamped_offset_swiglu"])
def test_other_activations_match_megatron(megatron_parallel, activation):
    settings = {
        "gelu_gated": dict(activation_func=F.gelu),
        "relu_plain": dict(activation_func=F.relu, gated_linear_unit=False),
        "clamped_offset_swiglu": dict(activation_func_clamp_value=0.5, glu_linear_offset=1.0),
    }[activation]
    module, config = build_sequential_experts(num_experts=3, hidden=32, ffn=16, **settings)
    experts = LocalExperts(module, config)
    counts = [6, 1, 4]
    x, probs = random_call(3, 32, counts, torch.float32, "cpu", seed=2)
    stock = get_backend("megatron").forward(experts, x, counts, probs, 0)
    for backend in CPU_BACKENDS:
        out = get_backend(backend).forward(experts, x, counts, probs, 0)
        assert relative_error(out, stock) < FP32_TOL, backend
    assert relative_error(reference_for_experts(experts, x, counts, probs), stock) < FP32_TOL


def test_bias_experts_are_rejected_with_a_clear_error(megatron_parallel):
    module, config = build_sequential_experts(num_experts=2, hidden=32, ffn=16, add_bias_linear=True)
    experts = LocalExperts(module, config)
    assert available_backends(experts, torch.device("cpu"), torch.float32) == ["megatron"]
    with pytest.raises(ValueError, match="add_bias_linear"):
        experts.weights()


def test_stacked_experts_bf16_cpu():
    """bf16 on CPU (grouped_mm's CPU fallback and the dense loop) stays within bf16 rounding."""
    torch.manual_seed(0)
    fc1 = (torch.randn(3, 32, 64) / 8).bfloat16()
    fc2 = (torch.randn(3, 64, 16) / 4).bfloat16()
    experts = StackedExperts(ExpertWeights.from_tensors(fc1, fc2))
    counts = [9, 0, 12]
    x, probs = random_call(3, 64, counts, torch.bfloat16, "cpu")
    ref = reference_for_experts(experts, x, counts, probs)
    for backend in CPU_BACKENDS:
        assert relative_error(get_backend(backend).forward(experts, x, counts, probs, 0), ref) < 1e-2
