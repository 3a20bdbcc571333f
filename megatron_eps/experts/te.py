"""``te`` backend: Transformer Engine's GroupedLinear, for TEGroupedMLP experts.

Runs the module's own ``linear_fc1``/``linear_fc2`` GroupedLinear layers (TE's multi-stream /
cuBLASLt grouped GEMM) with our activation between them, for any contiguous range of experts
(the experts outside the range get zero rows, which GroupedLinear skips). This module imports
without transformer_engine; the backend then reports itself unavailable.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_eps.experts.base import register_backend
from megatron_eps.experts.gemm_common import GemmExpertBackend, gemm_unavailable_reason
from megatron_eps.experts.weights import StackedExperts, _experts_kind


def te_unavailable_reason() -> Optional[str]:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        return f"transformer_engine is not importable ({type(exc).__name__}: {exc})"
    return None


@register_backend
class TEExpertsBackend(GemmExpertBackend):
    name = "te"

    @classmethod
    def unavailable_reason(cls, local_experts, device, dtype):
        reason = te_unavailable_reason()
        if reason is not None:
            return reason
        if torch.device(device).type != "cuda":
            return "Transformer Engine GroupedLinear runs on CUDA only"
        if isinstance(local_experts, StackedExperts) or _experts_kind(local_experts.module) != "te_grouped":
            return "the te expert kernel runs TEGroupedMLP experts only (moe_grouped_gemm with TE specs)"
        return gemm_unavailable_reason(local_experts, device, dtype)

    def compute(self, call, local_experts, first_expert):
        # prepare_call has validated the arguments and folded probs into the input when asked.
        module = local_experts.module
        if call.hidden.shape[0] == 0:
            return call.hidden.new_empty(0, call.hidden.shape[1])
        m_splits = [0] * local_experts.num_local_experts
        m_splits[first_expert : first_expert + len(call.counts)] = call.counts
        fc1_out, _ = module.linear_fc1(call.hidden, m_splits)
        h = call.weights.activation.apply(fc1_out, call.probs)
        out, _ = module.linear_fc2(h, m_splits)
        return out
