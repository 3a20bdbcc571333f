"""The Triton kernels on the CPU through TRITON_INTERPRET=1 (fp32; run in a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # one subprocess runs every kernel under the interpreter

pytest.importorskip("triton")
_NUMPY = tuple(int(x) for x in __import__("numpy").__version__.split(".")[:2])
if _NUMPY >= (2, 3):
    # Triton 3.6's interpreter fails under numpy >= 2.3 (CI pins numpy < 2.3); on such machines
    # (the GPU hosts) the kernels are tested on the GPU instead (tests/unit/experts/test_gpu.py).
    pytest.skip(f"Triton's interpreter needs numpy < 2.3, found {__import__('numpy').__version__}",
                allow_module_level=True)

FP32_TOL = 1e-5


@pytest.fixture(scope="module")
def interpreter_results():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "tests.unit.experts.triton_interpreter_check"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_interpreter_covered_every_case(interpreter_results):
    # 3 shapes x 3 activations x 4 configs x 3 loads (+1 for 20 experts) + subranges
    # + 2 activations + fused kernels
    assert len(interpreter_results) >= 3 * 3 * 4 * 3 + 3 * 4 + 3 + 2 + 10


def test_triton_backend_runs_from_device_row_ends(interpreter_results):
    # 3 shapes x 4 configs x 2 non-empty loads (+1 for 20 experts)
    device = {k: v for k, v in interpreter_results.items() if k.endswith("/device_row_ends")}
    assert len(device) >= 3 * 4 * 2 + 4
    failures = {k: v for k, v in device.items() if not v < FP32_TOL}
    assert not failures, failures


def test_triton_backend_matches_reference(interpreter_results):
    failures = {k: v for k, v in interpreter_results.items() if not v < FP32_TOL}
    assert not failures, failures
