"""How the copy-engine transport's copies go out, as the benchmarks record it: one batched call,
or one cudaMemcpyAsync per copy after the batched call was refused (and why)."""

from types import SimpleNamespace

import numpy as np

from megatron_eps.comm import cuda_ops


class _Runtime:
    """The runtime calls memcpy_batch makes, recorded; the batched one fails with ``batch_error``."""

    class cudaMemcpyKind:
        cudaMemcpyDeviceToDevice = "d2d"

    def __init__(self, batch_error):
        self.batch_error, self.single = batch_error, []

    def cudaMemcpyBatchAsync(self, dsts, srcs, sizes, count, attrs, attr_idx, num_attrs, stream):
        return (self.batch_error,)

    def cudaMemcpyAsync(self, dst, src, size, kind, stream):
        self.single.append((dst, src, size))
        return (0,)


def _with_runtime(monkeypatch, runtime):
    monkeypatch.setattr(cuda_ops, "_modules", lambda: (None, runtime))
    monkeypatch.setattr(cuda_ops, "available", lambda: True)
    monkeypatch.setattr(cuda_ops, "_batch_attributes", lambda: SimpleNamespace())
    monkeypatch.setattr(cuda_ops, "_use_batch", True)
    monkeypatch.setattr(cuda_ops, "_batch_refused", None)


def test_batched_copies_stay_batched(monkeypatch):
    runtime = _Runtime(batch_error=0)
    _with_runtime(monkeypatch, runtime)
    cuda_ops.memcpy_batch(np.array([10, 20]), np.array([1, 2]), np.array([4, 4]), stream=7)
    assert runtime.single == []
    assert cuda_ops.copy_issue_mode().startswith("batched")


def test_a_refused_batch_goes_out_copy_by_copy_and_says_why(monkeypatch):
    runtime = _Runtime(batch_error=801)
    _with_runtime(monkeypatch, runtime)
    cuda_ops.memcpy_batch(np.array([10, 20]), np.array([1, 2]), np.array([4, 8]), stream=7)
    assert runtime.single == [(10, 1, 4), (20, 2, 8)]
    assert cuda_ops.copy_issue_mode() == "one cudaMemcpyAsync per copy (801)"
    cuda_ops.memcpy_batch(np.array([30]), np.array([3]), np.array([2]), stream=7)
    assert runtime.single[-1] == (30, 3, 2)  # no second try of the batched call


def test_copies_on_the_legacy_default_stream_go_one_by_one_and_keep_batching(monkeypatch):
    """The batched call refuses stream 0; that must not turn batching off for the other streams."""
    runtime = _Runtime(batch_error=0)
    _with_runtime(monkeypatch, runtime)
    cuda_ops.memcpy_batch(np.array([10]), np.array([1]), np.array([4]), stream=0)
    assert runtime.single == [(10, 1, 4)]
    cuda_ops.memcpy_batch(np.array([20]), np.array([2]), np.array([4]), stream=7)
    assert runtime.single == [(10, 1, 4)]
    assert cuda_ops.copy_issue_mode().startswith("batched")


def test_without_cuda_bindings(monkeypatch):
    monkeypatch.setattr(cuda_ops, "available", lambda: False)
    assert cuda_ops.copy_issue_mode() == "no cuda-bindings"
