"""benchmarks/summarize_trace.py on a hand-made Chrome trace whose busy time, gaps and the host
op during the largest gap are known."""

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _module():
    spec = importlib.util.spec_from_file_location(
        "summarize_trace", os.path.join(ROOT, "benchmarks", "summarize_trace.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _trace(tmp_path, events):
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": [dict(e, ph="X") for e in events]}))
    return str(path)


def test_busy_idle_gaps_and_host_ops(tmp_path):
    events = [
        # two overlapping kernels on two streams: busy 100..250
        {"cat": "kernel", "name": "gemm", "ts": 100, "dur": 100},
        {"cat": "kernel", "name": "copy_kernel", "ts": 150, "dur": 100},
        # a 300 us gap, then a memcpy, a 50 us gap, then a kernel
        {"cat": "gpu_memcpy", "name": "Memcpy HtoD", "ts": 550, "dur": 20},
        {"cat": "kernel", "name": "gemm", "ts": 620, "dur": 80},
        {"cat": "cpu_op", "name": "aten::nonzero", "ts": 260, "dur": 280},
        {"cat": "cpu_op", "name": "outer_forward", "ts": 0, "dur": 800},
        {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 90, "dur": 5},
        {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 560, "dur": 7},
        {"cat": "cuda_runtime", "name": "cudaStreamSynchronize", "ts": 300, "dur": 30},
        {"cat": "user_annotation", "name": "eps.layout", "ts": 270, "dur": 40},
        {"cat": "user_annotation", "name": "eps.layout", "ts": 700, "dur": 20},
        {"cat": "user_annotation", "name": "ProfilerStep#1", "ts": 0, "dur": 810},
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
    path = _trace(tmp_path, [{"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 5}])
    with pytest.raises(ValueError, match="no GPU kernels"):
        _module().summarize(path)
    assert _module().main([path]) == 1
