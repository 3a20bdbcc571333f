"""One MoE layer over a real expert-parallel group: EPS on each transport vs both fair baselines.

    torchrun --standalone --nproc-per-node 2 benchmarks/bench_layer_multigpu.py --out layer.json
    torchrun --standalone --nproc-per-node 2 benchmarks/bench_layer_multigpu.py --smoke --out x.json  (CPU)

EP = world size, real links (no emulator). Shapes: DeepSeek-V2 (H5120, 160 experts of F1536,
top-6, shared experts of 3072) and Mixtral 8x7B (H4096, 8 experts of F14336, top-2), the experts
divided over the ranks. Per point it times, on the same input and the same weights:

* stock     -- Megatron's MoELayer, alltoall dispatcher, SequentialMLP (stock without TE)
* grouped   -- the same stock layer with its experts run as one grouped GEMM (torch._grouped_mm):
               what a Megatron user with TE grouped GEMMs gets, no overlap. The ratio that counts.
* EPS       -- EPSMoELayer per transport (``--transports``), at fixed N and with N = auto

(CUDA events around ``--forwards-per-sample`` forwards issued back to back, median of
``--repeats`` samples after 2 warm-ups, slowest rank; the variants of a point are timed in
rotating order, round by round. Each row also records every variant's spread (IQR / median) and,
where auto chose the chunks of a fixed N, how far apart the two timings of that one setting came:
the noise any ratio of the row carries.) Every output is checked against stock. With
``--trace-dir`` one forward of chosen points is profiled and the overlap efficiency (transfer
time hidden under compute kernels / transfer time) is computed from the trace.
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

MODELS = {
    "dsv2": dict(hidden=5120, ffn=1536, experts=160, topk=6, shared=3072),
    "mixtral": dict(hidden=4096, ffn=14336, experts=8, topk=2, shared=None),
    "dsv2lite": dict(hidden=2048, ffn=1408, experts=64, topk=6, shared=2816),
    # GEMMs of microseconds: the forward's time is its host path (launches, Python, syncs).
    "hostpath": dict(hidden=256, ffn=128, experts=64, topk=6, shared=256),
}
SMOKE = {
    "dsv2": dict(hidden=64, ffn=32, experts=8, topk=3, shared=64),
    "mixtral": dict(hidden=64, ffn=48, experts=4, topk=2, shared=None),
    "dsv2lite": dict(hidden=32, ffn=32, experts=8, topk=3, shared=64),
    "hostpath": dict(hidden=32, ffn=16, experts=8, topk=3, shared=32),
}


def _sync(cuda):
    if cuda:
        torch.cuda.synchronize()


def time_once(fn, x, cuda, forwards: int = 1):
    """(seconds per forward of ``forwards`` forwards issued back to back, as a model's layers
    follow each other, and the last output)."""
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(forwards):
            out, _ = fn(x)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / forwards, out
    t0 = time.perf_counter()
    for _ in range(forwards):
        out, _ = fn(x)
    return (time.perf_counter() - t0) / forwards, out


def relative_spread(values) -> float:
    """Interquartile range / median of a variant's samples (0 with fewer than 4)."""
    if len(values) < 4:
        return 0.0
    q1, q2, q3 = statistics.quantiles(values, n=4)
    return (q3 - q1) / q2 if q2 > 0 else 0.0


def same_setting_gaps(times, auto_chunks, labels, degrees, local):
    """{label: |t(auto) / t(N) - 1|} where auto chose the chunks of a fixed N: the same setting
    timed twice in one run, so the benchmark's own noise at that point."""
    from megatron_eps.policy.chunks import chunk_sizes

    gaps = {}
    for label in labels:
        chosen = tuple(auto_chunks.get(f"{label}:auto", ()))
        for n in degrees:
            if chosen and chosen == chunk_sizes(local, n):
                gaps[label] = abs(times[f"{label}:auto"] / times[f"{label}:{n}"] - 1.0)
    return gaps


