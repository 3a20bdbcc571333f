"""benchmarks/bench_roofline.py end to end on the CPU (--smoke: tiny shapes, one process): the
JSON carries every point's counts, ceilings, times and provenance."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.slow


def test_roofline_smoke(tmp_path):
    out = tmp_path / "roofline.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get(
        "PYTHONPATH", ""), MEGATRON_EPS_GIT_COMMIT="abc1234", MASTER_PORT="29533")
    proc = subprocess.run([sys.executable, "benchmarks/bench_roofline.py", "--smoke", "--out",
                           str(out), "--models", "qwen3,dsv2lite", "--repeats", "1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["git_commit"] == "abc1234" and result["device"] == "cpu (smoke)"
    assert result["eps_shared_stream"] == "side"
    assert set(result["ceilings"]) == {"dense_8192_randn_tflops", "dense_8192_layer_scale_tflops",
                                       "copy_gbps"}
    assert [(r["model"], r["tokens"]) for r in result["rows"]] == [
        ("qwen3", 64), ("qwen3", 128), ("dsv2lite", 64), ("dsv2lite", 128)]
    for row in result["rows"]:
        assert set(row["ms"]) == {"stock", "grouped", "eps", "eps_device"}
        assert row["eps_device_planned_on_device"] and row["eps_device_backends"] == ["grouped"]
        assert all(t > 0 for t in row["ms"].values())
        # fp32 on the CPU: every variant computes stock's function
        assert max(row["rel_err_vs_stock"].values()) < 1e-4
        assert row["attainable_tflops"] >= row["aspect_pair_tflops"] > 0
        assert row["floor_ms"]["floor"] == max(row["floor_ms"]["compute"], row["floor_ms"]["memory"])
        assert row["back_to_back_forwards"] == 4
        assert all(len(samples) == 1 for samples in row["back_to_back_samples_ms"].values())
        assert set(row["back_to_back_ms"]) == {"stock", "grouped", "eps", "eps_device"}
        assert all(t > 0 for t in row["back_to_back_ms"].values())
    assert "== roofline on cpu (smoke)" in proc.stdout
    assert "== 4 forwards back to back" in proc.stdout
