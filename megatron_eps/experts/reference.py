"""Float64 reference of Megatron's expert computation (tests and benchmark checks).

Same math as MLP.forward per expert, in float64 and with no intermediate rounding:
out[rows of e] = fc2_e( act(fc1_e(x)) * probs ), the input scaled instead when probs_on_input.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from megatron_eps.experts.activation import ActivationSpec


def reference_expert_forward(
    fc1: torch.Tensor,
    fc2: torch.Tensor,
    activation: ActivationSpec,
    hidden: torch.Tensor,
    tokens_per_expert: Sequence[int],
    probs: Optional[torch.Tensor],
    first_expert: int = 0,
) -> torch.Tensor:
    """float64 [M, H] on the CPU: experts first_expert.. over rows grouped by expert."""
    x = hidden.detach().to("cpu", torch.float64)
    p = probs.detach().to("cpu", torch.float64).reshape(-1) if probs is not None else None
    if activation.probs_on_input and p is not None:
        x = x * p.unsqueeze(-1)
        p = None
    out = torch.zeros(x.shape[0], fc2.shape[1], dtype=torch.float64)
    start = 0
    for i, count in enumerate(tokens_per_expert):
        count = int(count)
        if count == 0:
            continue
        w1 = fc1[first_expert + i].detach().to("cpu", torch.float64)
        w2 = fc2[first_expert + i].detach().to("cpu", torch.float64)
        rows = slice(start, start + count)
        h = activation.apply_torch(x[rows] @ w1.t(), p[rows] if p is not None else None)
        out[rows] = h @ w2.t()
        start += count
    return out


def reference_for_experts(local_experts, hidden, tokens_per_expert, probs, first_expert=0):
    """The float64 reference for a LocalExperts (reads its stacked weights)."""
    weights = local_experts.weights()
    return reference_expert_forward(
        weights.fc1, weights.fc2, weights.activation, hidden, tokens_per_expert, probs, first_expert
    )


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (NaN anywhere gives inf)."""
    out64 = out.detach().to("cpu", torch.float64)
    ref64 = ref.detach().to("cpu", torch.float64)
    if not torch.isfinite(out64).all():
        return float("inf")
    denom = ref64.norm().item()
    diff = (out64 - ref64).norm().item()
    return diff / denom if denom > 0 else diff