def slowest(value, cuda):
    t = torch.tensor([value], dtype=torch.float64, device="cuda" if cuda else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def rel_err(ref, out):
    ref, out = ref.double(), out.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", default="dsv2,mixtral", help=f"comma list of {', '.join(MODELS)}")
    ap.add_argument("--tokens", default="4096,8192,16384,32768",
                    help="tokens per rank of every model but mixtral")
    ap.add_argument("--mixtral-tokens", default="8192,16384,32768")
    ap.add_argument("--degrees", default="1,2,4,8")
    ap.add_argument("--transports", default="copy_engine,nccl")
    ap.add_argument("--kernel", default="auto")
    ap.add_argument("--dispatch-dedup", default="off",
                    help="comma list of off,on: each transport also runs with one row per (token, "
                    "rank, chunk) and pre-reduced combine (keys '<transport>+dedup:<N>')")
    ap.add_argument("--local-rows", default="together",
                    help="comma list of together,apart: the copy_engine transport (without dedup) "
                    "also runs with each chunk's own rows as a GEMM call of their own (keys "
                    "'copy_engine+apart:<N>')")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--forwards-per-sample", type=int, default=1,
                    help="forwards timed back to back per sample (as consecutive layers run)")
    ap.add_argument("--cost-profile", default=None)
    ap.add_argument("--trace-dir", default=None)
    ap.add_argument("--trace-points", default="dsv2:8192,dsv2:16384,dsv2:32768")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU/gloo logic check)")
    args = ap.parse_args(argv)
    from megatron_eps.config import DISPATCH_DEDUPS, LOCAL_ROWS, TRANSPORTS

    for flag, value in (("--repeats", args.repeats), ("--forwards-per-sample", args.forwards_per_sample)):
        if value < 1:
            raise SystemExit(f"{flag} {value}: must be an integer >= 1")
    for flag, given, allowed in (("--dispatch-dedup", args.dispatch_dedup, DISPATCH_DEDUPS),
                                 ("--local-rows", args.local_rows, LOCAL_ROWS),
                                 ("--transports", args.transports, TRANSPORTS),
                                 ("--models", args.models, tuple(MODELS))):
        bad = [v for v in given.split(",") if v not in allowed]
        if bad or not given:
            raise SystemExit(f"{flag} {given!r}: allowed values (comma list): {', '.join(allowed)}")

    from megatron_eps import EPSConfig
    from megatron_eps.testing import Utils
    from megatron_eps.experts.autotune import warm_up_while_calibrating
    from megatron_eps.inference.baselines import with_grouped_experts
    from megatron_eps.policy.chunks import chunk_sizes
    from megatron_eps.inference.layers import build_moe_pair

    transports = (args.transports.split(",") if torch.cuda.is_available() and not args.smoke
                  else ["nccl"])
    # Local rows apart only where they can be (copy_engine, one row per pair).
    flavours = [(t, d, lr) for t in transports for d in args.dispatch_dedup.split(",")
                for lr in args.local_rows.split(",")
                if lr == "together" or (t == "copy_engine" and d == "off")]
    if not flavours:
        raise SystemExit(f"--local-rows {args.local_rows!r}: apart runs on the copy_engine "
                         "transport without dedup only (GPUs); add together or that transport")
    cuda, world, rank, dtype, shapes = start_expert_group(args.smoke)
    trace_points = {tuple(p.split(":")) for p in args.trace_points.split(",") if p}
    rows = []
    for name in args.models.split(","):
        s = shapes[name]
        if s["experts"] % world:
            continue
        local = s["experts"] // world
        config = layer_config(s, world, dtype)
        degrees = sorted({min(int(d), local) for d in args.degrees.split(",")})
        base = EPSConfig(min_tokens_to_pipeline=0, expert_kernel=args.kernel,
                         cost_profile=args.cost_profile)

        def flavour(t, d, lr):
            return base.replace(transport=t, dispatch_dedup=d, local_rows=lr)

        stock, eps_first = build_moe_pair(config, flavour(*flavours[0]))
        eps_layers = {_label(*flavours[0]): eps_first}
        for t, d, lr in flavours[1:]:
            _, layer = build_moe_pair(config, flavour(t, d, lr))
            layer.load_state_dict(stock.state_dict())
            eps_layers[_label(t, d, lr)] = layer
        grouped = with_grouped_experts(stock)
        if args.smoke:
            tokens_list = [64, 128]
        else:
            tokens_list = [int(t) for t in (args.mixtral_tokens if name == "mixtral" else args.tokens).split(",")]
        for tokens in tokens_list:
            gen = torch.Generator().manual_seed(1000 + rank)
            x = torch.randn(tokens, 1, s["hidden"], generator=gen).to(
                device="cuda" if cuda else "cpu", dtype=dtype)
            variants = {"stock": stock, "grouped": grouped}
            for t, layer in eps_layers.items():
                for degree in degrees + ["auto"]:
                    variants[f"{t}:{degree}"] = (layer, degree)
            samples = {k: [] for k in variants}
            errors, auto_n, used = {}, {}, {}

            def run(key):
                v = variants[key]
                if isinstance(v, tuple):
                    layer, degree = v
                    layer.eps_config = layer.eps_config.replace(pipeline_degree=degree)
                    fn = layer
                else:
                    fn = v
                return time_once(fn, x, cuda, args.forwards_per_sample)

            with torch.no_grad():
                _, ref = run("stock")
                keys = list(variants)
                for key in keys:  # warm-up, correctness, the choices auto makes
                    _, out = run(key)
                    # The expert kernels' one-time self-calibration stays out of the samples.
                    last = [out]
                    warm_up_while_calibrating(lambda: last.__setitem__(0, run(key)[1]), x.device)
                    out = last[0]
                    errors[key] = rel_err(ref, out)
                    if ":" in key:
                        record = variants[key][0].token_dispatcher.last_record
                        used[key] = record.transport
                        if key.endswith((":auto", ":auto-sf")):
                            auto_n[key] = list(record.experts_per_chunk)
                for round_ in range(args.repeats):
                    order = keys[round_ % len(keys):] + keys[: round_ % len(keys)]
                    for key in order:
                        dist.barrier()
                        samples[key].append(run(key)[0])
            times = {k: slowest(statistics.median(v), cuda) for k, v in samples.items()}
            row = {"model": name, "ep": world, "tokens_per_rank": tokens, "local_experts": local,
                   "ms": {k: v * 1e3 for k, v in times.items()}, "rel_err_vs_stock": errors,
                   "auto_chunks": auto_n, "transport_used": used,
                   "spread": {k: relative_spread(v) for k, v in samples.items()},
                   "same_setting_gap": same_setting_gaps(times, auto_n, list(eps_layers), degrees,
                                                         local)}
            for t in eps_layers:
                fixed = {d: times[f"{t}:{d}"] for d in degrees}
                best = min(fixed, key=fixed.get)
                row[t] = {
                    "best_n": best,
                    "auto_vs_grouped": times["grouped"] / times[f"{t}:auto"],
                    "auto_vs_stock": times["stock"] / times[f"{t}:auto"],
                    "best_vs_grouped": times["grouped"] / fixed[best],
                    "auto_vs_best": times[f"{t}:auto"] / fixed[best],
                    "auto_vs_n1": times[f"{t}:auto"] / fixed[1],
                }
                # The decision itself: where auto chose a fixed N's chunks, that N's own timing
                # against the best (the noise between two timings of one setting left out).
                chose = [d for d in degrees if tuple(auto_n.get(f"{t}:auto", ())) ==
                         chunk_sizes(local, d)]
                row[t]["auto_chose"] = chose[0] if chose else None
                row[t]["auto_choice_vs_best"] = (fixed[chose[0]] / fixed[best] if chose
                                                 else row[t]["auto_vs_best"])
            if args.trace_dir and cuda and (name, str(tokens)) in trace_points:
                row["trace"] = trace_point(eps_layers, x, args.trace_dir, name, tokens, rank)
            rows.append(row)
            if rank == 0:
                print(json.dumps(row), flush=True)
    if rank == 0:
        write_result(args, rows, cuda, world)
    Utils.destroy_model_parallel()


