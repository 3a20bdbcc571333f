"""How far EPS and stock Megatron each are from an fp32 reference, and stock from itself.

    python benchmarks/accuracy_check.py --out accuracy.json      (one GPU; CPU works too)

One DeepSeek-V2-Lite MoE layer (H2048, 64 experts of F1408, top-6, 2 shared experts, fp32
router) in bf16 at EP=1. For each token count it reports relative L2 errors of:
  stock vs stock (a second identical call: Megatron's bf16 atomic scatter-add is not
  deterministic), EPS (each expert kernel) vs stock, and stock / EPS vs the same layer in fp32.
The logit check of the prefill benchmark compares EPS against stock; this tells how much of that
difference is stock's own bf16 rounding.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokens", default="2048,8192,32768")
    parser.add_argument("--kernels", default="auto,megatron,grouped,triton")
    args = parser.parse_args(argv)
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("RANK", "0")
    from megatron_eps.testing.distributed import Utils, free_port

    os.environ.setdefault("MASTER_PORT", str(free_port()))
    from megatron_eps import EPSConfig
    from megatron_eps.inference.layers import build_moe_pair, moe_config

    Utils.initialize_model_parallel(1, 1)
    cuda = torch.cuda.is_available()
    kernels = [k for k in args.kernels.split(",") if cuda or k in ("auto", "megatron", "dense")]
    config = moe_config(
        num_experts=64, topk=6, hidden_size=2048, ffn_hidden_size=1408,
        shared_expert_size=2816, dtype=torch.bfloat16, moe_router_dtype="fp32",
    )
    stock, eps = build_moe_pair(config, EPSConfig(min_tokens_to_pipeline=0))
    reference, _ = build_moe_pair(
        moe_config(num_experts=64, topk=6, hidden_size=2048, ffn_hidden_size=1408,
                   shared_expert_size=2816, dtype=torch.float32, moe_router_dtype="fp32"),
        EPSConfig(enabled=False),
    )
    reference.load_state_dict(stock.state_dict())  # the bf16 weights, held in fp32
    rows = []
    for tokens in [int(t) for t in args.tokens.split(",")]:
        x = torch.randn(tokens, 1, 2048, generator=torch.Generator().manual_seed(tokens))
        x = x.to(device="cuda" if cuda else "cpu", dtype=torch.bfloat16)
        with torch.no_grad():
            ref, _ = reference(x.float())
            stock_a, _ = stock(x)
            stock_b, _ = stock(x)
            row = {
                "tokens": tokens,
                "stock_vs_stock": rel(stock_b, stock_a),
                "stock_vs_fp32": rel(stock_a, ref),
            }
            for kernel in kernels:
                eps.eps_config = eps.eps_config.replace(expert_kernel=kernel)
                out, _ = eps(x)
                again, _ = eps(x)
                row[f"eps_{kernel}_vs_stock"] = rel(out, stock_a)
                row[f"eps_{kernel}_vs_fp32"] = rel(out, ref)
                row[f"eps_{kernel}_vs_itself"] = rel(again, out)
                row[f"eps_{kernel}_backends"] = sorted(set(eps.last_expert_backends))
        rows.append(row)
        print(json.dumps(row))
    from megatron_eps.provenance import git_commit

    commit = git_commit()
    result = {
        "what": "relative L2 errors of one DSV2-Lite MoE layer in bf16 (see docstring)",
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "megatron_core": __import__("megatron.core").core.__version__,
        "command": " ".join(sys.argv),
        "git_commit": commit,
        "rows": rows,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    Utils.destroy_model_parallel()


if __name__ == "__main__":
    main()
