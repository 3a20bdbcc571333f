"""Where one EPS forward's device and host time goes, by op, for two settings side by side.

    torchrun --standalone --nproc-per-node 1 benchmarks/trace_layer_ops.py --out ops.json
    torchrun --standalone --nproc-per-node 1 benchmarks/trace_layer_ops.py --smoke --out x.json (CPU)

EP = world size. For each point (``model:tokens``) and each variant (``--variants``, EPSConfig
overrides such as ``dispatch_dedup=on``, or ``grouped`` / ``stock``: the stock layer with its
experts as one grouped GEMM / as SequentialMLP, same weights), it times forwards with CUDA
events, then profiles a few forwards (torch.profiler, CPU and CUDA) and reports per op: device
time (self, per forward), calls per forward, and the host time of the forward. The table lists the ops whose
device time differs most between the first variant and each other one: the trace that says
where an extra millisecond comes from.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_layer_multigpu import MODELS, layer_config, start_expert_group  # noqa: E402


BASELINES = ("grouped", "stock")


def parse_variant(text: str):
    """'dispatch_dedup=on,pipeline_degree=2' -> {'dispatch_dedup': 'on', 'pipeline_degree': 2};
    a baseline's name -> {'baseline': name}."""
    if text in BASELINES:
        return {"baseline": text}
    out = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        out[key] = int(value) if value.isdigit() else value
    return out


def op_table(prof, forwards: int, cuda: bool):
    """{op name: (device us, calls, host us)} per forward from the profiler's averages: the op's
    self device time (on CPU, its self host time) and its self host time (CUDA runtime calls,
    such as a synchronize, are ops of their own here; the dispatcher's ``eps.*`` phases count
    their whole host time)."""
    table = {}
    for event in prof.key_averages():
        host_us = event.self_cpu_time_total
        if not cuda:
            device_us = host_us
        else:
            device_us = getattr(event, "self_device_time_total", None)
            if device_us is None:
                device_us = getattr(event, "self_cuda_time_total", 0)
        if device_us <= 0 and host_us <= 0:
            continue
        if event.key.startswith("eps."):  # the dispatcher's phases: their whole host time
            host_us = event.cpu_time_total
        table[event.key] = (device_us / forwards, event.count / forwards, host_us / forwards)
    return table