def start_expert_group(smoke: bool):
    """(cuda, world, rank, dtype, shapes) after initializing torch.distributed and one expert-
    parallel group over the whole world (EP = world size)."""
    from megatron_eps.testing import Utils

    cuda = torch.cuda.is_available() and not smoke
    Utils.initialize_distributed()
    world, rank = dist.get_world_size(), dist.get_rank()
    Utils.initialize_model_parallel(1, 1, expert_model_parallel_size=world)
    return cuda, world, rank, (torch.bfloat16 if cuda else torch.float32), (SMOKE if smoke else MODELS)


def layer_config(shape: dict, ep_size: int, dtype):
    """Megatron's TransformerConfig of one MoE layer of ``shape`` (MODELS / SMOKE) at EP ``ep_size``."""
    from megatron_eps.inference.layers import moe_config

    return moe_config(num_experts=shape["experts"], topk=shape["topk"], hidden_size=shape["hidden"],
                      ffn_hidden_size=shape["ffn"], shared_expert_size=shape["shared"],
                      ep_size=ep_size, dtype=dtype)


def _label(transport: str, dispatch_dedup: str, local_rows: str = "together") -> str:
    return (transport + ("+dedup" if dispatch_dedup != "off" else "")
            + ("+apart" if local_rows == "apart" else ""))


