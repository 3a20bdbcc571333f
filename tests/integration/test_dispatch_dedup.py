"""Deduplicated dispatch and pre-reduced combine (``dispatch_dedup``): the rows against brute
force, the layout's sizes and byte counts against traffic.routed_traffic, and whole layers
against stock Megatron and a float64 reference on 1, 2 and 4 CPU ranks."""

import math

import numpy as np
import pytest
import torch

from megatron_eps import EPSConfig
from megatron_eps.pipeline.rows import unique_rows
from megatron_eps.pipeline.rows import dedup as dedup_scheme
from megatron_eps import row_kernels
from megatron_eps.pipeline.rows.dedup import AUTO_MIN_SAVING, DedupChunkLayout
from megatron_eps.comm.traffic import routed_traffic
from megatron_eps.config import EPSConfigError
from megatron_eps.policy.chunks import chunk_sizes
from megatron_eps.pipeline.layout import ChunkLayout
from megatron_eps.testing import run_distributed, skip_unless_ranks_fit
from tests.integration import eps_cases
from tests.integration.test_eps_equivalence import _check
from tests.marks import ranks


def random_routing(num_tokens, num_experts, topk, seed, hot=None):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(num_tokens, num_experts, generator=gen)
    if hot is not None:
        scores[:, hot] += 10.0
    chosen = scores.topk(topk, dim=1).indices
    routing_map = torch.zeros(num_tokens, num_experts, dtype=torch.bool).scatter_(1, chosen, True)
    probs = torch.rand(num_tokens, num_experts, generator=gen) * routing_map
    return routing_map, probs


def group_layouts(maps, ep_size, chunking, topk):
    """Every rank's (pair layout, dedup layout) from every rank's routing map."""
    local = maps[0].shape[1] // ep_size
    counts = np.stack([m.sum(dim=0).numpy() for m in maps])
    ranges = np.stack([unique_rows.range_unique_counts(m, ep_size).numpy() for m in maps])
    out = []
    for rank in range(ep_size):
        pairs = ChunkLayout.build(counts, rank, local, chunking)
        out.append((pairs, DedupChunkLayout.from_pairs(pairs, counts, ranges, topk)))
    return out


def _devices():
    gpu = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU")])
    return ["cpu", gpu]


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("tokens", [0, 1, 37])
def test_range_unique_counts_brute_force(tokens, device):
    routing_map, _ = random_routing(tokens, 24, 5, seed=tokens)
    table = unique_rows.range_unique_counts(routing_map.to(device), 3, top_k=5).cpu()
    assert table.dtype == torch.int64
    per_rank = routing_map.reshape(tokens, 3, 8)
    for d in range(3):
        for a in range(8):
            for b in range(a + 1, 9):
                assert table[d, a, b] == int(per_rank[:, d, a:b].any(dim=1).sum())


@pytest.mark.parametrize("ep_size,chunking,hot", [(2, 1, None), (2, 3, 5), (4, (1, 2, 1), None),
                                                  (1, 2, None)])
