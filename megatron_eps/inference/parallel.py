"""The process group and Megatron's model-parallel state of one process: what the commands
(megatron-eps-calibrate, megatron-eps-prefill) set up, and what the test harness uses too.

The default process group is NCCL on GPUs and gloo on CPU or where ranks share a GPU
(``MEGATRON_EPS_RANKS_SHARE_GPU=1``: NCCL refuses two ranks on one device). On CPU the shims
(``cpu_shims``) let Megatron's MoE layer run.
"""

from __future__ import annotations

import datetime
import os
import socket
from typing import Dict, Optional

import torch
import torch.distributed as dist

from megatron_eps.comm.selection import ranks_share_gpu
from megatron_eps.inference.cpu_shims import install_cpu_shims


def process_group_backend(use_cuda: bool) -> str:
    """NCCL on GPUs, gloo on CPU or where ranks share a GPU."""
    return "nccl" if use_cuda and not ranks_share_gpu() else "gloo"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def initialize_distributed(timeout_s: int = 300, use_cuda: Optional[bool] = None) -> Dict[str, int]:
    """The default process group from the environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR/PORT as torchrun sets them; without them a world of one on a free port), with
    this rank's GPU selected (``use_cuda``, default: where CUDA is available) or the CPU shims
    installed. Returns rank, world_size and local_rank."""
    use_cuda = torch.cuda.is_available() if use_cuda is None else use_cuda
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.setdefault("RANK", os.environ.get("LOCAL_RANK", "0"))
        os.environ.setdefault("WORLD_SIZE", "1")
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        # A world of one owns its port; ranks of a larger world must agree on one.
        os.environ["MASTER_PORT"] = str(_free_port() if world_size == 1 else 29500)
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    else:
        install_cpu_shims(force=torch.cuda.is_available())
    if not dist.is_initialized():
        backend = process_group_backend(use_cuda)
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
    return {"rank": rank, "world_size": world_size, "local_rank": local_rank}


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


def seed_model_parallel(seed: int, on_cuda: Optional[bool] = None) -> None:
    """Seed torch and Megatron's model-parallel RNG tracker for a model on the GPU (``on_cuda``,
    default: where CUDA is available) or on the CPU. On GPUs the regular tracker gives each EP
    rank its own expert weights; on the CPU the inference tracker (no CUDA RNG) is the one that
    works."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    on_cuda = torch.cuda.is_available() if on_cuda is None else on_cuda
    torch.manual_seed(seed)
    if on_cuda:
        torch.cuda.manual_seed_all(seed)
        model_parallel_cuda_manual_seed(seed)
    else:
        model_parallel_cuda_manual_seed(seed, inference_rng_tracker=True)
