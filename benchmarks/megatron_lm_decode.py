"""Decode-step cost of one MoE layer, stock MoELayer vs EPSMoELayer (eager, bf16, one GPU):
a decode step of batch B is B tokens, which EPSMoELayer without expert parallelism hands to the stock forward
(``takes_stock_path``). Bar: EPS within 3% of stock at batch 1-64.

    python benchmarks/megatron_lm_decode.py --out decode.json

The layer is a DeepSeek-V2-Lite MoE layer (hidden 2048, 64 experts of F 1408, top-6, shared
expert 2816). Each batch size is timed in alternating rounds (stock, EPS, stock, ...) with CUDA
events around ``--steps`` forwards; the median per-step time over rounds is reported.
"""

import argparse
import json
import statistics


def measure(batches, steps, rounds):
    import torch

    from megatron_eps import EPSConfig
    from megatron_eps.testing import Utils
    from megatron_eps.inference.layers import build_moe_pair, moe_config

    Utils.initialize_model_parallel(1, 1, expert_model_parallel_size=1)
    config = moe_config(num_experts=64, topk=6, hidden_size=2048, ffn_hidden_size=1408,
                        shared_expert_size=2816, dtype=torch.bfloat16)
    stock, eps = build_moe_pair(config, EPSConfig(kernel_autotune="off"))
    results = []
    with torch.inference_mode():
        for batch in batches:
            x = torch.randn(1, batch, 2048, device="cuda", dtype=torch.bfloat16)
            for layer in (stock, eps):
                for _ in range(10):
                    layer(x)
            times = {"stock": [], "eps": []}
            for round_index in range(rounds):
                order = (("stock", stock), ("eps", eps))
                for name, layer in order if round_index % 2 == 0 else order[::-1]:
                    start = torch.cuda.Event(enable_timing=True)
                    end = torch.cuda.Event(enable_timing=True)
                    torch.cuda.synchronize()
                    start.record()
                    for _ in range(steps):
                        layer(x)
                    end.record()
                    end.synchronize()
                    times[name].append(start.elapsed_time(end) / steps * 1e3)
            stock_us = statistics.median(times["stock"])
            eps_us = statistics.median(times["eps"])
            results.append({"batch": batch, "stock_us": round(stock_us, 2), "eps_us": round(eps_us, 2),
                            "eps_over_stock": round(eps_us / stock_us, 4),
                            "round_us": times, "eps_took_stock_path": bool(eps.takes_stock_path(x))})
    Utils.destroy_model_parallel()
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--batches", default="1,2,4,8,16,32,64")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    import torch

    from megatron_eps.testing import run_distributed

    batches = [int(b) for b in args.batches.split(",")]
    results = run_distributed(measure, 1, batches, args.steps, args.rounds)[0]
    import megatron.core

    report = {
        "benchmark": "megatron_lm_decode_step", "device": torch.cuda.get_device_name(0),
        "versions": {"torch": torch.__version__, "megatron_core": megatron.core.__version__},
        "layer": "DSV2-Lite MoE layer: hidden 2048, 64 experts F1408, top-6, shared 2816, bf16",
        "steps_per_round": args.steps, "rounds": args.rounds, "results": results,
        "bar": "eps_us <= 1.03 * stock_us at every batch",
        "within_3_percent": all(r["eps_over_stock"] <= 1.03 for r in results),
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    for r in results:
        print(f"decode batch {r['batch']:3d}: stock {r['stock_us']:8.1f} us  eps {r['eps_us']:8.1f} us"
              f"  ratio {r['eps_over_stock']:.3f}", flush=True)


if __name__ == "__main__":
    main()
