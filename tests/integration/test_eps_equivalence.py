"""EPSMoELayer equals stock MoELayer (alltoall dispatcher) on 1, 2 and 4 ranks.

Runs on CPU ranks over gloo in CI (ranks are spawned from this process) and on GPUs over NCCL
when CUDA is present (world sizes above the GPU count are skipped there).
"""

import pytest
import torch

from megatron_eps.comm.selection import ranks_share_gpu
from megatron_eps.testing import run_distributed, skip_unless_ranks_fit
from tests.integration import eps_cases
from tests.marks import ranks

FP32_MAX_ABS = 1e-5
BF16_REL = 1e-2


def _check(results, tolerance_kind):
    assert results, "no cases ran"
    failures = []
    for rank, rank_results in enumerate(results):
        for r in rank_results:
            ok = r["shape_ok"] and r["finite"] and r["num_chunks"] == r["expected_chunks"]
            ok = ok and r["experts_per_chunk"] == r["expected_experts_per_chunk"]
            if tolerance_kind == "fp32":
                ok = ok and r["max_abs"] <= FP32_MAX_ABS
            else:
                ok = ok and r["rel_err"] <= BF16_REL
            if not ok:
                failures.append((rank, r))
    assert not failures, "\n".join(f"rank {rank}: {r}" for rank, r in failures)
    # The grid really exercised what it claims.
    cases = [r["case"] for r in results[0]]
    assert {c[2] for c in cases} == {1, 2, 3, 4, 8}
    assert {c[1] for c in cases} == {1, 2, 6}
    assert {c[3] for c in cases} == {True, False}
    assert {c[4] for c in cases} == {"balanced", "hot", "zero_rank"}
    assert {c[6] for c in cases} == {"equal", "tail"}
    # Some tail split really was uneven (its last chunk one expert, another chunk more).
    assert any(len(set(r["experts_per_chunk"])) > 1 and c[6] == "tail"
               for r, c in zip(results[0], cases))


@pytest.mark.parametrize("world", ranks(1, 2, 4))
def test_eps_equals_stock_fp32(world):
    skip_unless_ranks_fit(world)
    results = run_distributed(
        eps_cases.run_equivalence, world, world, "fp32", "megatron", 10_000
    )
    _check(results, "fp32")
    # Some case must have pipelined for real (more than one chunk) with tokens on every rank.
    assert any(r["num_chunks"] > 1 and r["tokens"] > 0 for r in results[0])


@pytest.mark.parametrize("world", ranks(1, 2, 4))
def test_eps_equals_stock_bf16(world):
    skip_unless_ranks_fit(world)
    results = run_distributed(eps_cases.run_equivalence, world, world, "bf16", "megatron", 10_000)
    _check(results, "bf16")


@pytest.mark.parametrize("world", ranks(2, 4))
def test_auto_degree_is_identical_on_every_rank(world):
    skip_unless_ranks_fit(world)
    results = run_distributed(eps_cases.run_auto_degree_agreement, world, world)
    chunks = {r["num_chunks"] for r in results}
    assert len(chunks) == 1, f"ranks disagree on N: {[r['num_chunks'] for r in results]}"
    splits = {tuple(r["experts_per_chunk"]) for r in results}
    assert len(splits) == 1, f"ranks disagree on the chunks: {[r['experts_per_chunk'] for r in results]}"
    assert chunks.pop() > 1, "the slow-link profile should make pipelining pay"
    assert all(r["rel_err"] <= 1e-6 for r in results), results


@pytest.mark.parametrize("world", ranks(1, 2, 4))
def test_dispatcher_roundtrip_returns_input(world):
    skip_unless_ranks_fit(world)
    results = run_distributed(eps_cases.run_dispatcher_roundtrip, world, world)
    for rank, rank_results in enumerate(results):
        for path, experts, topk, degree, err, chunks in rank_results:
            assert err <= 1e-6, (rank, path, experts, topk, degree, err)
            assert chunks == min(degree, experts // world), (rank, path, degree, chunks)


@pytest.mark.parametrize("world", ranks(1, 2))
@pytest.mark.parametrize("kernel", ["dense", "grouped", "triton", "auto"])
def test_eps_equals_stock_with_gemm_backends(kernel, world):
    if kernel == "triton" and not torch.cuda.is_available():
        pytest.skip("the Triton kernel runs on GPUs (its CPU interpreter test is in experts/)")
    if world == 1 and not torch.cuda.is_available():
        pytest.skip("covered at world 2 on CPU")
    skip_unless_ranks_fit(world)
    dtype = "bf16" if torch.cuda.is_available() else "fp32"
    results = run_distributed(eps_cases.run_equivalence, world, world, dtype, kernel, 10_000)
    _check(results, dtype)


@pytest.mark.slow
@pytest.mark.multigpu
@pytest.mark.parametrize("transport,local_rows", [("nccl", "together"),
                                                  ("copy_engine", "together"),
                                                  ("copy_engine", "apart")])
def test_eps_equals_stock_on_each_transport(transport, local_rows):
    """Both transports over a real EP=2 group (GPUs): the whole grid, bf16, and the transport
    really used is the one asked for (no silent fallback); on the copy engines also with each
    chunk's own rows apart."""
    if not torch.cuda.is_available():
        pytest.skip("the transports differ on GPUs only (CPU ranks use gloo's all-to-all)")
    skip_unless_ranks_fit(2)
    results = run_distributed(eps_cases.run_equivalence, 2, 2, "bf16", "auto", 10_000, transport,
                              "off", local_rows)
    _check(results, "bf16")
    used = {(r["transport"], r["local_rows_apart"]) for rank in results for r in rank}
    assert used == {(transport, local_rows == "apart")}, used


def _check_stack(results, dtype):
    limit = 1e-5 if dtype == "fp32" else 2e-2
    for rank_results in results:
        for r in rank_results:
            assert r["finite"] and r["rel_err"] <= limit, r


@pytest.mark.slow
@pytest.mark.multigpu
def test_layer_stack_equals_stock():
    """Layers in a row share the transport's memory and streams; sizes grow and shrink. Two
    ranks where they fit (CPU, two GPUs, or ranks sharing one GPU), else EP=1 on the one GPU;
    the transport is the one ``auto`` picks."""
    on_gpu = torch.cuda.is_available()
    fits = not on_gpu or torch.cuda.device_count() >= 2 or ranks_share_gpu()
    world = 2 if fits else 1
    dtype = "bf16" if on_gpu else "fp32"
    results = run_distributed(eps_cases.run_layer_stack, world, world, dtype)
    assert len(results) == world
    _check_stack(results, dtype)


@pytest.mark.slow
@pytest.mark.multigpu
@pytest.mark.parametrize("transport", ["nccl", "copy_engine"])
def test_layer_stack_on_each_transport(transport):
    if not torch.cuda.is_available():
        pytest.skip("the transports differ on GPUs only (CPU ranks use gloo's all-to-all)")
    skip_unless_ranks_fit(2)
    results = run_distributed(eps_cases.run_layer_stack, 2, 2, "bf16", transport)
    _check_stack(results, "bf16")
    assert {r["transport"] for rank in results for r in rank} == {transport}