def test_rows_roundtrip_brute_force(ep_size, chunking, hot):
    """Place -> (all-to-all simulated by slicing) -> expand -> pre-reduce -> final sum equals the
    float64 sum of each token's prob-weighted rows; the expanded rows are Megatron's order."""
    num_experts, topk, hidden = 16, 4, 8
    lengths = [9, 0, 5, 13][:ep_size] if ep_size > 1 else [11]
    maps, probs, tokens = [], [], []
    for rank, length in enumerate(lengths):
        m, p = random_routing(length, num_experts, topk, seed=rank + 3, hot=hot)
        maps.append(m)
        probs.append(p)
        tokens.append(torch.randn(length, hidden, generator=torch.Generator().manual_seed(rank)))
    layouts = group_layouts(maps, ep_size, chunking, topk)
    dedup = [d for _, d in layouts]
    width = hidden + dedup_scheme.meta_columns(hidden, torch.float32, torch.float32, dedup[0].slots)
    sent, sent_rows = [], []
    for rank in range(ep_size):
        lay = dedup[rank]
        send = torch.zeros(lay.send_offsets[-1], width)
        sent_rows.append([unique_rows.place_unique_rows(
            tokens[rank], probs[rank], maps[rank], ep_size, lay.expert_ranges[g],
            send[lay.send_offsets[g]:lay.send_offsets[g + 1]], lay.slots)
            for g in range(lay.num_chunks)])
        sent.append(send)
    returned = [torch.zeros(d.send_offsets[-1], hidden, dtype=torch.float64) for d in dedup]
    local = num_experts // ep_size
    for me in range(ep_size):
        lay = dedup[me]
        for g, (a, b) in enumerate(lay.expert_ranges):
            pieces, where = [], []
            for src in range(ep_size):
                first = dedup[src].send_offsets[g] + sum(dedup[src].send_splits[g][:me])
                pieces.append(sent[src][first:first + dedup[src].send_splits[g][me]])
                where.append(first)
            received = torch.cat(pieces)
            x, p, table = unique_rows.expand_rows(
                received, hidden, lay.slots, b - a, lay.pair_rows(g), torch.float32)
            # Megatron's order: by expert, then source rank, then token.
            expected_rows = []
            for e in range(a, b):
                for src in range(ep_size):
                    mask = maps[src][:, me * local + e]
                    expected_rows.append(tokens[src][mask])
            assert torch.equal(x, torch.cat(expected_rows))
            out = (x.double() * p.double().unsqueeze(1))
            # The slot table lists each received row's pairs in expert order.
            experts_of_pair = torch.cat([torch.full((n,), e) for e, n in
                                         enumerate(lay.tokens_per_expert[g])])
            for r in range(received.shape[0]):
                filled = table[r][table[r] < x.shape[0]]
                assert torch.all(experts_of_pair[filled][1:] > experts_of_pair[filled][:-1])
            sums = row_kernels.sum_rows(out, table, torch.float64)
            start = 0
            for src in range(ep_size):
                n = dedup[src].send_splits[g][me]
                returned[src][where[src]:where[src] + n] = sums[start:start + n]
                start += n
    for rank in range(ep_size):
        table = unique_rows.return_table(sent_rows[rank], dedup[rank].send_offsets[:-1],
                                        lengths[rank], dedup[rank].send_offsets[-1])
        result = row_kernels.sum_rows(returned[rank], table, torch.float64)
        # probs are zero off the routing map: each token's weighted rows sum to this
        expected = probs[rank].double().sum(dim=1, keepdim=True) * tokens[rank].double()
        torch.testing.assert_close(result, expected)


def place_both_ways(device, token_dtype, probs_dtype, ep_size, expert_range, num_tokens, hot,
                    scattered):
    """(rows and send rows of the device path, the same of the torch path) for one chunk;
    ``scattered``: the rows go to shuffled rows of a larger buffer (the copy-engine transport)."""
    num_experts, topk, hidden = 16, 4, 40
    routing_map, probs = random_routing(num_tokens, num_experts, topk, seed=num_tokens, hot=hot)
    tokens = torch.randn(num_tokens, hidden, generator=torch.Generator().manual_seed(7))
    local = num_experts // ep_size
    start, end = expert_range
    chunk = routing_map.reshape(num_tokens, ep_size, local)[:, :, start:end]
    num_rows = int(chunk.any(dim=2).sum())
    slots = min(topk, end - start)
    width = hidden + dedup_scheme.meta_columns(hidden, token_dtype, probs_dtype, slots)
    tokens, probs = tokens.to(device, token_dtype), probs.to(device, probs_dtype)
    routing_map = routing_map.to(device)
    results = []
    for path in ("device", "torch"):
        out = torch.full((num_rows + 5 if scattered else num_rows, width), -7.0, dtype=token_dtype,
                         device=device)
        dst = torch.randperm(num_rows + 5, generator=torch.Generator().manual_seed(1))[:num_rows]
        dst = dst.to(device) if scattered else None
        if path == "device":
            sent = unique_rows.place_unique_rows(tokens, probs, routing_map, ep_size,
                                                expert_range, out, slots, dst_rows=dst)
        else:
            rows = torch.full((num_rows, width), -7.0, dtype=token_dtype, device=device)
            sent = unique_rows._send_rows(routing_map, ep_size, expert_range)
            unique_rows._place_unique_rows_torch(tokens, probs, routing_map, ep_size,
                                                expert_range, rows, slots, sent)
            if scattered:
                out[dst] = rows
            else:
                out = rows
        results.append((out, sent))
    return results


