import os
import sys

import pytest

# Make `tests.unit...` and `tests.integration...` importable in spawned ranks and keep CPU threads modest.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def parallel():
    """Megatron's model-parallel state of one process: no tensor, pipeline or expert
    parallelism (the layers of a test module are built under it)."""
    from megatron_eps.testing import Utils

    Utils.initialize_model_parallel(1, 1, expert_model_parallel_size=1)
    yield
    Utils.destroy_model_parallel()
