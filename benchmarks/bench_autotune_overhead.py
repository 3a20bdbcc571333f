"""What self-calibration costs a prefill: the first forward of a stack of EPS MoE layers with
``kernel_autotune`` on (a fresh decision cache) and off, each in a fresh process (GPU).

A Qwen3-30B-A3B-like layer (H2048, 128 experts of F768, top-8; a width no shipped kernel table
covers, so ``auto`` calibrates) is stacked ``--layers`` times (27 by default, the depth of
DeepSeek-V2-Lite) at ``--tokens`` tokens (8K). Each mode runs in its own process, so the first
forward pays what a real first forward pays (CUDA and cuBLAS start-up, Triton compilation or
loading). Modes:

  off_cold     kernel_autotune off, empty Triton cache of its own: a first run ever without it
  cold         kernel_autotune on, empty decision cache and empty Triton cache: a first run ever
  off          kernel_autotune off: the tables alone (Triton cache as "cold" left it)
  warm_triton  kernel_autotune on, empty decision cache, Triton kernels already compiled
  cached       kernel_autotune on, the decisions the previous mode wrote: nothing is timed

Prints a table and writes JSON (``--out``): per mode the first and the steady forward, the
autotuner's timed candidates and seconds (in the first forward and in all), the share of the
first forward spent calibrating, and the forward from which every bucket was decided (while
candidates compile in the background the forwards run a ready backend, untimed). Each mode runs
at least three forwards, and more until every bucket is decided.

    python benchmarks/bench_autotune_overhead.py --out overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Run in this order: "cold" needs an empty Triton cache, "warm_triton" the one "cold" filled.
MODES = ("off_cold", "cold", "off", "warm_triton", "cached")
# Modes that start from a Triton cache of their own (empty), not the shared one.
OWN_TRITON_CACHE = ("off_cold",)


def run_one(args) -> dict:
    """One process: build the stack, time three forwards, report the autotuner's work."""
    import torch

    from megatron_eps import compat
    from megatron_eps.config import EPSConfig
    from megatron_eps.experts.autotune import autotuner_for
    from megatron_eps.moe_layer import EPSMoELayer
    from megatron_eps.testing.distributed import Utils, free_port
    from megatron_eps.inference.layers import moe_config

    for key, value in (("WORLD_SIZE", "1"), ("RANK", "0"), ("LOCAL_RANK", "0"),
                       ("MASTER_PORT", str(free_port()))):
        os.environ.setdefault(key, value)
    Utils.initialize_model_parallel(1, 1)
    device = torch.device("cuda", torch.cuda.current_device())
    dtype = torch.bfloat16
    config = moe_config(num_experts=args.experts, topk=args.topk, hidden_size=args.hidden,
                        ffn_hidden_size=args.ffn, dtype=dtype)
    eps_config = EPSConfig(kernel_autotune="off" if args.mode.startswith("off") else "on",
                           kernel_cache=args.kernel_cache)
    submodules = compat.moe_submodules_from_spec(compat.local_moe_spec(args.experts))
    Utils.set_seed(1)
    layers = [EPSMoELayer(config, submodules=submodules, eps_config=eps_config).to(device).eval()
              for _ in range(args.layers)]
    gen = torch.Generator(device=device).manual_seed(2)
    x = torch.randn(args.tokens, 1, args.hidden, device=device, generator=gen).to(dtype) * 0.5

    def forward():
        h = x
        with torch.no_grad():
            for layer in layers:
                h = h + layer(h)[0]
        torch.cuda.synchronize(device)

    torch.cuda.synchronize(device)
    tuner = autotuner_for(device, args.kernel_cache)
    forwards = []
    # Until every bucket met is decided (candidates compile in the background meanwhile), and
    # at least three forwards.
    while len(forwards) < 3 or (tuner.waiting_buckets and len(forwards) < args.max_forwards):
        tuning, untimed = tuner.tuning_seconds, tuner.untimed_calls
        t0 = time.perf_counter()
        forward()
        forwards.append({"seconds": time.perf_counter() - t0, "tuning_s": tuner.tuning_seconds - tuning,
                         "untimed_calls": tuner.untimed_calls - untimed,
                         "buckets_waiting": len(tuner.waiting_buckets)})
    backends = sorted({b for layer in layers for b in layer.expert_runner.backends_used})
    decided = [i for i, f in enumerate(forwards) if f["buckets_waiting"] == 0]
    return {"mode": args.mode, "first_s": forwards[0]["seconds"],
            "steady_s": min(f["seconds"] for f in forwards[1:]),
            "timed_candidates": tuner.timed_calls, "tuning_s": tuner.tuning_seconds,
            "first_forward_tuning_s": forwards[0]["tuning_s"],
            "untimed_calls": tuner.untimed_calls,
            "decided_by_end_of_forward": decided[0] + 1 if decided else None,
            "forwards": forwards,
            "buckets": sorted(tuner.decisions), "backends_last_forward": backends}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=27)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=768)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--max-forwards", type=int, default=200,
                        help="forwards at most while candidates compile in the background")
    parser.add_argument("--out", default=None)
    parser.add_argument("--git-commit", default=None)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--kernel-cache", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.mode:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return None

    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench_autotune_overhead.py times GPU first forwards; no CUDA device here")
    from megatron_eps.calibrate import kernels as cal
    from megatron_eps.provenance import git_commit, write_result

    results = []
    with tempfile.TemporaryDirectory() as root:
        cache = os.path.join(root, "kernels.json")
        triton_cache = os.path.join(root, "triton")
        shape_args = [f"--{k}={getattr(args, k)}" for k in ("layers", "tokens", "hidden", "ffn", "experts", "topk")]
        for mode in MODES:
            if mode in ("cold", "warm_triton") and os.path.exists(cache):
                os.remove(cache)
            env = dict(os.environ, TRITON_CACHE_DIR=os.path.join(root, "triton_" + mode)
                       if mode in OWN_TRITON_CACHE else triton_cache)
            proc = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--mode", mode, "--kernel-cache", cache] + shape_args,
                env=env, capture_output=True, text=True, timeout=600)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"mode {mode} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            record = json.loads(line[len("RESULT "):])
            record["share_of_first_forward"] = record["first_forward_tuning_s"] / record["first_s"]
            results.append(record)
            print(f"{mode:>12}: first forward {record['first_s'] * 1e3:8.1f} ms, steady {record['steady_s'] * 1e3:7.1f} ms, "
                  f"timed candidates {record['timed_candidates']:3d} in {len(record['buckets'])} bucket(s), "
                  f"calibrating {record['first_forward_tuning_s'] * 1e3:7.1f} ms in the first forward "
                  f"= {100 * record['share_of_first_forward']:.1f}% of it, {record['tuning_s'] * 1e3:7.1f} ms "
                  f"in all; every bucket decided by the end of forward {record['decided_by_end_of_forward']} "
                  f"({record['untimed_calls']} untimed calls before); backends {record['backends_last_forward']}",
                  flush=True)
    by_mode = {r["mode"]: r for r in results}
    first_forward = {
        "empty_triton_cache": {"with": by_mode["cold"]["first_s"], "without": by_mode["off_cold"]["first_s"]},
        "warm_triton_cache": {"with": by_mode["warm_triton"]["first_s"], "without": by_mode["off"]["first_s"]},
    }
    for case, pair in first_forward.items():
        pair["extra_share"] = pair["with"] / pair["without"] - 1
        print(f"first forward with / without self-calibration, {case.replace('_', ' ')}: "
              f"{pair['with'] * 1e3:.1f} / {pair['without'] * 1e3:.1f} ms ({100 * pair['extra_share']:+.1f}%)")
    device = torch.device("cuda", 0)
    result = {"benchmark": "bench_autotune_overhead", "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
              "git_commit": args.git_commit or git_commit(), "device": cal.device_info(device),
              "versions": cal.versions(), "shape": {k: getattr(args, k) for k in ("layers", "tokens", "hidden", "ffn", "experts", "topk")},
              "modes": results, "first_forward_with_and_without": first_forward}
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
