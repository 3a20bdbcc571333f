"""Markers of tests that spawn ranks (registered in pytest.ini)."""

import pytest


def ranks(*world_sizes):
    """Parameters of a test that spawns ``world_size`` ranks: ``slow``, and ``multigpu`` from
    two ranks on (on a GPU host each rank takes a GPU and they talk over NCCL)."""
    return [
        pytest.param(n, marks=[pytest.mark.slow] + ([pytest.mark.multigpu] if n > 1 else []))
        for n in world_sizes
    ]
