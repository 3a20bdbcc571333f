"""The copy-engine transport's row arithmetic, checked against brute force in one process.

Every rank of an EP group is simulated with its own buffers (``SimulatedPeers``): the transport
places, copies and signals exactly as on GPUs, only the copies are tensor assignments and a
wait on an unset flag raises. The receive area must hold each chunk's rows expert-major (the
stock dispatcher's order after its regroup), and the return buffer every routed row's expert
output in send order.
"""

import numpy as np
import pytest
import torch

from megatron_eps.comm.copy_engine import CopyEngineTransport, SimulatedPeers
from megatron_eps.comm.copy_engine_plan import CopyEngineLayout
from megatron_eps.pipeline.layout import ChunkLayout
from megatron_eps.pipeline.rows.dedup import place_chunk_unique_rows
from megatron_eps.pipeline.rows.per_pair import permute_chunk_major, place_pair_rows, probs_columns
from megatron_eps.policy.chunks import chunk_sizes

HIDDEN = 8


def random_routing(rng, num_tokens, num_experts, topk, hot_expert=None, empty=()):
    allowed = [e for e in range(num_experts) if e not in empty]
    routing = np.zeros((num_tokens, num_experts), dtype=bool)
    for t in range(num_tokens):
        if hot_expert is not None:
            picks = [hot_expert] + list(rng.choice([e for e in allowed if e != hot_expert],
                                                   topk - 1, replace=False))
        else:
            picks = rng.choice(allowed, topk, replace=False)
        routing[t, picks] = True
    probs = rng.random((num_tokens, num_experts)).astype(np.float32) * routing
    return torch.from_numpy(routing), torch.from_numpy(probs)


def expert_output(rows, probs):
    """A stand-in for the experts that depends on every element and on the routing weight."""
    return rows * 3.0 - 1.0 + probs.unsqueeze(-1)


CASES = [
    # ep, local experts, tokens per rank, topk, chunking, scenario
    (2, 4, [13, 9], 2, 2, "random"),
    (2, 4, [0, 11], 2, 3, "zero tokens on a rank"),
    (3, 3, [7, 20, 5], 3, [1, 2], "uneven chunks"),
    (4, 2, [16, 0, 9, 12], 2, 2, "empty experts"),
    (4, 5, [40, 33, 2, 0], 3, 5, "one hot expert"),
    (2, 8, [64, 64], 4, 1, "one chunk"),
    (1, 6, [30], 2, 3, "one rank"),
    (2, 3, [0, 0], 2, 2, "no tokens anywhere"),
]


def case_inputs(ep, local, tokens, topk, scenario):
    """Every rank's (hidden states [T, H], routing map [T, E], probs [T, E]) and the count
    matrix for one case of CASES."""
    rng = np.random.default_rng(hash(scenario) % 2**32)
    num_experts = ep * local
    empty = (1, num_experts - 1) if scenario == "empty experts" else ()
    hot = 0 if scenario == "one hot expert" else None
    hidden_states, routings, probs = [], [], []
    for r in range(ep):
        routing, p = random_routing(rng, tokens[r], num_experts, topk, hot, empty)
        routings.append(routing)
        probs.append(p)
        hidden_states.append(torch.randn(tokens[r], HIDDEN, generator=torch.Generator().manual_seed(r)))
    counts = np.stack([r.sum(dim=0).numpy() for r in routings]).astype(np.int64)
    return hidden_states, routings, probs, counts


