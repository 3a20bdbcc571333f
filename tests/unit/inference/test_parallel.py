"""Which process-group backend the harness and the prefill tool create, and when ranks may share
a GPU (MEGATRON_EPS_RANKS_SHARE_GPU=1: gloo, whose collectives take CUDA tensors)."""

import pytest

from megatron_eps.comm.selection import RANKS_SHARE_GPU_ENV
from megatron_eps.inference.parallel import process_group_backend
from megatron_eps.testing import distributed


@pytest.mark.parametrize("share, use_cuda, expected", [
    ("0", True, "nccl"), ("0", False, "gloo"), ("1", True, "gloo"), ("1", False, "gloo"),
])
def test_backend_follows_device_and_sharing(monkeypatch, share, use_cuda, expected):
    monkeypatch.setenv(RANKS_SHARE_GPU_ENV, share)
    assert process_group_backend(use_cuda) == expected


def test_ranks_skip_only_where_they_cannot_share(monkeypatch):
    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(distributed.torch.cuda, "device_count", lambda: 1)
    monkeypatch.delenv(RANKS_SHARE_GPU_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="needs 2 GPUs"):
        distributed.skip_unless_ranks_fit(2)
    monkeypatch.setenv(RANKS_SHARE_GPU_ENV, "1")
    distributed.skip_unless_ranks_fit(2)  # no skip: the two ranks share the one GPU
    distributed.skip_unless_ranks_fit(1)
