"""benchmarks/megatron_lm_decode.py end to end on CPU ranks (the GPU run is `benchmarks/gpu.sh
megatron_lm`): every decode batch takes the stock forward, the report pairs stock and EPS
samples, and the check EPS adds on the host is timed."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


@pytest.mark.slow
def test_decode_benchmark_reports_paired_samples(tmp_path):
    out = tmp_path / "decode.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "megatron_lm_decode.py"),
                           "--out", str(out), "--batches", "1,3", "--pairs", "2", "--steps", "1",
                           "--experts", "grouped"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["results"]
    assert [(r["experts"], r["batch"]) for r in rows] == [("grouped", 1), ("grouped", 3)]
    for r in rows:
        assert r["eps_took_stock_path"]
        assert len(r["samples_us"]["stock"]) == len(r["samples_us"]["eps"]) == 2
        low, median, high = r["eps_over_stock_quartiles"]
        assert 0 < low <= median <= high
        assert median == r["eps_over_stock"]
        # the check is a shape test and a few attribute reads: microseconds, not a forward
        assert 0 < r["eps_check_host_us"] < min(r["stock_us"], 1000)
    assert report["within_3_percent"] == all(r["eps_over_stock"] <= 1.03 for r in rows)


@pytest.mark.slow
@pytest.mark.parametrize("flag,value", [("--experts", "fused"), ("--batches", "1,x"),
                                        ("--batches", "0"), ("--steps", "0"), ("--pairs", "1")])
def test_decode_benchmark_refuses_bad_settings(tmp_path, flag, value):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "megatron_lm_decode.py"),
                           "--out", str(tmp_path / "d.json"), flag, value],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert flag in proc.stderr.strip().splitlines()[-1]
