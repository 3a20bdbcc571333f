"""Decode-step cost of one MoE layer, stock MoELayer vs EPSMoELayer (eager, bf16, one GPU):
a decode step of batch B is B tokens, which EPSMoELayer without expert parallelism hands to the stock forward
(``takes_stock_path``). Bar: EPS within 3% of stock at batch 1-64.

    python benchmarks/megatron_lm_decode.py --out decode.json

The layer is a DeepSeek-V2-Lite MoE layer (hidden 2048, 64 experts of F 1408, top-6, shared
expert 2816), with its experts as Megatron's SequentialMLP and, apart, as one grouped GEMM
(``inference.baselines.GroupedGemmExperts`` in both layers). A decode step's layer forward is
host-bound and the host's speed drifts, so stock and EPS are timed in pairs of back-to-back
samples (CUDA events around ``--steps`` forwards each; the order alternates between pairs), and
the ratio reported is the median of the pairs' ratios, with its quartiles. What EPS adds on the
host, the check that sends a step to the stock forward, is also timed alone.
"""

import argparse
import json
import statistics
import time


def _timed_steps(layer, x, steps):
    """Microseconds per forward: CUDA events on a GPU, the host clock on CPU (smoke runs)."""
    import torch

    if not x.is_cuda:
        start = time.perf_counter()
        for _ in range(steps):
            layer(x)
        return (time.perf_counter() - start) / steps * 1e6
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(steps):
        layer(x)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / steps * 1e3


def _quartiles(values):
    q = statistics.quantiles(values, n=4)
    return [round(q[0], 4), round(statistics.median(values), 4), round(q[2], 4)]


def measure(batches, steps, pairs, experts_kinds):
    import torch

    from megatron_eps import EPSConfig
    from megatron_eps.inference.baselines import GroupedGemmExperts
    from megatron_eps.inference.layers import build_moe_pair, moe_config
    from megatron_eps.testing import Utils

    Utils.initialize_model_parallel(1, 1, expert_model_parallel_size=1)
    # bf16 on the GPU; fp32 on CPU (smoke runs of the script)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = moe_config(num_experts=64, topk=6, hidden_size=2048, ffn_hidden_size=1408,
                        shared_expert_size=2816, dtype=dtype)
    results = []
    with torch.inference_mode():
        for experts_kind in experts_kinds:
            stock, eps = build_moe_pair(config, EPSConfig(kernel_autotune="off"))
            if experts_kind == "grouped":
                stock.experts = GroupedGemmExperts(stock.experts, config)
                eps.experts = GroupedGemmExperts(eps.experts, config)
            for batch in batches:
                x = torch.randn(1, batch, 2048, device=device, dtype=dtype)
                for layer in (stock, eps):
                    for _ in range(10):
                        layer(x)
                times = {"stock": [], "eps": []}
                ratios = []
                for pair in range(pairs):
                    order = ("stock", "eps") if pair % 2 == 0 else ("eps", "stock")
                    sample = {name: _timed_steps(stock if name == "stock" else eps, x, steps)
                              for name in order}
                    for name in order:
                        times[name].append(sample[name])
                    ratios.append(sample["eps"] / sample["stock"])
                start = time.perf_counter()
                checks = 2000
                for _ in range(checks):
                    eps.takes_stock_path(x)
                check_us = (time.perf_counter() - start) / checks * 1e6
                stock_us = statistics.median(times["stock"])
                eps_us = statistics.median(times["eps"])
                results.append({
                    "experts": experts_kind, "batch": batch,
                    "stock_us": round(stock_us, 2), "eps_us": round(eps_us, 2),
                    "eps_over_stock": round(statistics.median(ratios), 4),
                    "eps_over_stock_quartiles": _quartiles(ratios),
                    "eps_check_host_us": round(check_us, 2),
                    "samples_us": {k: [round(v, 1) for v in vs] for k, vs in times.items()},
                    "eps_took_stock_path": bool(eps.takes_stock_path(x))})
            del stock, eps
    Utils.destroy_model_parallel()
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--batches", default="1,2,4,8,16,32,64")
    parser.add_argument("--steps", type=int, default=5, help="forwards per timed sample")
    parser.add_argument("--pairs", type=int, default=40, help="(stock, EPS) sample pairs per point")
    parser.add_argument("--experts", default="sequential,grouped",
                        help="the layers' experts: sequential (SequentialMLP), grouped, or both")
    args = parser.parse_args()
    kinds = [k for k in args.experts.split(",") if k]
    if not kinds or set(kinds) - {"sequential", "grouped"}:
        parser.error("--experts: a comma-separated list of sequential, grouped")
    try:
        batches = [int(b) for b in args.batches.split(",") if b]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        parser.error(f"--batches: a comma-separated list of positive ints, got {args.batches!r}")
    if args.steps < 1:
        parser.error(f"--steps: at least 1, got {args.steps}")
    if args.pairs < 2:
        parser.error(f"--pairs: at least 2 (the ratio's quartiles need two), got {args.pairs}")
    import torch

    from megatron_eps.testing import run_distributed

    results = run_distributed(measure, 1, batches, args.steps, args.pairs, kinds)[0]
    import megatron.core

    report = {
        "benchmark": "megatron_lm_decode_step",
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "versions": {"torch": torch.__version__, "megatron_core": megatron.core.__version__},
        "layer": "DSV2-Lite MoE layer: hidden 2048, 64 experts F1408, top-6, shared 2816, bf16",
        "timing": "median of per-pair ratios of back-to-back samples, each CUDA events around "
                  f"{args.steps} forwards; {args.pairs} pairs per point, order alternating",
        "results": results,
        "bar": "eps_over_stock (median of the pairs' ratios) <= 1.03 at every batch",
        "within_3_percent": all(r["eps_over_stock"] <= 1.03 for r in results),
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    for r in results:
        print(f"decode {r['experts']:10s} batch {r['batch']:3d}: stock {r['stock_us']:8.1f} us  "
              f"eps {r['eps_us']:8.1f} us  ratio {r['eps_over_stock']:.3f} "
              f"(quartiles {r['eps_over_stock_quartiles']})  check {r['eps_check_host_us']:.1f} us",
              flush=True)


if __name__ == "__main__":
    main()
