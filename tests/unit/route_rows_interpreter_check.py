"""Run the routing pass (row_kernels.route_rows) under TRITON_INTERPRET=1 on the CPU against
the torch path, and print the cases that differ as JSON (run by test_route_rows_interpreter)."""

import json
import os

import numpy as np
import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

from megatron_eps import row_kernels  # noqa: E402
from megatron_eps.pipeline.rows.per_pair import permute_chunk_major  # noqa: E402


def split_counts_differ(routing, split, token_block):
    """Whether the count pass's [splits, E] counts differ from torch's sums over each split."""
    num_tokens, num_experts = routing.shape
    splits = -(-num_tokens // split)
    padded = torch.zeros(splits * split, num_experts, dtype=torch.int32)
    padded[:num_tokens] = routing.to(torch.int32)
    want = padded.view(splits, split, num_experts).sum(dim=1, dtype=torch.int32)
    got = row_kernels.count_routed_per_split(routing.view(torch.uint8), split, token_block,
                                             through_jit=True)
    return got.dtype != torch.int32 or not torch.equal(got, want)


def check(num_tokens, num_experts, topk, hot, shuffled, split, cold=None):
    gen = torch.Generator().manual_seed(num_tokens * 7 + num_experts)
    scores = torch.rand(num_tokens, num_experts, generator=gen)
    if hot is not None:
        scores[:, hot] += 10.0
    if cold is not None:
        scores[:, cold] = -1.0  # an expert no token picks
    routing = torch.zeros(num_tokens, num_experts, dtype=torch.bool)
    routing.scatter_(1, scores.topk(topk, dim=1).indices, True)
    probs = torch.rand(num_tokens, num_experts, generator=gen) * routing
    order = (np.random.default_rng(num_tokens).permutation(num_experts) if shuffled
             else np.arange(num_experts))
    counts = routing.sum(dim=0).numpy()
    num_rows = int(counts.sum())
    want = permute_chunk_major(torch.zeros(num_tokens, 4), probs, routing, order, num_rows)
    sizes = counts[order]
    first = np.empty(num_experts, dtype=np.int64)
    first[order] = np.cumsum(sizes) - sizes
    position = np.empty(num_experts, dtype=np.int64)
    position[order] = np.arange(num_experts)
    got_idx, got_probs, table = row_kernels.route_rows(
        routing, probs, torch.from_numpy(first), num_rows, through_jit=True, top_k=topk,
        position=torch.from_numpy(position) if shuffled else None, tokens_per_split=split)
    bad = []
    if cold is not None and counts[cold] != 0:
        bad.append("the cold expert got tokens")
    for tokens_per_split in (split or row_kernels.TOKENS_PER_SPLIT,
                             2 * (split or row_kernels.TOKENS_PER_SPLIT)):
        if split_counts_differ(routing, tokens_per_split, 256):
            bad.append(f"split_counts per {tokens_per_split}")
    if not torch.equal(got_idx, want.sorted_indices):
        bad.append("sorted_indices")
    if not torch.equal(got_probs, want.probs):
        bad.append("probs")
    sorted_rows = torch.argsort(want.sorted_indices, stable=True).view(num_tokens, topk)
    if table is None or not torch.equal(table, sorted_rows):
        bad.append("token_rows")
    # without the table (top_k 0): the numbering alone
    idx2, probs2, none = row_kernels.route_rows(
        routing, probs, torch.from_numpy(first), num_rows, through_jit=True,
        position=torch.from_numpy(position) if shuffled else None,
        tokens_per_split=2 * split if split else None)
    if none is not None or not torch.equal(idx2, want.sorted_indices) or not torch.equal(
            probs2, want.probs):
        bad.append("without table")
    return bad


results = {}
for case in [(1300, 16, 4, None, False, 256), (1300, 16, 4, 5, True, 256), (37, 8, 2, 3, False, 256),
             (600, 160, 6, None, True, 256), (700, 12, 3, None, False, None),
             (1100, 160, 6, 7, True, 256, 11), (1300, 160, 6, 150, False, None, 3)]:
    results[str(case)] = check(*case)
print(json.dumps(results))
