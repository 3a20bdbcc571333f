"""megatron-eps-calibrate on a tiny shape (CPU): grid, loads and a profile the selector reads."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_eps.policy.profile import load_kernel_tables
from megatron_eps.policy import kernel_tables
from megatron_eps.calibrate import kernels as calibrate


def test_make_counts_keeps_total_and_skew():
    for skew in (0.0, 0.5, 1.0, 1.5):
        counts = calibrate.make_counts(20, 100, skew, seed=3)
        assert len(counts) == 20 and sum(counts) == 2000 and min(counts) >= 0
    assert calibrate.make_counts(4, 16, 0.0) == [16, 16, 16, 16]
    assert max(calibrate.make_counts(20, 100, 1.5)) > 3 * max(calibrate.make_counts(20, 100, 0.5))


def test_calibrate_writes_a_profile_the_selector_uses(tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "cpu.json"
    calibrate.main(
        ["--shape", "32,16,4", "--device", "cpu", "--loads", "4,16", "--skews", "0,1.0", "--dtype", "fp32",
         "--target-ms", "1", "--out", str(out), "--no-progress"]
    )
    data = json.loads(out.read_text())
    assert data["device"]["name"] == "cpu" and data["dtype"] == "float32"
    assert data["grid"] == {"tokens_per_expert": [4, 16], "skews": [0.0, 1.0]}
    loads = data["shapes"][0]["loads"]
    assert len(loads) == 4
    assert all(set(l["seconds"]) == {"dense", "grouped"} and all(t > 0 for t in l["seconds"].values()) for l in loads)
    for key in ("torch", "triton", "megatron_core"):
        assert key in data["versions"]
    profile = load_kernel_tables(str(out), "cpu")
    assert profile.covers("cpu", torch.float32)
    assert kernel_tables.predict_time(profile, "dense", (32, 16), [16] * 4) > 0


def test_model_yaml_shape(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text(
        "model:\n  hidden_size: 2048\n  moe_ffn_hidden_size: 1408\n  num_moe_experts: 64\n"
        "parallel:\n  expert_model_parallel_size: 8\n"
    )
    assert calibrate.shape_from_model_yaml(str(path), None) == (2048, 1408, 8)
    assert calibrate.shape_from_model_yaml(str(path), 2) == (2048, 1408, 32)
    with pytest.raises(calibrate.CalibrateError, match="do not divide"):
        calibrate.shape_from_model_yaml(str(path), 3)


def test_shipped_model_configs_parse():
    import glob
    import os

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    moe_configs = [p for p in glob.glob(os.path.join(root, "configs", "*.yaml")) if "num_moe_experts" in open(p).read()]
    for path in moe_configs:
        hidden, ffn, experts = calibrate.shape_from_model_yaml(path, 1)
        assert hidden > 0 and ffn > 0 and experts > 0


def test_back_to_back_seconds_times_a_batch_of_calls_in_order():
    import time as _time

    from megatron_eps.timing import back_to_back_seconds

    seen = []

    def call(i):
        seen.append(i)
        _time.sleep(0.002)
        return i

    seconds, out = back_to_back_seconds(call, torch.device("cpu"), 3, first_index=6)
    assert seen == [6, 7, 8] and out == 8
    assert 0.0018 <= seconds < 0.05


def test_time_call_rotates_the_call_index_over_its_batches():
    from megatron_eps.calibrate.kernels import time_call

    seen = []
    seconds = time_call(lambda i: seen.append(i), torch.device("cpu"), target_s=1e-4, min_reps=9,
                        max_reps=9, warmup=2)
    assert seconds >= 0.0
    # two warm-up calls, a one-call probe, then 3 batches of 3 calls with their own indices
    assert seen == [0, 1, 2] + list(range(9))


def test_interleaved_timing_alternates_the_callables_round_by_round():
    from megatron_eps.calibrate.kernels import time_calls_interleaved

    order = []
    fns = {name: (lambda i, name=name: order.append((name, i))) for name in ("a", "b")}
    seconds = time_calls_interleaved(fns, torch.device("cpu"), target_s=1e-4, min_reps=9,
                                     max_reps=9, warmup=1)
    assert set(seconds) == {"a", "b"} and all(s >= 0.0 for s in seconds.values())
    # per callable: a warm-up call and a one-call probe; then rounds of 3-call batches
    # whose order alternates, a, b / b, a / a, b
    timed = [name for name, _ in order[4:]]
    assert timed == ["a"] * 3 + ["b"] * 3 + ["b"] * 3 + ["a"] * 3 + ["a"] * 3 + ["b"] * 3
    assert [i for name, i in order[4:] if name == "a"] == list(range(9))
