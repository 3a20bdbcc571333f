"""The chunk layout and the plan, checked against brute force on random count matrices."""

import numpy as np
import pytest
import torch

from megatron_eps.comm.nccl import regroup_rows
from megatron_eps.comm.base import LOCAL_PART, PEER_PART
from megatron_eps.pipeline.layout import ChunkLayout
from megatron_eps.policy.chunks import chunk_sizes, split_local_experts, tail_split
from megatron_eps.pipeline.runner import run_plan
from megatron_eps.policy.schedule import (
    COMBINE,
    COMM,
    COMPUTE,
    DISPATCH,
    EXPERTS,
    LOCAL_EXPERTS,
    PLACE,
    Step,
    build_plan,
    simulate_plan,
)


@pytest.mark.parametrize("experts,chunks", [(1, 1), (4, 4), (5, 2), (20, 3), (64, 8), (7, 7)])
def test_split_local_experts_covers_all(experts, chunks):
    ranges = split_local_experts(experts, chunks)
    assert len(ranges) == chunks
    assert ranges[0][0] == 0 and ranges[-1][1] == experts
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    sizes = [e - s for s, e in ranges]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


@pytest.mark.parametrize("bad", [0, 5])
def test_split_local_experts_rejects(bad):
    with pytest.raises(ValueError):
        split_local_experts(4, bad)


@pytest.mark.parametrize("experts,chunks", [(1, 1), (4, 4), (5, 2), (20, 5), (20, 16), (64, 8)])
def test_tail_split_ends_with_one_expert(experts, chunks):
    sizes = tail_split(experts, chunks)
    assert len(sizes) == chunks and sum(sizes) == experts and min(sizes) >= 1
    if chunks > 1:
        assert sizes[-1] == 1
        assert max(sizes[:-1]) - min(sizes[:-1]) <= 1
    assert chunk_sizes(experts, chunks, "tail") == sizes
    assert chunk_sizes(experts, sizes) == sizes


def test_chunk_sizes_rejects_bad_input():
    for bad in ([], [2, 0, 2], [1, 1], [3, 3]):
        with pytest.raises(ValueError, match="sum to the 4 local experts"):
            chunk_sizes(4, bad)
    with pytest.raises(ValueError, match="equal, tail"):
        chunk_sizes(4, 2, "rows")
    with pytest.raises(ValueError, match="num_chunks"):
        tail_split(4, 5)


def simulate_all_to_all(layouts, payloads):
    """Brute-force exchange: payloads[src] is the permuted buffer of rank src."""
    ep = len(layouts)
    received = {}
    for chunk in range(layouts[0].num_chunks):
        for dst in range(ep):
            parts = []
            for src in range(ep):
                lay = layouts[src]
                start = lay.send_offsets[chunk] + sum(lay.send_splits[chunk][:dst])
                parts.append(payloads[src][start : start + lay.send_splits[chunk][dst]])
            received[(dst, chunk)] = np.concatenate(parts)
    return received


