"""The shared-expert runner (experts/shared.py): the fused path equals the module's own forward,
and everything the fused path would not reproduce takes the module's forward."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from megatron_eps.experts.shared import SharedExpertRunner, SharedOutput, fused_path_reason

FP32_TOL = 1e-5


def _shared_module(**overrides):
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_eps import compat
    from megatron_eps.inference.layers import moe_config

    config = moe_config(num_experts=4, hidden_size=32, ffn_hidden_size=16, shared_expert_size=24,
                        **overrides)
    layer = MoELayer(config, submodules=compat.moe_submodules_from_spec(compat.local_moe_spec(4)))
    return layer.shared_experts


def test_plain_swiglu_shared_experts_qualify(megatron_parallel):
    pytest.importorskip("triton")
    assert fused_path_reason(_shared_module()) is None


@pytest.mark.parametrize("overrides, words", [
    (dict(moe_shared_expert_gate=True), "gate"),
    (dict(activation_func=torch.tanh), "activation"),
    (dict(bias_activation_fusion=True, activation_func_clamp_value=0.5), "bias_activation_fusion"),
])
def test_what_the_fused_path_would_change_runs_the_module(megatron_parallel, overrides, words):
    module = _shared_module(**overrides)
    reason = fused_path_reason(module)
    assert reason is not None and words in reason
    runner = SharedExpertRunner(module)
    x = torch.randn(5, 2, 32)
    assert not runner.fused(x)
    with torch.no_grad():
        assert torch.equal(runner.issue(x).join(), module(x))


def test_an_activation_stock_refuses_is_refused_alike(megatron_parallel):
    # Megatron's MLP has no fused quick-GEGLU kernel without per-token scales: its forward
    # raises, and the runner must not compute something in its place.
    from megatron.core.fusions.fused_bias_geglu import quick_gelu

    module = _shared_module(activation_func=quick_gelu, bias_activation_fusion=True)
    assert "bias_activation_fusion" in fused_path_reason(module)
    with torch.no_grad(), pytest.raises(ValueError):
        module(torch.randn(2, 1, 32))
    with torch.no_grad(), pytest.raises(ValueError):
        SharedExpertRunner(module).issue(torch.randn(2, 1, 32))


def test_a_subclass_with_its_own_forward_runs_it(megatron_parallel):
    module = _shared_module()

    class Doubled(type(module)):
        def forward(self, hidden_states):
            return 2 * super().forward(hidden_states)

    module.__class__ = Doubled
    assert "not Megatron's SharedExpertMLP" in fused_path_reason(module)
    x = torch.randn(3, 1, 32)
    with torch.no_grad():
        assert torch.equal(SharedExpertRunner(module)(x), module(x))


def test_cpu_without_the_interpreter_runs_the_module_in_order(megatron_parallel):
    pytest.importorskip("triton")
    from megatron_eps.experts.triton_kernels import interpreter_active

    if interpreter_active():
        pytest.skip("the interpreter is on: CPU tensors take the fused path")
    module = _shared_module()
    runner = SharedExpertRunner(module)
    x = torch.randn(4, 2, 32)
    assert not runner.fused(x)
    pending = runner.issue(x, side_stream=True)
    assert isinstance(pending, SharedOutput) and pending._done is None  # no side stream on CPU
    with torch.no_grad():
        assert torch.equal(pending.join(), module(x))


_NUMPY = tuple(int(v) for v in __import__("numpy").__version__.split(".")[:2])


@pytest.fixture(scope="module")
def interpreter_results():
    pytest.importorskip("triton")
    if _NUMPY >= (2, 3):
        pytest.skip("Triton's interpreter needs numpy < 2.3 (the GPU tests cover the GPU hosts)")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "tests.unit.experts.shared_interpreter_check"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


FUSED_CASES = ("swiglu", "swiglu_clamp_offset", "gelu_plain", "bias_activation_fusion")
MODULE_CASES = ("gated_shared", "unknown_activation")


@pytest.mark.slow
@pytest.mark.parametrize("case", FUSED_CASES)
def test_fused_shared_experts_equal_the_module(interpreter_results, case):
    r = interpreter_results[case]
    assert r["reason"] is None
    assert r["fused_calls"] == 1, "the fused kernel did not run"
    assert r["shape_ok"] and r["rel_err"] < FP32_TOL, r
    # The pipelined layer runs it too, and still equals the stock layer.
    assert r["pipelined"] and r["layer_fused_calls"] == 1
    assert r["layer_rel_err"] < FP32_TOL, r


@pytest.mark.slow
@pytest.mark.parametrize("case", MODULE_CASES)
def test_module_forward_taken_under_the_interpreter(interpreter_results, case):
    r = interpreter_results[case]
    assert r["reason"] is not None
    assert r["fused_calls"] == 0 and r["layer_fused_calls"] == 0
    assert r["bit_equal"] and r["layer_rel_err"] < FP32_TOL, r
