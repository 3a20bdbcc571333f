"""Test support beside the commands: a Megatron-style harness that runs a function on N ranks,
and (from ``inference``) the CPU shims for Megatron's torch.cuda calls and small MoE layers."""

from megatron_eps.inference.cpu_shims import install_cpu_shims
from megatron_eps.testing.distributed import (
    RankFailed,
    Utils,
    run_distributed,
    skip_unless_ranks_fit,
)

__all__ = ["install_cpu_shims", "Utils", "run_distributed", "RankFailed", "skip_unless_ranks_fit"]
