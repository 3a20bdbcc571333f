"""Chunk by experts or by tokens? The measurement behind issue 14's ``chunk_split`` question.

    python benchmarks/chunk_split_tradeoff.py --out tradeoff.json            (GPU)
    python benchmarks/chunk_split_tradeoff.py --smoke --out x.json            (CPU logic check)

The deduplicated scheme sends one row per (token, destination rank, chunk). EPS chunks by groups
of local experts, so a token whose experts on one rank fall into two chunks travels twice: more
chunks save fewer bytes (comm/traffic.py). Chunking by tokens (each chunk a slice of every
rank's tokens, all local experts) keeps the saving whole, but every chunk runs every local
expert on a third or a quarter of its rows: its weights are read once per chunk and its GEMMs
are smaller.

For each shape and load this script
1. samples random top-k routing on every rank of the EP group (uniform, as a random router);
2. counts exactly, under both chunkings and N in ``--degrees``, the unique rows each chunk
   moves (the busiest rank's remote rows sent or received, as the cost model counts them);
3. times on this GPU the expert GEMMs each chunk runs on rank 0 (fastest of the available
   backends, backends interleaved, offsets staged as in a layer: calibrate.kernels);
4. models each chunk's dispatch and combine with the profile's copy-engine link figures
   (bandwidth, latency, one copy per peer and chunk, bf16 partial sums), and the forward as
   ``policy.cost_model.predict`` does: the plan simulated on two streams, the overlap
   efficiency and the per-chunk overhead applied.

Step 3 is measured; step 4 is the calibrated model of the link, since one GPU has no peer. The
output says which chunking the model prefers at each point with measured GEMM times, and by
how much the token chunks inflate the GEMMs: the half of the trade-off one GPU can measure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = {  # hidden, ffn, experts, topk, ep, shared ffn
    "dsv2_ep2": (5120, 1536, 160, 6, 2, 3072),
    "dsv2_ep8": (5120, 1536, 160, 6, 8, 3072),
    "dsv2_lite_ep2": (2048, 1408, 64, 6, 2, 2816),
    "mixtral_ep2": (4096, 14336, 8, 2, 2, 0),
}
SMOKE_SHAPES = {"tiny_ep2": (64, 32, 16, 4, 2, 64), "tiny_ep4": (64, 32, 16, 4, 4, 0)}


def sample_routing(tokens: int, experts: int, topk: int, ep: int, seed: int, device):
    """[ep, tokens, experts] bool: each token's top-k experts, uniform at random, per rank."""
    gen = torch.Generator(device=device).manual_seed(seed)
    maps = torch.zeros(ep, tokens, experts, dtype=torch.bool, device=device)
    for r in range(ep):
        scores = torch.rand(tokens, experts, generator=gen, device=device)
        maps[r].scatter_(1, scores.topk(topk, dim=1).indices, True)
    return maps


