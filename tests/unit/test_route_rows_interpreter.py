"""The routing pass (row_kernels.route_rows: a count per split of tokens, then one program
per expert and split) on the CPU through TRITON_INTERPRET=1, against the torch path: the same
rows, weights and per-token row table exactly, and the count pass's per-split counts against
torch's sums, over several splits (a ragged last one), shuffled expert orders, a hot expert, an
expert no token picks and an expert count that is not a power of two (160)."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

pytest.importorskip("triton")
if tuple(int(x) for x in __import__("numpy").__version__.split(".")[:2]) >= (2, 3):
    pytest.skip("Triton's interpreter needs numpy < 2.3 (the GPU test covers the kernel there)",
                allow_module_level=True)


def test_route_rows_under_the_interpreter_matches_torch():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "tests.unit.route_rows_interpreter_check"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 7
    assert all(not bad for bad in results.values()), results