@pytest.mark.parametrize("scattered", [False, True])
def test_place_rows_into_given_rows(scattered):
    """dst_rows places the same rows where it says (CPU: the torch path both ways)."""
    (out, sent), (want, want_sent) = place_both_ways(
        "cpu", torch.float32, torch.float32, 2, (1, 6), 29, None, scattered)
    assert torch.equal(sent, want_sent)
    # each (rank, token) with an expert of the chunk has its own row, numbered in order
    filled = sent[sent >= 0]
    assert torch.equal(filled, torch.arange(filled.numel()))
    assert torch.equal(out.view(torch.int32), want.view(torch.int32))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("probs_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ep_size,expert_range,num_tokens,hot,scattered", [
    (1, (0, 16), 53, None, False), (2, (0, 8), 53, 3, True), (2, (5, 6), 53, None, False),
    (4, (1, 3), 200, 9, True), (4, (0, 4), 0, None, False), (2, (2, 7), 1, None, True)])
def test_place_rows_kernel_matches_torch(probs_dtype, ep_size, expert_range, num_tokens, hot,
                                         scattered):
    """The Triton placement writes the torch path's bytes: rows, packed experts and weights."""
    (out, sent), (want, want_sent) = place_both_ways(
        "cuda", torch.bfloat16, probs_dtype, ep_size, expert_range, num_tokens, hot, scattered)
    assert torch.equal(sent, want_sent)
    assert torch.equal(out.view(torch.int16), want.view(torch.int16))


@pytest.mark.parametrize("ep_size", [2, 4, 8])
def test_layout_bytes_match_routed_traffic(ep_size):
    num_experts, topk = 8 * ep_size, 6
    maps = [random_routing(n, num_experts, topk, seed=n)[0] for n in (50, 0, 31, 7, 64, 3, 9, 20)[:ep_size]]
    for chunking in (1, 3, chunk_sizes(8, 4, "tail")):
        layouts = group_layouts(maps, ep_size, chunking, topk)
        for rank, (pairs, dedup) in enumerate(layouts):
            traffic = routed_traffic(maps[rank], ep_size, rank, pairs.expert_ranges)
            pb, db = pairs.bytes_sent(10, 7), dedup.bytes_sent(10, 7)
            assert pb.dispatch_remote == traffic.per_pair_remote * 10
            assert pb.dispatch_local == traffic.per_pair_local * 10
            assert db.dispatch_remote == traffic.per_rank_remote * 10
            assert db.dispatch_local == traffic.per_rank_local * 10
            assert db.remote <= pb.remote * 10 / 7
        # What the group sends is what it receives, in both schemes and directions.
        for which in (0, 1):
            sent = sum(sum(map(sum, lay[which].send_splits)) for lay in layouts)
            received = sum(sum(map(sum, lay[which].recv_splits)) for lay in layouts)
            assert sent == received


def test_more_chunks_save_less():
    maps = [random_routing(200, 32, 6, seed=s)[0] for s in range(2)]
    remote = [sum(d.bytes_sent(1, 1).remote for _, d in group_layouts(maps, 2, n, 6))
              for n in (1, 2, 4, 16)]
    assert remote == sorted(remote) and remote[0] < remote[-1]


def test_dispatch_dedup_setting_is_checked():
    assert EPSConfig().dispatch_dedup == "off"
    assert EPSConfig().dedup_combine_dtype == "model"
    with pytest.raises(EPSConfigError, match="dispatch_dedup.*off, on, auto"):
        EPSConfig(dispatch_dedup="yes")
    with pytest.raises(EPSConfigError, match="dedup_combine_dtype.*model, fp32"):
        EPSConfig(dedup_combine_dtype="bf16")


