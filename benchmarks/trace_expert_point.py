"""Where one expert call's time goes, per backend: host time per call against GPU kernel time
per call (torch.profiler), to tell a launch-bound point from a GPU-bound one (GPU).

    python benchmarks/trace_expert_point.py --shape dsv2_ep8 --load 8 --skew 1.0 --out trace.json

Prints one line per backend: wall time per call with calls issued back to back (what
bench_experts.py measures), the host's issue time per call, and the sum of the GPU kernels per
call with the kernels named. Writes the summary as JSON (``--out``).

``--host-breakdown`` adds where the triton backend's host time goes: each step of one call
timed alone over many calls (no profiler), and the top functions of a cProfile run.
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


def _host_us(fn, calls: int) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return 1e6 * elapsed / calls


def host_breakdown(experts, counts, x, probs, calls: int) -> dict:
    """Host microseconds per call of each step of the triton backend's forward."""
    import cProfile
    import io
    import pstats

    import torch

    from megatron_eps.experts import triton_kernels as tk
    from megatron_eps.experts.base import get_backend
    from megatron_eps.experts.gemm_common import expert_offsets, prepare_call

    backend = get_backend("triton")
    weights = experts.weights()
    call = prepare_call(weights, x, counts, probs, 0, "triton")
    hidden_size, ffn = x.shape[1], call.fc2.shape[2]
    cfg1, cfg2 = tk.choose_configs(counts, hidden_size, ffn, True)
    offs = expert_offsets(counts, x.device)
    n_tiles = tk.count_m_tiles(counts, cfg1.block_m)
    h = tk.expert_gemm(x, call.fc1, offs, n_tiles, cfg1, gated=True, act_code=1, probs=call.probs)
    steps = {
        "torch_empty_like (host speed yardstick)": lambda: torch.empty_like(x),
        "prepare_call": lambda: prepare_call(weights, x, counts, probs, 0, "triton"),
        "choose_configs": lambda: tk.choose_configs(counts, hidden_size, ffn, True),
        "expert_offsets (unstaged)": lambda: expert_offsets(counts, x.device),
        "count_m_tiles": lambda: tk.count_m_tiles(counts, cfg1.block_m),
        "fc1 expert_gemm": lambda: tk.expert_gemm(x, call.fc1, offs, n_tiles, cfg1, gated=True,
                                                  act_code=1, probs=call.probs),
        "fc2 expert_gemm": lambda: tk.expert_gemm(h, call.fc2, offs, n_tiles, cfg2),
        "whole forward": lambda: backend.forward(experts, x, counts, probs, 0),
    }
    with torch.no_grad():
        result = {name: _host_us(fn, calls) for name, fn in steps.items()}
        # Our Python alone: the same fc1 call with its launch replaced by nothing.
        launchers = dict(tk._gemm_launchers())
        try:
            for flavour in launchers:
                tk._gemm_launchers()[flavour] = lambda *args, **kwargs: None
            result["fc1 expert_gemm, launch skipped"] = _host_us(steps["fc1 expert_gemm"], calls)
        finally:
            tk._gemm_launchers().update(launchers)
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(calls):
            backend.forward(experts, x, counts, probs, 0)
        profiler.disable()
        torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
    return {"host_us_per_call": result, "cprofile_tottime_top25": text.getvalue()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="dsv2_ep8")
    parser.add_argument("--load", type=float, default=8)
    parser.add_argument("--skew", type=float, default=1.0)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--host-breakdown", action="store_true",
                        help="also time each host step of the triton backend's call")
    parser.add_argument("--out", default=None)
    parser.add_argument("--git-commit", default=None)
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("trace_expert_point.py traces GPU calls; no CUDA device here")
    from benchmarks.bench_experts import SHAPES
    from megatron_eps.provenance import git_commit, write_result
    from megatron_eps.calibrate import kernels as cal

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
    breakdown = None
    if args.host_breakdown and "triton" in [r["backend"] for r in records]:
        breakdown = host_breakdown(experts, counts, x, probs, max(args.calls, 200))
        for step, us in breakdown["host_us_per_call"].items():
            print(f"  triton host: {step:<40} {us:8.1f} us/call", flush=True)
        print(breakdown["cprofile_tottime_top25"], flush=True)
    result = {"benchmark": "trace_expert_point", "command": " ".join(["trace_expert_point.py"] + sys.argv[1:]),
              "git_commit": args.git_commit or git_commit(), "device": cal.device_info(device),
              "versions": cal.versions(), "shape": args.shape, "load": args.load, "skew": args.skew,
              "counts": counts, "backends": records, "triton_host_breakdown": breakdown}
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
