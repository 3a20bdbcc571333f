"""benchmarks/bench_roofline.py: the FLOP and byte counts, and the trace breakdown on a hand-made
Chrome trace whose kernels, launch sites and idle time are known."""

import pytest

from tests.benchmark_scripts import load_benchmark_script


def _module():
    return load_benchmark_script("bench_roofline")


def test_flops_and_bytes_of_dsv2_lite():
    m = _module()
    shape = m.SHAPES["dsv2lite"]
    flops = m.layer_flops(shape, 16384)
    # routed: fc1 2*T*k*H*2F + fc2 2*T*k*F*H; shared 6*T*H*Fs
    assert flops["routed"] == 2 * 16384 * 6 * 2048 * 2816 + 2 * 16384 * 6 * 1408 * 2048
    assert flops["shared"] == 6 * 16384 * 2048 * 2816
    assert flops["total"] == flops["routed"] + flops["shared"]
    assert flops["router"] / flops["total"] < 0.005
    nbytes = m.min_bytes(shape, 16384)
    assert nbytes["weights"] == 2 * (64 * 3 * 2048 * 1408 + 3 * 2048 * 2816 + 64 * 2048)
    assert nbytes["activations"] == 2 * 2 * 16384 * 2048
    qwen = m.layer_flops(m.SHAPES["qwen3"], 4096)
    assert qwen["shared"] == 0 and qwen["routed"] == 6 * 4096 * 8 * 2048 * 768


def _x(cat, name, ts, dur, correlation=None):
    event = {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}
    if correlation is not None:
        event["args"] = {"correlation": correlation}
    return event


def test_breakdown_assigns_kernels_by_launch_site():
    events = [
        _x("user_annotation", "moe.router", 0, 10),
        _x("cuda_runtime", "cudaLaunchKernel", 2, 1, 1),
        _x("kernel", "nvjet_router_gemm", 100, 10, 1),        # router (a GEMM, but in the router)
        _x("cuda_runtime", "cudaLaunchKernel", 12, 1, 2),     # no range, before the experts
        _x("kernel", "route_rows_kernel", 110, 20, 2),        # -> permutation
        _x("user_annotation", "eps.experts.prepare", 14, 2),
        _x("cuda_runtime", "cudaMemcpyAsync", 15, 1, 3),
        _x("gpu_memcpy", "Memcpy HtoD", 130, 5, 3),           # staging the offsets: permutation
        _x("user_annotation", "eps.experts[0]", 20, 30),
        _x("cuda_driver", "cuLaunchKernelEx", 21, 1, 4),
        _x("kernel", "_expert_gemm_tma_kernel", 200, 300, 4),  # 65 us idle before it
        _x("cuda_runtime", "cudaLaunchKernel", 25, 1, 5),
        _x("kernel", "_fused_activation_kernel", 500, 40, 5),
        _x("user_annotation", "moe.shared_experts", 30, 5),   # nested inside the experts range
        _x("cuda_runtime", "cudaLaunchKernel", 31, 1, 6),
        _x("kernel", "nvjet_shared", 540, 60, 6),
        _x("cuda_runtime", "cudaLaunchKernel", 60, 1, 7),     # after the experts, no range
        _x("kernel", "sum_rows_kernel", 600, 25, 7),          # -> combine
        _x("kernel", "orphan_kernel", 625, 5, 99),            # launch not in the trace
    ]
    bd = _module().breakdown_from_trace(events)
    us = bd["us"]
    assert us["router"] == 10
    assert us["permutation"] == 20 + 5
    assert us["expert_gemm"] == 300
    assert us["activation"] == 40
    assert us["shared_experts"] == 60
    assert us["combine"] == 25
    assert us["other"] == 5
    assert us["idle"] == 65
    assert bd["span_us"] == 530 and bd["busy_us"] == 465 and bd["gpu_ops"] == 8
    assert sum(us.values()) == pytest.approx(bd["span_us"])


def test_a_trace_without_gpu_kernels_is_refused():
    with pytest.raises(ValueError, match="no GPU kernels"):
        _module().breakdown_from_trace([_x("cpu_op", "aten::mm", 0, 5)])


@pytest.mark.parametrize("argv, message", [
    (["--models", "gpt"], "--models 'gpt': allowed values"),
    (["--tokens", "4k"], "--tokens '4k'"),
    (["--variants", "eps,fast"], "--variants 'eps,fast': allowed values"),
    (["--repeats", "0"], "--repeats 0"),
])
def test_bad_arguments_name_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit):
        _module().parse_args(["--out", "x.json"] + argv)
    assert message in capsys.readouterr().err
