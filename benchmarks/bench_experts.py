"""Benchmark the expert backends and the selector over loads and skews (GPU; CPU runs tiny).

For each shape x mean tokens/expert x skew: the median time of every available backend's whole
expert computation (fc1 + SwiGLU + probs + fc2), the backend the selector picks from the cost
profile (``--profile``), and the oracle (fastest measured). Reports the selector's
chosen/oracle efficiency (oracle time / chosen time), Triton vs torch._grouped_mm, and TFLOP/s
against a dense bf16 GEMM ceiling measured in the same run.

Three selections are scored on the same timings:
  ``profile``   the cost tables alone (``kernel_autotune: off``);
  ``autotune``  what a layer does with ``kernel_autotune: on`` (its ExpertRunner): where the
                tables do not cover the shape or cannot tell the best backends apart, the first
                call of each load bucket times the candidates (experts/autotune.py, a fresh
                cache per run) and later calls reuse the winner;
  ``default``   no profile at all (the documented fixed order). ``--stock`` also times Megatron's
stock SequentialMLP against the backends for DSV2-Lite at T=4096 tokens per rank (top-6).

    python benchmarks/bench_experts.py --profile megatron_eps/profiles/nvidia_h100_80gb_hbm3.json \
        --out benchmarks/results/experts/bench_experts_h100.json --stock

Shapes (local experts per rank): DeepSeek-V2 at EP=8 (H5120 F1536 n20), DeepSeek-V2-Lite at
EP=1 (H2048 F1408 n64), Mixtral 8x7B at EP=2 (H4096 F14336 n4), and H3072 F1024 n32, a shape
no shipped profile calibrates (tests the selector's shape interpolation); three more that no
table was built from: Qwen3-30B-A3B at EP=2 (H2048 F768 n64), H4096 F1536 n16 (a
Qwen2-57B-like width) and DeepSeek-V3 at EP=8 (H7168 F2048 n32).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_eps.calibrate import kernels as cal  # noqa: E402
from megatron_eps.experts.autotune import TIMED_RUNS, TUNING_ROUNDS  # noqa: E402
from megatron_eps.provenance import write_result  # noqa: E402
from megatron_eps.experts import selector  # noqa: E402
from megatron_eps.policy import kernel_tables  # noqa: E402
from megatron_eps.policy.profile import load_kernel_tables  # noqa: E402
from megatron_eps.experts.base import get_backend  # noqa: E402
from megatron_eps.experts.reference import relative_error  # noqa: E402

SHAPES = {
    "dsv2_ep8": (5120, 1536, 20),
    "dsv2_lite": (2048, 1408, 64),
    "mixtral_ep2": (4096, 14336, 4),
    "uncalibrated_h3072": (3072, 1024, 32),
    "qwen3_30b_ep2": (2048, 768, 64),
    "h4096_f1536_n16": (4096, 1536, 16),
    "dsv3_ep8": (7168, 2048, 32),
    "tiny_cpu": (128, 64, 8),  # smoke runs on CPU only
}
# Mostly off the calibration grid (powers of two) so the selector has to interpolate.
LOADS = (8, 24, 96, 384, 1536, 4096, 8192)
SELECTIONS = ("profile", "autotune", "default")
SKEWS = (0.0, 0.5, 1.0, 1.5)


def git_commit(explicit):
    from megatron_eps.provenance import git_commit as checkout_commit

    return explicit or checkout_commit()


def dense_ceiling(device, dtype) -> float:
    """TFLOP/s of one large dense GEMM (8192^3 on GPU), the roofline the backends are held to."""
    size = 8192 if device.type == "cuda" else 512
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    t = cal.time_call(lambda i: torch.mm(a, b), device, target_s=0.2, min_reps=10, max_reps=100)
    return 2 * size**3 / t / 1e12


def geomean(values):
    values = [v for v in values if v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


class AutotuneSelection:
    """``expert_kernel: auto`` with ``kernel_autotune: on``, run by the layer's own
    ``ExpertRunner`` (fresh decision cache): the tables where they decide, else one calibration
    per load bucket. ``buckets`` records what each calibration cost."""

    def __init__(self, device, profile_path, cache_dir):
        from megatron_eps import EPSConfig
        from megatron_eps.experts.autotune import autotuner_for

        self.eps_config = EPSConfig(kernel_autotune="on", cost_profile=profile_path,
                                    kernel_cache=os.path.join(cache_dir, "kernels.json"))
        self.tuner = autotuner_for(device, self.eps_config.kernel_cache)
        self.buckets = {}

    def choose(self, experts, counts, x, probs):
        from megatron_eps.experts.chunk_runner import ExpertRunner

        runner = ExpertRunner(experts, self.eps_config)
        before = (self.tuner.timed_calls, self.tuner.tuning_seconds, set(self.tuner.decisions))
        deadline = time.monotonic() + 120
        with torch.no_grad(), cal.offsets_staged(experts, counts, x.device):
            runner.run(x, counts, probs, 0)
            # A layer's later forwards time the bucket once its candidates have compiled in
            # the background: the choice scored is the one it settles on.
            while self.tuner.waiting_buckets and time.monotonic() < deadline:
                time.sleep(0.01)
                runner.run(x, counts, probs, 0)
        for key in set(self.tuner.decisions) - before[2]:
            self.buckets[key] = {"timed_candidates": self.tuner.timed_calls - before[0],
                                 "seconds": self.tuner.tuning_seconds - before[1],
                                 **self.tuner.decisions[key]}
        return runner.backends_used[-1]


def run_grid(args, device, dtype, profile, autotune):
    rows_out = []
    for shape_name in args.shapes:
        hidden, ffn, n = SHAPES[shape_name]
        experts = cal.synthetic_experts(hidden, ffn, n, dtype, device, seed=1)
        names = cal.measurable_backends(experts, device, dtype)
        max_rows = max(int(round(n * m)) for m in args.loads)
        inputs = cal.make_inputs(max_rows, hidden, dtype, device, sets=3 if device.type == "cuda" else 1, seed=1)
        covered = profile is not None and profile.covers(device, dtype) and profile.covers_shape(hidden, ffn)
        for mean in args.loads:
            for skew in args.skews:
                counts = cal.make_counts(n, mean, skew, seed=1)
                rows = sum(counts)
                x, p = inputs[0]
                chosen_by = {
                    "autotune": autotune.choose(experts, counts, x[:rows], p[:rows]),
                    "profile": selector.choose_backend("auto", experts, counts, device, dtype, profile),
                    "default": selector.default_backend(device, names),
                }
                # Two passes (each interleaves the backends' batches), backends in opposite
                # orders, the faster median kept: a host stall during one pass (launch-bound
                # calls) does not make a backend look slow.
                first = cal.measure_point(experts, names, counts, inputs, device, args.target_ms / 1e3)
                second = cal.measure_point(experts, names[::-1], counts, inputs, device, args.target_ms / 1e3)
                seconds = {b: min(first[b], second[b]) for b in names}
                chosen = chosen_by["profile"]
                oracle = min(seconds, key=seconds.get)
                flops = 6.0 * rows * hidden * ffn
                record = {
                    "shape": shape_name, "hidden": hidden, "ffn": ffn, "experts": n,
                    "covered_by_tables": covered,
                    "tokens_per_expert": mean, "skew": skew, "rows": rows, "max_tokens": max(counts),
                    "seconds": seconds, "chosen": chosen, "oracle": oracle,
                    "chosen_over_oracle": seconds[oracle] / seconds[chosen] if chosen in seconds else None,
                    "chosen_by": chosen_by,
                    "efficiency": {k: seconds[oracle] / seconds[c] for k, c in chosen_by.items() if c in seconds},
                    "tflops": {b: flops / t / 1e12 for b, t in seconds.items()},
                }
                if profile is not None and chosen in profile.backends:
                    record["predicted_seconds"] = {
                        b: kernel_tables.predict_time(profile, b, (hidden, ffn), counts)
                        for b in names if b in profile.backends
                    }
                if "triton" in seconds and "grouped" in seconds:
                    record["triton_speedup_vs_grouped"] = seconds["grouped"] / seconds["triton"]
                rows_out.append(record)
                print(format_row(record), flush=True)
        del experts, inputs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows_out


def format_row(r):
    times = " ".join(f"{b}={t * 1e3:8.3f}" for b, t in sorted(r["seconds"].items()))
    effs = " ".join(f"{k[:4]} {r['chosen_by'][k]:>7} {r['efficiency'].get(k, float('nan')):.2f}"
                    for k in SELECTIONS)
    tri = r.get("triton_speedup_vs_grouped")
    return (
        f"{r['shape']:>18} load {r['tokens_per_expert']:5d} skew {r['skew']:.1f} max {r['max_tokens']:6d} | "
        f"{times} ms | oracle {r['oracle']:>7} | {effs} | "
        f"tri/grp {'-' if tri is None else f'{tri:.2f}'} | best {max(r['tflops'].values()):6.1f} TF/s"
    )


def summarize(rows, ceiling):
    summary = {}
    effs = [r["chosen_over_oracle"] for r in rows if r["chosen_over_oracle"] is not None]
    summary["selector_geomean"] = geomean(effs)
    summary["selector_worst"] = min(effs) if effs else None
    per_shape = {}
    for shape in sorted({r["shape"] for r in rows}):
        e = [r["chosen_over_oracle"] for r in rows if r["shape"] == shape and r["chosen_over_oracle"] is not None]
        per_shape[shape] = {"geomean": geomean(e), "worst": min(e) if e else None}
    summary["selector_per_shape"] = per_shape
    summary["selections"] = {}
    for name in SELECTIONS:
        e = [r["efficiency"][name] for r in rows if name in r["efficiency"]]
        per = {}
        for shape in sorted({r["shape"] for r in rows}):
            es = [r["efficiency"][name] for r in rows if r["shape"] == shape and name in r["efficiency"]]
            per[shape] = {"geomean": round(geomean(es), 4), "worst": round(min(es), 4) if es else None}
        summary["selections"][name] = {"geomean": round(geomean(e), 4), "worst": round(min(e), 4) if e else None,
                                       "per_shape": per}
    hot = [r["triton_speedup_vs_grouped"] for r in rows
           if "triton_speedup_vs_grouped" in r and r["skew"] >= 1.0 and r["tokens_per_expert"] >= 256]
    rest = [r["triton_speedup_vs_grouped"] for r in rows
            if "triton_speedup_vs_grouped" in r and not (r["skew"] >= 1.0 and r["tokens_per_expert"] >= 256)]
    summary["triton_vs_grouped_skewed_ge256"] = {"geomean": geomean(hot), "min": min(hot) if hot else None}
    summary["triton_vs_grouped_elsewhere"] = {"geomean": geomean(rest), "min": min(rest) if rest else None}
    big = [r for r in rows if r["tokens_per_expert"] >= 1024 and r["skew"] == 1.0]
    summary["best_pct_of_ceiling_ge1024_skew1"] = {
        f"{r['shape']}@{r['tokens_per_expert']}": round(100 * max(r["tflops"].values()) / ceiling, 1) for r in big
    }
    summary["chosen_pct_of_ceiling_ge1024_skew1"] = {
        f"{r['shape']}@{r['tokens_per_expert']}": round(100 * r["tflops"][r["chosen"]] / ceiling, 1) for r in big
    }
    wins = {}
    for r in rows:
        wins[r["oracle"]] = wins.get(r["oracle"], 0) + 1
    summary["oracle_wins"] = wins
    return summary


def stock_comparison(device, dtype, target_s, profile):
    """Stock SequentialMLP vs the backends: DSV2-Lite, T=4096 tokens per rank, top-6 (EP=1)."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_eps import compat
    from megatron_eps.experts import LocalExperts
    from megatron_eps.testing import Utils
    from megatron_eps.testing.distributed import free_port
    from megatron_eps.inference.layers import moe_config

    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    Utils.initialize_model_parallel(1, 1)
    hidden, ffn, n, topk, tokens = 2048, 1408, 64, 6, 4096
    config = moe_config(num_experts=n, topk=topk, hidden_size=hidden, ffn_hidden_size=ffn, dtype=dtype)
    Utils.set_seed(5)
    layer = MoELayer(config, submodules=compat.moe_submodules_from_spec(compat.local_moe_spec(n))).to(device)
    module = layer.experts.eval()
    experts = LocalExperts(module, config)
    results = []
    rows_total = tokens * topk
    gen = torch.Generator(device="cpu").manual_seed(3)
    router_like = torch.multinomial(torch.softmax(torch.randn(n, generator=gen), 0), rows_total, True, generator=gen)
    loads = {
        "balanced": cal.make_counts(n, rows_total / n, 0.0),
        "zipf1.0": cal.make_counts(n, rows_total / n, 1.0),
        "random_router": torch.bincount(router_like, minlength=n).tolist(),
    }
    x = torch.randn(rows_total, hidden, device=device).to(dtype)
    probs = torch.rand(rows_total, device=device)
    with torch.no_grad():
        for name, counts in loads.items():
            # Megatron's dispatcher hands SequentialMLP a host tensor of counts: no sync in .tolist().
            counts_cpu = torch.tensor(counts)
            stock_t = cal.time_call(lambda i: module(x, counts_cpu, probs), device, target_s=target_s)
            stock_out = module(x, counts_cpu, probs)[0]
            seconds, errors = {}, {}
            for backend in cal.measurable_backends(experts, device, dtype):
                fwd = get_backend(backend).forward
                seconds[backend] = cal.time_call(lambda i, f=fwd: f(experts, x, counts, probs, 0), device, target_s=target_s)
                errors[backend] = relative_error(fwd(experts, x, counts, probs, 0), stock_out)
            chosen = selector.choose_backend("auto", experts, counts, device, dtype, profile)
            best = min(seconds, key=seconds.get)
            record = {
                "load": name, "tokens_per_rank": tokens, "topk": topk, "rows": rows_total,
                "max_tokens": max(counts), "stock_seconds": stock_t, "seconds": seconds,
                "rel_err_vs_stock": errors, "chosen": chosen, "best": best,
                "speedup_best": stock_t / seconds[best], "speedup_chosen": stock_t / seconds[chosen],
            }
            results.append(record)
            print(
                f"stock SequentialMLP DSV2-Lite T={tokens} {name:>13}: stock {stock_t * 1e3:.3f} ms, "
                + ", ".join(f"{b} {t * 1e3:.3f} ms (err {errors[b]:.1e})" for b, t in seconds.items())
                + f" -> chosen {chosen} {record['speedup_chosen']:.1f}x, best {best} {record['speedup_best']:.1f}x",
                flush=True,
            )
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default=None,
                        help="cost profile for the selector (default: the shipped one)")
    parser.add_argument("--out", default=None, help="JSON results path")
    parser.add_argument("--shapes", default=",".join(s for s in SHAPES if s != "tiny_cpu"))
    parser.add_argument("--loads", default=",".join(map(str, LOADS)))
    parser.add_argument("--skews", default=",".join(map(str, SKEWS)))
    parser.add_argument("--target-ms", type=float, default=30.0)
    parser.add_argument("--stock", action="store_true", help="also time stock SequentialMLP (needs Megatron)")
    parser.add_argument("--git-commit", default=None)
    args = parser.parse_args(argv)
    args.shapes = [s for s in args.shapes.split(",") if s]
    unknown = [s for s in args.shapes if s not in SHAPES]
    if unknown:
        raise SystemExit(f"--shapes {unknown}: known shapes are {', '.join(SHAPES)}")
    args.loads = [int(v) for v in args.loads.split(",")]
    args.skews = [float(v) for v in args.skews.split(",")]
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    profile = load_kernel_tables(args.profile, device)
    started = time.time()
    cal.warm_gpu(device, seconds=2.0)
    ceiling = dense_ceiling(device, dtype)
    print(f"device {kernel_tables.device_name(device)}; dense {dtype} GEMM ceiling {ceiling:.1f} TF/s; "
          f"profile {profile.path if profile else None}", flush=True)
    with tempfile.TemporaryDirectory() as cache_dir:
        autotune = AutotuneSelection(device, args.profile, cache_dir)
        rows = run_grid(args, device, dtype, profile, autotune)
    summary = summarize(rows, ceiling)
    summary["self_calibration"] = {
        "buckets": len(autotune.buckets),
        "timed_candidates_per_bucket": sorted({b["timed_candidates"] for b in autotune.buckets.values()}),
        "runs_per_candidate": TUNING_ROUNDS * (1 + TIMED_RUNS),
        "seconds_total": round(sum(b["seconds"] for b in autotune.buckets.values()), 3),
        "per_bucket": autotune.buckets,
    }
    stock = stock_comparison(device, dtype, args.target_ms / 1e3, profile) if args.stock else None
    result = {
        "benchmark": "bench_experts",
        "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
        "git_commit": git_commit(args.git_commit),
        "device": cal.device_info(device),
        "versions": cal.versions(),
        "dtype": str(dtype).replace("torch.", ""),
        "profile": profile.path if profile else None,
        "profile_device": profile.device_name if profile else None,
        "dense_ceiling_tflops": ceiling,
        "summary": summary,
        "stock_sequential_mlp": stock,
        "rows": rows,
        "wall_seconds": time.time() - started,
    }
    print(json.dumps(summary, indent=1))
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