@pytest.mark.parametrize("ep,local,tokens,topk,chunking,scenario", CASES)
def test_transport_matches_brute_force(ep, local, tokens, topk, chunking, scenario):
    hidden_states, routings, probs, counts = case_inputs(ep, local, tokens, topk, scenario)
    sizes = chunk_sizes(local, chunking)

    world = SimulatedPeers(ep)
    transports = [CopyEngineTransport(world.memory(r)) for r in range(ep)]
    layouts, sorted_idx, permuted_probs = [], [], []
    for _forward in range(2):  # the second forward reuses the buffers and bumps the sequence
        layouts, sorted_idx, permuted_probs = [], [], []
        for r in range(ep):
            layout = ChunkLayout.build(counts, r, local, sizes)
            num_rows = layout.send_offsets[-1]
            permutation = permute_chunk_major(hidden_states[r], probs[r], routings[r],
                                              layout.expert_order, num_rows, gather_tokens=False)
            pp, si = permutation.probs, permutation.sorted_indices
            columns = probs_columns(hidden_states[r], pp)
            assert columns
            transports[r].begin(layout, counts, HIDDEN + columns, HIDDEN, torch.float32,
                                torch.device("cpu"))
            layouts.append(layout)
            sorted_idx.append(si)
            permuted_probs.append(pp)
        for chunk in range(len(sizes)):
            for r in range(ep):
                place_pair_rows(transports[r], layouts[r], chunk, hidden_states[r], sorted_idx[r],
                                permuted_probs[r], columns)
            completions = [transports[r].dispatch(chunk) for r in range(ep)]
            for r in range(ep):
                completions[r].wait(None)
                received, no_probs = transports[r].received(chunk)
                assert no_probs is None  # the weights ride in the rows
                a, b = layouts[r].expert_ranges[chunk]
                want_rows, want_probs = [], []
                for l in range(a, b):  # expert-major, then source rank, then token
                    expert = r * local + l
                    for s in range(ep):
                        tokens_s = torch.nonzero(routings[s][:, expert]).flatten()
                        want_rows.append(hidden_states[s][tokens_s])
                        want_probs.append(probs[s][tokens_s, expert])
                want_rows = torch.cat(want_rows) if want_rows else torch.zeros(0, HIDDEN)
                want_probs = torch.cat(want_probs) if want_probs else torch.zeros(0)
                assert received.shape[0] == sum(layouts[r].tokens_per_expert[chunk])
                assert torch.equal(received[:, :HIDDEN], want_rows)
                got_probs = received[:, HIDDEN:HIDDEN + 1].contiguous().view(torch.float32)[:, 0]
                assert torch.equal(got_probs, want_probs)
                transports[r].hand_back(chunk, expert_output(received[:, :HIDDEN], got_probs))
            finals = [transports[r].combine(chunk) for r in range(ep)]
        for r in range(ep):
            finals[r].wait(None)
            combined = transports[r].combined_rows()
            want = expert_output(hidden_states[r][sorted_idx[r]], permuted_probs[r])
            assert torch.equal(combined, want), scenario
            transports[r].end()


def test_rank_own_rows_are_never_copied():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 20, size=(2, 8))
    for rank in range(2):
        plan = CopyEngineLayout.build(counts, rank, [(0, 2), (2, 4)])
        assert all(rank not in chunk for chunk in plan.dispatch)  # no dispatch copy to itself
        local_rows = plan.run_sizes[plan.run_is_local].sum()
        assert local_rows == counts[rank, rank * 4:(rank + 1) * 4].sum()
        assert plan.recv_capacity == max(counts[:, r * 4:(r + 1) * 4].sum() for r in range(2))
        assert plan.return_capacity == counts.sum(axis=1).max()
        # every remote row is staged exactly once
        staged = sum(c.total_rows for chunk in plan.dispatch for c in chunk.values())
        assert staged == plan.run_sizes[~plan.run_is_local].sum() == counts[rank].sum() - local_rows


def test_missing_signal_is_detected():
    world = SimulatedPeers(2)
    memory = world.memory(0)
    with pytest.raises(RuntimeError, match="waits for flag"):
        memory.wait(1, 0, 1, None)
    world.memory(1).signal(0, 0, 1)
    memory.wait(1, 0, 1, None)


def test_explicit_copy_engine_where_it_cannot_work_is_one_clear_error(monkeypatch):
    from megatron_eps.comm import selection
    from megatron_eps.config import EPSConfigError

    monkeypatch.setattr(selection.torch.cuda, "is_available", lambda: False)
    with pytest.raises(EPSConfigError, match="transport='copy_engine'.*no CUDA device.*auto.*nccl"):
        selection.check_transport_setting("copy_engine", None, 2)
    selection.check_transport_setting("copy_engine", None, 1)  # nothing travels at EP 1
    selection.check_transport_setting("auto", None, 2)  # auto falls back instead
    assert "CUDA" in selection.copy_engine_blocker(None)