def host_functions(layer, x, forwards: int, top: int):
    """cProfile of ``forwards`` forwards: the ``top`` functions of megatron_eps by cumulative
    host time, as [file:line function, calls per forward, cumulative us, own us per forward]."""
    import cProfile
    import pstats

    profile = cProfile.Profile()
    profile.enable()
    for _ in range(forwards):
        layer(x)
    profile.disable()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    rows = []
    for (path, line, func), (_, calls, own, cumulative, _) in pstats.Stats(profile).stats.items():
        if "megatron_eps" not in path:
            continue
        where = f"{path.split('megatron_eps/')[-1]}:{line} {func}"
        rows.append([where, calls / forwards, cumulative / forwards * 1e6, own / forwards * 1e6])
    rows.sort(key=lambda r: -r[2])
    return rows[:top]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--points", default="mixtral:8192,dsv2:4096,dsv2:16384")
    ap.add_argument("--variants", default="dispatch_dedup=off;dispatch_dedup=on",
                    help="';'-separated EPSConfig overrides, the first is the reference")
    ap.add_argument("--base", default="pipeline_degree=1,transport=nccl",
                    help="EPSConfig overrides every variant shares")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--profiled", type=int, default=3)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--trace-dir", default=None,
                    help="also write each variant's chrome trace of the first point here")
    ap.add_argument("--python-profile", type=int, default=0, metavar="K",
                    help="also run cProfile over the timed forwards' host code and keep the K "
                    "functions of megatron_eps with the most cumulative time per forward")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)

    from megatron_eps import EPSConfig
    from megatron_eps.provenance import git_commit
    from megatron_eps.testing import Utils
    from megatron_eps.experts.autotune import warm_up_while_calibrating
    from megatron_eps.inference.baselines import with_grouped_experts
    from megatron_eps.inference.layers import build_moe_pair

    from megatron_eps.config import EPSConfigError

    for flag, value in (("--repeats", args.repeats), ("--profiled", args.profiled)):
        if value < 1:
            raise SystemExit(f"{flag} {value}: must be an integer >= 1")
    if args.python_profile < 0:
        raise SystemExit(f"--python-profile {args.python_profile}: must be an integer >= 0 "
                         "(0: no host-function profile)")
    variants = [parse_variant(v) for v in args.variants.split(";")]
    settings = {f.name for f in dataclasses.fields(EPSConfig)}
    for given in [parse_variant(args.base)] + [v for v in variants if "baseline" not in v]:
        unknown = sorted(set(given) - settings)
        if unknown:
            raise SystemExit(f"--base / --variants: unknown setting(s) {', '.join(unknown)}; "
                             f"EPSConfig has {', '.join(sorted(settings))}, or a variant is one "
                             f"of {', '.join(BASELINES)}")
    try:  # a bad value fails here, before any collective
        base = EPSConfig(**{"min_tokens_to_pipeline": 0, **parse_variant(args.base)})
        for v in variants:
            if "baseline" not in v:
                base.replace(**v)
    except (EPSConfigError, TypeError, ValueError) as exc:
        raise SystemExit(f"--base / --variants: {exc}") from None
    known = tuple(MODELS)
    for point in args.points.split(","):
        name, _, tokens = point.partition(":")
        if name not in known or not tokens.isdigit():
            raise SystemExit(f"--points {point!r}: each point is MODEL:TOKENS, MODEL one of "
                             f"{', '.join(known)}")
    cuda, world, rank, dtype, shapes = start_expert_group(args.smoke)
    results = []
    for point in args.points.split(","):
        name, tokens = point.split(":")
        tokens = 64 if args.smoke else int(tokens)
        s = shapes[name]
        config = layer_config(s, world, dtype)
        stock, eps_layer = build_moe_pair(config, base)
        baselines = {"stock": stock, "grouped": with_grouped_experts(stock)}
        gen = torch.Generator().manual_seed(1000 + rank)
        x = torch.randn(tokens, 1, s["hidden"], generator=gen).to(
            device="cuda" if cuda else "cpu", dtype=dtype)
        row = {"model": name, "tokens_per_rank": tokens, "ep": world, "variants": []}
        with torch.no_grad():
            for v in variants:
                if "baseline" in v:
                    layer = baselines[v["baseline"]]
                else:
                    layer = eps_layer
                    layer.eps_config = base.replace(**v)
                dispatcher = getattr(layer, "token_dispatcher", None)
                eps = "baseline" not in v
                for _ in range(2):
                    layer(x)
                # The expert kernels' one-time self-calibration stays out of the timings.
                warm_up_while_calibrating(lambda: layer(x), x.device)
                times, host = [], []
                for _ in range(args.repeats):
                    dist.barrier()
                    if cuda:
                        torch.cuda.synchronize()
                        start = torch.cuda.Event(enable_timing=True)
                        end = torch.cuda.Event(enable_timing=True)
                        start.record()
                    t0 = time.perf_counter()
                    layer(x)
                    host.append(time.perf_counter() - t0)
                    if cuda:
                        end.record()
                        end.synchronize()
                        times.append(start.elapsed_time(end) / 1e3)
                    else:
                        times.append(host[-1])
                activities = [torch.profiler.ProfilerActivity.CPU]
                if cuda:
                    activities.append(torch.profiler.ProfilerActivity.CUDA)
                if eps:
                    dispatcher.profiler_ranges = True
                with torch.profiler.profile(activities=activities) as prof:
                    for _ in range(args.profiled):
                        layer(x)
                    if cuda:
                        torch.cuda.synchronize()
                if eps:
                    dispatcher.profiler_ranges = False
                if args.trace_dir and not results and rank == 0:
                    os.makedirs(args.trace_dir, exist_ok=True)
                    label = "_".join(f"{k}-{val}" for k, val in v.items()) or "base"
                    prof.export_chrome_trace(os.path.join(args.trace_dir, f"ops_{name}_{label}.json"))
                python_profile = (host_functions(layer, x, args.repeats, args.python_profile)
                                  if args.python_profile else [])
                record = dispatcher.last_record if eps else None
                row["variants"].append({
                    "settings": v, "forward_ms": statistics.median(times) * 1e3,
                    "host_ms": statistics.median(host) * 1e3,
                    "chunks": list(record.experts_per_chunk) if record else [],
                    "dedup": bool(record.dedup) if record else False,
                    "backends": list(layer.expert_runner.backends_used) if eps else [v["baseline"]],
                    "ops": op_table(prof, args.profiled, cuda),
                    "python_profile": python_profile,
                })
        results.append(row)
        if rank == 0:
            print_point(row, args.top)
        del layer, eps_layer, stock, baselines
        if cuda:
            torch.cuda.empty_cache()
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0) if cuda else "cpu (smoke)",
                       "torch": torch.__version__, "git_commit": git_commit(),
                       "command": " ".join(sys.argv), "world_size": world,
                       "timing": "CUDA events per forward (median); host: the forward's own wall "
                                 "time; ops: torch.profiler self device time per forward",
                       "points": results}, f, indent=1)
    Utils.destroy_model_parallel()


def print_point(row, top):
    ref = row["variants"][0]
    print(f"== {row['model']} {row['tokens_per_rank']} tokens/rank, EP={row['ep']}")
    for v in row["variants"]:
        device = sum(op[0] for op in v["ops"].values()) / 1e3
        print(f"   {v['settings']}: forward {v['forward_ms']:.2f} ms, host {v['host_ms']:.2f} ms, "
              f"device ops {device:.2f} ms, chunks {v['chunks']}, dedup {v['dedup']}, "
              f"kernels {v['backends']}")
    for v in row["variants"]:
        if v.get("python_profile"):
            print(f"   host functions of {v['settings']} (cumulative us per forward, own us, calls):")
            for where, calls, cumulative, own in v["python_profile"]:
                print(f"     {cumulative:9.1f} {own:8.1f} ({calls:5.1f})  {where[:100]}")
    for v in row["variants"][1:]:
        names = set(ref["ops"]) | set(v["ops"])
        for column, what in ((0, "device"), (2, "host")):
            def change(k):
                return v["ops"].get(k, (0, 0, 0))[column] - ref["ops"].get(k, (0, 0, 0))[column]
            print(f"   ops whose {what} time differs most, {v['settings']} vs {ref['settings']} "
                  "(us per forward, calls):")
            for k in sorted(names, key=lambda k: -abs(change(k)))[:top]:
                a, b = ref["ops"].get(k, (0.0, 0.0, 0.0)), v["ops"].get(k, (0.0, 0.0, 0.0))
                print(f"     {change(k):+9.1f}  {a[column]:8.1f} ({a[1]:4.0f}) -> "
                      f"{b[column]:8.1f} ({b[1]:4.0f})  {k[:90]}")


if __name__ == "__main__":
    main()
