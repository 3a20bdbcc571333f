"""staging.to_device: host arrays to the device without a host sync."""

import contextlib

import numpy as np
import pytest
import torch

from megatron_eps import staging


def test_on_the_host_it_is_a_copy_with_the_dtype_asked():
    values = np.arange(5, dtype=np.int64)
    out = staging.to_device(values, torch.device("cpu"), np.int32)
    values[0] = 99
    assert out.dtype == torch.int32 and out.tolist() == [0, 1, 2, 3, 4]
    assert staging.to_device([], "cpu", np.int64).shape == (0,)


@contextlib.contextmanager
def no_synchronize():
    """Fail on any host wait for the device (staging must never block)."""
    names = [(torch.cuda, "synchronize"), (torch.cuda.Stream, "synchronize"),
             (torch.cuda.Event, "synchronize")]
    saved = [getattr(owner, name) for owner, name in names]

    def refuse(*args, **kwargs):
        raise AssertionError("a host sync while staging")

    for owner, name in names:
        setattr(owner, name, refuse)
    try:
        yield
    finally:
        for (owner, name), original in zip(names, saved):
            setattr(owner, name, original)


@pytest.mark.gpu
def test_pinned_blocks_are_not_overwritten_while_their_copy_is_pending():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    device = torch.device("cuda", torch.cuda.current_device())
    rng = np.random.default_rng(0)
    expected, staged = [], []
    # A long kernel ahead of the copies keeps them pending while more are staged.
    busy = torch.randn(4096, 4096, device=device)
    for _ in range(4):
        busy = busy @ busy / 64
    for i in range(49):
        size = int(rng.integers(1, 3000))
        dtype = (np.int32, np.int64, np.float32)[i % 3]
        values = rng.integers(-1000, 1000, size=(size,)).astype(dtype)
        expected.append(values.copy())
        with no_synchronize():
            staged.append(staging.to_device(values, device))
        values[:] = 0  # the caller's array may change once to_device returned
    torch.cuda.synchronize()
    for values, out in zip(expected, staged):
        assert out.device == device
        assert out.dtype == torch.from_numpy(values).dtype
        assert np.array_equal(out.cpu().numpy(), values)
    two_d = staging.to_device(np.arange(6, dtype=np.int64).reshape(2, 3), device)
    assert two_d.shape == (2, 3) and two_d.cpu().tolist() == [[0, 1, 2], [3, 4, 5]]
