"""Can two ranks on ONE GPU run the multi-rank code paths (functionally, not for speed)?

Launch: ``torchrun --standalone --nproc-per-node 2 benchmarks/ranks_share_gpu_probe.py --out F``
on a machine with one GPU. NCCL refuses two ranks on one device, so the group is gloo, whose
collectives take CUDA tensors. Checks, each reported as ok or the error it raised:

* gloo collectives on CUDA tensors: all_reduce, all_gather_into_tensor, all_to_all_single
  (uneven splits), barrier with device_ids;
* torch symmetric memory over the gloo group: allocation, rendezvous, peer pointers;
* the copy-engine transport's CUDA calls between the two processes: a batched copy into the
  peer's buffer, a flag written by one rank's stream and awaited by the other's;
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

    state = {}

    def symmetric():
        import torch.distributed._symmetric_memory as symm_mem

        buf = symm_mem.empty(1 << 20, dtype=torch.uint8, device=device)
        handle = symm_mem.rendezvous(buf, dist.group.WORLD)
        ptrs = [int(p) for p in handle.buffer_ptrs]
        state["buf"], state["handle"], state["ptrs"] = buf, handle, ptrs
        return {"ptrs_distinct": len(set(ptrs)) == world, "own_matches": ptrs[rank] == buf.data_ptr()}

    def copy_and_flag():
        from megatron_eps.comm import cuda_ops

        buf, ptrs = state["buf"], state["ptrs"]
        buf.zero_()
        torch.cuda.synchronize()
        dist.barrier()
        peer = (rank + 1) % world
        payload = torch.full((4096,), rank + 7, dtype=torch.uint8, device=device)
        stream = torch.cuda.current_stream().cuda_stream
        # Rows at offset 4096 * rank of the peer's buffer; the flag is the last word of it.
        cuda_ops.memcpy_batch(np.array([ptrs[peer] + 4096 * rank]), np.array([payload.data_ptr()]),
                              np.array([4096]), stream)
        flag_offset = (1 << 20) - 4 * (rank + 1)
        cuda_ops.stream_write_u32(stream, ptrs[peer] + flag_offset, 5)
        source = (rank - 1) % world
        side = torch.cuda.Stream()
        cuda_ops.stream_wait_geq_u32(side.cuda_stream, buf.data_ptr() + (1 << 20) - 4 * (source + 1), 5)
        with torch.cuda.stream(side):
            got = buf[4096 * source: 4096 * (source + 1)].clone()
        side.synchronize()
        assert bool((got == source + 7).all()), got[:8]
        return {"copy_batched": cuda_ops.batch_copies_in_use()}

    for name, fn in (("all_reduce", all_reduce), ("all_gather_into_tensor", all_gather),
                     ("all_to_all_single", all_to_all), ("barrier_device_ids", barrier),
                     ("copy_engine_blocker", blocker), ("symmetric_memory", symmetric),
                     ("copy_and_flag", copy_and_flag)):
        if name == "copy_and_flag" and not results.get("symmetric_memory", {}).get("ok"):
            continue
        _check(results, name, fn)
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