def test_cost_model_counts_unique_rows():
    from megatron_eps.policy.cost_model import LayerShape, chunk_comm_times
    from megatron_eps.policy.profile import PipelineProfile

    maps = [random_routing(300, 32, 6, seed=s)[0] for s in range(2)]
    counts = np.stack([m.sum(dim=0).numpy() for m in maps])
    ranges = np.stack([unique_rows.range_unique_counts(m, 2).numpy() for m in maps])
    shape = LayerShape(num_local_experts=16, hidden_size=1024, ffn_hidden_size=512, topk=6,
                       ep_size=2)
    profile = PipelineProfile(link_bandwidth_gbps=10.0, link_latency_us=0.0,
                              chunk_overhead_us=0.0, expert_tflops=1.0)
    pair = sum(chunk_comm_times(counts, shape, profile, 1)[1])
    unique = [sum(chunk_comm_times(counts, shape, profile, n, ranges)[1]) for n in (1, 4, 16)]
    assert unique[0] < pair / 2
    assert unique == sorted(unique) and unique[0] < unique[-1]
    # fp32 partial sums (dedup_combine_dtype: fp32) double the bf16 combine's bytes
    fp32 = sum(chunk_comm_times(counts, shape, profile, 1, ranges, partial_sum_bytes=4)[1])
    assert fp32 == pytest.approx(2 * unique[0])
    # On the copy engines a deduplicated chunk is one piece per peer (combine: per rank), the
    # per-pair scheme one per (peer, expert)
    pieces = PipelineProfile(link_bandwidth_gbps=1e9, link_latency_us=0.0, chunk_overhead_us=0.0,
                             expert_tflops=1.0, link_piece_us=5.0)
    dispatch, combine = chunk_comm_times(counts, shape, pieces, 4, ranges)
    assert dispatch == pytest.approx([5e-6] * 4, rel=1e-3)
    assert combine == pytest.approx([2 * 5e-6] * 4, rel=1e-3)
    dispatch, _ = chunk_comm_times(counts, shape, pieces, 4)
    assert dispatch == pytest.approx([4 * 5e-6] * 4, rel=1e-3)


@pytest.mark.parametrize("world", ranks(1, 2, 4))
def test_dedup_equals_stock_fp32(world):
    skip_unless_ranks_fit(world)
    results = run_distributed(eps_cases.run_equivalence, world, world, "fp32", "megatron",
                              10_000, "auto", "on")
    _check(results, "fp32")
    assert all(r["dedup"] for rank in results for r in rank)
    _check_transport(results, world)
    if world > 1:
        assert any(r["bytes_sent"]["remote"] < r["pair_bytes_sent"]["remote"]
                   for r in results[0])


@pytest.mark.parametrize("world", ranks(2, 4))
def test_dedup_equals_stock_bf16(world):
    skip_unless_ranks_fit(world)
    results = run_distributed(eps_cases.run_equivalence, world, world, "bf16", "megatron",
                              10_000, "auto", "on")
    _check(results, "bf16")
    _check_transport(results, world)


def _check_transport(results, world):
    """On GPUs, transport auto puts the deduplicated rows on the copy engines where they reach
    every rank (one node with peer access, or ranks sharing one GPU), else on NCCL."""
    if not torch.cuda.is_available() or world == 1:
        return
    from megatron_eps.comm.selection import copy_engine_blocker

    peers = torch.cuda.device_count() < world or all(
        torch.cuda.can_device_access_peer(0, d) for d in range(1, world))
    expected = "copy_engine" if peers and copy_engine_blocker(None) is None else "nccl"
    assert {r["transport"] for rank in results for r in rank} == {expected}


