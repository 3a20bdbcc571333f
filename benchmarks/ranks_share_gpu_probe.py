"""Can two ranks on ONE GPU run the multi-rank code paths (functionally, not for speed)?

Launch: ``torchrun --standalone --nproc-per-node 2 benchmarks/ranks_share_gpu_probe.py --out F``
on a machine with one GPU. NCCL refuses two ranks on one device, so the group is gloo, whose
collectives take CUDA tensors. Checks, each reported as ok or the error it raised:

* gloo collectives on CUDA tensors: all_reduce, all_gather_into_tensor, all_to_all_single
  (uneven splits), barrier with device_ids;
* the copy-engine transport's peer memory for ranks sharing a GPU (CUDA IPC mappings; torch
  symmetric memory refuses two ranks on one device, which is reported): a batched copy into the
  peer's buffers and a flag written by one rank's stream and awaited by the other's, before and
  after the buffers grow;
* ``copy_engine_blocker`` for the group.

Timing says nothing here: the two processes time-share the GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import traceback

import numpy as np
import torch
import torch.distributed as dist


def _check(results, name, fn):
    try:
        detail = fn()
        results[name] = {"ok": True, "detail": detail}
    except Exception as exc:  # noqa: BLE001 - the probe reports every failure
        results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                         "trace": traceback.format_exc(limit=4)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="ranks_share_gpu_probe.json")
    args = parser.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(0)
    device = torch.device("cuda", 0)
    os.environ.setdefault("MEGATRON_EPS_RANKS_SHARE_GPU", "1")
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    results = {"rank": rank, "world": world, "gpus": torch.cuda.device_count(),
               "torch": torch.__version__}

    def all_reduce():
        t = torch.full((4,), float(rank + 1), device=device)
        dist.all_reduce(t)
        return t.tolist()

    def all_gather():
        out = torch.empty(world * 3, dtype=torch.int64, device=device)
        dist.all_gather_into_tensor(out, torch.full((3,), rank, dtype=torch.int64, device=device))
        return out.tolist()

    def all_to_all():
        sends = [r + rank + 1 for r in range(world)]  # uneven: rank r sends r+dst+1 rows to dst
        recvs = [rank + src + 1 for src in range(world)]
        send = torch.cat([torch.full((n, 2), 10.0 * rank + dst, device=device, dtype=torch.bfloat16)
                          for dst, n in enumerate(sends)])
        recv = torch.empty(sum(recvs), 2, device=device, dtype=torch.bfloat16)
        dist.all_to_all_single(recv, send, recvs, sends)
        expect = torch.cat([torch.full((n, 2), 10.0 * src + rank, device=device,
                                       dtype=torch.bfloat16) for src, n in enumerate(recvs)])
        assert torch.equal(recv, expect), recv
        return recvs

    def barrier():
        dist.barrier(device_ids=[0])
        return "ok"

    def blocker():
        from megatron_eps.comm.selection import copy_engine_blocker

        return copy_engine_blocker(dist.group.WORLD, device)

    def symmetric():
        """Expected to be refused (ranks on one device); reported, not required."""
        import torch.distributed._symmetric_memory as symm_mem

        buf = symm_mem.empty(1 << 20, dtype=torch.uint8, device=device)
        symm_mem.rendezvous(buf, dist.group.WORLD)
        return "accepted"

    def peer_memory():
        """The transport's PeerMemory for ranks sharing the GPU: a batched copy into the next
        rank's dispatch buffer and a flag after it, awaited by that rank's side stream."""
        from megatron_eps.comm import cuda_ops
        from megatron_eps.comm.copy_engine import DISPATCH_BUFFER, RETURN_BUFFER
        from megatron_eps.comm.selection import peer_memory_for
        from megatron_eps.comm.copy_engine_plan import RowCopies

        memory = peer_memory_for(dist.group.WORLD, device)
        kinds = []
        for size in (1 << 16, 1 << 22):  # the second grows (releases and re-maps) the buffers
            memory.ensure(size, size)
            kinds.append(type(memory).__name__)
            sequence = memory.next_sequence()
            rows = torch.full((8, 256), rank + sequence, dtype=torch.bfloat16, device=device)
            peer, source = (rank + 1) % world, (rank - 1) % world
            copies = RowCopies.nonempty(np.array([0]), np.array([8 * rank]), np.array([8]))
            comm = torch.cuda.Stream()  # as the transport: not the legacy default stream
            comm.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(comm):
                memory.copy_rows(rows, [(peer, DISPATCH_BUFFER, copies),
                                        (peer, RETURN_BUFFER, copies)])
                memory.signal(peer, 3, sequence)
            side = torch.cuda.Stream()
            memory.wait(source, 3, sequence, side)
            with torch.cuda.stream(side):
                got = [memory.local(w)[: 8 * world * 512].view(torch.bfloat16).view(-1, 256)
                       [8 * source: 8 * source + 8].clone() for w in (DISPATCH_BUFFER, RETURN_BUFFER)]
            side.synchronize()
            for g in got:
                assert bool((g == source + sequence).all()), g[:, :4]
            torch.cuda.synchronize()
            dist.barrier()
        return {"memory": kinds, "copies": cuda_ops.copy_issue_mode()}

    for name, fn in (("all_reduce", all_reduce), ("all_gather_into_tensor", all_gather),
                     ("all_to_all_single", all_to_all), ("barrier_device_ids", barrier),
                     ("copy_engine_blocker", blocker), ("peer_memory", peer_memory)):
        _check(results, name, fn)
    try:
        results["symmetric_memory"] = symmetric()
    except RuntimeError as exc:
        results["symmetric_memory"] = f"refused: {exc}"
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(gathered, f, indent=1)
        for name in gathered[0]:
            if isinstance(gathered[0][name], dict) and "ok" in gathered[0][name]:
                print(f"{name:24s}", [g[name].get("detail", g[name].get("error")) for g in gathered])
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
