"""Calibrate the all-to-all link of an expert-parallel group: latency and bandwidth.

    torchrun --nproc-per-node 8 benchmarks/calibrate_link.py --out link.json \
        [--merge-into megatron_eps/profiles/<gpu>.json]

Times ``all_to_all_single`` (NCCL on GPUs, gloo on CPU) for message sizes from 64 KiB to
256 MiB per rank, with warm-up and CUDA-event medians, then fits
``t(bytes) = latency + bytes_leaving_rank / bandwidth`` by least squares. "Bytes" are the rows a
rank sends to other ranks (its own share stays local), which is the quantity the cost model
(megatron_eps.policy.cost_model.predict_times) charges the link for. With ``--merge-into`` the fitted
``link_bandwidth_gbps`` and ``link_latency_us`` replace those keys of an existing pipeline
profile, keeping its measured chunk overhead and expert throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--merge-into", default=None, help="pipeline profile JSON to update")
    parser.add_argument("--min-kib", type=int, default=64)
    parser.add_argument("--max-mib", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    return parser.parse_args(argv)


def fit_latency_bandwidth(points):
    """Least-squares fit of t = a + b * x over (x bytes, t seconds); returns (a s, 1/b B/s)."""
    n = len(points)
    if n < 2:
        raise ValueError("need at least two message sizes to fit latency and bandwidth")
    mean_x = sum(x for x, _ in points) / n
    mean_t = sum(t for _, t in points) / n
    var_x = sum((x - mean_x) ** 2 for x, _ in points)
    cov = sum((x - mean_x) * (t - mean_t) for x, t in points)
    slope = cov / var_x
    intercept = mean_t - slope * mean_x
    if slope <= 0:
        raise ValueError(f"non-positive time per byte ({slope}); timings too noisy to fit")
    return max(intercept, 0.0), 1.0 / slope


def time_all_to_all(numel_per_peer: int, world: int, device, repeats: int, warmup: int):
    send = torch.randn(numel_per_peer * world, device=device, dtype=torch.float32)
    recv = torch.empty_like(send)
    for _ in range(warmup):
        dist.all_to_all_single(recv, send)
    times = []
    for _ in range(repeats):
        dist.barrier()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dist.all_to_all_single(recv, send)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            dist.all_to_all_single(recv, send)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    args = parse_args(argv)
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if world < 2:
        raise SystemExit("calibrate_link.py needs >= 2 ranks (torchrun --nproc-per-node N)")
    device = torch.device("cuda") if use_cuda else torch.device("cpu")
    sizes = []
    size = args.min_kib * 1024
    while size <= args.max_mib * 1024 * 1024:
        sizes.append(size)
        size *= 4
    rows = []
    for total_bytes in sizes:
        numel_per_peer = max(1, total_bytes // (4 * world))
        seconds = time_all_to_all(numel_per_peer, world, device, args.repeats, args.warmup)
        # Every rank's worst time decides when the exchange is over.
        worst = torch.tensor([seconds], dtype=torch.float64, device=device)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        remote_bytes = numel_per_peer * 4 * (world - 1)
        rows.append({"bytes_per_rank": numel_per_peer * 4 * world, "remote_bytes": remote_bytes,
                     "seconds": worst.item()})
    latency, bandwidth = fit_latency_bandwidth([(r["remote_bytes"], r["seconds"]) for r in rows])
    if rank == 0:
        from megatron_eps.calibrate.provenance import git_commit

        commit = git_commit()
        result = {
            "what": "all_to_all_single latency/bandwidth fit (t = latency + remote_bytes / bw)",
            "device": torch.cuda.get_device_name(0) if use_cuda else "cpu",
            "backend": dist.get_backend(),
            "world_size": world,
            "torch": torch.__version__,
            "command": " ".join(sys.argv),
            "git_commit": commit,
            "points": rows,
            "link_latency_us": latency * 1e6,
            "link_bandwidth_gbps": bandwidth / 1e9,
        }
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"{'bytes/rank':>12} {'remote bytes':>13} {'median ms':>10}")
        for r in rows:
            print(f"{r['bytes_per_rank']:>12} {r['remote_bytes']:>13} {r['seconds'] * 1e3:>10.3f}")
        print(f"fit: latency {latency * 1e6:.1f} us, bandwidth {bandwidth / 1e9:.1f} GB/s")
        if args.merge_into:
            with open(args.merge_into) as f:
                profile = json.load(f)
            section = profile.setdefault("pipeline", profile)
            section["link_bandwidth_gbps"] = bandwidth / 1e9
            section["link_latency_us"] = latency * 1e6
            section["link_source"] = f"calibrate_link.py, {world} ranks, {result['device']}"
            with open(args.merge_into, "w") as f:
                json.dump(profile, f, indent=2)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