@pytest.mark.parametrize("seed", range(6))
def test_layout_routes_every_row_to_its_expert(seed):
    rng = np.random.default_rng(seed)
    ep = int(rng.integers(1, 5))
    local = int(rng.integers(1, 7))
    chunks = int(rng.integers(1, local + 1))
    # Even seeds: N equal chunks; odd seeds: random uneven chunk sizes.
    chunking = chunks
    if seed % 2:
        cuts = sorted(rng.choice(np.arange(1, local), size=chunks - 1, replace=False)) if chunks > 1 else []
        chunking = [b - a for a, b in zip([0] + list(cuts), list(cuts) + [local])]
    counts = rng.integers(0, 5, size=(ep, ep * local))
    if seed % 2:
        counts[rng.integers(ep)] = 0  # a rank with no tokens
        counts[:, 0] += 9  # one hot expert
    layouts = [ChunkLayout.build(counts, r, local, chunking) for r in range(ep)]
    if seed % 2:
        assert [e - s for s, e in layouts[0].expert_ranges] == chunking
    # Each rank's permuted buffer, chunk-major, labelled with (src, expert) per row.
    payloads = []
    for src, lay in enumerate(layouts):
        labels = [(src, e) for e in lay.expert_order for _ in range(counts[src, e])]
        payloads.append(np.array(labels, dtype=np.int64).reshape(-1, 2))
        assert len(labels) == lay.send_offsets[-1] == counts[src].sum()
    received = simulate_all_to_all(layouts, payloads)
    for dst, lay in enumerate(layouts):
        assert lay.num_chunks == chunks
        for chunk in range(chunks):
            rows = received[(dst, chunk)]
            assert len(rows) == sum(lay.recv_splits[chunk])
            regroup = lay.rank_major_to_expert_major(chunk)
            if regroup is not None:
                rows = regroup_rows(torch.from_numpy(rows), *regroup).numpy()
            start, end = lay.expert_ranges[chunk]
            expected = [
                (src, dst * local + e)
                for e in range(start, end)
                for src in range(ep)
                for _ in range(counts[src, dst * local + e])
            ]
            assert [tuple(r) for r in rows] == expected
            assert lay.tokens_per_expert[chunk] == [
                int(counts[:, dst * local + e].sum()) for e in range(start, end)
            ]
            apart = ChunkLayout.build(counts, dst, local, chunking, local_rows_apart=True,
                                      local_rows_align=2)
            # whole pairs of the rank's own rows: its local part
            own = [int(counts[dst, dst * local + e]) // 2 * 2 for e in range(start, end)]
            assert apart.part_tokens_per_expert(chunk, LOCAL_PART) == own
            assert apart.part_tokens_per_expert(chunk, PEER_PART) == [
                int(counts[:, dst * local + e].sum()) - o for e, o in zip(range(start, end), own)]
            assert apart.part_tokens_per_expert(chunk) == lay.tokens_per_expert[chunk]
            back = lay.expert_major_to_rank_major(chunk)
            if back is not None:
                restored = regroup_rows(torch.from_numpy(rows), *back).numpy()
                assert (restored == received[(dst, chunk)]).all()
        assert lay.expert_calls() == lay.tokens_per_expert
        assert len(apart.expert_calls()) == 2 * chunks


def test_layout_rejects_wrong_shape():
    with pytest.raises(ValueError, match="experts"):
        ChunkLayout.build(np.zeros((2, 6), dtype=np.int64), 0, 4, 2)


@pytest.mark.parametrize("chunks", [1, 2, 5])
def test_plan_orders_dispatch_before_experts_before_combine(chunks):
    plan = build_plan(chunks)
    position = {(s.stage, s.chunk): i for i, s in enumerate(plan)}
    assert plan[0] == Step(PLACE, 0, COMM, "routed", None)
    for i in range(chunks):
        # a chunk's rows are placed right before its dispatch, on the same stream
        assert position[(PLACE, i)] + 1 == position[(DISPATCH, i)]
        assert position[(DISPATCH, i)] < position[(EXPERTS, i)] < position[(COMBINE, i)]
        if i + 1 < chunks:
            # The next dispatch is issued before this chunk's experts: it overlaps them.
            assert position[(DISPATCH, i + 1)] < position[(EXPERTS, i)]
    for step in plan:
        assert step.stream == (COMPUTE if step.stage == EXPERTS else COMM)
    assert len(plan) == 4 * chunks


@pytest.mark.parametrize("chunks", [1, 2, 5])
def test_plan_with_local_rows_apart_hides_the_first_dispatch_and_the_last_combine(chunks):
    plan = build_plan(chunks, local_apart=True)
    position = {(s.stage, s.chunk): i for i, s in enumerate(plan)}
    together = [s for s in plan if s.stage != LOCAL_EXPERTS]
    # without the local steps (and the placed[] events nothing else awaits), the same plan
    assert [(s.stage, s.chunk, s.stream, s.wait) for s in together] == [
        (s.stage, s.chunk, s.stream, s.wait) for s in build_plan(chunks)]
    for i in range(chunks):
        local = plan[position[(LOCAL_EXPERTS, i)]]
        assert local.stream == COMPUTE and local.wait == f"placed[{i}]"
        assert plan[position[(PLACE, i)]].record == f"placed[{i}]"
        if chunks > 1 and i == chunks - 1:
            # after the chunk's peer rows and its combine: it runs beside that combine
            assert position[(EXPERTS, i)] < position[(COMBINE, i)] < position[(LOCAL_EXPERTS, i)]
        else:
            # before the chunk's peer rows: it runs beside their dispatch
            assert position[(LOCAL_EXPERTS, i)] < position[(EXPERTS, i)]


def test_simulated_plan_with_local_rows_apart():
    """Two chunks, each transfer and each GEMM part 1 s: apart, L0 runs beside D0 and L1 beside
    C1, so 4 s; together (each chunk's GEMMs 2 s) 6 s."""
    ones = [1.0, 1.0]
    assert simulate_plan(ones, ones, ones, local_experts=ones) == pytest.approx(4.0)
    assert simulate_plan(ones, [2.0, 2.0], ones) == pytest.approx(6.0)
    # one chunk: the local part hides the dispatch, the combine stays exposed
    assert simulate_plan([1.0], [1.0], [1.0], local_experts=[1.0]) == pytest.approx(3.0)
    assert simulate_plan([1.0], [2.0], [1.0]) == pytest.approx(4.0)


def test_run_plan_without_streams_follows_plan_order():
    plan = build_plan(3)
    seen = []
    stages = {name: (lambda c, name=name: seen.append((name, c)))
              for name in (PLACE, DISPATCH, EXPERTS, COMBINE)}
    run_plan(plan, stages, comm_stream=None)
    assert seen == [(s.stage, s.chunk) for s in plan]


def test_build_plan_rejects_zero():
    with pytest.raises(ValueError):
        build_plan(0)


def _shared_experts_layer(world):
    from megatron_eps import EPSConfig
    from megatron_eps.testing import Utils
    from megatron_eps.inference.layers import build_moe_pair, moe_config

    Utils.initialize_model_parallel(1, 1, expert_model_parallel_size=world)
    try:
        config = moe_config(num_experts=4 * world, topk=2, shared_expert_size=24, ep_size=world)
        stock, eps = build_moe_pair(config, EPSConfig(pipeline_degree=3, min_tokens_to_pipeline=0))
        x = torch.randn(21, 2, 32, generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            ref, _ = stock(x)
            out, _ = eps(x)
        return (ref - out).abs().max().item(), eps.token_dispatcher.last_record.num_chunks
    finally:
        Utils.destroy_model_parallel()


@pytest.mark.slow
@pytest.mark.multigpu
def test_shared_experts_issued_before_the_plan_give_the_stock_output():
    from megatron_eps.testing import run_distributed

    for err, chunks in run_distributed(_shared_experts_layer, 2, 2):
        assert err <= 1e-5 and chunks == 3
