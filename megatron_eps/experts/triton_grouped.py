"""``triton`` backend: megatron-eps' own load-aware grouped GEMM (see triton_kernels.py).

fc1 runs with the activation and the routing probs fused into its epilogue (the [M, 2F] fc1
output is never written), fc2 writes straight into the output. Tile shapes are chosen from the
host-side row counts per call; the persistent tile scheduler keeps every SM busy under skew.
The kernels read the same int32 row offsets as torch._grouped_mm (staged by the layer once per
forward), so a call costs the host no per-call table and no copy.
"""

from __future__ import annotations

import torch

from megatron_eps.experts import triton_kernels as tk
from megatron_eps.experts.base import register_backend
from megatron_eps.experts.gemm_common import (
    DeviceRowEnds,
    ExpertCall,
    GemmExpertBackend,
    expert_offsets,
    gemm_unavailable_reason,
)

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def triton_expert_forward(call: ExpertCall, staged_offsets=None) -> torch.Tensor:
    """Our grouped GEMM kernel, activation fused into the first (a call with at least one row).
    ``staged_offsets``: offsets already on the device (gemm_common.stage_int32_batch)."""
    counts, spec = call.counts, call.weights.activation
    hidden = call.hidden if call.hidden.stride(1) == 1 else call.hidden.contiguous()
    out = hidden.new_empty(hidden.shape)
    offs = expert_offsets(counts, hidden.device, staged_offsets)
    on_device = isinstance(counts, DeviceRowEnds)
    if on_device:
        # Only the total is known here: tiles chosen for an even load, the grid sized for the
        # most m-tiles any split can take; the kernel counts the real ones from offs.
        n, rows = len(counts), counts.num_rows
        even = [rows // n + (1 if e < rows % n else 0) for e in range(n)]
        cfg1, cfg2 = tk.choose_configs(even, hidden.shape[1], call.fc2.shape[2], spec.gated)
        m_tiles1 = tk.m_tile_bound(rows, n, cfg1.block_m)
        m_tiles2 = tk.m_tile_bound(rows, n, cfg2.block_m)
    else:
        cfg1, cfg2 = tk.choose_configs(counts, hidden.shape[1], call.fc2.shape[2], spec.gated)
        m_tiles1 = tk.count_m_tiles(counts, cfg1.block_m)
        m_tiles2 = (m_tiles1 if cfg2.block_m == cfg1.block_m
                    else tk.count_m_tiles(counts, cfg2.block_m))
    if spec.fused_code is not None:
        h = tk.expert_gemm(
            hidden,
            call.fc1,
            offs,
            m_tiles1,
            cfg1,
            gated=spec.gated,
            act_code=spec.fused_code,
            probs=call.probs,
            clamp=spec.clamp,
            glu_offset=spec.glu_offset,
            tiles_on_device=on_device,
        )
    else:
        # An activation callable the kernel does not know: plain GEMM, then Megatron's math.
        fc1_out = tk.expert_gemm(hidden, call.fc1, offs, m_tiles1, cfg1,
                                 tiles_on_device=on_device)
        h = spec.apply_torch(fc1_out, call.probs)
    return tk.expert_gemm(h, call.fc2, offs, m_tiles2, cfg2, out=out, tiles_on_device=on_device)


@register_backend
class TritonExpertsBackend(GemmExpertBackend):
    name = "triton"
    gpu_default_rank = 1
    takes_device_row_ends = True

    @classmethod
    def unavailable_reason(cls, local_experts, device, dtype):
        reason = tk.triton_unavailable_reason()
        if reason is not None:
            return reason
        device = torch.device(device)
        if device.type != "cuda" and not tk.interpreter_active():
            return "the triton expert kernel needs a CUDA GPU (or TRITON_INTERPRET=1 for tests)"
        if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 8:
            return "the triton expert kernel needs an SM80+ GPU (bf16 tensor cores)"
        if dtype not in SUPPORTED_DTYPES:
            return f"the triton expert kernel runs bfloat16/float16/float32, not {dtype}"
        return gemm_unavailable_reason(local_experts, device, dtype)

    def compute(self, call, local_experts, first_expert):
        return triton_expert_forward(call, getattr(local_experts, "staged_int32", None))

    def compile_in_background(self, local_experts, hidden, tokens_per_expert, probs, first_expert):
        """The forward once with its GEMM launches turned into background compilations (a
        first compile of the GEMM kernels takes about a second; the other backends' only Triton
        kernel, the activation, compiles in a fraction of that and is not deferred)."""
        if not hidden.is_cuda:
            return None
        from megatron_eps.triton_launch import compile_in_background

        with compile_in_background() as started:
            if started is None:
                return None
            self.forward(local_experts, hidden, tokens_per_expert, probs, first_expert)
        return started if started.kernels else None
