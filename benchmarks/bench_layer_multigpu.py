"""One MoE layer over a real expert-parallel group: stock Megatron vs EPS (N = 1..max, auto).

    torchrun --nproc-per-node 8 benchmarks/bench_layer_multigpu.py --out layer.json
    torchrun --nproc-per-node 2 benchmarks/bench_layer_multigpu.py --smoke --out x.json  (CPU)

EP = world size, real NCCL all-to-alls (no emulator). Shapes: DeepSeek-V2 (H5120, 160 experts
of F1536, top-6, 2 shared experts of F1536 each) and Mixtral 8x7B (H4096, 8 experts of F14336,
top-2), the expert count divided over the ranks. For each tokens/rank it times the stock
MoELayer (alltoall dispatcher, Megatron's SequentialMLP) and EPSMoELayer with fixed N and with
``pipeline_degree=auto`` (CUDA events, median over repeats, the slowest rank's time), checks
EPS against stock (bf16 relative error), and prints a table. ``--kernel`` picks EPS's expert
kernel; the comparison "EPS N=1" vs "EPS best N" isolates the overlap from the kernel switch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.distributed as dist

MODELS = {
    "dsv2": dict(hidden=5120, ffn=1536, experts=160, topk=6, shared=3072),
    "mixtral": dict(hidden=4096, ffn=14336, experts=8, topk=2, shared=None),
}
SMOKE = {
    "dsv2": dict(hidden=64, ffn=32, experts=8, topk=3, shared=64),
    "mixtral": dict(hidden=64, ffn=48, experts=4, topk=2, shared=None),
}


def timed(fn, x, repeats, cuda):
    times = []
    for i in range(repeats + 2):
        dist.barrier()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out, _ = fn(x)
            end.record()
            end.synchronize()
            t = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            out, _ = fn(x)
            t = time.perf_counter() - t0
        if i >= 2:
            times.append(t)
    worst = torch.tensor([statistics.median(times)], dtype=torch.float64,
                         device="cuda" if cuda else "cpu")
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return worst.item(), out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", default="dsv2,mixtral")
    ap.add_argument("--tokens", default="4096,8192,16384,32768")
    ap.add_argument("--degrees", default="1,2,4,8")
    ap.add_argument("--kernel", default="auto")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU/gloo logic check)")
    args = ap.parse_args(argv)

    from megatron_eps import EPSConfig
    from megatron_eps.testing import Utils
    from megatron_eps.testing.models import build_moe_pair, moe_config

    cuda = torch.cuda.is_available() and not args.smoke
    Utils.initialize_distributed()
    world, rank = dist.get_world_size(), dist.get_rank()
    Utils.initialize_model_parallel(1, 1, expert_model_parallel_size=world)
    dtype = torch.bfloat16 if cuda else torch.float32
    shapes = SMOKE if args.smoke else MODELS
    tokens_list = [64, 128] if args.smoke else [int(t) for t in args.tokens.split(",")]
    rows = []
    for name in args.models.split(","):
        s = shapes[name]
        if s["experts"] % world:
            continue
        local = s["experts"] // world
        config = moe_config(num_experts=s["experts"], topk=s["topk"], hidden_size=s["hidden"],
                            ffn_hidden_size=s["ffn"], shared_expert_size=s["shared"],
                            ep_size=world, dtype=dtype)
        degrees = sorted({min(int(d), local) for d in args.degrees.split(",")})
        stock, eps = build_moe_pair(config, EPSConfig(min_tokens_to_pipeline=0,
                                                      expert_kernel=args.kernel))
        for tokens in tokens_list:
            x = torch.randn(tokens, 1, s["hidden"], generator=torch.Generator().manual_seed(rank))
            x = x.to(device="cuda" if cuda else "cpu", dtype=dtype)
            row = {"model": name, "ep": world, "tokens_per_rank": tokens, "local_experts": local}
            with torch.no_grad():
                row["stock_s"], ref = timed(stock, x, args.repeats, cuda)
                for degree in degrees + ["auto"]:
                    eps.eps_config = eps.eps_config.replace(pipeline_degree=degree)
                    t, out = timed(eps, x, args.repeats, cuda)
                    row[f"eps_{degree}_s"] = t
                    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
                    row.setdefault("max_rel_err", 0.0)
                    row["max_rel_err"] = max(row["max_rel_err"], err)
                    if degree == "auto":
                        row["auto_n"] = eps.token_dispatcher.last_record.num_chunks
            best = min(degrees, key=lambda d: row[f"eps_{d}_s"])
            row["best_n"] = best
            row["speedup_auto_vs_stock"] = row["stock_s"] / row["eps_auto_s"]
            row["speedup_best_vs_eps_n1"] = row["eps_1_s"] / row[f"eps_{best}_s"]
            rows.append(row)
            if rank == 0:
                print(json.dumps(row), flush=True)
    if rank == 0:
        from megatron_eps.provenance import git_commit

        commit = git_commit()
        result = {
            "device": torch.cuda.get_device_name(0) if cuda else "cpu (smoke)",
            "world_size": world, "torch": torch.__version__,
            "megatron_core": __import__("megatron.core").core.__version__,
            "command": " ".join(sys.argv), "git_commit": commit, "kernel": args.kernel,
            "timing": "CUDA events, median of repeats after 2 warm-ups, slowest rank",
            "rows": rows,
        }
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"{'model':8} {'tok/rank':>8} {'stock ms':>9} {'EPS N=1':>8} {'best N':>7} "
              f"{'EPS best':>9} {'auto N':>6} {'EPS auto':>9} {'auto/stock':>10} {'rel err':>8}")
        for r in rows:
            best_s = r["eps_%s_s" % r["best_n"]]
            print(f"{r['model']:8} {r['tokens_per_rank']:>8} {r['stock_s']*1e3:>9.3f} "
                  f"{r['eps_1_s']*1e3:>8.3f} {r['best_n']:>7} {best_s*1e3:>9.3f} "
                  f"{r['auto_n']:>6} {r['eps_auto_s']*1e3:>9.3f} {r['speedup_auto_vs_stock']:>9.2f}x "
                  f"{r['max_rel_err']:>8.1e}")
    Utils.destroy_model_parallel()


if __name__ == "__main__":
    main()
