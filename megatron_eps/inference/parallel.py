"""The process group and Megatron's model-parallel state of one process: what the commands
(megatron-eps-calibrate, megatron-eps-prefill) set up, and what the test harness uses too.

The default process group is NCCL on GPUs and gloo on CPU or where ranks share a GPU
(``MEGATRON_EPS_RANKS_SHARE_GPU=1``: NCCL refuses two ranks on one device). On CPU the shims
(``cpu_shims``) let Megatron's MoE layer run.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from megatron_eps.comm.selection import ranks_share_gpu
from megatron_eps.inference.cpu_shims import install_cpu_shims


def process_group_backend(use_cuda: bool) -> str:
    """NCCL on GPUs, gloo on CPU or where ranks share a GPU."""
    return "nccl" if use_cuda and not ranks_share_gpu() else "gloo"


def initialize_distributed(timeout_s: int = 300) -> None:
    """The default process group from the environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT;
    a world of one without them), with this rank's GPU selected or the CPU shims installed."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    if not torch.cuda.is_available():
        install_cpu_shims()
    else:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29511")
        backend = process_group_backend(torch.cuda.is_available())
        kwargs = {}
        if backend == "nccl":
            kwargs["device_id"] = torch.device("cuda", torch.cuda.current_device())
        dist.init_process_group(
            backend=backend,
            world_size=world_size,
            rank=rank,
            timeout=datetime.timedelta(seconds=timeout_s),
            **kwargs,
        )


def initialize_model_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    expert_model_parallel_size: int = 1,
    expert_tensor_parallel_size: int = 1,
    **kwargs,
) -> None:
    """Megatron's parallel state over the default process group (made here if missing)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    initialize_distributed()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        expert_model_parallel_size=expert_model_parallel_size,
        expert_tensor_parallel_size=expert_tensor_parallel_size,
        **kwargs,
    )


def seed_model_parallel(seed: int) -> None:
    """Seed torch and Megatron's model-parallel RNG tracker (works on CPU too)."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
        model_parallel_cuda_manual_seed(seed)
    else:
        # The inference tracker keeps Megatron's RNG bookkeeping off torch.cuda.
        model_parallel_cuda_manual_seed(seed, inference_rng_tracker=True)
