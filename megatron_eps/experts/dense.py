"""``dense`` backend: one torch.mm per non-empty expert on slices of the stacked weights.

The per-expert loop is exactly SequentialMLP's math (on CPU the fp32 results are bitwise the
same), without its Python module overhead, torch.split/cat copies or the ``.tolist()`` sync: the
row counts are host ints, GEMMs write straight into one fc1 buffer and into the output, and the
activation runs once over all rows. Launch-bound at small loads (~2 launches per expert), which
is where the selector prefers ``grouped``; it can beat grouped when few experts hold many rows.
"""

from __future__ import annotations

import torch

from megatron_eps.experts.base import register_backend
from megatron_eps.experts.gemm_common import ExpertCall, GemmExpertBackend


def dense_expert_forward(call: ExpertCall) -> torch.Tensor:
    """One torch.mm per expert and projection (a call with at least one row)."""
    hidden, counts = call.hidden, call.counts
    fc1_out = hidden.new_empty(hidden.shape[0], call.fc1.shape[1])
    start = 0
    for expert, count in enumerate(counts):
        if count:
            torch.mm(hidden[start : start + count], call.fc1[expert].t(), out=fc1_out[start : start + count])
        start += count
    h = call.weights.activation.apply(fc1_out, call.probs)
    out = hidden.new_empty(hidden.shape)
    start = 0
    for expert, count in enumerate(counts):
        if count:
            torch.mm(h[start : start + count], call.fc2[expert].t(), out=out[start : start + count])
        start += count
    return out


@register_backend
class DenseExpertsBackend(GemmExpertBackend):
    name = "dense"
    gpu_default_rank = 2
    cpu_default = True
    accepts_strided_rows = True

    def compute(self, call, local_experts, first_expert):
        return dense_expert_forward(call)
