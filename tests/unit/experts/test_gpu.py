"""bf16 on a CUDA GPU: every available backend vs the float64 reference and vs Megatron."""

from __future__ import annotations

import pytest
import torch

from megatron_eps.experts import LocalExperts, available_backends, get_backend
from megatron_eps.experts.reference import reference_expert_forward, reference_for_experts, relative_error
from megatron_eps.experts.weights import ExpertWeights, StackedExperts

from .conftest import build_sequential_experts, count_cases, random_call, requires_cuda, requires_te

BF16_TOL = 1e-2
pytestmark = [pytest.mark.gpu, requires_cuda]


def _poisoned_forward(backend, experts, x, counts, probs, first):
    """Run with a NaN-filled cache so stale memory cannot pass for output."""
    torch.cuda.empty_cache()
    junk = torch.full((1 << 24,), float("nan"), device=x.device, dtype=x.dtype)
    del junk
    return get_backend(backend).forward(experts, x, counts, probs, first)


@pytest.mark.parametrize("shape", [(8, 256, 128), (4, 512, 1408 // 4)])
def test_stacked_backends_bf16(shape):
    n, hidden, ffn = shape
    gen = torch.Generator(device="cpu").manual_seed(1)
    fc1 = (torch.randn(n, 2 * ffn, hidden, generator=gen) / hidden**0.5).cuda().bfloat16()
    fc2 = (torch.randn(n, hidden, ffn, generator=gen) / ffn**0.5).cuda().bfloat16()
    experts = StackedExperts(ExpertWeights.from_tensors(fc1, fc2))
    names = [b for b in available_backends(experts, torch.device("cuda"), torch.bfloat16) if b != "megatron"]
    assert {"grouped", "dense", "triton"} <= set(names)
    cases = dict(count_cases(n))
    cases["large_skewed"] = [700, 3, 0, 1300, 5, 0, 64, 1][:n]
    for case, counts in cases.items():
        x, probs = random_call(n, hidden, counts, torch.bfloat16, "cuda", seed=len(case))
        ref = reference_expert_forward(fc1, fc2, experts.weights().activation, x, counts, probs)
        for name in names:
            out = _poisoned_forward(name, experts, x, counts, probs, 0)
            assert out.shape == (sum(counts), hidden) and out.dtype == torch.bfloat16
            if sum(counts):
                err = relative_error(out, ref)
                assert err <= BF16_TOL, (name, case, err)


def test_triton_gemms_launch_their_compiled_kernels_directly():
    """After the first call of a specialization the GEMMs skip Triton's JIT dispatch (a silent
    fallback to it would cost the host tens of microseconds per launch)."""
    from megatron_eps.experts import triton_kernels as tk

    n, hidden, ffn = 20, 256, 128
    gen = torch.Generator(device="cpu").manual_seed(3)
    fc1 = (torch.randn(n, 2 * ffn, hidden, generator=gen) / hidden**0.5).cuda().bfloat16()
    fc2 = (torch.randn(n, hidden, ffn, generator=gen) / ffn**0.5).cuda().bfloat16()
    experts = StackedExperts(ExpertWeights.from_tensors(fc1, fc2))
    counts = [0, 5, 0, 0, 40, 3] + [2] * 14
    x, probs = random_call(n, hidden, counts, torch.bfloat16, "cuda", seed=5)
    ref = reference_expert_forward(fc1, fc2, experts.weights().activation, x, counts, probs)
    for _ in range(3):
        out = get_backend("triton").forward(experts, x, counts, probs, 0)
        assert relative_error(out, ref) <= BF16_TOL
    launchers = tk._gemm_launchers()
    assert all(launcher.direct for launcher in launchers.values())
    assert launchers["tma"].compiled_kernels(), "the H100/H200 path launches the TMA kernel"


def test_sequential_mlp_backends_bf16(megatron_parallel):
    module, config = build_sequential_experts(
        num_experts=6, hidden=256, ffn=128, dtype=torch.bfloat16, device="cuda"
    )
    experts = LocalExperts(module, config)
    names = available_backends(experts, torch.device("cuda"), torch.bfloat16)
    assert "megatron" in names and "grouped" in names
    for case, counts in count_cases(6).items():
        x, probs = random_call(6, 256, counts, torch.bfloat16, "cuda", seed=len(case))
        stock = get_backend("megatron").forward(experts, x, counts, probs, 0)
        ref = reference_for_experts(experts, x, counts, probs)
        for name in names:
            out = get_backend(name).forward(experts, x, counts, probs, 0)
            if sum(counts):
                assert relative_error(out, ref) <= BF16_TOL, (name, case)
                assert relative_error(out, stock) <= BF16_TOL, (name, case)


def test_fused_activation_matches_megatron_math():
    from megatron_eps.experts.activation import ActivationSpec
    from megatron_eps.experts.triton_kernels import fused_activation

    spec = ActivationSpec.swiglu()
    h = torch.randn(1000, 2 * 1408, device="cuda").bfloat16()
    probs = torch.rand(1000, device="cuda")
    ref = spec.apply_torch(h.double(), probs.double())
    assert relative_error(fused_activation(h, probs, spec), ref) < 5e-3


@requires_te
def test_te_backend_matches_megatron(megatron_parallel):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_eps import compat
    from megatron_eps.inference.layers import moe_config

    config = moe_config(num_experts=4, hidden_size=256, ffn_hidden_size=128, dtype=torch.bfloat16,
                        moe_grouped_gemm=True)
    spec = get_gpt_layer_with_transformer_engine_spec(num_experts=4, moe_grouped_gemm=True)
    layer = MoELayer(config, submodules=compat.moe_submodules_from_spec(spec.submodules.mlp)).cuda()
    experts = LocalExperts(layer.experts, config)
    counts = [30, 0, 7, 100]
    x, probs = random_call(4, 256, counts, torch.bfloat16, "cuda")
    stock = get_backend("megatron").forward(experts, x, counts, probs, 0)
    for name in ("te", "grouped", "dense"):
        assert relative_error(get_backend(name).forward(experts, x, counts, probs, 0), stock) <= BF16_TOL


def test_triton_compiles_in_the_background_then_runs(tmp_path):
    """A first compile (fresh Triton cache, own process) starts on a worker thread and returns
    before it is done; once done, the backend's output matches the float64 reference."""
    from megatron_eps.testing import run_distributed

    returned_before_done, seconds_to_done, launcher_errors, first_call, err = run_distributed(
        _background_compile_rank, 1, str(tmp_path / "triton"))[0]
    assert returned_before_done, "compile_in_background waited for the compilation"
    assert seconds_to_done < 120 and err <= BF16_TOL
    assert not launcher_errors, launcher_errors
    # The launchers were built in the background: the first call compiles nothing (a C
    # launcher compiled at the first launch took about 0.3 s).
    assert first_call < 0.2, first_call


def _background_compile_rank(triton_cache):
    import os
    import time

    os.environ["TRITON_CACHE_DIR"] = triton_cache
    n, hidden, ffn = 4, 256, 128
    gen = torch.Generator(device="cpu").manual_seed(3)
    fc1 = (torch.randn(n, 2 * ffn, hidden, generator=gen) / hidden**0.5).cuda().bfloat16()
    fc2 = (torch.randn(n, hidden, ffn, generator=gen) / ffn**0.5).cuda().bfloat16()
    experts = StackedExperts(ExpertWeights.from_tensors(fc1, fc2))
    counts = [40, 0, 7, 90]
    x, probs = random_call(n, hidden, counts, torch.bfloat16, "cuda", seed=5)
    backend = get_backend("triton")
    started = time.monotonic()
    handle = backend.compile_in_background(experts, x, counts, probs, 0)
    returned_before_done = handle is not None and not handle.done()
    while handle is not None and not handle.done() and time.monotonic() - started < 120:
        time.sleep(0.01)
    seconds = time.monotonic() - started
    launcher_errors = []
    if handle is not None:
        handle.wait()
        launcher_errors = [repr(f.exception()) for f in handle.launchers if f.exception() is not None]
    ref = reference_expert_forward(fc1, fc2, experts.weights().activation, x, counts, probs)
    torch.cuda.synchronize()
    first_started = time.perf_counter()
    out = backend.forward(experts, x, counts, probs, 0)
    torch.cuda.synchronize()
    first_call = time.perf_counter() - first_started
    return returned_before_done, seconds, launcher_errors, first_call, relative_error(out, ref)


def test_calibration_times_calls_with_their_offsets_staged_as_a_layer_does():
    from megatron_eps.calibrate import kernels as cal
    from megatron_eps.experts.gemm_common import expert_offsets

    device = torch.device("cuda")
    experts = cal.synthetic_experts(256, 128, 4, torch.bfloat16, device, seed=1)
    counts = [5, 0, 17, 3]
    with cal.offsets_staged(experts, counts, device):
        staged = expert_offsets(counts, device, experts.staged_int32)
        assert staged is expert_offsets(counts, device, experts.staged_int32)  # no copy per call
        assert staged.tolist() == [5, 5, 22, 25]
    assert experts.staged_int32 == {}
    inputs = cal.make_inputs(sum(counts), 256, torch.bfloat16, device, sets=2, seed=1)
    seconds = cal.measure_point(experts, ["grouped", "triton"], counts, inputs, device, 1e-3)
    assert set(seconds) == {"grouped", "triton"} and all(s > 0 for s in seconds.values())
    assert experts.staged_int32 == {}
