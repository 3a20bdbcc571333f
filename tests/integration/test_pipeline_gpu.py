"""The pipeline on a GPU (skipped without CUDA): overlap on equals the stock MoELayer, no syncs
inside the pipeline, memory reuse across streams is safe, the link emulator, the SM carve-out."""

from __future__ import annotations

import contextlib

import pytest
import torch

from megatron_eps.comm.nccl import NCCLTransport

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

HIDDEN, FFN, SHARED = 256, 128, 192


def _rel(ref, out):
    ref, out = ref.double(), out.double()
    return ((ref - out).norm() / ref.norm()).item()


def _kernel(dtype):
    if dtype == torch.bfloat16:
        try:
            from megatron_eps.experts.base import get_backend  # noqa: F401
            import megatron_eps.experts.grouped  # noqa: F401

            return "grouped"
        except ImportError:
            return "megatron"
    return "megatron"


def _pair(dtype, degree, experts=8, topk=2, shared=True, hidden=HIDDEN, ffn=FFN, **eps_kw):
    from megatron_eps import EPSConfig
    from megatron_eps.inference.layers import build_moe_pair, moe_config

    config = moe_config(num_experts=experts, topk=topk, hidden_size=hidden, ffn_hidden_size=ffn,
                        shared_expert_size=SHARED if shared else None, dtype=dtype)
    eps_config = EPSConfig(pipeline_degree=degree, min_tokens_to_pipeline=0,
                           expert_kernel=_kernel(dtype), **eps_kw)
    return build_moe_pair(config, eps_config, seed=5)


def _emulator(bandwidth_gbps=2.0, latency_us=5.0, fraction=0.875):
    from megatron_eps.bench.link_emulator import EmulatedLinkAllToAll

    return EmulatedLinkAllToAll(bandwidth_gbps, latency_us, fraction)


