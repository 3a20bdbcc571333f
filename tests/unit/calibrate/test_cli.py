"""megatron-eps-calibrate kernels|link|pipeline|all: the fits, one complete profile on one CPU
device that pipeline_degree auto reads, and the link over 2 gloo ranks."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from megatron_eps.policy.profile import load_kernel_tables
from megatron_eps.calibrate import cli
from megatron_eps.timing import fit_latency_bandwidth, fit_line
from megatron_eps.testing import skip_unless_ranks_fit

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
TINY_KERNELS = ["--device", "cpu", "--dtype", "fp32", "--loads", "4,16", "--skews", "0,1.0",
                "--target-ms", "1", "--no-progress"]


def test_fit_recovers_latency_and_bandwidth():
    latency, bandwidth = 12e-6, 150e9
    points = [(x, latency + x / bandwidth) for x in (1e5, 1e6, 1e7, 1e8)]
    got_latency, got_bandwidth = fit_latency_bandwidth(points)
    assert got_latency == pytest.approx(latency, rel=1e-6)
    assert got_bandwidth == pytest.approx(bandwidth, rel=1e-6)


def test_fit_rejects_too_few_or_bad_points():
    with pytest.raises(ValueError):
        fit_latency_bandwidth([(1.0, 1.0)])
    with pytest.raises(ValueError):
        fit_latency_bandwidth([(1.0, 2.0), (2.0, 1.0)])


def test_theil_sen_line_ignores_one_outlier():
    xs = [1, 2, 3, 4, 5, 8]
    ys = [10 + 3 * x for x in xs]
    ys[2] += 100
    slope, intercept = fit_line(xs, ys)
    assert slope == pytest.approx(3.0) and intercept == pytest.approx(10.0)


@pytest.mark.slow
def test_all_on_one_device_writes_a_complete_profile_auto_reads(tmp_path):
    from megatron_eps.config import EPSConfig
    from megatron_eps.policy.cost_model import LayerShape
    from megatron_eps.policy.degree import choose_chunking
    from megatron_eps.policy.profile import load_pipeline_profile

    cli.main(["all", "--config", "tiny", "--out", str(tmp_path), "--repeats", "3", "--max-mib", "1",
              "--tokens", "64", "--host-tokens", "16"] + TINY_KERNELS)
    path = tmp_path / "cpu.json"  # a directory --out: <gpu slug>.json
    data = json.loads(path.read_text())
    assert {"experts", "pipeline", "provenance"} <= set(data)
    for key in ("link_bandwidth_gbps", "link_latency_us", "chunk_overhead_us", "host_chunk_us",
                "host_base_us", "expert_tflops", "memory_bandwidth_gbps"):
        assert data["pipeline"][key] >= 0, key
    assert "no link to measure" in data["provenance"]["link"]  # one device: said so
    assert data["provenance"]["device"] == "cpu" and "git_commit" in data["provenance"]
    assert load_kernel_tables(str(path), "cpu").covers("cpu", __import__("torch").float32)
    # pipeline_degree auto from this file alone (an EP=2 layer of the tiny shape).
    eps_config = EPSConfig(pipeline_degree="auto", min_tokens_to_pipeline=0, cost_profile=str(path))
    profile = load_pipeline_profile(eps_config.cost_profile, "cpu")
    assert profile is not None and profile.chunk_overhead_us == data["pipeline"]["chunk_overhead_us"]
    shape = LayerShape(64, 32, 4, 2, 2, shared_ffn_hidden_size=32)
    counts = np.full((2, 8), 512)
    sizes = choose_chunking(counts, shape, eps_config, profile)
    assert sum(sizes) == 4 and min(sizes) >= 1


def test_no_subcommand_is_the_kernel_calibration(tmp_path):
    out = tmp_path / "k.json"
    cli.main(["--shape", "32,16,4", "--out", str(out)] + TINY_KERNELS)
    assert json.loads(out.read_text())["format"] == "megatron-eps-cost-profile"


def test_out_directory_may_not_exist_yet(tmp_path):
    from megatron_eps.policy.profile import profile_path_for

    assert profile_path_for(str(tmp_path / "new") + os.sep, "NVIDIA H200") == str(
        tmp_path / "new" / "nvidia_h200.json")
    assert profile_path_for(str(tmp_path / "p.json"), "NVIDIA H200") == str(tmp_path / "p.json")


def test_link_needs_a_profile_to_merge_into(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["link", "--out", str(tmp_path / "missing.json"), "--device", "cpu"])
    assert exit_info.value.code == 2
    assert "megatron-eps-calibrate link: error: --out" in capsys.readouterr().err


def test_help_lists_the_subcommands_and_an_unknown_one_names_them(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in cli.SUBCOMMANDS)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bogus"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "megatron-eps-calibrate: error:" in err and all(name in err for name in cli.SUBCOMMANDS)


def test_bad_options_exit_2_in_the_error_form(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--config", "no_such_model", "--out", str(tmp_path / "k.json")])
    assert exit_info.value.code == 2
    assert "megatron-eps-calibrate: error: --config 'no_such_model'" in capsys.readouterr().err


@pytest.mark.slow
def test_two_rank_link_merges_into_the_profile(tmp_path):
    skip_unless_ranks_fit(2)
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"pipeline": {"chunk_overhead_us": 9.0, "expert_tflops": 1.0,
                                                "link_bandwidth_gbps": 1.0, "link_latency_us": 1.0}}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "megatron_eps.calibrate", "link", "--out", str(profile), "--max-mib", "16",
           "--repeats", "3", "--device", "cpu"]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    subprocess.run(cmd, check=True, timeout=300, capture_output=True, cwd=ROOT, env=env)
    data = json.loads(profile.read_text())
    merged = data["pipeline"]
    assert merged["chunk_overhead_us"] == 9.0  # kept
    assert merged["link_bandwidth_gbps"] != 1.0 and merged["link_bandwidth_gbps"] > 0
    assert "2 ranks" in data["provenance"]["link"]
