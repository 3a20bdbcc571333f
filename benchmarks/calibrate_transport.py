"""Calibrate each transport's link on a real multi-GPU node, next to real GEMMs.

    torchrun --standalone --nproc-per-node 2 benchmarks/calibrate_transport.py \\
        --out links.json [--base-profile P --write-profile OUT.json]

Per transport (copy_engine: the transport's own batched copy-engine copies into the peer's
symmetric buffer, one piece per local expert, then its flag; nccl: all_to_all_single):

* latency and bandwidth: a least-squares fit of t = latency + remote bytes / bandwidth over
  message sizes (medians of CUDA-event timings, slowest rank);
* overlap efficiency: a DeepSeek-V2-shaped grouped GEMM (torch._grouped_mm) alone, the transfer
  alone, both at once on two streams: eta = (t_gemm + t_comm - t_both) / min(t_gemm, t_comm),
  clipped to [0, 1] (1: the shorter fully hidden; 0: they serialize).

``--write-profile`` writes a pipeline profile: the base profile's compute and host constants
(from ``--base-profile``; they are the GPU's, not the link's) plus a ``links`` section with these
figures, which the cost model uses for the transport a layer runs on.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from calibrate_link import fit_latency_bandwidth  # noqa: E402


def timed(fn, repeats=10, warmup=3):
    times = []
    for i in range(repeats + warmup):
        dist.barrier()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end) / 1e3)
    t = torch.tensor([statistics.median(times)], dtype=torch.float64, device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--pieces", type=int, default=80, help="copies per transfer (local experts)")
    ap.add_argument("--sizes-mib", default="8,32,128,256")
    ap.add_argument("--base-profile", default=None)
    ap.add_argument("--write-profile", default=None)
    ap.add_argument("--min-gain", type=float, default=None,
                    help="auto's hysteresis in the written profile (default: the base's)")
    args = ap.parse_args(argv)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank)
    dist.init_process_group("nccl", device_id=device)
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD

    from megatron_eps.comm.copy_engine import DISPATCH_BUFFER, SymmetricPeerMemory
    from megatron_eps.comm.copy_engine_layout import RowCopies

    sizes = [int(float(s) * 2**20) for s in args.sizes_mib.split(",")]
    largest = max(sizes)
    row_bytes = 10256  # a DSV2 row (5120 bf16 + 16 bytes of routing weight)
    memory = SymmetricPeerMemory(group, device)
    memory.ensure(2 * largest + row_bytes * args.pieces, 2**20)
    buffer = memory.local(DISPATCH_BUFFER)
    peers = [r for r in range(world) if r != rank]
    sequence = [0]

    def copy_engine(nbytes, pieces=None):
        pieces = pieces or args.pieces
        rows = nbytes // row_bytes // len(peers)
        per = np.full(pieces, rows // pieces, dtype=np.int64)
        per[: rows % pieces] += 1
        start = np.cumsum(per) - per
        src = buffer[largest: largest + rows * row_bytes].view(rows, row_bytes)
        copies = RowCopies(start, start, per)

        def run():
            sequence[0] = memory.next_sequence()
            memory.copy_rows(src, [(p, DISPATCH_BUFFER, copies) for p in peers])
            for p in peers:
                memory.signal(p, 0, sequence[0])
            for p in peers:
                memory.wait(p, 0, sequence[0], torch.cuda.current_stream())
        return run, rows * row_bytes * len(peers)

    def nccl(nbytes):
        numel = nbytes // 2 // world * world
        send = torch.randn(numel, device=device, dtype=torch.bfloat16)
        recv = torch.empty_like(send)
        return (lambda: dist.all_to_all_single(recv, send)), numel * 2 * (world - 1) // world

    experts, hidden, ffn2 = 80, 5120, 3072
    gemm_rows = 65536
    x = torch.randn(gemm_rows, hidden, device=device, dtype=torch.bfloat16)
    w = torch.randn(experts, ffn2, hidden, device=device, dtype=torch.bfloat16) * 0.02
    offs = torch.cumsum(torch.full((experts,), gemm_rows // experts, device=device), 0).to(torch.int32)

    def gemm():
        torch._grouped_mm(x, w.transpose(1, 2), offs=offs)

    side = torch.cuda.Stream(device=device, priority=-1)

    def both(comm):
        def run():
            ev = torch.cuda.current_stream().record_event()
            side.wait_event(ev)
            with torch.cuda.stream(side):
                comm()
            gemm()
            torch.cuda.current_stream().wait_stream(side)
        return run

    result = {"device": torch.cuda.get_device_name(device), "world_size": world,
              "torch": torch.__version__, "nccl": ".".join(map(str, torch.cuda.nccl.version())),
              "command": " ".join(sys.argv), "pieces": args.pieces, "links": {}, "points": {}}
    t_gemm = timed(gemm)
    result["grouped_gemm_ms"] = t_gemm * 1e3
    for name, make in (("copy_engine", copy_engine), ("nccl", nccl)):
        points = []
        piece_counts = (8, args.pieces) if name == "copy_engine" else (1,)
        for pieces in piece_counts:
            for nbytes in sizes:
                run, remote = make(nbytes, pieces) if name == "copy_engine" else make(nbytes)
                points.append((remote, pieces, timed(run)))
        if name == "copy_engine":
            # t = latency + pieces * piece_time + bytes / bandwidth
            a = np.array([[1.0, p, b] for b, p, _ in points])
            t = np.array([x for _, _, x in points])
            (latency, piece, per_byte), *_ = np.linalg.lstsq(a, t, rcond=None)
            latency, piece, bandwidth = max(latency, 0.0), max(piece, 0.0), 1.0 / per_byte
        else:
            latency, bandwidth = fit_latency_bandwidth([(b, x) for b, _, x in points])
            piece = 0.0
        run, remote = make(sizes[-1])
        t_comm = timed(run)
        t_both = timed(both(run))
        # The share of the transfer's time hidden under the GEMM (the GEMM is the longer).
        eta = (t_gemm + t_comm - t_both) / min(t_gemm, t_comm)
        result["points"][name] = [{"remote_bytes": b, "pieces": p, "ms": x * 1e3} for b, p, x in points]
        result["links"][name] = {
            "link_latency_us": latency * 1e6,
            "link_bandwidth_gbps": bandwidth / 1e9,
            "link_piece_us": piece * 1e6,
            "overlap_efficiency": float(min(1.0, max(0.0, eta))),
        }
        result["points"][name + "_overlap"] = {"comm_ms": t_comm * 1e3, "both_ms": t_both * 1e3,
                                               "gemm_slowdown": t_both / t_gemm, "eta": eta}
    if rank == 0:
        from megatron_eps.calibrate.provenance import git_commit

        result["git_commit"] = git_commit()
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        for name, link in result["links"].items():
            o = result["points"][name + "_overlap"]
            print(f"{name:12} latency {link['link_latency_us']:7.1f} us  per piece "
                  f"{link['link_piece_us']:5.2f} us  bandwidth "
                  f"{link['link_bandwidth_gbps']:6.1f} GB/s  overlap eta {o['eta']:.2f} "
                  f"(GEMM {t_gemm * 1e3:.2f} ms, comm {o['comm_ms']:.2f}, both {o['both_ms']:.2f})")
        if args.write_profile:
            base = {}
            if args.base_profile:
                with open(args.base_profile) as f:
                    base = json.load(f)
            profile = {"pipeline": dict(base.get("pipeline", {})), "links": result["links"]}
            link0 = result["links"]["nccl"]
            profile["pipeline"].update(link_bandwidth_gbps=link0["link_bandwidth_gbps"],
                                       link_latency_us=link0["link_latency_us"],
                                       overlap_efficiency=link0["overlap_efficiency"])
            if args.min_gain is not None:
                profile["pipeline"]["min_gain"] = args.min_gain
            profile["provenance"] = dict(
                {k: result[k] for k in ("device", "torch", "nccl", "git_commit", "command")},
                links="measured here, per transport (calibrate_transport.py)",
                compute_and_host=f"from {args.base_profile} (not re-measured on this GPU)",
            )
            with open(args.write_profile, "w") as f:
                json.dump(profile, f, indent=2)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
