"""Where one expert call's time goes, per backend: host time per call against GPU kernel time
per call (torch.profiler), to tell a launch-bound point from a GPU-bound one (GPU).

    python benchmarks/trace_expert_point.py --shape dsv2_ep8 --load 8 --skew 1.0 --out trace.json

Prints one line per backend: wall time per call with calls issued back to back (what
bench_experts.py measures), the host's issue time per call, and the sum of the GPU kernels per
call with the kernels named. Writes the summary as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def trace_backend(name, experts, counts, x, probs, device, calls: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from megatron_eps.experts.base import get_backend

    backend = get_backend(name)
    with torch.no_grad():
        for _ in range(5):
            backend.forward(experts, x, counts, probs, 0)
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            backend.forward(experts, x, counts, probs, 0)
        issued = time.perf_counter() - start
        torch.cuda.synchronize(device)
        wall = time.perf_counter() - start
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                backend.forward(experts, x, counts, probs, 0)
            torch.cuda.synchronize(device)
    kernels = {}
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if device_us and event.key and not event.key.startswith(("cuda", "aten::", "Memcpy")):
            kernels[event.key[:60]] = device_us / calls
    return {"backend": name, "wall_us_per_call": 1e6 * wall / calls,
            "host_issue_us_per_call": 1e6 * issued / calls,
            "gpu_kernel_us_per_call": sum(kernels.values()), "kernels_us_per_call": kernels}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="dsv2_ep8")
    parser.add_argument("--load", type=float, default=8)
    parser.add_argument("--skew", type=float, default=1.0)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--out", default=None)
    parser.add_argument("--git-commit", default=None)
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("trace_expert_point.py traces GPU calls; no CUDA device here")
    from benchmarks.bench_experts import SHAPES
    from megatron_eps.calibrate.provenance import git_commit, write_result
    from megatron_eps.experts import calibrate as cal

    if args.shape not in SHAPES:
        raise SystemExit(f"--shape {args.shape!r}: allowed: {', '.join(SHAPES)}")
    device, dtype = torch.device("cuda", torch.cuda.current_device()), torch.bfloat16
    hidden, ffn, n = SHAPES[args.shape]
    experts = cal.synthetic_experts(hidden, ffn, n, dtype, device, seed=1)
    counts = cal.make_counts(n, args.load, args.skew, seed=1)
    x, probs = cal.make_inputs(sum(counts), hidden, dtype, device, sets=1, seed=1)[0]
    cal.warm_gpu(device)
    records = []
    for name in cal.measurable_backends(experts, device, dtype):
        record = trace_backend(name, experts, counts, x, probs, device, args.calls)
        records.append(record)
        top = sorted(record["kernels_us_per_call"].items(), key=lambda kv: -kv[1])[:3]
        print(f"{name:>8}: wall {record['wall_us_per_call']:7.1f} us/call, host issue "
              f"{record['host_issue_us_per_call']:7.1f} us/call, GPU kernels "
              f"{record['gpu_kernel_us_per_call']:7.1f} us/call: "
              + ", ".join(f"{k} {v:.1f}" for k, v in top), flush=True)
    result = {"benchmark": "trace_expert_point", "command": " ".join(["trace_expert_point.py"] + sys.argv[1:]),
              "git_commit": args.git_commit or git_commit(), "device": cal.device_info(device),
              "versions": cal.versions(), "shape": args.shape, "load": args.load, "skew": args.skew,
              "counts": counts, "backends": records}
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