def expert_chunk_counts(maps, ep: int, ranges):
    """Expert chunks: ([src, dst, chunk] unique rows, [chunk] -> rank 0's rows per expert)."""
    _, tokens, experts = maps.shape
    per = maps.reshape(ep, tokens, ep, experts // ep)  # [src, token, dst, local expert]
    unique = torch.stack([per[..., a:b].any(dim=3).sum(dim=1) for a, b in ranges], dim=2)
    received = per[:, :, 0].sum(dim=(0, 1))  # [local expert] rows rank 0's experts get
    loads = [received[a:b].tolist() for a, b in ranges]
    return unique.cpu().numpy(), loads


def token_chunk_counts(maps, ep: int, num_chunks: int):
    """Token chunks (every rank's tokens in ``num_chunks`` contiguous slices of sizes differing
    by <= 1): ([src, dst, chunk] unique rows, [chunk] -> rank 0's rows per local expert)."""
    from megatron_eps.policy.chunks import split_local_experts

    _, tokens, experts = maps.shape
    per = maps.reshape(ep, tokens, ep, experts // ep)
    unique, loads = [], []
    for a, b in split_local_experts(tokens, num_chunks):
        piece = per[:, a:b]
        unique.append(piece.any(dim=3).sum(dim=1))  # [src, dst]
        loads.append(piece[:, :, 0].sum(dim=(0, 1)).tolist())
    return torch.stack(unique, dim=2).cpu().numpy(), loads


class GemmTimer:
    """Seconds of one expert call per load on this device: fastest available backend."""

    def __init__(self, hidden, ffn, num_local, dtype, device, max_rows, backends, target_s):
        from megatron_eps.calibrate.kernels import make_inputs, measurable_backends, synthetic_experts

        self.device, self.target_s = device, target_s
        self.experts = synthetic_experts(hidden, ffn, num_local, dtype, device)
        self.backends = measurable_backends(self.experts, device, dtype, backends or None)
        self.inputs = make_inputs(max_rows, hidden, dtype, device, sets=2)
        self.memo = {}

    def seconds(self, counts, first_expert: int) -> dict:
        from megatron_eps.experts.base import get_backend
        from megatron_eps.calibrate.kernels import offsets_staged, time_calls_interleaved

        key = (tuple(int(c) for c in counts), first_expert)
        if key in self.memo:
            return self.memo[key]
        rows = sum(key[0])
        if rows == 0:
            return {"best": 0.0}

        def runner(backend):
            def run(i):
                x, p = self.inputs[i % len(self.inputs)]
                return backend.forward(self.experts, x[:rows], list(key[0]), p[:rows], first_expert)
            return run

        with torch.no_grad(), offsets_staged(self.experts, list(key[0]), self.device):
            times = time_calls_interleaved({b: runner(get_backend(b)) for b in self.backends},
                                           self.device, target_s=self.target_s)
        times["best"] = min(times.values())
        self.memo[key] = times
        return times


def shape_and_timer(spec, tokens_list, dtype, device, args):
    """(LayerShape, GemmTimer of its local experts) of a SHAPES entry at its EP size (args
    None: the shape alone)."""
    from megatron_eps.policy.cost_model import LayerShape

    hidden, ffn, experts, topk, ep, shared_ffn = spec
    element = torch.empty((), dtype=dtype).element_size()
    shape = LayerShape(hidden, ffn, experts // ep, ep, topk, True, element, shared_ffn)
    if args is None:
        return shape
    max_rows = max(tokens_list) * topk * 2  # rank 0's received rows stay well under this
    return shape, GemmTimer(hidden, ffn, experts // ep, dtype, device, max_rows, args.backends,
                            args.target_s)


def measure_point(point, maps, shape, timer, degrees, profile):
    """Both chunkings of one load (``maps`` [ep, tokens, experts]) into ``point``."""
    from megatron_eps.policy.chunks import split_local_experts
    from megatron_eps.policy.cost_model import overlapped_time, unique_rows_comm_times

    ep, local, shared = shape.ep_size, shape.num_local_experts, point["shared_s"]
    point.update(expert_chunks={}, token_chunks={})
    for n in sorted({min(d, local) for d in degrees}):
        ranges = split_local_experts(local, n)
        for split, (unique, loads), firsts in (
            ("expert_chunks", expert_chunk_counts(maps, ep, ranges), [a for a, _ in ranges]),
            ("token_chunks", token_chunk_counts(maps, ep, n), [0] * n),
        ):
            widest = max(b - a for a, b in ranges) if split == "expert_chunks" else local
            # bf16 partial sums (dedup_combine_dtype: model)
            dispatch, combine = unique_rows_comm_times(unique, shape, profile, widest)
            timed = [timer.seconds(c, f) for c, f in zip(loads, firsts)]
            compute = [t["best"] for t in timed]
            remote = ~np.eye(ep, dtype=bool)
            point[split][str(n)] = {
                "remote_rows": int(unique.sum(axis=2)[remote].sum()),
                "dispatch_s": dispatch, "combine_s": combine, "gemm_s": compute,
                "gemm_by_backend_s": [{k: v for k, v in t.items() if k != "best"} for t in timed],
                "forward_s": overlapped_time(dispatch, compute, combine, shared, profile),
            }
    tokens = maps.shape[1]
    pair_remote = int(maps.reshape(ep, tokens, ep, local).sum(dim=(1, 3)).cpu().numpy()[
        ~np.eye(ep, dtype=bool)].sum())
    point["per_pair_remote_rows"] = pair_remote
    for split in ("expert_chunks", "token_chunks"):
        best = min(point[split], key=lambda k: point[split][k]["forward_s"])
        point[split + "_best"] = {"n": int(best), "forward_s": point[split][best]["forward_s"]}
    one = sum(point["expert_chunks"]["1"]["gemm_s"])
    point["token_chunk_gemm_inflation"] = {
        n: sum(v["gemm_s"]) / one for n, v in point["token_chunks"].items() if one > 0}


def print_row(p):
    e, t = p["expert_chunks_best"], p["token_chunks_best"]
    infl = " ".join(f"{n}:{v:.2f}" for n, v in p["token_chunk_gemm_inflation"].items())
    n1 = p["expert_chunks"]["1"]["forward_s"]
    print(f"{p['shape']:14} {p['tokens_per_rank']:>6} | N=1 {n1 * 1e3:7.2f} | experts "
          f"{e['forward_s'] * 1e3:7.2f} (N={e['n']}) | tokens {t['forward_s'] * 1e3:7.2f} "
          f"(N={t['n']}) | tokens/experts {t['forward_s'] / e['forward_s']:.3f} | "
          f"token-chunk GEMM inflation {infl}", flush=True)


def tradeoff_parser(description: str, shapes: str, degrees: str) -> argparse.ArgumentParser:
    """The arguments of the one-GPU trade-off scripts (this one and local_rows_tradeoff.py)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default=shapes)
    ap.add_argument("--tokens", default="4096,8192,16384,32768")
    ap.add_argument("--degrees", default=degrees)
    ap.add_argument("--backends", default="", help="comma list (default: every measurable one)")
    ap.add_argument("--target-s", type=float, default=0.02)
    ap.add_argument("--profile", default=None,
                    help="profile with a links.copy_engine section (default: the shipped H200 one)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (logic check)")
    return ap


def run_tradeoff(args, measure, show, method: str) -> None:
    """Validate ``args`` (``tradeoff_parser``); for each shape and load, sample the routing and
    call ``measure(point, maps, shape, timer, degrees, profile)``, which fills ``point``, then
    ``show(point)``; write the JSON result."""
    from megatron_eps.provenance import git_commit
    from megatron_eps.policy.cost_model import shared_experts_time
    from megatron_eps.calibrate.kernels import device_info, versions, warm_gpu
    from megatron_eps.policy.profile import PROFILES_DIR, open_profile

    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    names = list(shapes) if args.smoke else args.shapes.split(",")
    unknown = [s for s in names if s not in shapes]
    if unknown:
        raise SystemExit(f"--shapes {','.join(unknown)}: allowed: {', '.join(shapes)}")
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    # the model alone sizes rows as the GPU would
    dtype = torch.bfloat16 if cuda or getattr(args, "model_only", False) else torch.float32
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
        if getattr(args, "model_only", False):
            shape, timer = shape_and_timer(shapes[name], tokens_list, dtype, device, None), None
        else:
            shape, timer = shape_and_timer(shapes[name], tokens_list, dtype, device, args)
        experts = shape.num_local_experts * shape.ep_size
        for tokens in tokens_list:
            maps = sample_routing(tokens, experts, shape.topk, shape.ep_size, seed=tokens,
                                  device=device)
            point = {"shape": name, "tokens_per_rank": tokens, "ep": shape.ep_size,
                     "local_experts": shape.num_local_experts,
                     "shared_s": shared_experts_time(tokens, shape, profile)}
            measure(point, maps, shape, timer, degrees, profile)
            show(point)
            points.append(point)
        del timer
        if cuda:
            torch.cuda.empty_cache()
    result = {
        "device": device_info(device), "versions": versions(), "git_commit": git_commit(),
        "command": " ".join(sys.argv), "seconds": time.time() - t0,
        "link": {"transport": "copy_engine", "profile": path, **profile.to_dict()},
        "method": method, "points": points,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


def main(argv=None):
    args = tradeoff_parser(__doc__.split("\n\n")[0], ",".join(SHAPES), "1,2,3,4,8").parse_args(argv)
    run_tradeoff(args, measure_point, print_row,
                 "routing sampled; unique rows counted exactly; GEMMs timed on this device "
                 "(fastest backend, interleaved); link and forward modeled (cost_model)")


if __name__ == "__main__":
    main()
