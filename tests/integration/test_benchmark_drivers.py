"""The GPU benchmark drivers run end to end on CPU (``--smoke``: tiny shapes, gloo ranks), so a
broken driver shows up here and not in a device call; each result file holds what it reports."""

import json
import os
import subprocess
import sys

import pytest

from megatron_eps.testing import skip_unless_ranks_fit
from megatron_eps.policy.chunks import chunk_sizes
from megatron_eps.testing.distributed import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.slow


def _run(args, nproc=None, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for name in ("RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR", "LOCAL_RANK"):
        env.pop(name, None)
    if nproc is None:
        cmd = [sys.executable, *args]
    else:
        skip_unless_ranks_fit(nproc)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-port", str(free_port()), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def test_layer_benchmark_smoke(tmp_path):
    out = tmp_path / "layer.json"
    proc = _run(["benchmarks/bench_layer_multigpu.py", "--smoke", "--out", str(out),
                 "--degrees", "1,2", "--dispatch-dedup", "off,on", "--repeats", "4"], nproc=2)
    rows = json.loads(out.read_text())["rows"]
    assert {r["model"] for r in rows} == {"dsv2", "mixtral"}
    for row in rows:
        assert max(row["rel_err_vs_stock"].values()) < 1e-5
        ms, local = row["ms"], row["local_experts"]
        for label in ("nccl", "nccl+dedup"):
            summary = row[label]
            fixed = {n: ms[f"{label}:{n}"] for n in (1, 2)}
            # the driver's figures, recomputed from the timings it recorded
            assert summary["best_n"] == min(fixed, key=fixed.get)
            assert summary["auto_vs_best"] == pytest.approx(ms[f"{label}:auto"] / min(fixed.values()))
            chunks = row["auto_chunks"][f"{label}:auto"]
            assert sum(chunks) == local and min(chunks) >= 1
            chose = summary["auto_chose"]
            if chose is None:
                assert tuple(chunks) not in {chunk_sizes(local, n) for n in fixed}
                assert summary["auto_choice_vs_best"] == summary["auto_vs_best"]
            else:
                assert tuple(chunks) == chunk_sizes(local, chose)
                assert summary["auto_choice_vs_best"] == pytest.approx(
                    fixed[chose] / min(fixed.values()))
            assert row["transport_used"][f"{label}:auto"] == "nccl"
        assert set(row["spread"]) == set(row["ms"])
    assert "auto's choice within 3%" in proc.stdout


def test_layer_ops_trace_smoke(tmp_path):
    out = tmp_path / "ops.json"
    _run(["benchmarks/trace_layer_ops.py", "--smoke", "--out", str(out), "--points", "dsv2:8",
          "--repeats", "2", "--profiled", "1"], nproc=1)
    point = json.loads(out.read_text())["points"][0]
    flags = [(v["settings"]["dispatch_dedup"], v["dedup"]) for v in point["variants"]]
    assert flags == [("off", False), ("on", True)]
    assert all(v["ops"] and v["backends"] for v in point["variants"])


def test_trace_layer_ops_against_a_baseline_smoke(tmp_path):
    out = tmp_path / "ops.json"
    _run(["benchmarks/trace_layer_ops.py", "--smoke", "--out", str(out), "--points",
          "dsv2lite:8", "--variants", "grouped;pipeline_degree=1", "--repeats", "2",
          "--profiled", "1"], nproc=1)
    grouped, eps = json.loads(out.read_text())["points"][0]["variants"]
    assert grouped["settings"] == {"baseline": "grouped"} and grouped["backends"] == ["grouped"]
    assert "aten::_grouped_mm" in grouped["ops"] and not grouped["chunks"]
    assert eps["chunks"] == [8] and any(k.startswith("eps.") for k in eps["ops"])


def test_chunk_split_tradeoff_smoke(tmp_path):
    out = tmp_path / "split.json"
    _run(["benchmarks/chunk_split_tradeoff.py", "--smoke", "--out", str(out)])
    for point in json.loads(out.read_text())["points"]:
        token_rows = {v["remote_rows"] for v in point["token_chunks"].values()}
        expert_rows = [point["expert_chunks"][n]["remote_rows"]
                       for n in sorted(point["expert_chunks"], key=int)]
        # token chunks keep the saving whole; expert chunks lose it as N grows
        assert len(token_rows) == 1 and expert_rows == sorted(expert_rows)
        assert expert_rows[-1] <= point["per_pair_remote_rows"]


def test_local_rows_tradeoff_smoke(tmp_path):
    out = tmp_path / "local_rows.json"
    _run(["benchmarks/local_rows_tradeoff.py", "--smoke", "--out", str(out)])
    for point in json.loads(out.read_text())["points"]:
        assert point["best_apart"]["forward_s"] > 0 and point["best_together"]["forward_s"] > 0
        for n, v in point["degrees"].items():
            assert len(v["gemm_own_s"]) == len(v["gemm_peer_s"]) == len(v["gemm_whole_s"]) == int(n)
            # a chunk that moves rows pays for its transfers in both modes
            assert all(d > 0 for d in v["dispatch_s"]) and v["forward_apart_s"] > 0
    model = tmp_path / "model.json"
    _run(["benchmarks/local_rows_tradeoff.py", "--smoke", "--model-only", "--out", str(model)])
    points = json.loads(model.read_text())["points"]
    assert points and all("degrees" not in p and p["model_apart_over_together"] > 0 for p in points)
