"""The link calibration's fit, and one real run of it over 2 gloo ranks."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from megatron_eps.testing import skip_unless_ranks_fit

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "calibrate_link.py")


def load_module():
    spec = importlib.util.spec_from_file_location("calibrate_link", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fit_recovers_latency_and_bandwidth():
    fit = load_module().fit_latency_bandwidth
    latency, bandwidth = 12e-6, 150e9
    points = [(x, latency + x / bandwidth) for x in (1e5, 1e6, 1e7, 1e8)]
    got_latency, got_bandwidth = fit(points)
    assert got_latency == pytest.approx(latency, rel=1e-6)
    assert got_bandwidth == pytest.approx(bandwidth, rel=1e-6)


def test_fit_rejects_too_few_or_bad_points():
    fit = load_module().fit_latency_bandwidth
    with pytest.raises(ValueError):
        fit([(1.0, 1.0)])
    with pytest.raises(ValueError):
        fit([(1.0, 2.0), (2.0, 1.0)])


def test_two_rank_run_writes_profile(tmp_path):
    skip_unless_ranks_fit(2)
    out = tmp_path / "link.json"
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"pipeline": {"chunk_overhead_us": 9.0, "expert_tflops": 1.0,
                                                "link_bandwidth_gbps": 1.0, "link_latency_us": 1.0}}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           SCRIPT, "--out", str(out), "--max-mib", "16", "--repeats", "3", "--warmup", "1",
           "--merge-into", str(profile)]
    subprocess.run(cmd, check=True, timeout=300, capture_output=True, cwd=ROOT)
    result = json.loads(out.read_text())
    assert result["world_size"] == 2 and len(result["points"]) >= 3
    assert result["link_bandwidth_gbps"] > 0 and result["link_latency_us"] >= 0
    merged = json.loads(profile.read_text())["pipeline"]
    assert merged["chunk_overhead_us"] == 9.0  # kept
    assert merged["link_bandwidth_gbps"] == pytest.approx(result["link_bandwidth_gbps"])