def trace_point(eps_layers, x, trace_dir, name, tokens, rank):
    """Profile one forward per transport at N = auto; overlap efficiency from the trace."""
    from trace_overlap import overlap_from_trace

    out = {}
    os.makedirs(trace_dir, exist_ok=True)
    for t, layer in eps_layers.items():
        layer.eps_config = layer.eps_config.replace(pipeline_degree="auto")
        layer.token_dispatcher.profiler_ranges = True
        with torch.no_grad():
            layer(x)
            torch.cuda.synchronize()
            dist.barrier()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                                    torch.profiler.ProfilerActivity.CPU]) as prof:
                layer(x)
                torch.cuda.synchronize()
        path = os.path.join(trace_dir, f"trace_{name}_{tokens}_{t}_rank{rank}.json")
        layer.token_dispatcher.profiler_ranges = False
        prof.export_chrome_trace(path)
        stats = overlap_from_trace(path)
        stats["chunks"] = list(layer.token_dispatcher.last_record.experts_per_chunk)
        out[t] = stats
        if rank != 0 or (t, tokens) not in (("copy_engine", 16384), ("copy_engine+apart", 8192)):
            os.remove(path)  # one trace comes back: the device returns few files
    return out


def write_result(args, rows, cuda, world):
    from megatron_eps.provenance import git_commit
    from megatron_eps.comm import cuda_ops

    result = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu (smoke)",
        "world_size": world, "torch": torch.__version__,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
        "megatron_core": __import__("megatron.core").core.__version__,
        "command": " ".join(sys.argv), "git_commit": git_commit(), "kernel": args.kernel,
        "copy_engine_copies": cuda_ops.copy_issue_mode() if cuda else None,
        "timing": f"CUDA events around {args.forwards_per_sample} forwards back to back, median of "
                  f"{args.repeats} samples after 2 warm-ups, rotating order, slowest rank",
        "rows": rows,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print_table(result)


def print_table(result):
    rows = result["rows"]
    if not rows:
        return
    transports = [_label(t, d, lr) for t in ("copy_engine", "nccl") for d in ("off", "on")
                  for lr in ("together", "apart") if _label(t, d, lr) in rows[0]]
    head = f"{'model':8} {'tok/rk':>6} {'stock':>7} {'grouped':>7}"
    for t in transports:
        name = t.replace("copy_engine", "ce").replace("+dedup", "+dd").replace("+apart", "+la")
        head += f" | {name[:6]:>6} N=1 {'best':>9} {'auto':>10} {'vs grp':>6} {'vs stk':>6}"
    print(head)
    for r in rows:
        line = f"{r['model']:8} {r['tokens_per_rank']:>6} {r['ms']['stock']:>7.2f} {r['ms']['grouped']:>7.2f}"
        for t in transports:
            s = r[t]
            n1 = r["ms"][f"{t}:1"]
            best = r["ms"][f"{t}:{s['best_n']}"]
            auto_chunks = r["auto_chunks"].get(f"{t}:auto", [])
            line += (f" | {n1:>10.2f} {best:>6.2f}({s['best_n']}) {r['ms'][f'{t}:auto']:>6.2f}"
                     f"({len(auto_chunks)}) {s['auto_vs_grouped']:>5.2f}x {s['auto_vs_stock']:>5.2f}x")
        worst = max(r["rel_err_vs_stock"].values())
        print(line + f"  err<={worst:.1e}")
    choices = [r[t] for r in rows for t in transports if "auto_choice_vs_best" in r[t]]
    if choices:
        within = sum(c["auto_choice_vs_best"] <= 1.03 for c in choices)
        print(f"auto's choice within 3% of the best fixed N at {within} of {len(choices)} points "
              f"(worst {max(c['auto_choice_vs_best'] for c in choices):.3f}x the best)")
    spreads = [v for r in rows for v in r.get("spread", {}).values()]
    gaps = [v for r in rows for v in r.get("same_setting_gap", {}).values()]
    if spreads:
        print(f"noise: samples' IQR/median up to {max(spreads):.1%} (median "
              f"{statistics.median(spreads):.1%})"
              + (f"; one setting timed twice (auto = a fixed N) differed by up to {max(gaps):.1%}"
                 if gaps else ""))


if __name__ == "__main__":
    main()
