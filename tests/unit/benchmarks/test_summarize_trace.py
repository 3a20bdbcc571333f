"""benchmarks/summarize_trace.py on a hand-made Chrome trace whose busy time, gaps and the host
op during the largest gap are known."""

import json

import pytest

from tests.benchmark_scripts import load_benchmark_script


def _module():
    return load_benchmark_script("summarize_trace")


def _trace(tmp_path, events):
    """A Chrome trace of complete events given as (category, name, start us, duration us)."""
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": [
        {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur} for cat, name, ts, dur in events]}))
    return str(path)


def test_busy_idle_gaps_and_host_ops(tmp_path):
    events = [
        # two overlapping kernels on two streams: busy 100..250
        ("kernel", "gemm", 100, 100), ("kernel", "copy_kernel", 150, 100),
        # a 300 us gap, then a memcpy, a 50 us gap, then a kernel
        ("gpu_memcpy", "Memcpy HtoD", 550, 20), ("kernel", "gemm", 620, 80),
        ("cpu_op", "aten::nonzero", 260, 280), ("cpu_op", "outer_forward", 0, 800),
        ("cuda_runtime", "cudaLaunchKernel", 90, 5), ("cuda_runtime", "cudaLaunchKernel", 560, 7),
        ("cuda_runtime", "cudaStreamSynchronize", 300, 30),
        ("user_annotation", "eps.layout", 270, 40), ("user_annotation", "eps.layout", 700, 20),
        ("user_annotation", "ProfilerStep#1", 0, 810),
    ]
    summary = _module().summarize(_trace(tmp_path, events), top=5)
    assert summary["gpu_span_us"] == 600
    assert summary["gpu_busy_us"] == 150 + 20 + 80
    assert summary["gpu_idle_us"] == 350
    assert summary["kernel_launches"] == 4
    assert summary["top_kernels"][0] == {"name": "gemm", "us": 180, "count": 2}
    assert [g["us"] for g in summary["largest_gaps"]] == [300, 50]
    # the longest host ops inside the gap: what the GPU waited for
    assert summary["largest_gaps"][0]["host_ops"] == [
        "aten::nonzero 280us", "eps.layout 40us", "cudaStreamSynchronize 30us"]
    # no host op inside the second gap: the innermost one spanning it
    assert summary["largest_gaps"][1]["host_ops"] == ["outer_forward"]
    assert summary["largest_gaps"][0]["at_us"] == 150
    assert summary["host_ranges"] == [{"name": "eps.layout", "us": 60, "count": 2}]
    calls = {c["name"]: (c["us"], c["count"]) for c in summary["top_runtime_calls"]}
    assert calls == {"cudaLaunchKernel": (12, 2), "cudaStreamSynchronize": (30, 1)}


def test_a_trace_without_gpu_activity_is_refused(tmp_path):
    path = _trace(tmp_path, [("cpu_op", "aten::mm", 0, 5)])
    with pytest.raises(ValueError, match="no GPU kernels"):
        _module().summarize(path)
    assert _module().main([path]) == 1
