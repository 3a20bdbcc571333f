"""Row counts of the per-pair and per-rank schemes against brute force, and the saving on a
DeepSeek-V2-shaped layer with random top-6 routing (issue 14's byte bars, as they stand)."""

import itertools

import numpy as np
import pytest
import torch

from megatron_eps.comm.traffic import routed_traffic
from megatron_eps.policy.chunks import chunk_sizes, ranges_of_sizes


def _random_routing(tokens, experts, topk, seed):
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.rand(tokens, experts, generator=gen).topk(topk, dim=1).indices
    return torch.zeros(tokens, experts, dtype=torch.bool).scatter_(1, chosen, True)


@pytest.mark.parametrize("ep,local,chunks", [(2, 4, 1), (2, 4, 2), (4, 3, 3), (1, 5, 2)])
def test_counts_match_brute_force(ep, local, chunks):
    routing = _random_routing(37, ep * local, 3, seed=ep * 10 + chunks)
    ranges = ranges_of_sizes(chunk_sizes(local, chunks))
    for rank in range(ep):
        t = routed_traffic(routing, ep, rank, ranges)
        pairs = {(tok, e // local) for tok, e in zip(*np.nonzero(routing.numpy()))}
        pair_rows = [(tok, e) for tok, e in zip(*np.nonzero(routing.numpy()))]
        per_rank = set()
        for tok, e in pair_rows:
            dst, l = divmod(e, local)
            chunk = next(i for i, (a, b) in enumerate(ranges) if a <= l < b)
            per_rank.add((tok, dst, chunk))
        assert t.per_pair_remote == sum(1 for _, e in pair_rows if e // local != rank)
        assert t.per_pair_local == sum(1 for _, e in pair_rows if e // local == rank)
        assert t.per_rank_remote == sum(1 for _, d, _ in per_rank if d != rank)
        assert t.per_rank_local == sum(1 for _, d, _ in per_rank if d == rank)
        assert len(pairs) <= t.per_rank_remote + t.per_rank_local


def test_dsv2_random_routing_saving():
    """Unchunked, DSV2 top-6 over 160 experts: about 3 remote rows per token become about 1 at
    EP=2 (>= 2.5x), and 5.25 become about 3.9 at EP=8 (>= 1.3x); chunking erodes the saving."""
    routing = _random_routing(4096, 160, 6, seed=0)
    reductions = {}
    for ep, chunks in itertools.product((2, 8), (1, 4)):
        local = 160 // ep
        t = routed_traffic(routing, ep, 0, ranges_of_sizes(chunk_sizes(local, chunks)))
        reductions[(ep, chunks)] = t.remote_reduction
    assert reductions[(2, 1)] >= 2.5
    assert reductions[(8, 1)] >= 1.3
    assert reductions[(2, 4)] < reductions[(2, 1)]
    assert reductions[(8, 4)] < reductions[(8, 1)]
