"""Fixtures of the expert-kernel tests: Megatron parallel state (one CPU/GPU rank), experts."""

from __future__ import annotations

import os

import pytest
import torch


def cuda_available() -> bool:
    return torch.cuda.is_available()


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def te_importable() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


requires_te = pytest.mark.skipif(not te_importable(), reason="needs transformer_engine")


@pytest.fixture(scope="session")
def megatron_parallel():
    """Megatron's parallel state for one rank (TP=EP=PP=1), created once per session."""
    from megatron.core import parallel_state

    from megatron_eps.testing import Utils, install_cpu_shims
    from megatron_eps.testing.distributed import free_port

    install_cpu_shims()
    if not parallel_state.model_parallel_is_initialized():
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        if not torch.distributed.is_initialized():
            os.environ["MASTER_PORT"] = str(free_port())
        Utils.initialize_model_parallel(1, 1)
    yield
    # Left initialized: other test modules of the session may share the same process group.


def build_sequential_experts(
    num_experts=6, hidden=64, ffn=32, dtype=torch.float32, seed=7, device="cpu", **overrides
):
    """A real Megatron SequentialMLP (from a stock MoELayer) and its TransformerConfig."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_eps import compat
    from megatron_eps.testing import Utils
    from megatron_eps.inference.layers import moe_config

    topk = overrides.pop("topk", 2)
    config = moe_config(
        num_experts=num_experts, topk=topk, hidden_size=hidden, ffn_hidden_size=ffn, dtype=dtype, **overrides
    )
    submodules = compat.moe_submodules_from_spec(compat.local_moe_spec(num_experts))
    Utils.set_seed(seed)
    layer = MoELayer(config, submodules=submodules)
    experts = layer.experts.to(device)
    experts.eval()
    # Megatron initializes with std 0.02: scale up so outputs are O(1) and errors measurable.
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0.0, 1.0 / max(p.shape[-1], 1) ** 0.5)
    return experts, config


def random_call(num_experts, hidden, counts, dtype, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    rows = sum(counts)
    x = torch.randn(rows, hidden, generator=gen).to(device=device, dtype=dtype)
    probs = torch.rand(rows, generator=gen).to(device)
    return x, probs


# Row-count patterns every backend must handle: mixed with empty experts, one hot expert,
# all empty (M = 0), balanced.
def count_cases(num_experts):
    mixed = [(3 * i + 1) % 7 for i in range(num_experts)]
    mixed[1] = 0
    hot = [0] * num_experts
    hot[num_experts // 2] = 37
    return {
        "mixed_with_empty": mixed,
        "one_hot_expert": hot,
        "all_empty": [0] * num_experts,
        "balanced": [5] * num_experts,
    }