def _agree(transport):
    import torch.distributed as dist

    from megatron_eps.comm.selection import agree_on_copy_engine
    from megatron_eps.config import EPSConfigError

    try:
        return ("usable", agree_on_copy_engine(dist.group.WORLD, torch.device("cpu"), transport))
    except EPSConfigError as exc:
        return ("error", str(exc))


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU ranks: there the copy engines are unusable")
def test_ranks_agree_on_the_transport_before_using_it():
    """On CPU ranks no rank can use the copy engines: auto falls back to nccl on every rank;
    an explicit copy_engine is one clear error on every rank (nobody is left in a collective)."""
    from megatron_eps.testing import run_distributed

    auto = run_distributed(_agree, 2, "auto")
    assert auto == [("usable", False), ("usable", False)]
    explicit = run_distributed(_agree, 2, "copy_engine")
    assert all(kind == "error" and "transport='copy_engine'" in msg and "nccl" in msg
               for kind, msg in explicit), explicit


@pytest.mark.parametrize("ep,local,tokens,topk,chunking,scenario", CASES)
def test_dedup_rows_match_brute_force(ep, local, tokens, topk, chunking, scenario):
    """The deduplicated scheme over simulated peers: each chunk's receive area holds, by source
    rank then token, every token with an expert of the chunk here (once), and after the
    pre-reduced combine each token's rows sum to its weighted expert outputs."""
    from megatron_eps.pipeline.rows import unique_rows
    from megatron_eps.pipeline.rows import dedup as dedup_scheme
    from megatron_eps import row_kernels
    from megatron_eps.pipeline.rows.dedup import DedupChunkLayout

    hidden_states, routings, probs, counts = case_inputs(ep, local, tokens, topk, scenario)
    ranges = np.stack([unique_rows.range_unique_counts(r, ep).numpy() for r in routings])
    sizes = chunk_sizes(local, chunking)
    world = SimulatedPeers(ep)
    transports = [CopyEngineTransport(world.memory(r)) for r in range(ep)]
    layouts = [DedupChunkLayout.from_pairs(ChunkLayout.build(counts, r, local, sizes), counts,
                                           ranges, topk, torch.float32) for r in range(ep)]
    width = HIDDEN + dedup_scheme.meta_columns(HIDDEN, torch.float32, torch.float32, layouts[0].slots)
    sent_rows = [[] for _ in range(ep)]
    for r in range(ep):
        transports[r].begin(layouts[r], counts, width, HIDDEN, torch.float32, torch.device("cpu"))
    for chunk in range(len(sizes)):
        for r in range(ep):
            sent_rows[r].append(place_chunk_unique_rows(transports[r], layouts[r], chunk,
                                                        hidden_states[r], probs[r], routings[r]))
        completions = [transports[r].dispatch(chunk) for r in range(ep)]
        for r in range(ep):
            completions[r].wait(None)
            received, _ = transports[r].received(chunk)
            a, b = layouts[r].expert_ranges[chunk]
            experts = slice(r * local + a, r * local + b)
            want = torch.cat([hidden_states[s][routings[s][:, experts].any(dim=1)]
                              for s in range(ep)])
            assert torch.equal(received[:, :HIDDEN], want), scenario
            x, p, table = unique_rows.expand_rows(received, HIDDEN, layouts[r].slots, b - a,
                                                 layouts[r].pair_rows(chunk), torch.float32)
            sums = row_kernels.sum_rows(x * p.unsqueeze(1), table, torch.float32)
            transports[r].hand_back(chunk, sums)
        finals = [transports[r].combine(chunk) for r in range(ep)]
    for r in range(ep):
        finals[r].wait(None)
        table = unique_rows.return_table(sent_rows[r], layouts[r].send_offsets[:-1], tokens[r],
                                        layouts[r].send_offsets[-1])
        out = row_kernels.sum_rows(transports[r].combined_rows(), table, torch.float64)
        want = hidden_states[r].double() * probs[r].double().sum(dim=1, keepdim=True)
        torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
        transports[r].end()


