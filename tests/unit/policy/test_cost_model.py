"""The pipeline cost model (megatron_eps.policy.cost_model): math, N* behaviour, determinism, threshold,
clamping, profiles, and the same N on every rank of a gloo group with skewed loads."""

from __future__ import annotations

import dataclasses
import json
import os
import types

import numpy as np
import pytest

from megatron_eps.config import EPSConfig
from megatron_eps.bench.emulated_group import emulated_group_counts, emulated_group_shape
from megatron_eps.policy.cost_model import (
    LayerShape,
    chunk_comm_times,
    chunk_compute_times,
    predict,
)
from megatron_eps.policy.degree import candidate_chunkings, choose_chunking
from megatron_eps.policy.profile import PipelineProfile, load_pipeline_profile, shipped_profile_path
from megatron_eps.policy.chunks import chunk_sizes
from megatron_eps.policy.schedule import simulate_plan
from megatron_eps.testing import run_distributed, skip_unless_ranks_fit
from tests.marks import ranks

DSV2 = LayerShape(5120, 1536, 20, 8, 6, shared_ffn_hidden_size=3072)
DSV2_EP2 = LayerShape(5120, 1536, 8, 2, 6, shared_ffn_hidden_size=3072)


def balanced_counts(shape: LayerShape, tokens_per_rank: int) -> np.ndarray:
    """Every rank sends every expert the same number of rows."""
    experts = shape.ep_size * shape.num_local_experts
    per_expert = tokens_per_rank * shape.topk // experts
    return np.full((shape.ep_size, experts), per_expert, dtype=np.int64)


