"""Bytes one MoE forward sends with one row per (token, expert) and with the deduplicated
scheme (``dispatch_dedup``), from the layouts every rank builds (CPU, gloo ranks, no GPU).

    python benchmarks/dedup_bytes.py [--tokens 4096] [--out benchmarks/results/transport/dedup_bytes_cpu.json]

A DeepSeek-V2 layer (160 experts, top-6, hidden 5120, bf16 rows, fp32 weights) with random
routing at EP=2 and EP=8: each rank routes its tokens, the ranks all-gather the counts and the
unique-token counts of every range of local experts (as the dispatcher does), and each rank's
layout counts its bytes (``ChunkLayout.bytes_sent``). Reported per chunking: unchunked (N=1,
where deduplication is whole), a few fixed N, and the chunking ``pipeline_degree: auto`` picks
with the shipped H200 profile's NCCL link, timing the deduplicated rows (auto) or the pairs
(auto_pp); partial sums in fp32 and in bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

NUM_EXPERTS, TOP_K, HIDDEN = 160, 6, 5120
PROFILE = os.path.join(os.path.dirname(__file__), "..", "megatron_eps", "profiles", "nvidia_h200.json")


def rank_bytes(tokens: int, seed: int):
    """On every rank: {chunking label: {scheme: BytesSent dict}} of this rank."""
    import torch.distributed as dist

    from megatron_eps import EPSConfig
    from megatron_eps.pipeline.rows import unique_rows
    from megatron_eps.pipeline.rows.dedup import DedupChunkLayout, dedup_row_bytes
    from megatron_eps.pipeline.rows.per_pair import pair_row_bytes
    from megatron_eps.policy.cost_model import LayerShape
    from megatron_eps.policy.degree import choose_chunking
    from megatron_eps.policy.profile import load_pipeline_profile
    from megatron_eps.pipeline.rows.per_pair import probs_columns
    from megatron_eps.pipeline.layout import ChunkLayout

    ep_size, rank = dist.get_world_size(), dist.get_rank()
    local = NUM_EXPERTS // ep_size
    gen = torch.Generator().manual_seed(seed * 100 + rank)
    scores = torch.rand(tokens, NUM_EXPERTS, generator=gen)
    routing_map = torch.zeros_like(scores, dtype=torch.bool).scatter_(
        1, scores.topk(TOP_K, dim=1).indices, True)
    mine = unique_rows.routing_statistics(routing_map, ep_size, True)
    gathered = torch.empty(ep_size * mine.numel(), dtype=mine.dtype)
    dist.all_gather_into_tensor(gathered, mine)
    counts, ranges = unique_rows.split_statistics(gathered.numpy(), ep_size, NUM_EXPERTS)

    rows = torch.empty(1, HIDDEN, dtype=torch.bfloat16)
    probs = torch.empty(1, NUM_EXPERTS, dtype=torch.float32)
    pair_bytes = pair_row_bytes(rows, probs, probs_columns(rows, probs))
    shape = LayerShape(num_local_experts=local, hidden_size=HIDDEN, ffn_hidden_size=1536,
                       topk=TOP_K, ep_size=ep_size, shared_ffn_hidden_size=2 * 1536)
    profile = load_pipeline_profile(PROFILE, None, "nccl")
    auto = EPSConfig(pipeline_degree="auto", min_tokens_to_pipeline=0, dispatch_dedup="on")
    chunkings = {"N=1": (local,), "N=2": 2, "N=4": 4,
                 "auto": choose_chunking(counts, shape, auto, profile, range_counts=ranges),
                 "auto_pp": choose_chunking(counts, shape, auto.replace(dispatch_dedup="off"),
                                            profile)}
    out = {}
    for label, chunking in chunkings.items():
        pairs = ChunkLayout.build(counts, rank, local, chunking)
        entry = {"experts_per_chunk": [b - a for a, b in pairs.expert_ranges],
                 "per_pair": pairs.bytes_sent(*pair_bytes).to_dict()}
        for name, dtype in (("dedup_fp32_partials", torch.float32), ("dedup_bf16_partials", None)):
            dedup = DedupChunkLayout.from_pairs(pairs, counts, ranges, TOP_K, dtype)
            entry[name] = dedup.bytes_sent(*dedup_row_bytes(dedup, rows, probs)).to_dict()
        out[label] = entry
    return out


def summarize(per_rank):
    """Group totals and reductions per chunking."""
    table = {}
    for label in per_rank[0]:
        total = {scheme: {k: sum(r[label][scheme][k] for r in per_rank)
                          for k in per_rank[0][label][scheme]}
                 for scheme in ("per_pair", "dedup_fp32_partials", "dedup_bf16_partials")}
        row = {"experts_per_chunk": per_rank[0][label]["experts_per_chunk"], "bytes": total}
        for scheme in ("dedup_fp32_partials", "dedup_bf16_partials"):
            row[f"remote_reduction_{scheme}"] = total["per_pair"]["remote"] / total[scheme]["remote"]
            row[f"dispatch_remote_reduction_{scheme}"] = (
                total["per_pair"]["dispatch_remote"] / total[scheme]["dispatch_remote"])
        table[label] = row
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    parser.add_argument("--ep", default="2,8")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "transport",
                                                      "dedup_bytes_cpu.json"))
    args = parser.parse_args(argv)
    from megatron_eps.provenance import git_commit
    from megatron_eps.testing import run_distributed

    results = {}
    print(f"{'EP':>3} {'chunking':>8} {'experts/chunk':>16} {'per-pair remote MB':>19} "
          f"{'dedup fp32 MB':>14} {'x':>5} {'dedup bf16 MB':>14} {'x':>5} {'dispatch x':>10}")
    for ep in [int(e) for e in args.ep.split(",")]:
        table = summarize(run_distributed(rank_bytes, ep, args.tokens, args.seed))
        results[f"ep{ep}"] = table
        for label, row in table.items():
            b = row["bytes"]
            chunks = row["experts_per_chunk"]
            shown = str(chunks) if len(chunks) <= 4 else f"{len(chunks)} chunks"
            print(f"{ep:>3} {label:>8} {shown:>16} {b['per_pair']['remote'] / 1e6:>19.1f} "
                  f"{b['dedup_fp32_partials']['remote'] / 1e6:>14.1f} "
                  f"{row['remote_reduction_dedup_fp32_partials']:>5.2f} "
                  f"{b['dedup_bf16_partials']['remote'] / 1e6:>14.1f} "
                  f"{row['remote_reduction_dedup_bf16_partials']:>5.2f} "
                  f"{row['dispatch_remote_reduction_dedup_bf16_partials']:>10.2f}")
    record = {
        "what": "bytes one DSV2-shape MoE forward sends, whole group, per-pair vs deduplicated "
                "(remote = crossing a link; see module docstring)",
        "layer": {"experts": NUM_EXPERTS, "top_k": TOP_K, "hidden": HIDDEN, "dtype": "bf16",
                  "routing": "uniform random top-k", "tokens_per_rank": args.tokens},
        "device": "cpu (gloo ranks; layouts only)",
        "torch": torch.__version__,
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "git_commit": git_commit(),
        "results": results,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
