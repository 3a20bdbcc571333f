"""The expert MLP's activation, as Megatron computes it, for the GEMM backends.

Megatron's MLP.forward (unfused path) does, between fc1 and fc2:

    x_glu, x_lin = chunk(fc1_out, 2, -1)              # gated_linear_unit only
    x_glu = x_glu.clamp(max=c); x_lin = x_lin.clamp(-c, c)   # activation_func_clamp_value c
    h = act(x_glu) * (x_lin + glu_linear_offset)      # or act(fc1_out) when not gated
    h = (h * probs[:, None]).to(fc1_out.dtype)        # per_token_scale

``ActivationSpec`` captures those settings once from the TransformerConfig so the backends never
read the config on the hot path. ``apply`` runs that math with torch ops (bit-identical to
Megatron's unfused path on CPU); on CUDA, when Triton is importable and the activation is one the
fused kernel knows, it runs one fused kernel instead (one read of fc1_out, one write of h, fp32
math, one rounding), which removes 4-5 elementwise passes over [M, 2F].
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
import torch.nn.functional as F

# Activation kinds the fused Triton epilogues implement (value = the kernel's ACT constexpr).
ACT_NONE, ACT_SILU, ACT_GELU, ACT_RELU, ACT_SQUARED_RELU, ACT_QUICK_GELU = range(6)


def _known_activations():
    """Map Megatron's activation callables to the fused kernels' ACT codes (by identity)."""
    known = {F.silu: ACT_SILU, F.gelu: ACT_GELU, F.relu: ACT_RELU, torch.relu: ACT_RELU}
    try:  # both names exist in 0.16 and 0.19; import lazily so this module stays Megatron-free
        from megatron.core.activations import quick_gelu, squared_relu

        known[squared_relu] = ACT_SQUARED_RELU
        known[quick_gelu] = ACT_QUICK_GELU
    except ImportError:
        pass
    try:
        from megatron.core.fusions.fused_bias_geglu import quick_gelu as fused_quick_gelu

        known[fused_quick_gelu] = ACT_QUICK_GELU
    except ImportError:
        pass
    return known


@dataclasses.dataclass(frozen=True)
class ActivationSpec:
    """The activation settings of Megatron's expert MLP that the GEMM backends must honour."""

    gated: bool
    fn: Callable[[torch.Tensor], torch.Tensor]
    clamp: Optional[float] = None
    glu_offset: float = 0.0
    probs_on_input: bool = False
    # ACT_* code for the fused Triton kernels, or None when the callable is not one we know.
    fused_code: Optional[int] = None

    @classmethod
    def from_config(cls, config) -> "ActivationSpec":
        reason = unsupported_config_reason(config)
        if reason is not None:
            raise ValueError(reason)
        fn = config.activation_func
        return cls(
            gated=bool(config.gated_linear_unit),
            fn=fn,
            clamp=getattr(config, "activation_func_clamp_value", None),
            glu_offset=float(getattr(config, "glu_linear_offset", 0.0) or 0.0),
            probs_on_input=bool(getattr(config, "moe_apply_probs_on_input", False)),
            fused_code=_known_activations().get(fn),
        )

    @classmethod
    def swiglu(cls, probs_on_input: bool = False) -> "ActivationSpec":
        """SwiGLU, the activation of DeepSeek-V2/V3, Mixtral, Qwen-MoE (used by benchmarks)."""
        return cls(gated=True, fn=F.silu, probs_on_input=probs_on_input, fused_code=ACT_SILU)

    # ---------------------------------------------------------------- math
    def apply_torch(self, fc1_out: torch.Tensor, probs: Optional[torch.Tensor]) -> torch.Tensor:
        """Megatron's unfused activation path, op for op (so rounding matches on CPU)."""
        if self.gated:
            x_glu, x_lin = torch.chunk(fc1_out, 2, dim=-1)
            if self.clamp is not None:
                x_glu = x_glu.clamp(min=None, max=self.clamp)
                x_lin = x_lin.clamp(min=-self.clamp, max=self.clamp)
            if self.glu_offset != 0.0:
                x_lin = x_lin + self.glu_offset
            h = self.fn(x_glu) * x_lin
        else:
            h = self.fn(fc1_out)
        if probs is not None:
            h = (h * probs.unsqueeze(-1)).to(fc1_out.dtype)
        return h

    def apply(self, fc1_out: torch.Tensor, probs: Optional[torch.Tensor]) -> torch.Tensor:
        """Activation (+ probs) of fc1's output: fused Triton kernel on CUDA when possible."""
        if fused_activation_enabled(fc1_out, self):
            from megatron_eps.experts.triton_kernels import fused_activation

            return fused_activation(fc1_out, probs, self)
        return self.apply_torch(fc1_out, probs)


def fused_activation_enabled(fc1_out: torch.Tensor, spec: ActivationSpec) -> bool:
    if not (fc1_out.is_cuda and spec.fused_code is not None):
        return False
    from megatron_eps.experts.triton_kernels import triton_available

    return triton_available()


def unsupported_config_reason(config) -> Optional[str]:
    """Why the GEMM backends cannot reproduce this expert MLP config, or None if they can."""
    if getattr(config, "add_bias_linear", False):
        return (
            "experts with biases (add_bias_linear=True) are not supported by the GEMM expert "
            "kernels; set expert_kernel='megatron' or build the model with add_bias_linear=False"
        )
    if getattr(config, "use_te_activation_func", False):
        return (
            "use_te_activation_func=True (a Transformer Engine activation module) is not "
            "supported by the GEMM expert kernels; set expert_kernel='megatron'"
        )
    if getattr(config, "fp8", None) or getattr(config, "fp4", None):
        return "fp8/fp4 experts are not supported by the GEMM expert kernels; use 'megatron'"
    if (getattr(config, "expert_tensor_parallel_size", 1) or 1) > 1:
        return (
            "expert tensor parallelism (expert_tensor_parallel_size > 1) needs Megatron's "
            "row-parallel all-reduce; set expert_kernel='megatron'"
        )
    if getattr(config, "moe_latent_size", None) is not None:
        return "moe_latent_size experts are not supported by the GEMM expert kernels"
    if not callable(getattr(config, "activation_func", None)):
        return "the config has no callable activation_func"
    return None
