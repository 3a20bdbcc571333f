"""``grouped`` backend: torch._grouped_mm (CUTLASS SM90 grouped GEMM; CPU fallback loop).

Two grouped GEMMs (fc1, fc2) with the activation between them. Constraints of _grouped_mm that
shape this code: ``offs`` are int32 cumulative row ends (an empty expert repeats the previous
end), ``mat_b`` is (G, K, N) so the stacked (out, in) weights are passed transposed (a free
view: column-major B is accepted), and every stride and base pointer must be 16-byte aligned.
On CUDA only SM90+ has the fast path; older GPUs fall back to a loop with a host sync, which
would stall the expert pipeline, so the backend reports itself unavailable there.
"""

from __future__ import annotations

import torch

from megatron_eps.experts.base import register_backend
from megatron_eps.experts.gemm_common import (
    ExpertCall,
    GemmExpertBackend,
    expert_offsets,
    gemm_unavailable_reason,
)

_ALIGN_BYTES = 16
CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CUDA_DTYPES = (torch.bfloat16,)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its base pointer and row stride are 16-byte aligned, else a copy."""
    row_bytes = t.stride(0) * t.element_size()
    if t.stride(-1) == 1 and t.data_ptr() % _ALIGN_BYTES == 0 and row_bytes % _ALIGN_BYTES == 0:
        return t
    return t.contiguous() if not t.is_contiguous() else t.clone()


def grouped_expert_forward(call: ExpertCall, staged_offsets=None) -> torch.Tensor:
    """Two torch._grouped_mm calls around the activation (a call with at least one row).
    ``staged_offsets``: offsets already on the device (gemm_common.stage_int32_batch)."""
    hidden = call.hidden
    offs = expert_offsets(call.counts, hidden.device, staged_offsets)
    fc1_out = torch._grouped_mm(_aligned(hidden), call.fc1.transpose(1, 2), offs=offs)
    h = call.weights.activation.apply(fc1_out, call.probs)
    return torch._grouped_mm(_aligned(h), call.fc2.transpose(1, 2), offs=offs)


@register_backend
class GroupedExpertsBackend(GemmExpertBackend):
    name = "grouped"
    gpu_default_rank = 0
    accepts_strided_rows = True
    takes_device_row_ends = True

    @classmethod
    def unavailable_reason(cls, local_experts, device, dtype):
        if not hasattr(torch, "_grouped_mm"):
            return f"torch {torch.__version__} has no torch._grouped_mm (needs torch >= 2.8)"
        device = torch.device(device)
        if device.type == "cuda":
            major, _ = torch.cuda.get_device_capability(device)
            if major < 9:
                return "torch._grouped_mm needs an SM90+ GPU (older GPUs take a host-syncing fallback)"
            if dtype not in CUDA_DTYPES:
                return f"torch._grouped_mm on CUDA runs bfloat16 only, not {dtype}"
        elif dtype not in CPU_DTYPES:
            return f"torch._grouped_mm on {device.type} runs float32/bfloat16/float16, not {dtype}"
        reason = gemm_unavailable_reason(local_experts, device, dtype)
        if reason is not None:
            return reason
        elem = torch.empty((), dtype=dtype).element_size()
        config = local_experts.config
        ffn = getattr(config, "moe_ffn_hidden_size", None) or getattr(config, "ffn_hidden_size")
        for name, size in (("hidden_size", config.hidden_size), ("moe_ffn_hidden_size", ffn)):
            if (size * elem) % _ALIGN_BYTES:
                return f"torch._grouped_mm needs {name}*{elem} bytes to be a multiple of 16, got {size}"
        return None

    def compute(self, call, local_experts, first_expert):
        return grouped_expert_forward(call, getattr(local_experts, "staged_int32", None))