@pytest.mark.parametrize("world", ranks(1, 2, 4))
def test_dedup_accuracy_vs_float64(world):
    """fp32 partial sums: the error vs float64 is not above stock's over the grid, nor in any
    case; the model-dtype partials (bf16) add at most 1% to it over the grid; repeated forwards
    are bit-identical. On CPU each case matches stock to 1e-6. On GPUs stock's combine adds bf16
    rows with atomics, and a case of a few tokens has both errors at the bf16 output rounding,
    where which of two rounding sequences lands closer is chance: there a case may exceed
    stock's error by at most half the error of rounding the float64 output once to bf16."""
    skip_unless_ranks_fit(world)
    rows = [r for rank in run_distributed(eps_cases.run_dedup_accuracy, world, world, 10_000)
            for r in rank]
    assert rows and all(r["dedup_used"] and r["deterministic"] for r in rows)
    total = {k: math.sqrt(sum(r[k] for r in rows))
             for k in ("stock", "dedup_fp32", "dedup_bf16", "pairs", "rounding")}
    assert total["dedup_fp32"] <= total["stock"] * (1 + 1e-6), total
    assert total["dedup_bf16"] <= total["stock"] * 1.01, total
    on_gpu = torch.cuda.is_available()
    over = []
    for r in rows:
        allowed = math.sqrt(r["stock"]) * (1 + 1e-6) + 1e-12
        if on_gpu:
            allowed = math.sqrt(r["stock"]) + 0.5 * math.sqrt(r["rounding"]) + 1e-12
        for scheme in ("dedup_fp32", "pairs"):
            if math.sqrt(r[scheme]) > allowed:
                relative = {k: round(math.sqrt(r[k] / r["reference"]), 6)
                            for k in ("stock", scheme, "rounding")}
                over.append((r["case"], scheme, relative))
    assert not over, (f"{len(over)} of {2 * len(rows)} over the per-case bound "
                      f"(relative errors; grid totals {total}): {over}")


@pytest.mark.parametrize("world", ranks(1, 2))
def test_dedup_dispatcher_roundtrip_returns_input(world):
    skip_unless_ranks_fit(world)
    results = run_distributed(eps_cases.run_dispatcher_roundtrip, world, world, "on")
    for rank_results in results:
        for path, experts, topk, degree, err, chunks in rank_results:
            assert err <= 1e-6, (path, experts, topk, degree, err)


def test_auto_dedups_only_when_it_saves_remote_bytes():
    """Top-6 of 32 at EP=2 saves most remote rows; top-1 saves none (the packed indices make
    each row larger); with no remote rows (EP=1) there is nothing to save. The answer reads only
    gathered numbers, so every rank gives the same one."""
    for topk, ep_size, expected in ((6, 2, True), (1, 2, False), (6, 1, False)):
        maps = [random_routing(n, 32, topk, seed=n)[0] for n in (40, 0, 17)[:ep_size]]
        answers = {d.saves_remote_bytes((10 + 48, 10), (10 + 16, 10))
                   for _, d in group_layouts(maps, ep_size, 1, topk)}
        assert answers == {expected}, (topk, ep_size, answers)


def test_auto_weighs_each_scheme_by_its_own_dispatch_and_combine_bytes():
    """auto sets each unique row's (dispatch, combine) bytes against each pair's: cases where
    an argument order mixing the two schemes' bytes would answer otherwise (an fp32 partial sum
    makes the unique row's combine larger than the pair's)."""
    maps = [random_routing(n, 32, 6, seed=n)[0] for n in (40, 17)]
    for _, d in group_layouts(maps, 2, 1, 6):
        remote = ~np.eye(2, dtype=bool)
        unique = int(d.unique_rows.sum(axis=2)[remote].sum())
        pairs = int(d.pair_rows_sent[remote].sum())
        for dedup_bytes, pair_bytes in (((58, 40), (26, 10)), ((58, 10), (26, 40)),
                                        ((200, 40), (26, 10))):
            expected = unique * sum(dedup_bytes) <= (1 - AUTO_MIN_SAVING) * pairs * sum(pair_bytes)
            assert d.saves_remote_bytes(dedup_bytes, pair_bytes) == expected, (
                unique, pairs, dedup_bytes, pair_bytes)
