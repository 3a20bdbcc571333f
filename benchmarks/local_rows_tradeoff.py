"""A chunk's own rows apart (``local_rows: apart``): what the second GEMM call costs, and what
the forward gains, with GEMMs measured on this GPU and the link modeled.

    python benchmarks/local_rows_tradeoff.py --out local_rows.json            (GPU)
    python benchmarks/local_rows_tradeoff.py --smoke --out x.json              (CPU logic check)

With the local rows apart each chunk's expert GEMMs are two calls: over whole row tiles of the
rows the rank routed to its own experts (they need no transfer, so they run beside the first
dispatch, or beside the last combine in the last chunk; ``layout.local_head_rows``) and over
the rest. The second call reads the chunk's weights again.

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

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from chunk_split_tradeoff import run_tradeoff, tradeoff_parser  # noqa: E402

DEFAULT_SHAPES = ("dsv2_ep2", "dsv2_ep8", "mixtral_ep2")


def measure_point(point, maps, shape, timer, degrees, profile):
    """Together and apart at one load (``maps`` [ep, tokens, experts]) into ``point``."""
    from megatron_eps.policy.chunks import local_head_rows, split_local_experts
    from megatron_eps.policy.cost_model import chunk_comm_times, overlapped_time

    counts = maps.sum(dim=1).cpu().numpy()  # [src rank, expert]
    shared = point["shared_s"]
    point["model_apart_over_together"] = model_ratio(counts, shape, degrees, profile)
    if timer is None:  # --model-only
        return
    point["degrees"] = {}
    for n in sorted({min(d, shape.num_local_experts) for d in degrees}):
        ranges = split_local_experts(shape.num_local_experts, n)
        dispatch, combine = chunk_comm_times(counts, shape, profile, [b - a for a, b in ranges])
        whole, own, peer = [], [], []
        for a, b in ranges:
            received = counts[:, a:b]  # rank 0's experts a..b-1, rows from every rank
            head = local_head_rows(received[0])  # the local part: whole tiles of own rows
            whole.append(timer.seconds(received.sum(axis=0), a)["best"])
            own.append(timer.seconds(head, a)["best"])
            peer.append(timer.seconds(received.sum(axis=0) - head, a)["best"])
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


def model_ratio(counts, shape, degrees, profile) -> float:
    """The cost model's own best-N apart / best-N together (``cost_model.predict``)."""
    from megatron_eps.policy.cost_model import predict

    best = {}
    for apart in (False, True):
        best[apart] = min(predict(counts, shape, profile, min(n, shape.num_local_experts),
                                  local_rows_apart=apart).t_pipelined for n in degrees)
    return best[True] / best[False]


def print_point(p):
    if "degrees" not in p:
        print(f"{p['shape']:12} {p['tokens_per_rank']:>6} | model apart/together "
              f"{p['model_apart_over_together']:.3f}", flush=True)
        return
    t, a = p["best_together"], p["best_apart"]
    ratios = " ".join(f"{n}:{v['gemm_parts_over_whole']:.2f}" for n, v in p["degrees"].items()
                      if v["gemm_parts_over_whole"] is not None)
    print(f"{p['shape']:12} {p['tokens_per_rank']:>6} | together {t['forward_s'] * 1e3:7.2f} "
          f"(N={t['n']}) | apart {a['forward_s'] * 1e3:7.2f} (N={a['n']}) | apart/together "
          f"{a['forward_s'] / t['forward_s']:.3f} (model {p['model_apart_over_together']:.3f}) | "
          f"GEMM parts/whole per N {ratios}", flush=True)


def main(argv=None):
    ap = tradeoff_parser(__doc__.split("\n\n")[0], ",".join(DEFAULT_SHAPES), "1,2,3,4")
    ap.add_argument("--model-only", action="store_true",
                    help="the cost model's prediction alone (no GEMM is timed; runs on CPU)")
    args = ap.parse_args(argv)
    run_tradeoff(args, measure_point, print_point,
                 "routing sampled; rank 0's expert GEMMs timed on this device per chunk, whole "
                 "and as own + peer rows (fastest backend, interleaved); link and forward "
                 "modeled (cost_model.overlapped_time)")


if __name__ == "__main__":
    main()