class ExpertByIndex:
    """Stand-in experts whose output also depends on the expert, so rows handed to the wrong
    expert (a wrong ``tokens_per_expert`` of a part) show up."""

    def run(self, tokens, tokens_per_expert, probs, first_expert):
        assert tokens.shape[0] == sum(tokens_per_expert)
        expert = torch.repeat_interleave(
            torch.arange(len(tokens_per_expert), device=tokens.device) + first_expert,
            torch.tensor(tokens_per_expert, dtype=torch.long, device=tokens.device))
        return expert_output(tokens, probs) + expert.unsqueeze(-1).to(tokens.dtype)


def simulated_group(ep, local, tokens, topk, chunking, scenario, device):
    """One case of CASES on ``device``: every rank's hidden states, routing map and probs, the
    count matrix, the chunk sizes, and a copy-engine transport per rank over one group of
    simulated peers."""
    hidden_states, routings, probs, counts = case_inputs(ep, local, tokens, topk, scenario)
    world = SimulatedPeers(ep, device)
    return ([t.to(device) for t in hidden_states], [t.to(device) for t in routings],
            [t.to(device) for t in probs], counts, chunk_sizes(local, chunking),
            [CopyEngineTransport(world.memory(r)) for r in range(ep)])


def walk_in_lockstep(plan, stage, ep, device):
    """Every rank's steps of ``plan`` in lockstep, ``stage(rank, name, chunk)`` issuing each.

    On a GPU each rank issues on two streams of its own (``runner.PlanIssuer``), ordered only by
    the plan's events and the flags' events, as ranks on separate GPUs are; the current stream
    then waits for every rank. On CPU the steps run in order, and every awaited completion is
    checked (SimulatedPeers raises on a flag not yet set)."""
    from megatron_eps.pipeline.runner import PlanIssuer
    from megatron_eps.policy.schedule import COMBINE, COMPUTE

    if device == "cuda":
        routed = torch.cuda.current_stream().record_event()  # the inputs are ready
        names = {step.stage for step in plan}
        issuers = [PlanIssuer({name: (lambda chunk, r=r, name=name: stage(r, name, chunk))
                               for name in names},
                              torch.cuda.Stream(), torch.cuda.Stream(), routed=routed)
                   for r in range(ep)]
        for step in plan:
            for issuer in issuers:
                issuer.issue(step)
        for issuer in issuers:
            issuer.finish()
            torch.cuda.current_stream().wait_stream(issuer.streams[COMPUTE])
        return
    completions = [{} for _ in range(ep)]
    for step in plan:
        for r in range(ep):
            waited = completions[r].get(step.wait)
            if waited is not None:
                waited.wait(None)
            done = stage(r, step.stage, step.chunk)
            if step.record is not None:
                completions[r][step.record] = done
    last_combine = [step for step in plan if step.stage == COMBINE][-1].record
    for r in range(ep):
        completions[r][last_combine].wait(None)


