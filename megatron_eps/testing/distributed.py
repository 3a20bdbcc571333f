"""Megatron-style test harness: model-parallel setup per rank, and a launcher for N ranks.

``Utils`` mirrors Megatron-LM's tests/unit_tests/test_utilities.py: it reads the rank from the
environment, creates the default process group (NCCL on GPUs, gloo on CPU), and initializes or
destroys Megatron's parallel state. ``run_distributed(fn, world_size)`` starts ``world_size``
processes from inside one pytest process (so CI needs no torchrun) and re-raises the first
rank failure with its traceback.

With ``MEGATRON_EPS_RANKS_SHARE_GPU=1`` several ranks run on one GPU over gloo (whose
collectives take CUDA tensors; NCCL refuses two ranks on one device). That checks the
multi-rank GPU paths, copy-engine transport included, on a one-GPU machine. Its timings say
nothing: the processes time-share the GPU and gloo stages every collective through the host.
"""

from __future__ import annotations

import os
import socket
import sys
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_eps.comm.selection import ranks_share_gpu
from megatron_eps.inference.parallel import (initialize_distributed, initialize_model_parallel,
                                             process_group_backend, seed_model_parallel)


def skip_unless_ranks_fit(world_size: int) -> None:
    """pytest.skip when ranks would share a GPU (NCCL refuses two ranks on one device); on CPU
    (gloo) any world size runs, and on GPUs too where ranks may share one."""
    if (torch.cuda.is_available() and torch.cuda.device_count() < world_size
            and not ranks_share_gpu()):
        import pytest

        pytest.skip(f"needs {world_size} GPUs (NCCL ranks cannot share one)")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Utils:
    """Per-rank model-parallel setup in the style of Megatron's test Utils
    (``inference.parallel`` does the work)."""

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    inited = False

    @staticmethod
    def backend() -> str:
        return process_group_backend(torch.cuda.is_available())

    @staticmethod
    def initialize_distributed(timeout_s: int = 300):
        Utils.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        Utils.rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
        initialize_distributed(timeout_s)
        Utils.inited = True

    @staticmethod
    def initialize_model_parallel(*args, **kwargs):
        initialize_model_parallel(*args, **kwargs)

    @staticmethod
    def destroy_model_parallel():
        from megatron.core import parallel_state

        if dist.is_initialized():
            dist.barrier()
        parallel_state.destroy_model_parallel()

    @staticmethod
    def set_seed(seed: int):
        seed_model_parallel(seed)


def _worker(local_rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue):
    os.environ.update(
        {
            "RANK": str(local_rank),
            "LOCAL_RANK": str(local_rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),  # one node, as torchrun --standalone
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    torch.set_num_threads(1)
    try:
        Utils.initialize_distributed()
        result = fn(*args)
        queue.put((local_rank, "ok", result))
    except BaseException:  # noqa: BLE001 - the parent re-raises with this traceback
        queue.put((local_rank, "error", traceback.format_exc()))
        # Leave without waiting for peers that may be blocked in a collective.
        os._exit(1)
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass


class RankFailed(RuntimeError):
    pass


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout_s: float = 600) -> list:
    """Run ``fn(*args)`` on ``world_size`` fresh processes; return the per-rank results.

    ``fn`` must be importable (a module-level function). A failing rank raises RankFailed with
    its traceback; a hang is ended after ``timeout_s``. Where the ranks would share a GPU (NCCL
    refuses that) the calling test is skipped, or outside pytest a RankFailed says so.
    """
    if (torch.cuda.is_available() and torch.cuda.device_count() < world_size
            and not ranks_share_gpu()):
        if "pytest" in sys.modules:
            skip_unless_ranks_fit(world_size)
        raise RankFailed(f"{world_size} ranks need {world_size} GPUs here, found "
                         f"{torch.cuda.device_count()} (NCCL ranks cannot share one)")
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: list = [None] * world_size
    errors = []
    import time

    deadline = time.monotonic() + timeout_s
    received = 0
    while received < world_size:
        if not queue.empty():
            rank, status, payload = queue.get()
            received += 1
            if status == "ok":
                results[rank] = payload
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
                break
        elif time.monotonic() > deadline:
            errors.append(f"timed out after {timeout_s}s waiting for ranks")
            break
        elif all(not p.is_alive() for p in procs) and queue.empty():
            errors.append("all ranks exited without reporting")
            break
        else:
            time.sleep(0.02)
    if errors:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(timeout=5)
        raise RankFailed("\n".join(errors))
    for p in procs:
        p.join(timeout=30)
    return results
