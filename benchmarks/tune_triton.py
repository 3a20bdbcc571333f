"""Sweep tile configs of the Triton expert GEMM against torch._grouped_mm (GPU).

Times the whole triton backend forward under several (fc1, fc2) GemmConfig pairs on the
benchmark shapes at a few loads and skews; prints the best config per point and writes JSON.
Used to pick megatron_eps.experts.triton_kernels.default_configs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_eps.calibrate import kernels as cal  # noqa: E402
from megatron_eps.experts import triton_kernels as tk  # noqa: E402
from megatron_eps.experts.base import get_backend  # noqa: E402
from megatron_eps.experts.reference import reference_expert_forward, relative_error  # noqa: E402

G = tk.GemmConfig
CANDIDATES = {
    "m128_n64x2_w8_s4": (G(128, 64, 64, 8, 8, 4), G(128, 128, 64, 8, 8, 4)),
    "m128_n64x2_w4_s4": (G(128, 64, 64, 8, 4, 4), G(128, 128, 64, 8, 4, 4)),
    "m128_n128x2_w8_s3": (G(128, 128, 64, 8, 8, 3), G(128, 256, 64, 8, 8, 3)),
    "m64_n64x2_w4_s4": (G(64, 64, 64, 8, 4, 4), G(64, 128, 64, 8, 4, 4)),
    "m64_n128x2_w4_s4": (G(64, 128, 64, 8, 4, 4), G(64, 256, 64, 8, 8, 3)),
    "m128_n64x2_w8_s4_grid": (G(128, 64, 64, 8, 8, 4, persistent=False), G(128, 128, 64, 8, 8, 4, persistent=False)),
    "m128_n64x2_w8_s4_g16": (G(128, 64, 64, 16, 8, 4), G(128, 128, 64, 16, 8, 4)),
    "tma_m128_n64x2_w8_s4": (G(128, 64, 64, 8, 8, 4, tma=True), G(128, 128, 64, 8, 8, 4, tma=True)),
    "tma_m128_n128x2_w8_s3": (G(128, 128, 64, 8, 8, 3, tma=True), G(128, 256, 64, 8, 8, 3, tma=True)),
    "tma_m128_n128_w8_s4_fc2n128": (G(128, 128, 64, 8, 8, 3, tma=True), G(128, 128, 64, 8, 8, 4, tma=True)),
    "tma_m64_n64x2_w4_s4": (G(64, 64, 64, 8, 4, 4, tma=True), G(64, 128, 64, 8, 4, 4, tma=True)),
    "tma_m64_n128x2_w4_s4": (G(64, 128, 64, 8, 4, 4, tma=True), G(64, 256, 64, 8, 8, 3, tma=True)),
    "tma_m128_n64x2_w8_s4_grid": (G(128, 64, 64, 8, 8, 4, persistent=False, tma=True),
                                  G(128, 128, 64, 8, 8, 4, persistent=False, tma=True)),
    # Weight-bound loads (a few rows per expert): more weight bytes in flight per SM.
    "tma_m64_n64x2_w4_s4_c2": (G(64, 64, 64, 8, 4, 4, tma=True, ctas_per_sm=2),
                               G(64, 128, 64, 8, 4, 4, tma=True, ctas_per_sm=2)),
    "tma_m64_n64x2_w4_s6": (G(64, 64, 64, 8, 4, 6, tma=True), G(64, 128, 64, 8, 4, 6, tma=True)),
    "tma_m64_n64x2_k128_w4_s3": (G(64, 64, 128, 8, 4, 3, tma=True), G(64, 128, 128, 8, 4, 3, tma=True)),
    "tma_m64_n32x2_w4_s6_c2": (G(64, 32, 64, 8, 4, 6, tma=True, ctas_per_sm=2),
                               G(64, 64, 64, 8, 4, 6, tma=True, ctas_per_sm=2)),
    "tma_m64_n64x2_w4_s4_grid": (G(64, 64, 64, 8, 4, 4, persistent=False, tma=True),
                                 G(64, 128, 64, 8, 4, 4, persistent=False, tma=True)),
}


def kernel_facts(seen_before):
    """Registers, spills and the instructions that matter, of the kernels compiled since
    ``seen_before`` (a tk.compiled_gemm_kernels() result), the last of each flavour."""
    facts = {}
    for flavour, kernels in tk.compiled_gemm_kernels().items():
        if len(kernels) <= len(seen_before.get(flavour, ())):
            continue
        kernel = kernels[-1]
        try:
            ptx = kernel.asm.get("ptx", "")
            facts[flavour] = {
                "n_regs": getattr(kernel, "n_regs", None),
                "n_spills": getattr(kernel, "n_spills", None),
                "shared": kernel.metadata.shared if hasattr(kernel, "metadata") else None,
                "wgmma": "wgmma" in ptx,
                "mma_sync": "mma.sync" in ptx,
                "tma_load": "cp.async.bulk.tensor" in ptx,
                "cp_async": "cp.async.cg" in ptx or "cp.async.ca" in ptx,
            }
        except Exception as exc:  # noqa: BLE001
            facts[flavour] = str(exc)
    return facts
SHAPES = {"dsv2_ep8": (5120, 1536, 20), "dsv2_lite": (2048, 1408, 64), "mixtral_ep2": (4096, 14336, 4),
          "qwen3_30b_ep2": (2048, 768, 64), "h4096_f1536_n16": (4096, 1536, 16), "dsv3_ep8": (7168, 2048, 32)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--loads", default="16,256,1024,4096")
    parser.add_argument("--skews", default="0,1.0")
    parser.add_argument("--candidates", default=",".join(CANDIDATES))
    parser.add_argument("--shapes", default="dsv2_ep8,dsv2_lite,mixtral_ep2", help=", ".join(SHAPES))
    args = parser.parse_args()
    device = torch.device("cuda", torch.cuda.current_device())
    dtype = torch.bfloat16
    loads = [int(v) for v in args.loads.split(",")]
    skews = [float(v) for v in args.skews.split(",")]
    names = args.candidates.split(",")
    results = []
    cal.warm_gpu(device, seconds=2.0)
    facts_seen = set()
    for shape_name in args.shapes.split(","):
        hidden, ffn, n = SHAPES[shape_name]
        experts = cal.synthetic_experts(hidden, ffn, n, dtype, device, seed=2)
        inputs = cal.make_inputs(n * max(loads), hidden, dtype, device, sets=3, seed=2)
        for mean in loads:
            for skew in skews:
                counts = cal.make_counts(n, mean, skew, seed=2)
                rows = sum(counts)
                base = cal.measure_point(experts, ["grouped", "dense", "triton"], counts, inputs, device, 0.03)
                per_cfg = {}
                errors = {}
                for name in names:
                    cfg = CANDIDATES[name]
                    tk.set_config_chooser(lambda c, h, f, g, cfg=cfg: cfg)
                    try:
                        seen_before = tk.compiled_gemm_kernels()
                        per_cfg[name] = cal.measure_point(experts, ["triton"], counts, inputs, device, 0.03)["triton"]
                        if (name, mean > 64) not in facts_seen:
                            facts_seen.add((name, mean > 64))
                            print(f"   kernel {name} load {mean}: {kernel_facts(seen_before)}", flush=True)
                        if mean == loads[0] or mean == loads[-1]:
                            x, p = inputs[0]
                            out = get_backend("triton").forward(experts, x[:rows], counts, p[:rows], 0)
                            w = experts.weights()
                            sub = slice(0, min(rows, 2048))
                            # Check the first rows only (float64 reference on the host is slow).
                            c2, left = [], sub.stop
                            for c in counts:
                                c2.append(min(c, left))
                                left -= c2[-1]
                            ref = reference_expert_forward(w.fc1, w.fc2, w.activation, x[sub], c2, p[sub])
                            errors[name] = relative_error(out[sub], ref)
                    except Exception as exc:  # noqa: BLE001 - a config that does not compile
                        per_cfg[name] = None
                        errors[name] = f"{type(exc).__name__}: {str(exc)[:200]}"
                    finally:
                        tk.set_config_chooser(None)
                best = min((k for k in per_cfg if per_cfg[k]), key=per_cfg.get)
                flops = 6.0 * rows * hidden * ffn
                rec = {"shape": shape_name, "load": mean, "skew": skew, "max": max(counts),
                       "grouped": base["grouped"], "dense": base["dense"], "triton_default": base["triton"],
                       "configs": per_cfg,
                       "best": best, "errors": errors}
                results.append(rec)
                print(f"{shape_name:>11} load {mean:5d} skew {skew:.1f} grouped {base['grouped']*1e3:7.3f} "
                      f"dense {base['dense']*1e3:7.3f} "
                      f"({flops/base['grouped']/1e12:5.0f} TF/s) triton-default {base['triton']*1e3:7.3f} "
                      f"best {best} {per_cfg[best]*1e3:7.3f} ({flops/per_cfg[best]/1e12:5.0f} TF/s) "
                      f"x{base['grouped']/per_cfg[best]:.2f} | "
                      + " ".join(f"{k}={'-' if v is None else f'{v*1e3:.3f}'}" for k, v in per_cfg.items()),
                      flush=True)
                if errors:
                    print("   errors:", {k: (round(v, 5) if isinstance(v, float) else v) for k, v in errors.items()}, flush=True)
        del experts, inputs
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
