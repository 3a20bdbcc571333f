"""A chunk's own rows apart (``local_rows: apart``): what the second GEMM call costs, and what
the forward gains, with GEMMs measured on this GPU and the link modeled.

    python benchmarks/local_rows_tradeoff.py --out local_rows.json            (GPU)
    python benchmarks/local_rows_tradeoff.py --smoke --out x.json              (CPU logic check)

With the local rows apart each chunk's expert GEMMs are two calls: over the rows the rank routed
to its own experts (they need no transfer, so they run beside the first dispatch, or beside the
last combine in the last chunk) and over the rows its peers sent. The second call reads the
chunk's weights again and both have fewer rows per expert.

For each shape and load this script
1. samples random top-k routing on every rank of the EP group (chunk_split_tradeoff's sampler);
2. times on this GPU rank 0's expert GEMMs per chunk as one call and as the two calls (fastest
   of the available backends, interleaved, offsets staged as in a layer);
3. models each chunk's dispatch and combine with the profile's copy-engine link figures, and
   the forward as ``policy.cost_model`` does (the plan simulated on two streams, the overlap
   efficiency and the per-chunk overhead applied), together and apart.

Step 2 is measured; step 3 is the calibrated model of the link, since one GPU has no peer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from chunk_split_tradeoff import SHAPES, SMOKE_SHAPES, GemmTimer, sample_routing  # noqa: E402

DEFAULT_SHAPES = ("dsv2_ep2", "dsv2_ep8", "mixtral_ep2")


def measure_shape(name, spec, tokens_list, degrees, profile, dtype, device, args):
    from megatron_eps.pipeline.layout import split_local_experts
    from megatron_eps.policy.cost_model import (LayerShape, chunk_comm_times, overlapped_time,
                                                shared_experts_time)

    hidden, ffn, experts, topk, ep, shared_ffn = spec
    local = experts // ep
    element = torch.empty((), dtype=dtype).element_size()
    shape = LayerShape(hidden, ffn, local, ep, topk, True, element, shared_ffn)
    max_rows = max(tokens_list) * topk * 2  # rank 0's received rows stay well under this
    timer = GemmTimer(hidden, ffn, local, dtype, device, max_rows, args.backends, args.target_s)
    points = []
    for tokens in tokens_list:
        maps = sample_routing(tokens, experts, topk, ep, seed=tokens, device=device)
        counts = maps.sum(dim=1).cpu().numpy()  # [src rank, expert]
        shared = shared_experts_time(tokens, shape, profile)
        point = {"shape": name, "tokens_per_rank": tokens, "ep": ep, "local_experts": local,
                 "shared_s": shared, "degrees": {}}
        for n in sorted({min(d, local) for d in degrees}):
            ranges = split_local_experts(local, n)
            dispatch, combine = chunk_comm_times(counts, shape, profile, [b - a for a, b in ranges])
            whole, own, peer = [], [], []
            for a, b in ranges:
                received = counts[:, a:b]  # rank 0's experts a..b-1, rows from every rank
                whole.append(timer.seconds(received.sum(axis=0), a)["best"])
                own.append(timer.seconds(received[0], a)["best"])
                peer.append(timer.seconds(received[1:].sum(axis=0), a)["best"])
            point["degrees"][str(n)] = {
                "dispatch_s": dispatch, "combine_s": combine,
                "gemm_whole_s": whole, "gemm_own_s": own, "gemm_peer_s": peer,
                "gemm_parts_over_whole": (sum(own) + sum(peer)) / sum(whole) if sum(whole) else None,
                "forward_together_s": overlapped_time(dispatch, whole, combine, shared, profile),
                "forward_apart_s": overlapped_time(dispatch, peer, combine, shared, profile,
                                                   local_compute=own),
            }
        for mode in ("together", "apart"):
            key = f"forward_{mode}_s"
            best = min(point["degrees"], key=lambda n: point["degrees"][n][key])
            point[f"best_{mode}"] = {"n": int(best), "forward_s": point["degrees"][best][key]}
        points.append(point)
        print_point(point)
    del timer
    return points


def print_point(p):
    t, a = p["best_together"], p["best_apart"]
    ratios = " ".join(f"{n}:{v['gemm_parts_over_whole']:.2f}" for n, v in p["degrees"].items()
                      if v["gemm_parts_over_whole"] is not None)
    print(f"{p['shape']:12} {p['tokens_per_rank']:>6} | together {t['forward_s'] * 1e3:7.2f} "
          f"(N={t['n']}) | apart {a['forward_s'] * 1e3:7.2f} (N={a['n']}) | apart/together "
          f"{a['forward_s'] / t['forward_s']:.3f} | GEMM parts/whole per N {ratios}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default=",".join(DEFAULT_SHAPES))
    ap.add_argument("--tokens", default="4096,8192,16384,32768")
    ap.add_argument("--degrees", default="1,2,3,4")
    ap.add_argument("--backends", default="", help="comma list (default: every measurable one)")
    ap.add_argument("--target-s", type=float, default=0.02)
    ap.add_argument("--profile", default=None,
                    help="profile with a links.copy_engine section (default: the shipped H200 one)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (logic check)")
    args = ap.parse_args(argv)
    from megatron_eps.calibrate.provenance import git_commit
    from megatron_eps.experts.calibrate import device_info, versions, warm_gpu
    from megatron_eps.policy.profile import PROFILES_DIR, open_profile

    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    names = list(shapes) if args.smoke else args.shapes.split(",")
    unknown = [s for s in names if s not in shapes]
    if unknown:
        raise SystemExit(f"--shapes {','.join(unknown)}: allowed: {', '.join(shapes)}")
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    path = args.profile or os.path.join(PROFILES_DIR, "nvidia_h200.json")
    profile = open_profile(path).pipeline_for("copy_engine")
    if profile is None:
        raise SystemExit(f"--profile {path}: no pipeline section to model the link with")
    args.backends = [b for b in args.backends.split(",") if b]
    tokens_list = [64, 256] if args.smoke else [int(t) for t in args.tokens.split(",")]
    degrees = [int(d) for d in args.degrees.split(",")]
    warm_gpu(device)
    t0 = time.time()
    points = []
    for name in names:
        points += measure_shape(name, shapes[name], tokens_list, degrees, profile, dtype, device,
                                args)
        if cuda:
            torch.cuda.empty_cache()
    result = {
        "device": device_info(device), "versions": versions(), "git_commit": git_commit(),
        "command": " ".join(sys.argv), "seconds": time.time() - t0,
        "link": {"transport": "copy_engine", "profile": path, **profile.to_dict()},
        "method": "routing sampled; rank 0's expert GEMMs timed on this device per chunk, whole "
                  "and as own + peer rows (fastest backend, interleaved); link and forward "
                  "modeled (cost_model.overlapped_time)",
        "points": points,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