def _devices():
    gpu = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU")])
    return ["cpu", gpu]


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("align", [None, 1, 4], ids=["together", "apart1", "apart4"])
@pytest.mark.parametrize("ep,local,tokens,topk,chunking,scenario", CASES)
def test_plan_with_simulated_peers_matches_brute_force(ep, local, tokens, topk, chunking,
                                                       scenario, align, device):
    """Every rank walks build_plan in lockstep with the dispatcher's own expert step
    (run_chunk_experts); every routed row comes back as the output of its expert. With the local
    rows apart (``align``) a chunk's local part holds, expert by expert, the first whole multiple
    of ``align`` of the rank's own rows, and its second part the rest, expert by expert and by
    source. A flag awaited before its peer set it raises (SimulatedPeers).

    On a GPU every rank issues its steps on two streams of its own (runner.PlanIssuer), ordered
    only by the plan's events and the flags' events, as ranks on separate GPUs are: a missing
    wait shows as wrong rows. The copies between the simulated ranks are tensor assignments."""
    from megatron_eps.pipeline.rows.per_pair import run_chunk_experts
    from megatron_eps.comm.base import LOCAL_PART, PEER_PART
    from megatron_eps.policy.schedule import COMBINE, DISPATCH, LOCAL_EXPERTS, PLACE, build_plan

    apart = align is not None
    hidden_states, routings, probs, counts, sizes, transports = simulated_group(
        ep, local, tokens, topk, chunking, scenario, device)
    experts = ExpertByIndex()
    ranks = []
    for r in range(ep):
        layout = ChunkLayout.build(counts, r, local, sizes, local_rows_apart=apart,
                                   local_rows_align=align or 1)
        permutation = permute_chunk_major(hidden_states[r], probs[r], routings[r],
                                          layout.expert_order, layout.send_offsets[-1],
                                          gather_tokens=False)
        columns = probs_columns(hidden_states[r], permutation.probs)
        transports[r].begin(layout, counts, HIDDEN + columns, HIDDEN, torch.float32,
                            torch.device(device))
        ranks.append((layout, permutation, columns))
    seen = {LOCAL_PART: [], PEER_PART: []}

    def stage(r, name, chunk):
        layout, permutation, columns = ranks[r]
        transport = transports[r]
        if device == "cuda" and name in (DISPATCH, COMBINE):
            # Transfers finish long after the host issued the whole plan (~20 ms each): a
            # reader that does not wait for them reads stale rows.
            torch.cuda._sleep(40_000_000)
        if name == PLACE:
            return place_pair_rows(transport, layout, chunk, hidden_states[r],
                                   permutation.sorted_indices, permutation.probs, columns)
        if name in (DISPATCH, COMBINE):
            return getattr(transport, name)(chunk)
        part = (LOCAL_PART if name == LOCAL_EXPERTS else PEER_PART) if apart else None
        if apart:
            rows, _ = transport.received(chunk, part)
            seen[part].append((r, chunk, rows[:, :HIDDEN].clone()))
        run_chunk_experts(transport, layout, experts, chunk, part, HIDDEN, columns, torch.float32)

    plan = build_plan(len(sizes), local_apart=apart)
    assert [s.stage for s in plan].count(LOCAL_EXPERTS) == (len(sizes) if apart else 0)
    walk_in_lockstep(plan, stage, ep, device)
    if device == "cuda":
        torch.cuda.synchronize()
    for r in range(ep):
        layout, permutation, _ = ranks[r]
        row_expert = torch.repeat_interleave(
            torch.as_tensor(layout.expert_order % local),
            torch.as_tensor(counts[r][layout.expert_order]))
        want = (expert_output(hidden_states[r][permutation.sorted_indices], permutation.probs)
                .cpu() + row_expert.unsqueeze(-1).float())
        assert torch.equal(transports[r].combined_rows().cpu(), want), scenario
    if not apart:
        return

    def rows_of(s, expert):
        return hidden_states[s][torch.nonzero(routings[s][:, expert]).flatten()].cpu()

    for part in (LOCAL_PART, PEER_PART):
        for r, chunk, rows in seen[part]:
            a, b = ranks[r][0].expert_ranges[chunk]
            want = []
            for l in range(a, b):
                own = rows_of(r, r * local + l)
                head = own.shape[0] // align * align
                if part == LOCAL_PART:
                    want.append(own[:head])
                    continue
                for s in range(ep):
                    want.append(own[head:] if s == r else rows_of(s, r * local + l))
            want = torch.cat(want) if want else torch.zeros(0, HIDDEN)
            assert torch.equal(rows.cpu(), want), (part, r, chunk)
    # the local parts held rows wherever the own rows allowed
    if align == 1 and counts.sum():
        assert any(rows.shape[0] for _, _, rows in seen[LOCAL_PART])


