"""Test support: CPU shims for Megatron's torch.cuda calls, and a Megatron-style harness."""

from megatron_eps.testing.cpu_shims import install_cpu_shims
from megatron_eps.testing.distributed import (
    RankFailed,
    Utils,
    run_distributed,
    skip_unless_ranks_fit,
)

__all__ = ["install_cpu_shims", "Utils", "run_distributed", "RankFailed"]
