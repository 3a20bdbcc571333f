"""IpcPeerMemory: the copy-engine transport's peer buffers as CUDA IPC mappings.

For ranks that share one GPU (``MEGATRON_EPS_RANKS_SHARE_GPU=1``, a one-GPU machine checking
the multi-rank paths): torch symmetric memory refuses two ranks on one device. Everything but
the allocation is ``SymmetricPeerMemory``'s: the same batched copy-engine copies into the peers'
buffers, the same flags written and awaited by stream memory operations, between processes.
Timings mean nothing there (the processes time-share the GPU).
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from megatron_eps.comm.copy_engine import SymmetricPeerMemory


class _DeviceBytes:
    """``nbytes`` of device memory at ``address``, for ``torch.as_tensor`` (no copy)."""

    def __init__(self, address: int, nbytes: int):
        self.__cuda_array_interface__ = {
            "shape": (nbytes,), "typestr": "|u1", "data": (address, False), "version": 3,
            "strides": None,
        }


class IpcPeerMemory(SymmetricPeerMemory):
    """``SymmetricPeerMemory`` whose buffers are ``cudaMalloc`` allocations that the peers open
    through IPC handles (exchanged with one all-gather over the EP group)."""

    def __init__(self, group, device: torch.device):
        # this rank's buffer address -> (its cudaMalloc address, every rank's address of it)
        self._mappings: Dict[int, Tuple[int, List[int]]] = {}
        super().__init__(group, device)

    def _allocate(self, nbytes: int) -> Tuple[torch.Tensor, List[int]]:
        ops = self._ops
        mine = ops.device_malloc(nbytes)
        handles = [None] * self.ep_size
        self._dist.all_gather_object(handles, ops.ipc_export(mine), group=self.group)
        pointers = [mine if r == self.ep_rank else ops.ipc_open(h) for r, h in enumerate(handles)]
        tensor = torch.as_tensor(_DeviceBytes(mine, nbytes), device=self.device)
        self._mappings[tensor.data_ptr()] = (mine, pointers)
        return tensor, pointers

    def _release(self, which: str) -> None:
        tensor = self._buffers.pop(which, None)
        if tensor is None:
            return
        mine, pointers = self._mappings.pop(tensor.data_ptr())
        for rank, address in enumerate(pointers):
            if rank != self.ep_rank:
                self._ops.ipc_close(address)
        # A peer frees its buffer only after every rank closed its mapping of it.
        self._dist.barrier(group=self.group)
        self._ops.device_free(mine)
