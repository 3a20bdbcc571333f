"""Each transport's link on a real multi-GPU node, next to real GEMMs.

Per transport (copy_engine: the transport's own batched copy-engine copies into the peer's
symmetric buffer, one piece per local expert, then its flag; nccl: all_to_all_single):

* latency and bandwidth: a least-squares fit of t = latency + remote bytes / bandwidth over
  message sizes (the slowest rank's median), and for the copy engines the time of each piece;
* overlap efficiency: a DeepSeek-V2-shaped grouped GEMM (torch._grouped_mm) alone, the transfer
  alone, both at once on two streams: eta = (t_gemm + t_comm - t_both) / min(t_gemm, t_comm),
  clipped to [0, 1] (1: the shorter fully hidden; 0: they serialize).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from megatron_eps.timing import fit_latency_bandwidth, median_seconds

# A DSV2 row: 5120 bf16 values plus 16 bytes of routing weight.
ROW_BYTES = 10256
DEFAULT_SIZES_MIB = (8, 32, 128, 256)


def measure_transports(device, group, pieces: int = 80, sizes_mib=DEFAULT_SIZES_MIB) -> dict:
    """``{"links": {transport: figures}, "points": {...}}`` over the ranks of ``group``."""
    from megatron_eps.comm.copy_engine import DISPATCH_BUFFER, SymmetricPeerMemory
    from megatron_eps.comm.copy_engine_plan import RowCopies

    rank, world = dist.get_rank(group), dist.get_world_size(group)

    def timed(fn):
        return median_seconds(fn, device, repeats=10, warmup=3, group=group)

    sizes = [int(float(s) * 2**20) for s in sizes_mib]
    largest = max(sizes)
    memory = SymmetricPeerMemory(group, device)
    memory.ensure(2 * largest + ROW_BYTES * pieces, 2**20)
    buffer = memory.local(DISPATCH_BUFFER)
    peers = [r for r in range(world) if r != rank]

    def copy_engine(nbytes, num_pieces=None):
        num_pieces = num_pieces or pieces
        rows = nbytes // ROW_BYTES // len(peers)
        per = np.full(num_pieces, rows // num_pieces, dtype=np.int64)
        per[: rows % num_pieces] += 1
        start = np.cumsum(per) - per
        src = buffer[largest: largest + rows * ROW_BYTES].view(rows, ROW_BYTES)
        copies = RowCopies(start, start, per)

        def run():
            sequence = memory.next_sequence()
            memory.copy_rows(src, [(p, DISPATCH_BUFFER, copies) for p in peers])
            for p in peers:
                memory.signal(p, 0, sequence)
            for p in peers:
                memory.wait(p, 0, sequence, torch.cuda.current_stream())
        return run, rows * ROW_BYTES * len(peers)

    def nccl(nbytes, num_pieces=None):
        numel = nbytes // 2 // world * world
        send = torch.randn(numel, device=device, dtype=torch.bfloat16)
        recv = torch.empty_like(send)
        return (lambda: dist.all_to_all_single(recv, send, group=group)), numel * 2 * (world - 1) // world

    experts, hidden, ffn2 = 80, 5120, 3072
    gemm_rows = 65536
    x = torch.randn(gemm_rows, hidden, device=device, dtype=torch.bfloat16)
    w = torch.randn(experts, ffn2, hidden, device=device, dtype=torch.bfloat16) * 0.02
    offs = torch.cumsum(torch.full((experts,), gemm_rows // experts, device=device), 0).to(torch.int32)

    def gemm():
        torch._grouped_mm(x, w.transpose(1, 2), offs=offs)

    side = torch.cuda.Stream(device=device, priority=-1)

    def beside_gemm(comm):
        def run():
            side.wait_event(torch.cuda.current_stream().record_event())
            with torch.cuda.stream(side):
                comm()
            gemm()
            torch.cuda.current_stream().wait_stream(side)
        return run

    result = {"links": {}, "points": {}}
    t_gemm = timed(gemm)
    result["points"]["grouped_gemm_ms"] = t_gemm * 1e3
    for name, make in (("copy_engine", copy_engine), ("nccl", nccl)):
        points = []
        for num_pieces in ((8, pieces) if name == "copy_engine" else (1,)):
            for nbytes in sizes:
                run, remote = make(nbytes, num_pieces)
                points.append((remote, num_pieces, timed(run)))
        if name == "copy_engine":
            # t = latency + pieces * piece_time + bytes / bandwidth
            a = np.array([[1.0, p, b] for b, p, _ in points])
            t = np.array([s for _, _, s in points])
            (latency, piece, per_byte), *_ = np.linalg.lstsq(a, t, rcond=None)
            latency, piece, bandwidth = max(latency, 0.0), max(piece, 0.0), 1.0 / per_byte
        else:
            latency, bandwidth = fit_latency_bandwidth([(b, s) for b, _, s in points])
            piece = 0.0
        run, _ = make(sizes[-1])
        t_comm = timed(run)
        t_both = timed(beside_gemm(run))
        eta = (t_gemm + t_comm - t_both) / min(t_gemm, t_comm)
        result["points"][name] = [{"remote_bytes": b, "pieces": p, "ms": s * 1e3} for b, p, s in points]
        result["links"][name] = {
            "link_latency_us": latency * 1e6,
            "link_bandwidth_gbps": bandwidth / 1e9,
            "link_piece_us": piece * 1e6,
            "overlap_efficiency": float(min(1.0, max(0.0, eta))),
        }
        result["points"][name + "_overlap"] = {"comm_ms": t_comm * 1e3, "both_ms": t_both * 1e3,
                                               "gemm_slowdown": t_both / t_gemm, "eta": eta}
    return result
