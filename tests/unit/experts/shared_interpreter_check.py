"""The shared-expert runner's fused path (fc1 -> Triton activation -> fc2) on the CPU through
TRITON_INTERPRET=1, fp32, against the module's own forward; prints the results as JSON.

Started in a subprocess by test_shared_experts.py (the interpreter must be on before triton is
imported, and must not leak into other tests of the session).
"""

from __future__ import annotations

import json
import os

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from megatron_eps.experts import triton_kernels as tk  # noqa: E402
from megatron_eps.experts.reference import relative_error  # noqa: E402
from megatron_eps.experts.shared import SharedExpertRunner  # noqa: E402


def _parallel_state():
    from megatron.core import parallel_state

    from megatron_eps.testing import Utils, install_cpu_shims
    from megatron_eps.testing.distributed import free_port

    install_cpu_shims()
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ["MASTER_PORT"] = str(free_port())
    if not parallel_state.model_parallel_is_initialized():
        Utils.initialize_model_parallel(1, 1)


def _layers(**overrides):
    """(stock MoELayer, EPSMoELayer) with shared experts, weights scaled so outputs are O(1)."""
    from megatron_eps import EPSConfig
    from megatron_eps.inference.layers import build_moe_pair, moe_config

    config = moe_config(num_experts=4, topk=2, hidden_size=48, ffn_hidden_size=24,
                        shared_expert_size=40, **overrides)
    stock, eps = build_moe_pair(config, EPSConfig(min_tokens_to_pipeline=0,
                                                  expert_kernel="megatron"))
    with torch.no_grad():
        for p in stock.shared_experts.parameters():
            p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5)
    eps.load_state_dict(stock.state_dict())
    return stock, eps


class _CountingActivation:
    def __init__(self):
        self.calls = 0
        self.inner = tk.fused_activation

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)


def main():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    _parallel_state()
    counter = _CountingActivation()
    tk.fused_activation = counter
    results = {}
    cases = {
        "swiglu": {},
        "swiglu_clamp_offset": dict(activation_func_clamp_value=0.6, glu_linear_offset=1.0),
        "gelu_plain": dict(gated_linear_unit=False, activation_func=F.gelu),
        "bias_activation_fusion": dict(bias_activation_fusion=True),
        "gated_shared": dict(moe_shared_expert_gate=True),
        "unknown_activation": dict(activation_func=torch.tanh),
    }
    for name, overrides in cases.items():
        stock, eps = _layers(**overrides)
        runner = SharedExpertRunner(stock.shared_experts)
        x = torch.randn(7, 3, 48)
        with torch.no_grad():
            want = stock.shared_experts(x)
            before = counter.calls
            got = runner.issue(x, side_stream=True).join()
            fused_calls = counter.calls - before
            # The whole layer, pipelined, against the stock layer.
            before = counter.calls
            eps_out, _ = eps(x)
            layer_fused_calls = counter.calls - before
            stock_out, _ = stock(x)
        results[name] = {
            "reason": runner.reason,
            "fused_calls": fused_calls,
            "layer_fused_calls": layer_fused_calls,
            "shape_ok": tuple(got.shape) == tuple(want.shape),
            "rel_err": relative_error(got, want.double()),
            "bit_equal": bool(torch.equal(got, want)),
            "layer_rel_err": relative_error(eps_out, stock_out.double()),
            "pipelined": eps.token_dispatcher.last_record is not None,
        }
    print(json.dumps(results))


if __name__ == "__main__":
    main()