def test_local_part_is_a_chunks_head_of_whole_tiles_of_own_rows():
    rng = np.random.default_rng(3)
    counts = rng.integers(0, 9, size=(3, 12))
    ranges = [(0, 1), (1, 3), (3, 4)]
    for rank in range(3):
        apart = CopyEngineLayout.build(counts, rank, ranges,
                                       local_head=lambda own: (own // 4) * 4)
        together = CopyEngineLayout.build(counts, rank, ranges)
        assert apart.recv_chunk_offsets == together.recv_chunk_offsets
        assert together.recv_local_rows == [0, 0, 0]
        own = counts[rank, rank * 4:(rank + 1) * 4]
        assert apart.recv_local_rows == [int((own[a:b] // 4 * 4).sum()) for a, b in ranges]
        assert sum(c.total_rows for c in apart.combine_local) == sum(apart.recv_local_rows)
        # the same copies to the same peers, only to other rows
        for g in range(len(ranges)):
            for peer, copies in apart.dispatch[g].items():
                assert copies.total_rows == together.dispatch[g][peer].total_rows


class WeightedByExpert:
    """Stand-in experts for the deduplicated scheme: expert e maps row x to p (3x - 1 + e),
    the routing weight applied as the GEMM backends apply it."""

    def run(self, tokens, tokens_per_expert, probs, first_expert):
        expert = torch.repeat_interleave(
            torch.arange(len(tokens_per_expert), device=tokens.device) + first_expert,
            torch.tensor(tokens_per_expert, dtype=torch.long, device=tokens.device))
        return (tokens * 3.0 - 1.0 + expert.unsqueeze(-1).to(tokens.dtype)) * probs.unsqueeze(-1)


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("ep,local,tokens,topk,chunking,scenario", CASES)
def test_unique_rows_plan_with_simulated_peers_matches_float64(ep, local, tokens, topk, chunking,
                                                               scenario, device):
    """The deduplicated scheme (one row per token, rank and chunk) over the copy engines: every
    rank walks build_plan in lockstep with the dispatcher's expert step of that scheme
    (run_unique_rows_experts) and sums its returned rows per token, as the layer does; each
    token's result equals the float64 sum over its experts e of p_e (3x - 1 + e). On a GPU every
    rank runs on streams of its own, ordered by events only (runner.PlanIssuer), with every
    transfer delayed as in the test above."""
    from megatron_eps.pipeline.rows import unique_rows
    from megatron_eps.pipeline.rows import dedup as dedup_scheme
    from megatron_eps.pipeline.rows.dedup import DedupChunkLayout
    from megatron_eps import row_kernels
    from megatron_eps.pipeline.rows.dedup import run_unique_rows_experts
    from megatron_eps.policy.schedule import COMBINE, DISPATCH, PLACE, build_plan

    hidden_states, routings, probs, counts, sizes, transports = simulated_group(
        ep, local, tokens, topk, chunking, scenario, device)
    range_counts = np.stack([unique_rows.range_unique_counts(m, ep).cpu().numpy() for m in routings])
    experts = WeightedByExpert()
    layouts, sent_rows = [], [[] for _ in range(ep)]
    for r in range(ep):
        layout = DedupChunkLayout.from_pairs(ChunkLayout.build(counts, r, local, sizes), counts,
                                             range_counts, topk, torch.float32)
        columns = dedup_scheme.meta_columns(HIDDEN, torch.float32, torch.float32, layout.slots)
        transports[r].begin(layout, counts, HIDDEN + columns, HIDDEN, torch.float32,
                            torch.device(device))
        layouts.append(layout)

    def stage(r, name, chunk):
        if device == "cuda" and name in (DISPATCH, COMBINE):
            torch.cuda._sleep(40_000_000)  # see the test above
        if name == PLACE:
            sent_rows[r].append(place_chunk_unique_rows(transports[r], layouts[r], chunk,
                                                        hidden_states[r], probs[r], routings[r]))
            return None
        if name in (DISPATCH, COMBINE):
            return getattr(transports[r], name)(chunk)
        run_unique_rows_experts(transports[r], layouts[r], experts, chunk, HIDDEN, torch.float32,
                                torch.float32)

    walk_in_lockstep(build_plan(len(sizes)), stage, ep, device)
    for r in range(ep):
        num_tokens = hidden_states[r].shape[0]
        table = unique_rows.return_table(sent_rows[r], layouts[r].send_offsets[:-1], num_tokens,
                                        layouts[r].send_offsets[-1])
        got = row_kernels.sum_rows(transports[r].combined_rows(), table, torch.float32)
        x = hidden_states[r].double().cpu()
        local_id = (torch.arange(ep * local) % local).double()
        weights = probs[r].double().cpu() * routings[r].cpu()  # [T, E]
        want = (weights.sum(dim=1, keepdim=True) * (3.0 * x - 1.0)
                + (weights * local_id).sum(dim=1, keepdim=True))
        torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-5)
