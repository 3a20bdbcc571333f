"""Fair baselines for benchmarks: the stock MoELayer with its experts run as one grouped GEMM.

Stock Megatron without Transformer Engine runs its experts as SequentialMLP (a per-expert loop),
slow at low loads. A Megatron user with TE gets grouped GEMMs (TEGroupedMLP) and no overlap.
``GroupedGemmExperts`` is that path without TE: the stock layer, the stock dispatcher, the same
weights, and the experts computed by one ``torch._grouped_mm`` per projection (megatron-eps'
``grouped`` backend, which reads the SequentialMLP weights in place).
"""

from __future__ import annotations

import copy

import torch

from megatron_eps.experts.base import LocalExperts, get_backend


class GroupedGemmExperts(torch.nn.Module):
    """Drop-in for a MoELayer's ``experts``: ``forward(tokens, tokens_per_expert, probs)``."""

    def __init__(self, experts: torch.nn.Module, config, backend: str = "grouped"):
        super().__init__()
        self.inner = experts
        self.__dict__["_local"] = LocalExperts(experts, config)
        self.backend = get_backend(backend)

    def forward(self, tokens, tokens_per_expert, permuted_probs):
        counts = [int(c) for c in tokens_per_expert.tolist()] if torch.is_tensor(tokens_per_expert) \
            else [int(c) for c in tokens_per_expert]
        local = self.__dict__["_local"]
        local.begin_forward()
        out = self.backend.forward(local, tokens.reshape(-1, tokens.shape[-1]), counts,
                                   permuted_probs.reshape(-1), 0)
        return out.view_as(tokens), None


def with_grouped_experts(stock_layer, backend: str = "grouped"):
    """A copy of ``stock_layer`` (a MoELayer) sharing its parameters, whose experts run as one
    grouped GEMM. The copy shares every weight tensor with the original."""
    layer = copy.copy(stock_layer)
    layer._modules = dict(stock_layer._modules)
    layer._modules["experts"] = GroupedGemmExperts(stock_layer.experts, stock_layer.config, backend)
    return layer
