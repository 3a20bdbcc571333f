"""``EPSConfig.transport`` -> a transport: auto picks copy_engine where it can work, else nccl.

``copy_engine_blocker`` answers from facts each rank has locally, without a collective, so an
explicit ``transport: copy_engine`` that cannot work fails at layer construction. The ranks then
agree at the first forward (``agree_on_copy_engine``: one all-reduce), so ``auto`` never
leaves one rank on the copy engines and another on NCCL.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Dict, Optional, Tuple

import torch

from megatron_eps.errors import EPSConfigError

logger = logging.getLogger(__name__)
_logged = set()

# Tests and functional checks on a one-GPU machine: several ranks on one device, over gloo.
# Torch symmetric memory refuses ranks on one device, so their peer buffers are CUDA IPC
# mappings instead (comm/ipc_memory.py); every copy and flag is still the copy engines'.
RANKS_SHARE_GPU_ENV = "MEGATRON_EPS_RANKS_SHARE_GPU"


def ranks_share_gpu() -> bool:
    """True when ranks may share a GPU (``MEGATRON_EPS_RANKS_SHARE_GPU=1``)."""
    return os.environ.get(RANKS_SHARE_GPU_ENV, "0") == "1"


def _group_ranks(group):
    import torch.distributed as dist

    return dist.get_process_group_ranks(group)


def copy_engine_blocker(group, device: Optional[torch.device] = None) -> Optional[str]:
    """Why the copy-engine transport cannot serve ``group`` from this rank, or None if it can."""
    if not torch.cuda.is_available():
        return "no CUDA device (the copy engines are a GPU's)"
    if device is not None and torch.device(device).type != "cuda":
        return f"the layer is on {torch.device(device)}, not on a CUDA device"
    try:
        importlib.import_module("torch.distributed._symmetric_memory")
    except ImportError as exc:
        return f"torch symmetric memory is unavailable ({exc})"
    from megatron_eps.comm import cuda_ops

    if not cuda_ops.available():
        return "cuda-bindings is not installed (pip install cuda-bindings)"
    if group is None:
        return None
    ranks = _group_ranks(group)
    local_world = os.environ.get("LOCAL_WORLD_SIZE")
    world = os.environ.get("WORLD_SIZE")
    if local_world is None or world is None:
        return (
            "cannot tell whether every rank of the expert-parallel group is on this node "
            "(LOCAL_WORLD_SIZE / WORLD_SIZE unset; launch with torchrun)"
        )
    local_world = int(local_world)
    import torch.distributed as dist

    me = dist.get_rank()
    nodes = {r // local_world for r in ranks}
    if len(nodes) > 1 or me // local_world not in nodes:
        return (
            f"the expert-parallel group (global ranks {ranks}) spans {len(nodes)} nodes of "
            f"{local_world} ranks; the copy engines reach only this node's GPUs"
        )
    mine = torch.cuda.current_device() if device is None or device.index is None else device.index
    for r in ranks:
        other = r % local_world
        if other == mine or other >= torch.cuda.device_count():
            continue
        if not torch.cuda.can_device_access_peer(mine, other):
            return f"GPU {mine} has no peer access to GPU {other} (no NVLink/PCIe P2P)"
    return None


def check_transport_setting(transport: str, group, ep_size: int) -> None:
    """Raise EPSConfigError when ``transport: copy_engine`` is asked for where it cannot work.

    Called at layer construction, before any collective. With one EP rank nothing travels, so
    every transport setting is valid there.
    """
    if transport != "copy_engine" or ep_size <= 1:
        return
    reason = copy_engine_blocker(group)
    if reason is not None:
        raise EPSConfigError(
            f"eps transport='copy_engine' cannot work here: {reason}. Allowed values: auto "
            "(copy_engine where it works, else nccl), nccl"
        )


def agree_on_copy_engine(group, device: torch.device, transport: str) -> bool:
    """At the first forward: True when every EP rank can use the copy engines (one all-reduce).

    ``transport='copy_engine'`` raises if any rank cannot; ``'auto'`` then falls back to nccl.
    """
    import torch.distributed as dist

    reason = copy_engine_blocker(group, device)
    verdict = torch.tensor([0 if reason else 1], dtype=torch.int32, device=device)
    dist.all_reduce(verdict, op=dist.ReduceOp.MIN, group=group)
    usable = bool(verdict.item())
    if not usable and transport == "copy_engine":
        raise EPSConfigError(
            "eps transport='copy_engine' cannot work on every rank of the expert-parallel "
            f"group (this rank: {reason or 'fine; another rank is not'}). Allowed values: "
            "auto, nccl"
        )
    key = (group.group_name if group is not None else None, usable)
    if key not in _logged and dist.get_rank() == 0:
        _logged.add(key)
        chosen = "copy_engine" if usable else "nccl"
        why = "" if usable else f" (copy_engine unavailable: {reason or 'on another rank'})"
        logger.info("megatron-eps: transport %s (setting %s)%s", chosen, transport, why)
    return usable


class TransportChoice:
    """The transport one layer's pipeline runs over, which the layer hands down each forward.

    The ``transport`` setting is checked at construction from local facts (an impossible
    ``copy_engine`` fails there, before any collective) and resolved at the first forward: the
    copy engines need the device and the ranks' agreement (one all-reduce), so every rank of the
    group lands on the same transport. ``use`` sets one explicitly (tests and benchmarks: e.g. an
    NCCLTransport over the single-GPU link emulator).
    """

    def __init__(self, setting: str, group, ep_size: int, check: bool = True):
        self.setting, self.group, self.ep_size = setting, group, ep_size
        if check:
            check_transport_setting(setting, group, ep_size)
        self.transport = None

    def use(self, transport) -> None:
        self.transport = transport

    def resolve(self, device: torch.device):
        if self.transport is not None:
            return self.transport
        from megatron_eps.comm.all_to_all import ProcessGroupAllToAll
        from megatron_eps.comm.nccl import NCCLTransport

        group = self.group if self.ep_size > 1 else None
        if self.ep_size > 1 and device.type == "cuda" and self.setting != "nccl":
            from megatron_eps.comm.copy_engine import CopyEngineTransport

            if agree_on_copy_engine(self.group, device, self.setting):
                self.transport = CopyEngineTransport(peer_memory_for(self.group, device))
                return self.transport
        self.transport = NCCLTransport(ProcessGroupAllToAll(group))
        return self.transport


_MEMORIES: Dict[Tuple[str, int], object] = {}


def peer_memory_for(group, device: torch.device):
    """The one SymmetricPeerMemory of an EP group in this process (layers share it: they run one
    at a time, and sharing keeps one set of buffers and one sequence of flags)."""
    from megatron_eps.comm.copy_engine import SymmetricPeerMemory
    from megatron_eps.comm.ipc_memory import IpcPeerMemory

    key = (group.group_name, device.index)
    if key not in _MEMORIES:
        if ranks_share_gpu():
            _MEMORIES[key] = IpcPeerMemory(group, device)
        else:
            _MEMORIES[key] = SymmetricPeerMemory(group, device)
    return _MEMORIES[key]