@contextlib.contextmanager
def _no_syncs_in_run_plan(monkeypatch):
    """Make every synchronizing call inside runner.run_plan raise."""
    import megatron_eps.pipeline.dispatcher as dispatcher_module

    original = dispatcher_module.run_plan
    calls = {"n": 0}

    def forbidden(*args, **kwargs):
        raise AssertionError("device/stream/event synchronize inside the pipeline")

    def guarded(*args, **kwargs):
        calls["n"] += 1
        with monkeypatch.context() as m:
            m.setattr(torch.cuda, "synchronize", forbidden)
            m.setattr(torch.cuda.Stream, "synchronize", forbidden)
            m.setattr(torch.cuda.Event, "synchronize", forbidden)
            previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error")
            try:
                return original(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode(previous)

    monkeypatch.setattr(dispatcher_module, "run_plan", guarded)
    yield calls


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("degree,split", [(1, "equal"), (2, "equal"), (3, "equal"), (8, "equal"),
                                          (3, "tail"), (5, "tail")])
def test_overlapped_pipeline_equals_stock(parallel, monkeypatch, dtype, tol, degree, split):
    from megatron_eps.policy.chunks import chunk_sizes

    stock, eps = _pair(dtype, degree, chunk_split=split, gemm_sm_carveout=8)
    eps.use_transport(NCCLTransport(_emulator()))  # a slow link: the comm stream lags behind
    assert eps.token_dispatcher.overlap
    x = torch.randn(512, 2, HIDDEN, device="cuda", dtype=dtype)
    with torch.no_grad():
        expected, _ = stock(x)
        with _no_syncs_in_run_plan(monkeypatch) as calls:
            actual, _ = eps(x)
    torch.cuda.synchronize()
    assert calls["n"] == 1
    assert eps.token_dispatcher.last_record.num_chunks == degree
    assert eps.token_dispatcher.last_record.experts_per_chunk == chunk_sizes(8, degree, split)
    assert torch.isfinite(actual.float()).all()
    assert _rel(expected, actual) <= tol


@pytest.mark.parametrize("dispatch_dedup", ["off", "on"])
def test_memory_reuse_across_streams_is_safe(parallel, dispatch_dedup):
    """Back-to-back forwards with a link ~10x slower than the GEMMs, and fresh allocations
    scribbled over right after each returns, all without a host sync: any buffer the allocator
    handed out while the comm stream still used it would corrupt an output."""
    stock, eps = _pair(torch.bfloat16, 4, dispatch_dedup=dispatch_dedup)
    eps.use_transport(NCCLTransport(_emulator(bandwidth_gbps=0.5)))
    inputs = [torch.randn(1024, 1, HIDDEN, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    with torch.no_grad():
        expected = [stock(x)[0] for x in inputs]
        torch.cuda.synchronize()
        outputs, scribbles = [], []
        for x in inputs:
            outputs.append(eps(x)[0])
            scribbles.append(torch.full((4 * x.numel(),), float("nan"), device="cuda", dtype=x.dtype))
        torch.cuda.synchronize()
    assert eps.token_dispatcher.last_record.dedup == (dispatch_dedup == "on")
    for ref, out in zip(expected, outputs):
        assert torch.isfinite(out.float()).all()
        assert _rel(ref, out) <= 1e-2


@pytest.mark.parametrize("spin", ["timer", "sleep"])
def test_link_emulator_occupies_the_stream_for_the_modeled_time(parallel, spin):
    from megatron_eps.bench.link_emulator import EmulatedLinkAllToAll, calibrate_sleep_cycles_per_ms

    cycles = calibrate_sleep_cycles_per_ms()
    assert 2e5 < cycles < 5e6  # a GPU clock between 0.2 and 5 GHz
    link = EmulatedLinkAllToAll(bandwidth_gbps=10.0, latency_us=100.0, remote_fraction=0.5,
                                cycles_per_ms=cycles, spin=spin)
    src = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16)  # 8 MiB
    dst = torch.empty_like(src)
    modeled = link.link_seconds(src.numel() * 2)
    assert modeled == pytest.approx(8 * 2**20 * 0.5 / 10e9 + 100e-6)
    link(dst, src, [4096], [4096])  # warm-up
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        link(dst, src, [4096], [4096])
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    measured = sorted(times)[2]
    # _sleep counts SM clock cycles calibrated a moment earlier; the clock of an idle GPU may
    # still be ramping, so only the GPU-timer spin is held to a tight bound.
    upper = 1.3 if spin == "timer" else 2.0
    assert 0.9 * modeled <= measured <= upper * modeled + 50e-6, (measured, modeled)
    assert torch.equal(dst, src)
    with pytest.raises(ValueError):
        link(dst, src, [2048, 2048], [2048, 2048])
    # Slices at odd offsets (probs rows: 4-byte aligned) and odd bf16 lengths (no int32 view).
    probs = torch.rand(4099, device="cuda")
    probs_out = torch.zeros(4099, device="cuda")
    link(probs_out[1:], probs[1:], [4098], [4098])
    odd = torch.randn(3, 7, device="cuda", dtype=torch.bfloat16)
    odd_out = torch.empty_like(odd)
    link(odd_out, odd, [3], [3])
    torch.cuda.synchronize()
    assert torch.equal(probs_out[1:], probs[1:]) and probs_out[0] == 0
    assert torch.equal(odd_out, odd)


def test_timer_link_keeps_its_time_beside_gemms_that_leave_it_sms(parallel):
    """The emulated link must not stretch under a GEMM load (the SM-clock based _sleep does)
    when the GEMMs leave it SMs, as the pipeline's carve-out does."""
    from megatron_eps.bench.link_emulator import EmulatedLinkAllToAll
    from megatron_eps.comm.sm_control import carveout_supported, gemm_sm_carveout

    if not carveout_supported():
        pytest.skip("torch has no _set_sm_carveout_experimental")
    link = EmulatedLinkAllToAll(bandwidth_gbps=160.0, latency_us=10.0, remote_fraction=0.875,
                                spin="timer", num_ctas=16)
    src = torch.randn(8192 * 6, 5120, device="cuda", dtype=torch.bfloat16)  # DSV2 8K tokens
    dst = torch.empty_like(src)
    rows = [src.shape[0]]
    modeled = link.link_seconds(src.numel() * 2)
    x = torch.randn(40960, 5120, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(16, 3072, 5120, device="cuda", dtype=torch.bfloat16)
    offs = torch.arange(1, 17, device="cuda", dtype=torch.int32) * 2560
    comm = torch.cuda.Stream(priority=-1)
    times = []
    for _ in range(5):
        torch.cuda.synchronize()
        with gemm_sm_carveout(16):
            for _ in range(4):
                torch._grouped_mm(x, w.transpose(1, 2), offs=offs)
            with torch.cuda.stream(comm):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                link(dst, src, rows, rows)
                end.record()
            for _ in range(8):
                torch._grouped_mm(x, w.transpose(1, 2), offs=offs)
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    measured = sorted(times)[2]
    assert measured <= 1.25 * modeled, (measured, modeled)
    assert torch.equal(dst, src)


def test_emulated_link_is_overlapped_with_the_gemms(parallel):
    """N=4 with the comm stream must beat the same plan without overlap by a clear margin when
    link and GEMM times are comparable. The layer is sized to be GPU-bound (several ms of
    GEMMs), so host issue time does not hide the link in both modes alike."""
    hidden, tokens = 2048, 32768
    _, eps = _pair(torch.bfloat16, 4, shared=False, hidden=hidden, ffn=4096)
    x = torch.randn(tokens, 1, hidden, device="cuda", dtype=torch.bfloat16)

    def median_ms(overlap):
        eps.token_dispatcher.overlap = overlap
        times = []
        with torch.no_grad():
            for i in range(7):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                eps(x)
                end.record()
                end.synchronize()
                if i >= 2:
                    times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]

    eps.use_transport(NCCLTransport(_emulator(bandwidth_gbps=1e9)))  # ~free link: GEMM time
    compute = median_ms(False)
    # A link with the same time as the layer's compute, split over dispatch and combine.
    rows_bytes = tokens * 2 * hidden * 2
    eps.use_transport(NCCLTransport(_emulator(
        bandwidth_gbps=2 * rows_bytes * 0.875 / (compute * 1e-3) / 1e9, latency_us=0.0
    )))
    serial, overlapped = median_ms(False), median_ms(True)
    eps.token_dispatcher.overlap = True
    assert serial > 1.6 * compute  # the link costs time
    assert overlapped < serial - 0.25 * compute, (serial, overlapped, compute)


def test_gemm_sm_carveout_is_restored(parallel):
    from megatron_eps.comm.sm_control import carveout_supported, current_gemm_carveout, gemm_sm_carveout

    if not carveout_supported():
        pytest.skip("torch has no _set_sm_carveout_experimental")
    before = current_gemm_carveout()
    with gemm_sm_carveout(16) as applied:
        assert applied and current_gemm_carveout() == 16
    assert current_gemm_carveout() == before
    stock, eps = _pair(torch.float32, 2, gemm_sm_carveout=16)
    eps.use_transport(NCCLTransport(_emulator()))
    seen = []
    original = eps.expert_runner.run

    def spy(*args, **kwargs):
        seen.append(current_gemm_carveout())
        return original(*args, **kwargs)

    eps.expert_runner.run = spy
    x = torch.randn(256, 1, HIDDEN, device="cuda")
    with torch.no_grad():
        expected, _ = stock(x)
        actual, _ = eps(x)
    assert seen == [16, 16]
    assert current_gemm_carveout() == before
    assert _rel(expected, actual) <= 1e-5


def test_nccl_cta_cap_env(monkeypatch):
    from megatron_eps.comm.sm_control import apply_comm_cta_cap

    for name in ("NCCL_MAX_CTAS", "NCCL_MAX_NCHANNELS"):
        monkeypatch.delenv(name, raising=False)
    assert apply_comm_cta_cap(8)
    import os

    assert os.environ["NCCL_MAX_CTAS"] == "8" and os.environ["NCCL_MAX_NCHANNELS"] == "8"
    assert not apply_comm_cta_cap(None)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("degree,split", [(1, "equal"), (3, "equal"), (5, "tail")])
def test_dedup_pipeline_equals_stock(parallel, monkeypatch, dtype, tol, degree, split):
    """dispatch_dedup on, overlapped over the emulated link: equals stock, no host sync inside
    the plan (the expansion and the pre-reduction are sized from the host's layout)."""
    stock, eps = _pair(dtype, degree, experts=16, topk=6, chunk_split=split,
                       dispatch_dedup="on")
    eps.use_transport(NCCLTransport(_emulator()))
    x = torch.randn(512, 2, HIDDEN, device="cuda", dtype=dtype)
    with torch.no_grad():
        expected, _ = stock(x)
        with _no_syncs_in_run_plan(monkeypatch) as calls:
            actual, _ = eps(x)
            again, _ = eps(x)
    torch.cuda.synchronize()
    record = eps.token_dispatcher.last_record
    assert calls["n"] == 2 and record.dedup and record.num_chunks == degree
    assert torch.equal(actual, again)  # deterministic
    assert _rel(expected, actual) <= tol


def test_dedup_accuracy_vs_float64_on_gpu(parallel):
    """bf16 layer, top-6 of 32, 4 chunks (several partial sums per token), vs the same layer in
    float64 (fp64 router, so all route alike): the deduplicated scheme, with bf16 or fp32 partial
    sums, is not further from float64 than stock Megatron (whose GPU combine adds in bf16)."""
    from megatron_eps.inference.layers import build_moe_pair, moe_config
    from megatron_eps import EPSConfig

    def config(dtype):
        return moe_config(num_experts=32, topk=6, hidden_size=HIDDEN, ffn_hidden_size=FFN,
                          shared_expert_size=SHARED, dtype=dtype, moe_router_dtype="fp64")

    eps_config = EPSConfig(pipeline_degree=4, min_tokens_to_pipeline=0,
                           expert_kernel=_kernel(torch.bfloat16), dispatch_dedup="on")
    stock, eps = build_moe_pair(config(torch.bfloat16), eps_config, seed=9)
    reference, _ = build_moe_pair(config(torch.float64), EPSConfig(enabled=False))
    reference.load_state_dict(stock.state_dict())
    eps.use_transport(NCCLTransport(_emulator(bandwidth_gbps=1e9)))
    x = torch.randn(4096, 1, HIDDEN, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ref, _ = reference(x.double())
        errors = {"stock": _rel(ref, stock(x)[0]), "dedup_model": _rel(ref, eps(x)[0])}
        eps.eps_config = eps_config.replace(dedup_combine_dtype="fp32")
        errors["dedup_fp32"] = _rel(ref, eps(x)[0])
        eps.eps_config = eps_config.replace(dispatch_dedup="off")
        errors["pairs"] = _rel(ref, eps(x)[0])
    print("errors vs float64:", errors)
    assert errors["dedup_fp32"] <= errors["stock"] * 1.001, errors
    assert errors["dedup_model"] <= errors["stock"] * 1.01, errors


def test_shared_experts_fused_on_a_side_stream(parallel):
    """The shared experts run fc1 -> fused activation -> fc2 (experts/shared.py) on a side
    stream; the layer equals stock either way, and the side stream changes no bit."""
    stock, eps = _pair(torch.bfloat16, 1)
    runner = eps.shared_expert_runner()
    assert runner.reason is None
    x = torch.randn(1024, 2, HIDDEN, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        module_out = eps.shared_experts(x)
        pending = runner.issue(x, side_stream=True)
        assert pending._done is not None  # issued on the side stream
        fused_out = pending.join()
        assert _rel(module_out, fused_out) <= 1e-2
        expected, _ = stock(x)
        eps.shared_experts_side_stream = True
        side, _ = eps(x)
        eps.shared_experts_side_stream = False
        same, _ = eps(x)
    torch.cuda.synchronize()
    assert torch.equal(side, same)
    assert _rel(expected, side) <= 1e-2


def test_each_forward_keeps_its_own_counts(parallel):
    """The count matrix lands in a pinned buffer reused by every forward of the layer: the
    host's counts of one forward must not change when the next forward's counts arrive."""
    import numpy as np

    _, eps = _pair(torch.bfloat16, 1)
    first = torch.randn(512, 1, HIDDEN, device="cuda", dtype=torch.bfloat16)
    second = torch.randn(256, 1, HIDDEN, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        eps(first)
        record = eps.token_dispatcher.last_record
        counts = record.global_counts.copy()
        eps(second)
    torch.cuda.synchronize()
    assert np.array_equal(record.global_counts, counts)
    assert int(counts.sum()) == 512 * 2
    assert int(eps.token_dispatcher.last_record.global_counts.sum()) == 256 * 2


@pytest.mark.parametrize("kernel", ["grouped", "triton"])
def test_rows_on_device_never_wait_for_the_gpu(parallel, monkeypatch, kernel):
    """Without expert parallelism (``plan_rows_on_device: auto``) the pipelined forward issues
    everything from counts the host never reads: any synchronizing call inside it raises, and
    the output still equals stock's."""
    from megatron_eps import EPSConfig
    from megatron_eps.pipeline.dispatcher import EPSAlltoAllTokenDispatcher

    stock, eps = _pair(torch.bfloat16, "auto", plan_rows_on_device="auto")
    eps.eps_config = EPSConfig(**{**eps.eps_config.to_dict(), "expert_kernel": kernel})
    x = torch.randn(1536, 2, HIDDEN, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        expected, _ = stock(x)
        eps(x)  # weights packed, kernels compiled
    torch.cuda.synchronize()
    original = EPSAlltoAllTokenDispatcher.pipelined_forward

    def forbidden(*args, **kwargs):
        raise AssertionError("a synchronize inside the forward planned on the device")

    def guarded(self, *args, **kwargs):
        with monkeypatch.context() as m:
            m.setattr(torch.cuda, "synchronize", forbidden)
            m.setattr(torch.cuda.Stream, "synchronize", forbidden)
            m.setattr(torch.cuda.Event, "synchronize", forbidden)
            torch.cuda.set_sync_debug_mode("error")
            try:
                return original(self, *args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode(0)

    monkeypatch.setattr(EPSAlltoAllTokenDispatcher, "pipelined_forward", guarded)
    with torch.no_grad():
        out, _ = eps(x)
    record = eps.token_dispatcher.last_record
    assert record.device_counts is not None and record.host_counts is None
    assert eps.last_expert_backends == [kernel]
    assert _rel(expected, out) <= 1e-2