def random_counts(shape: LayerShape, tokens, seed=0, zipf=None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    experts = shape.ep_size * shape.num_local_experts
    rows = []
    for t in tokens:
        if zipf:
            weights = 1.0 / np.arange(1, experts + 1) ** zipf
            picks = rng.choice(experts, size=t * shape.topk, p=weights / weights.sum())
        else:
            picks = rng.integers(0, experts, t * shape.topk)
        rows.append(np.bincount(picks, minlength=experts))
    return np.stack(rows).astype(np.int64)


def profile(**kw) -> PipelineProfile:
    values = dict(link_bandwidth_gbps=160.0, link_latency_us=0.0, chunk_overhead_us=15.0, expert_tflops=600.0)
    values.update(kw)
    return PipelineProfile(**values)


def equal_degree(counts, shape, eps_config, profile):
    """N that choose_chunking picks with equal chunks only (the paper's choice)."""
    return len(choose_chunking(counts, shape, eps_config, profile, split="equal"))


AUTO = EPSConfig(pipeline_degree="auto", min_tokens_to_pipeline=0, max_pipeline_degree=64)


def paper_pipelined_time(n: int, t_comm: float, t_comp: float, overhead_s: float) -> float:
    """The paper's closed form for N equal chunks: the serial time minus the hidden part
    L(N) = min(T_comm, T_comp) (N - 1) / N, plus R(N) = k N."""
    return t_comm + t_comp - min(t_comm, t_comp) * (n - 1) / n + overhead_s * n


def paper_optimal_degree(t_comm: float, t_comp: float, chunk_overhead_s: float) -> float:
    """The paper's N* = sqrt(min(T_comm, T_comp) / k) (continuous)."""
    return (min(t_comm, t_comp) / chunk_overhead_s) ** 0.5


def unpipelined_times(counts, shape, p):
    one = predict(counts, shape, p, 1)
    return one.t_comm, one.t_comp


# ----------------------------------------------------------------------------- schedule math
@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("t_comm,t_comp", [(1.0, 3.0), (2.0, 2.0), (3.0, 1.0), (6.0, 1.0)])
def test_simulated_plan_vs_closed_form(n, t_comm, t_comp):
    """Equal chunks: the simulated plan equals the paper's closed form when compute-bound, and
    is never worse (the 3-stage plan also overlaps dispatch with combine when comm-bound)."""
    d = [t_comm / (2 * n)] * n
    x = [t_comp / n] * n
    simulated = simulate_plan(d, x, d)
    closed = paper_pipelined_time(n, t_comm, t_comp, 0.0)
    assert simulated <= closed + 1e-12
    if t_comp >= t_comm:
        assert simulated == pytest.approx(closed, rel=1e-12)
    elif n > 1 and t_comp / n <= t_comm / (2 * n):
        # comm-bound with each chunk's GEMMs shorter than one combine: the comm stream never
        # waits, so the layer takes exactly T_comm.
        assert simulated == pytest.approx(t_comm, rel=1e-12)
    assert simulated >= max(t_comm, t_comp) - 1e-12  # never faster than the busier stream
    if n == 1:
        assert simulated == pytest.approx(t_comm + t_comp)


def test_simulated_plan_hides_shared_experts_behind_dispatch():
    # Shared experts (0.5) shorter than dispatch 0 (1.0): fully hidden.
    assert simulate_plan([1.0], [2.0], [1.0], shared=0.5) == pytest.approx(4.0)
    # Longer (3.0): X0 starts after it; 2 of the 3 units are exposed.
    assert simulate_plan([1.0], [2.0], [1.0], shared=3.0) == pytest.approx(6.0)


def test_uneven_chunks_cost_more_than_even_ones():
    even = simulate_plan([0.5, 0.5], [1.0, 1.0], [0.5, 0.5])
    uneven = simulate_plan([0.5, 0.5], [1.8, 0.2], [0.5, 0.5])
    assert uneven > even


def test_prediction_is_the_plan_walk_with_each_chunks_slowest_rank():
    """The all-to-alls couple the ranks: the model walks schedule.build_plan with, per chunk,
    the GEMM time of the slowest rank (and the largest shared-expert time)."""
    from megatron_eps.policy.cost_model import shared_experts_time

    counts = random_counts(DSV2, [4096, 1000, 7000, 0, 300, 4096, 2048, 5000], seed=3, zipf=1.0)
    p = profile(memory_bandwidth_gbps=2500.0, link_latency_us=20.0)
    tokens = counts.sum(axis=1) / DSV2.topk
    s = max(shared_experts_time(t, DSV2, p) for t in tokens)
    for n in (1, 3, 5, 16):
        for ahead in (1, None):
            d, c = chunk_comm_times(counts, DSV2, p, n)
            x = chunk_compute_times(counts, DSV2, p, n)
            walked = simulate_plan(d, x.max(axis=0), c, s, dispatch_ahead=ahead)
            pred = predict(counts, DSV2, p, n, dispatch_ahead=ahead)
            assert pred.t_pipelined == pytest.approx(walked + p.chunk_overhead_us * 1e-6 * (n - 1), rel=1e-12)
            assert pred.t_serial == pytest.approx(
                sum(d) + sum(c) + x.max(axis=0).sum() + s + p.chunk_overhead_us * 1e-6 * (n - 1), rel=1e-12
            )


def test_local_rows_apart_is_the_plan_walk_of_both_parts():
    """With a chunk's own rows apart the model walks the plan with both GEMM calls per chunk:
    the chunk's GEMM time split by the local part's share of its rows (as the chunk's slowest
    rank runs it), plus one chunk overhead per chunk for the second call."""
    from megatron_eps.policy.cost_model import local_part_rows, rows_per_expert, shared_experts_time

    counts = random_counts(DSV2_EP2, [8192, 6000], seed=5)
    p = profile(memory_bandwidth_gbps=2500.0, link_latency_us=20.0)
    rows, local = rows_per_expert(counts, DSV2_EP2), local_part_rows(counts, DSV2_EP2)
    # whole 128-row tiles of each expert's own rows
    assert (local[0] == counts[0, :8] // 128 * 128).all() and (local <= rows).all()
    s = max(shared_experts_time(t, DSV2_EP2, p) for t in counts.sum(axis=1) / DSV2_EP2.topk)
    k = p.chunk_overhead_us * 1e-6
    for n in (1, 2, 4):
        d, c = chunk_comm_times(counts, DSV2_EP2, p, n)
        x = chunk_compute_times(counts, DSV2_EP2, p, n)
        starts = [sum(chunk_sizes(8, n)[:g]) for g in range(n)]
        share = (np.add.reduceat(local, starts, axis=1) / np.add.reduceat(rows, starts, axis=1))
        slowest = x.argmax(axis=0), np.arange(n)
        walked = simulate_plan(d, (x * (1 - share))[slowest], c, s,
                               local_experts=(x * share)[slowest])
        pred = predict(counts, DSV2_EP2, p, n, local_rows_apart=True)
        assert pred.t_pipelined == pytest.approx(walked + k * (n - 1) + k * n, rel=1e-12)
        together = predict(counts, DSV2_EP2, p, n)
        assert pred.t_serial == pytest.approx(together.t_serial + k * n, rel=1e-12)
        # at this load the transfers are hidden better than with one call per chunk
        assert pred.t_pipelined < together.t_pipelined


def test_host_issue_time_bounds_the_layer():
    counts = balanced_counts(DSV2, 4096)
    gpu_only = profile(chunk_overhead_us=10.0)
    host = profile(chunk_overhead_us=10.0, host_chunk_us=600.0)
    for n in (1, 4, 10):
        assert predict(counts, DSV2, host, n).t_pipelined >= 600e-6 * n
        assert predict(counts, DSV2, host, n).t_pipelined >= predict(counts, DSV2, gpu_only, n).t_pipelined
    assert equal_degree(counts, DSV2, AUTO, host) < equal_degree(counts, DSV2, AUTO, gpu_only)


# ----------------------------------------------------------------------------- model inputs
def test_comm_time_from_bytes_bandwidth_and_latency():
    shape = LayerShape(1024, 512, 4, 2, 2)
    # Global experts 0..3 live on rank 0, 4..7 on rank 1. Rank 0 sends 10 rows to rank 1 and
    # receives none; rank 1 sends none and receives 10: the busiest rank moves 10 rows.
    counts = np.array([[10, 0, 0, 30, 5, 5, 0, 0], [0, 0, 0, 0, 7, 0, 0, 1]])
    p = profile(link_bandwidth_gbps=1.0, link_latency_us=3.0)
    d, c = chunk_comm_times(counts, shape, p, 1)
    row_bytes = 1024 * 2
    assert c[0] == pytest.approx(10 * row_bytes / 1e9 + 3e-6)
    assert d[0] == pytest.approx(10 * (row_bytes + 16) / 1e9 + 3e-6)  # + the packed weights
    # Two chunks: experts {0,1} and {2,3} of each rank; rank 0's remote rows go to global 4, 5.
    d2, c2 = chunk_comm_times(counts, shape, p, 2)
    assert c2[0] == pytest.approx(10 * row_bytes / 1e9 + 3e-6)
    assert c2[1] == 0.0  # nothing crosses the link in chunk 1: no call latency either


def test_compute_time_is_the_busiest_rank_and_shared_experts_count():
    shape = LayerShape(1024, 512, 2, 2, 1, shared_ffn_hidden_size=256)
    counts = np.array([[100, 0, 0, 0], [100, 300, 0, 0]])  # rank 0 receives 500 rows, rank 1 none
    p = profile(expert_tflops=1.0)
    _, t_comp = unpipelined_times(counts, shape, p)
    shared_per_token = 2.0 * 1024 * (256 * 2 + 256)
    rank0 = 500 * shape.flops_per_row + 100 * shared_per_token  # 100 tokens of its own
    rank1 = 400 * shared_per_token
    assert t_comp == pytest.approx(max(rank0, rank1) / 1e12)
    assert rank0 > rank1


def test_weight_bound_small_loads():
    shape = LayerShape(5120, 1536, 20, 1, 6)
    p = profile(memory_bandwidth_gbps=1000.0)
    counts = np.full((1, 20), 2)  # 2 rows per expert: weight streaming dominates
    x = chunk_compute_times(counts, shape, p, 1)
    assert x[0, 0] == pytest.approx(20 * shape.expert_weight_bytes / 1e12)
    counts[0, 5] = 0  # an empty expert reads no weights
    assert chunk_compute_times(counts, shape, p, 1)[0, 0] == pytest.approx(x[0, 0] * 19 / 20)


def test_ep1_link_is_free_and_an_emulated_group_pays_for_its_remote_rows():
    shape = LayerShape(5120, 1536, 20, 1, 6)
    counts = balanced_counts(shape, 8192)
    real = profile(link_bandwidth_gbps=1.0)
    assert chunk_comm_times(counts, shape, real, 4)[0] == [0.0] * 4
    assert equal_degree(counts, shape, AUTO, real) == 1  # nothing to hide
    # The single-GPU link emulator's view: rank 0 of EP=8 sends 7/8 of its rows.
    group, group_shape = emulated_group_counts(counts, 8), emulated_group_shape(shape, 8)
    assert (group.reshape(8, 8, 20).sum(axis=0) == counts).all()  # each rank computes `counts`
    d, c = chunk_comm_times(group, group_shape, profile(), 1)
    rows = counts.sum() * 7 / 8
    assert c[0] == pytest.approx(rows * 5120 * 2 / 160e9, rel=1e-3)
    assert equal_degree(group, group_shape, AUTO, profile()) > 1


# ----------------------------------------------------------------------------- choosing N
@pytest.mark.parametrize("k_us", [5.0, 20.0, 80.0])
@pytest.mark.parametrize("tokens", [2048, 8192])
def test_auto_degree_follows_sqrt_c_over_k(k_us, tokens):
    """Balanced, compute-bound layer with many experts: N ~ sqrt(min(T_comm, T_comp) / k)."""
    shape = LayerShape(4096, 1024, 64, 8, 8)
    counts = balanced_counts(shape, tokens)
    p = profile(link_bandwidth_gbps=400.0, chunk_overhead_us=k_us, expert_tflops=300.0)
    t_comm, t_comp = unpipelined_times(counts, shape, p)
    assert t_comp > t_comm  # compute-bound: the model is the closed form exactly
    n_star = paper_optimal_degree(t_comm, t_comp, k_us * 1e-6)
    n = equal_degree(counts, shape, AUTO, p)
    assert 1 < n < 64
    assert abs(n - n_star) <= 1.0, (n, n_star)


def test_auto_degree_monotonic_in_overhead_and_load():
    counts = balanced_counts(DSV2, 8192)
    ns = [equal_degree(counts, DSV2, AUTO, profile(chunk_overhead_us=k)) for k in (2, 10, 50, 400)]
    assert ns == sorted(ns, reverse=True) and ns[0] > ns[-1]
    p = profile()
    loads = [equal_degree(balanced_counts(DSV2, t), DSV2, AUTO, p) for t in (1024, 4096, 16384)]
    assert loads == sorted(loads) and loads[0] < loads[-1]


def test_auto_is_the_best_enabled_prediction():
    p = profile(link_latency_us=25.0, memory_bandwidth_gbps=2500.0)
    for seed, tokens in enumerate([[64] * 8, [512] * 8, [4096, 0, 100, 9000, 7, 2000, 4096, 1]]):
        counts = random_counts(DSV2, tokens, seed=seed, zipf=1.2)
        n = equal_degree(counts, DSV2, AUTO, p)
        preds = [predict(counts, DSV2, p, m) for m in range(1, 21)]
        chosen = preds[n - 1]
        assert chosen.t_pipelined <= preds[0].t_pipelined
        considered = [preds[0]] + [predict(counts, DSV2, p, c) for c in candidate_chunkings(DSV2, AUTO)]
        best = min(q.t_pipelined for q in considered if q.enabled or q.num_chunks == 1)
        assert chosen.t_pipelined == pytest.approx(best, rel=1e-9)
        # Each N left out has the largest chunk of a candidate with fewer chunks; the model
        # never predicts it more than a few percent better (the extra chunks only add overhead).
        assert min(q.t_pipelined for q in preds if q.enabled) >= 0.95 * best


def test_candidates_are_the_fewest_chunks_per_largest_chunk():
    equal = candidate_chunkings(DSV2, AUTO)
    assert [len(c) for c in equal] == [2, 3, 4, 5, 7, 10, 20]
    assert [max(c) for c in equal] == [10, 7, 5, 4, 3, 2, 1]
    both = candidate_chunkings(DSV2, AUTO, ("equal", "tail"))
    tails = [c for c in both if c not in equal]
    assert all(c[-1] == 1 and len(set(c)) > 1 for c in tails)
    assert len(set(both)) == len(both)
    capped = candidate_chunkings(DSV2, AUTO.replace(max_pipeline_degree=4))
    assert [len(c) for c in capped] == [2, 3, 4]


def test_choice_is_deterministic_and_input_type_independent():
    counts = random_counts(DSV2, [3000, 100, 0, 8000, 50, 4096, 4096, 10], seed=1, zipf=1.0)
    p = profile(link_latency_us=10.0)
    first = equal_degree(counts, DSV2, AUTO, p)
    assert all(equal_degree(counts.copy(), DSV2, AUTO, p) == first for _ in range(5))
    assert equal_degree(counts.astype(np.int32), DSV2, AUTO, p) == first
    assert equal_degree(counts.tolist(), DSV2, AUTO, p) == first


def test_tail_split_shortens_the_drain_and_auto_takes_it():
    # Compute-bound with shared experts that cover the first dispatch: the drain (the last
    # combine) is what pipelining leaves exposed, and the tail split makes it 1/E of the rows.
    counts = balanced_counts(DSV2, 8192)
    p = profile(chunk_overhead_us=100.0, link_latency_us=10.0)  # few chunks pay: a long drain
    equal = {n: predict(counts, DSV2, p, n).t_pipelined for n in range(1, 21)}
    tail = {n: predict(counts, DSV2, p, chunk_sizes(20, n, "tail")).t_pipelined for n in range(2, 21)}
    n_eq = min(equal, key=equal.get)
    assert min(tail.values()) < equal[n_eq]
    chosen = choose_chunking(counts, DSV2, AUTO, p)
    assert chosen[-1] == 1 and len(set(chosen)) > 1
    assert predict(counts, DSV2, p, chosen).t_pipelined == pytest.approx(min(tail.values()), rel=1e-3)
    # split="equal" (and equal_degree) stay on the paper's equal chunks.
    assert choose_chunking(counts, DSV2, AUTO, p, split="equal") == chunk_sizes(20, n_eq)
    assert equal_degree(counts, DSV2, AUTO, p) == n_eq
    assert choose_chunking(counts, DSV2, AUTO.replace(chunk_split="tail"), p)[-1] == 1
    # A fixed degree: equal unless the config asks for the tail split.
    fixed = AUTO.replace(pipeline_degree=5)
    assert choose_chunking(counts, DSV2, fixed, p) == (4, 4, 4, 4, 4)
    assert choose_chunking(counts, DSV2, fixed.replace(chunk_split="tail"), p) == (5, 5, 5, 4, 1)


def test_host_base_and_min_gain_keep_marginal_loads_unpipelined():
    counts = balanced_counts(DSV2, 4096)
    p = profile(chunk_overhead_us=30.0, link_latency_us=10.0)
    chosen = choose_chunking(counts, DSV2, AUTO, p)
    assert len(chosen) > 1
    gain = 1 - predict(counts, DSV2, p, chosen).t_pipelined / predict(counts, DSV2, p, 1).t_pipelined
    # Just above and just below the predicted gain.
    assert len(choose_chunking(counts, DSV2, AUTO, profile(chunk_overhead_us=30.0, link_latency_us=10.0,
                                                           min_gain=gain * 0.9))) > 1
    assert choose_chunking(counts, DSV2, AUTO, profile(chunk_overhead_us=30.0, link_latency_us=10.0,
                                                       min_gain=gain * 1.1)) == (20,)
    # A host whose fixed time dwarfs the GPU work: more chunks only add host time.
    host_bound = profile(chunk_overhead_us=30.0, link_latency_us=10.0, host_chunk_us=200.0, host_base_us=50000.0)
    assert predict(counts, DSV2, host_bound, 1).t_pipelined == pytest.approx(50200e-6)
    assert choose_chunking(counts, DSV2, AUTO, host_bound) == (20,)
    with pytest.raises(ValueError, match="min_gain"):
        profile(min_gain=1.0)


def test_gemm_carveout_slows_overlapped_gemms_only():
    counts = balanced_counts(DSV2, 8192)
    p = profile(chunk_overhead_us=30.0, sm_count=132.0)
    for n in (1, 4):
        plain = predict(counts, DSV2, p, n)
        carved = predict(counts, DSV2, p, n, gemm_sm_carveout=16)
        assert carved.enabled == plain.enabled  # the enable condition judges the split alone
        if n == 1:  # the dispatcher holds SMs back only while chunks overlap
            assert carved.t_pipelined == plain.t_pipelined
        else:
            assert carved.t_comp == pytest.approx(plain.t_comp * 132 / 116)
            assert carved.t_pipelined > plain.t_pipelined
    assert len(choose_chunking(counts, DSV2, AUTO.replace(gemm_sm_carveout=8), p)) > 1


def test_auto_decisions_are_cached_by_a_coarse_load_summary():
    from megatron_eps.policy import degree

    degree._DECISIONS.clear()
    p = profile(chunk_overhead_us=30.0, link_latency_us=10.0)
    counts = random_counts(DSV2, [8192] * 8, seed=3)
    first = choose_chunking(counts, DSV2, AUTO, p)
    assert len(degree._DECISIONS) == 1
    # Within the summary's resolution: the cached decision, no new entry.
    assert choose_chunking(counts + (counts > 500), DSV2, AUTO, p) == first
    assert len(degree._DECISIONS) == 1
    # Another load, another profile: new decisions, each the model's own.
    other = balanced_counts(DSV2, 1024)
    assert choose_chunking(other, DSV2, AUTO, p) == choose_chunking(other, DSV2, AUTO, p)
    slow_host = profile(chunk_overhead_us=30.0, link_latency_us=10.0, host_chunk_us=5000.0)
    assert choose_chunking(counts, DSV2, AUTO, slow_host) == (20,)
    assert len(degree._DECISIONS) == 3
    degree._DECISIONS.clear()
    assert choose_chunking(counts, DSV2, AUTO, p) == first


def test_threshold_returns_one():
    counts = balanced_counts(DSV2, 1600)  # exactly 1600 tokens per rank
    p = profile(chunk_overhead_us=0.1)
    cfg = EPSConfig(pipeline_degree="auto", min_tokens_to_pipeline=1601)
    assert equal_degree(counts, DSV2, cfg, p) == 1
    assert equal_degree(counts, DSV2, cfg.replace(pipeline_degree=4), p) == 1
    cfg = cfg.replace(min_tokens_to_pipeline=1600)  # the mean is exactly 1600: not below
    assert equal_degree(counts, DSV2, cfg, p) > 1
    assert equal_degree(counts, DSV2, cfg.replace(pipeline_degree=4), p) == 4


def test_clamping_and_missing_profile():
    shape = LayerShape(1024, 512, 4, 2, 2)
    counts = balanced_counts(shape, 100000)
    explicit = EPSConfig(pipeline_degree=100, min_tokens_to_pipeline=0)
    assert equal_degree(counts, shape, explicit, None) == 4
    cheap = profile(link_bandwidth_gbps=1.0, chunk_overhead_us=0.0)
    assert equal_degree(counts, shape, AUTO, cheap) <= 4
    capped = AUTO.replace(max_pipeline_degree=2)
    assert equal_degree(balanced_counts(DSV2, 65536), DSV2, capped, cheap) == 2
    assert equal_degree(counts, shape, AUTO, None) == 1  # no calibrated model: no guess


def test_enable_condition():
    counts = balanced_counts(DSV2, 2048)
    assert predict(counts, DSV2, profile(link_latency_us=0.0), 8).enabled
    # A latency comparable to the byte time: 8 chunks multiply it by 8, far over 1 + eps0.
    slow_start = profile(link_latency_us=2000.0, chunk_overhead_us=0.0)
    assert not predict(counts, DSV2, slow_start, 8).enabled
    assert equal_degree(counts, DSV2, AUTO, slow_start) <= 2
    lenient = profile(link_latency_us=2000.0, chunk_overhead_us=0.0, comm_inflation_eps=100.0)
    assert predict(counts, DSV2, lenient, 8).enabled


def test_overlap_efficiency_scales_the_gain():
    counts = balanced_counts(DSV2, 8192)
    full = predict(counts, DSV2, profile(), 4)
    half = predict(counts, DSV2, profile(overlap_efficiency=0.5), 4)
    assert half.t_pipelined - full.t_pipelined == pytest.approx((full.t_serial - full.t_pipelined) / 2)


# ----------------------------------------------------------------------------- profiles
def test_profile_json_round_trip(tmp_path):
    p = profile(chunk_overhead_base_us=3.0, memory_bandwidth_gbps=2800.0)
    path = tmp_path / "p.pipeline.json"
    path.write_text(json.dumps({"pipeline": p.to_dict(), "provenance": {"x": 1}}))
    loaded = load_pipeline_profile(str(path), "cpu")
    assert loaded.to_dict() == p.to_dict()
    # Kernel tables only (the shipped H100 ones, alone): no pipeline constants in it.
    import megatron_eps

    shipped = os.path.join(os.path.dirname(megatron_eps.__file__), "profiles",
                           "nvidia_h100_80gb_hbm3.json")
    kernel_only = tmp_path / "kernel_only.json"
    kernel_only.write_text(json.dumps(json.load(open(shipped))["experts"]))
    assert load_pipeline_profile(str(kernel_only), "cpu") is None
    # Something that is no profile at all is an error naming the setting.
    not_a_profile = tmp_path / "kernels.json"
    not_a_profile.write_text(json.dumps({"grouped": {"tflops": 600}}))
    with pytest.raises(ValueError, match="cost_profile=.*holds neither"):
        load_pipeline_profile(str(not_a_profile), "cpu")
    with pytest.raises(ValueError, match="chunk_overhead_us"):
        PipelineProfile.from_dict({"link_bandwidth_gbps": 1, "link_latency_us": 1, "expert_tflops": 1})
    with pytest.raises(ValueError):
        profile(link_bandwidth_gbps=0.0)
    assert shipped_profile_path("cpu") is None


def test_shipped_profiles_parse():
    import glob
    import os

    import megatron_eps

    root = os.path.join(os.path.dirname(megatron_eps.__file__), "profiles")
    paths = glob.glob(os.path.join(root, "*.json"))
    assert {os.path.basename(p) for p in paths} >= {"nvidia_h100_80gb_hbm3.json", "nvidia_h200.json"}
    for path in paths:  # one profile per GPU: experts and/or pipeline (+ links) sections
        p = PipelineProfile.from_json(path)
        assert p.chunk_overhead_us >= 0 and p.expert_tflops > 0 and p.link_bandwidth_gbps > 0
        with open(path) as f:
            data = json.load(f)
        assert "provenance" in data and "pipeline" in data
        for transport in data.get("links", {}):
            assert load_pipeline_profile(path, "cpu", transport).link_bandwidth_gbps > 0


# ----------------------------------------------------------------------------- ranks agree
SKEWED_TOKENS = {2: [48, 0], 4: [40, 3, 0, 97]}


def _rank_auto_agreement(world: int, profile_path: str):
    import torch
    import torch.distributed as dist

    from megatron_eps.moe_layer import route_allowing_empty
    from megatron_eps.testing import Utils
    from megatron_eps.inference.layers import build_moe_pair, moe_config

    rank = dist.get_rank()
    Utils.initialize_model_parallel(1, 1, expert_model_parallel_size=world)
    try:
        config = moe_config(num_experts=4 * world, topk=2, hidden_size=32, ffn_hidden_size=16,
                            shared_expert_size=24, ep_size=world)
        eps_config = EPSConfig(pipeline_degree="auto", min_tokens_to_pipeline=0,
                               cost_profile=profile_path, expert_kernel="megatron")
        stock, eps = build_moe_pair(config, eps_config, seed=11)
        seq = SKEWED_TOKENS[world][rank]
        x = torch.randn(seq, 1, 32, generator=torch.Generator().manual_seed(100 + rank))
        if seq == 0:
            stock.route = types.MethodType(route_allowing_empty, stock)
        with torch.no_grad():
            expected, _ = stock(x)
            actual, _ = eps(x)
        record = eps.token_dispatcher.last_record
        diff = (expected.double() - actual.double()).norm().item()
        ref = expected.double().norm().item()
        return {
            "num_chunks": record.num_chunks,
            "experts_per_chunk": list(record.experts_per_chunk),
            "counts": record.global_counts.tolist(),
            "rel_err": diff / ref if ref > 0 else diff,
            "tokens": seq,
        }
    finally:
        Utils.destroy_model_parallel()


@pytest.mark.parametrize("world", ranks(2, 4))
def test_every_rank_picks_the_same_degree(world, tmp_path):
    skip_unless_ranks_fit(world)
    # A link slow enough that pipelining pays even for a few tokens (CPU-sized layer).
    p = profile(link_bandwidth_gbps=1e-4, link_latency_us=1.0, chunk_overhead_us=1.0, expert_tflops=1e-4)
    path = tmp_path / "slow.pipeline.json"
    # One cost_profile file serves both the kernel selector (its own format, here without
    # kernel tables) and the pipeline model (the "pipeline" section).
    path.write_text(json.dumps({
        "format": "megatron-eps-cost-profile", "device": {"name": "cpu"}, "dtype": "float32",
        "shapes": [], "pipeline": p.to_dict(),
    }))
    results = run_distributed(_rank_auto_agreement, world, world, str(path), timeout_s=300)
    chunks = [r["num_chunks"] for r in results]
    assert len(set(chunks)) == 1, f"ranks disagree on N: {chunks}"
    assert [r["tokens"] for r in results] == SKEWED_TOKENS[world]
    counts = np.asarray(results[0]["counts"])
    assert all(np.array_equal(np.asarray(r["counts"]), counts) for r in results)
    # The per-rank loads really are skewed, and N is what the model says for the global counts.
    assert counts.sum(axis=1).min() == 0 and counts.sum(axis=1).max() > 0
    shape = LayerShape(32, 16, 4, world, 2, shared_ffn_hidden_size=24, bytes_per_element=4)
    expected = choose_chunking(counts, shape, AUTO.replace(max_pipeline_degree=16), p)
    assert all(tuple(r["experts_per_chunk"]) == expected for r in results), results
    assert chunks[0] == len(expected) > 1
    assert all(r["rel_err"] <= 1e-5 for r in results), [r["rel_err"] for r in results]


# ----------------------------------------------------------------------------- dispatch ahead
def test_plan_dispatch_ahead_orders():
    from megatron_eps.policy.schedule import COMBINE, DISPATCH, EXPERTS, PLACE, build_plan

    interleaved = [(s.stage, s.chunk) for s in build_plan(3, dispatch_ahead=1)]
    assert interleaved == [
        (PLACE, 0), (DISPATCH, 0), (PLACE, 1), (DISPATCH, 1), (EXPERTS, 0), (COMBINE, 0),
        (PLACE, 2), (DISPATCH, 2), (EXPERTS, 1), (COMBINE, 1), (EXPERTS, 2), (COMBINE, 2),
    ]
    ahead = [(s.stage, s.chunk) for s in build_plan(3)]
    assert ahead[:6] == [(PLACE, 0), (DISPATCH, 0), (PLACE, 1), (DISPATCH, 1), (PLACE, 2),
                         (DISPATCH, 2)]
    assert sorted(ahead) == sorted(interleaved)
    with pytest.raises(ValueError):
        build_plan(3, dispatch_ahead=0)


def test_dispatch_ahead_avoids_the_shared_expert_stall():
    # Comm-bound with long shared experts: with dispatch_ahead=1, C0 waits behind S + X0 and
    # holds D2 back; issuing every dispatch first keeps the link busy.
    d, x, c = [0.5] * 4, [0.3] * 4, [0.5] * 4
    interleaved = simulate_plan(d, x, c, shared=1.5, dispatch_ahead=1)
    ahead = simulate_plan(d, x, c, shared=1.5)
    assert ahead < interleaved
    assert ahead == pytest.approx(4.0)  # = T_comm: nothing exposed
    counts = balanced_counts(DSV2, 8192)
    p = profile()
    for n in (2, 4, 10):
        for a in (1, 2, None):
            dd, cc = chunk_comm_times(counts, DSV2, p, n)
            xx = chunk_compute_times(counts, DSV2, p, n)
            from megatron_eps.policy.cost_model import shared_experts_time

            s = shared_experts_time(counts[0].sum() / DSV2.topk, DSV2, p)
            walked = simulate_plan(dd, xx[0], cc, s, dispatch_ahead=a)
            pred = predict(counts, DSV2, p, n, dispatch_ahead=a)
            assert pred.t_pipelined == pytest.approx(walked + p.chunk_overhead_us * 1e-6 * (n - 1))


def test_profile_links_section_gives_each_transport_its_link(tmp_path):
    import json as _json

    from megatron_eps.policy.cost_model import chunk_comm_times

    base = dict(link_bandwidth_gbps=300.0, link_latency_us=50.0, chunk_overhead_us=90.0,
                expert_tflops=600.0)
    path = tmp_path / "h200.pipeline.json"
    path.write_text(_json.dumps({"pipeline": base, "links": {
        "copy_engine": {"link_bandwidth_gbps": 400.0, "link_latency_us": 100.0,
                        "link_piece_us": 4.0, "overlap_efficiency": 0.7}}}))
    plain = load_pipeline_profile(str(path), "cpu")
    nccl = load_pipeline_profile(str(path), "cpu", "nccl")  # no links entry: the pipeline's
    ce = load_pipeline_profile(str(path), "cpu", "copy_engine")
    assert plain == nccl and plain.link_bandwidth_gbps == 300.0 and plain.link_piece_us == 0.0
    assert (ce.link_bandwidth_gbps, ce.link_latency_us, ce.link_piece_us, ce.overlap_efficiency) == (
        400.0, 100.0, 4.0, 0.7)
    assert ce.chunk_overhead_us == 90.0  # not overridden
    # Per-piece time: each chunk's dispatch pays link_piece_us per (peer, expert of the chunk).
    counts = np.full((2, 16), 100)
    no_pieces = dataclasses.replace(ce, link_piece_us=0.0)
    for chunking in (1, 2, 4):
        d_with, c_with = chunk_comm_times(counts, DSV2_EP2, ce, chunking)
        d_without, c_without = chunk_comm_times(counts, DSV2_EP2, no_pieces, chunking)
        experts = 8 // chunking
        assert np.allclose(np.subtract(d_with, d_without), 4e-6 * experts * 1)
        assert np.allclose(np.subtract(c_with, c_without), 4e-6 * experts * 2)
    bad = tmp_path / "bad.json"
    bad.write_text(_json.dumps({"pipeline": base, "links": {"copy_engine": {"typo_us": 1}}}))
    with pytest.raises(ValueError, match="links.copy_engine.*typo_us"):
        load_pipeline_profile(str(bad), "cpu", "copy_engine")


def test_profiles_fitted_against_the_roofline_keep_it():
    from megatron_eps.policy.profile import PipelineProfile

    base = {"link_bandwidth_gbps": 100, "link_latency_us": 10, "chunk_overhead_us": 50, "expert_tflops": 400}
    assert PipelineProfile.from_dict(base).use_kernel_tables is True
    assert PipelineProfile.from_dict({**base, "use_kernel_tables": False}).use_kernel_tables is False
    with pytest.raises(ValueError, match="use_kernel_tables"):
        PipelineProfile.from_dict({**base, "use_kernel_tables": "no"})


def test_the_decision_cache_holds_the_kernel_tables_it_is_keyed_by():
    # Keyed by id(), a later set of tables at a freed one's address would get its decisions
    # (and two ranks could then disagree on the chunks).
    import gc
    import weakref

    class Tables:
        pass

    tables = Tables()
    alive = weakref.ref(tables)
    counts = balanced_counts(DSV2, 8192)
    chosen = choose_chunking(counts, DSV2, AUTO, profile(), kernel_profile=tables)
    del tables
    gc.collect()
    assert alive() is not None
    assert choose_chunking(counts, DSV2, AUTO, profile(), kernel_profile=alive()) == chosen


def test_chunking_policy_reads_a_profile_only_where_the_model_decides(monkeypatch):
    """At EP=1, below min_tokens_to_pipeline or with a fixed N the answer cannot depend on a
    profile, so its lookup (file checks per layer and forward) is skipped; with auto at EP > 1
    above the threshold it is read."""
    from megatron_eps.policy import degree as policies

    lookups = []

    def recording_lookup(path, device, transport=None):
        lookups.append(transport)
        return profile()

    monkeypatch.setattr(policies, "load_pipeline_profile", recording_lookup)
    auto = EPSConfig(pipeline_degree="auto", min_tokens_to_pipeline=1024)
    ep1 = dataclasses.replace(DSV2_EP2, ep_size=1)
    cases = [
        (ep1, auto, balanced_counts(ep1, 8192), False),
        (DSV2_EP2, auto, balanced_counts(DSV2_EP2, 512), False),
        (DSV2_EP2, dataclasses.replace(auto, pipeline_degree=2), balanced_counts(DSV2_EP2, 8192), False),
        (DSV2_EP2, auto, balanced_counts(DSV2_EP2, 8192), True),
    ]
    for shape, eps_config, counts, reads in cases:
        lookups.clear()
        chosen = policies.ChunkingPolicy(shape, eps_config, "cpu").choose(counts, "nccl")
        assert lookups == (["nccl"] if reads else []), (shape.ep_size, eps_config.pipeline_degree)
        # the same answer the model gives with the profile in hand
        assert chosen == choose_chunking(counts, shape, eps_config, profile())
