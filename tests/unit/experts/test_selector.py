"""The selector: picks the fastest from a profile, interpolates, falls back, errors clearly."""

from __future__ import annotations

import json
import math
import types

import numpy as np
import pytest
import torch

from megatron_eps.policy.profile import load_kernel_tables
from megatron_eps.policy import kernel_tables
from megatron_eps.experts import LocalExperts
from megatron_eps.experts import selector
from megatron_eps.calibrate.kernels import make_counts
from megatron_eps.experts.weights import ExpertWeights, StackedExperts

from .conftest import build_sequential_experts

HIDDEN, FFN, N = 64, 32, 8
LOADS = [8, 64, 512]
SKEWS = [0.0, 1.0]


def synthetic_profile(times, device_name="cpu", dtype="float32", shape=(HIDDEN, FFN, N)):
    """times(backend, load, skew) -> seconds, on a LOADS x SKEWS grid of one shape."""
    loads = []
    for load in LOADS:
        for skew in SKEWS:
            seconds = {b: times(b, load, skew) for b in ("dense", "grouped")}
            loads.append({"tokens_per_expert": load, "skew": skew, "seconds": {k: v for k, v in seconds.items() if v}})
    data = {
        "format": kernel_tables.PROFILE_FORMAT,
        "version": kernel_tables.PROFILE_VERSION,
        "device": {"name": device_name},
        "dtype": dtype,
        "shapes": [{"hidden": shape[0], "ffn": shape[1], "experts": shape[2], "loads": loads}],
    }
    return kernel_tables.CostProfile(data)


@pytest.fixture()
def experts():
    torch.manual_seed(0)
    weights = ExpertWeights.from_tensors(torch.randn(N, 2 * FFN, HIDDEN), torch.randn(N, HIDDEN, FFN))
    selector.clear_caches()
    return StackedExperts(weights)


def crossing_times(backend, load, skew):
    # dense wins at low load, grouped from 512 up; under skew grouped gets slower.
    if backend == "dense":
        return 1e-4 * load
    return 4e-4 * load ** 0.5 * (1 + skew)


def test_picks_the_fastest_measured_backend(experts):
    profile = synthetic_profile(crossing_times)
    cpu = torch.device("cpu")
    assert selector.choose_backend("auto", experts, [8] * N, cpu, torch.float32, profile) == "dense"
    assert selector.choose_backend("auto", experts, [512] * N, cpu, torch.float32, profile) == "grouped"
    skewed = make_counts(N, 512, 1.0)
    # At 512 with skew 1: dense 0.0512 s vs grouped 0.018 s -> still grouped.
    assert selector.choose_backend("auto", experts, skewed, cpu, torch.float32, profile) == "grouped"


def test_flipping_the_profile_flips_the_choice(experts):
    profile = synthetic_profile(lambda b, m, s: crossing_times("grouped" if b == "dense" else "dense", m, s))
    cpu = torch.device("cpu")
    assert selector.choose_backend("auto", experts, [8] * N, cpu, torch.float32, profile) == "grouped"
    assert selector.choose_backend("auto", experts, [512] * N, cpu, torch.float32, profile) == "dense"


def test_interpolation_is_log_linear_between_grid_points():
    profile = synthetic_profile(crossing_times)
    # Geometric midpoint of 8 and 64 is 8*sqrt(8): time is the geometric mean of the two.
    mid = 8 * math.sqrt(8)
    counts = [mid] * N
    predicted = kernel_tables.predict_time(profile, "dense", (HIDDEN, FFN, N), [int(round(mid))] * N)
    expected = math.sqrt(crossing_times("dense", 8, 0) * crossing_times("dense", 64, 0))
    assert predicted == pytest.approx(expected, rel=0.02)
    assert counts  # the same load summary is used for the choice
    # Skew halfway between the grid's 0 and 1: geometric mean of the two skew rows.
    half_skew = make_counts(N, 64, 0.5)
    _, s = kernel_tables.load_summary(half_skew)
    assert 0.35 < s < 0.65
    predicted = kernel_tables.predict_time(profile, "grouped", (HIDDEN, FFN), half_skew)
    lo, hi = crossing_times("grouped", 64, 0.0), crossing_times("grouped", 64, 1.0)
    assert lo < predicted < hi
    # Above the grid: linear in rows; below: flat.
    assert kernel_tables.predict_time(profile, "dense", (HIDDEN, FFN), [1024] * N) == pytest.approx(
        2 * crossing_times("dense", 512, 0), rel=1e-6
    )
    assert kernel_tables.predict_time(profile, "dense", (HIDDEN, FFN), [2] * N) == pytest.approx(
        crossing_times("dense", 8, 0), rel=1e-6
    )


def test_other_shapes_scale_with_expert_work():
    profile = synthetic_profile(crossing_times)
    base = kernel_tables.predict_time(profile, "dense", (HIDDEN, FFN), [64] * N)
    # Twice the hidden size, same experts and load: twice the FLOPs and weight bytes.
    assert kernel_tables.predict_time(profile, "dense", (2 * HIDDEN, FFN), [64] * N) == pytest.approx(2 * base)
    # A pipeline chunk of half the experts at the same load: half the time.
    assert kernel_tables.predict_time(profile, "dense", (HIDDEN, FFN), [64] * (N // 2)) == pytest.approx(base / 2)
    # The cost model passes its LayerShape and backend None (the fastest backend).
    shape = types.SimpleNamespace(hidden_size=HIDDEN, ffn_hidden_size=FFN, num_local_experts=N)
    fastest = min(kernel_tables.predict_time(profile, b, (HIDDEN, FFN), [64] * 4) for b in ("dense", "grouped"))
    assert kernel_tables.predict_time(profile, None, shape, [64] * 4) == pytest.approx(fastest)
    assert kernel_tables.predict_time(profile, None, shape, [0] * 4) == 0.0
    with pytest.raises(ValueError, match="no measurements of expert_kernel='triton'"):
        kernel_tables.predict_time(profile, "triton", (HIDDEN, FFN), [64] * N)


def test_defaults_without_a_covering_profile(experts):
    cpu = torch.device("cpu")
    # Profile of another device, or of another dtype: ignored, the CPU default is dense.
    for profile in (
        synthetic_profile(lambda b, m, s: 1.0 if b == "dense" else 1e-9, device_name="NVIDIA H100 80GB HBM3"),
        synthetic_profile(lambda b, m, s: 1.0 if b == "dense" else 1e-9, dtype="bfloat16"),
        None,
    ):
        assert selector.choose_backend("auto", experts, [16] * N, cpu, torch.float32, profile) == "dense"
    assert selector.default_backend(cpu, ["grouped", "dense"]) == "dense"
    assert selector.default_backend(torch.device("cuda"), ["dense", "triton", "grouped"]) == "grouped"
    assert selector.default_backend(torch.device("cuda"), ["dense", "triton"]) == "triton"


def test_explicit_names_are_checked(experts):
    cpu = torch.device("cpu")
    assert selector.choose_backend("grouped", experts, [4] * N, cpu, torch.float32) == "grouped"
    with pytest.raises(ValueError, match=r"expert_kernel='fastest' is not allowed; allowed values: auto"):
        selector.choose_backend("fastest", experts, [4] * N, cpu, torch.float32)
    # te needs transformer_engine (absent in CI) or TEGroupedMLP experts: unavailable here.
    with pytest.raises(ValueError, match=r"expert_kernel='te' cannot run here.*Available values here: auto"):
        selector.choose_backend("te", experts, [4] * N, cpu, torch.float32)
    with pytest.raises(ValueError, match=r"expert_kernel='grouped' cannot run here.*float64"):
        selector.choose_backend("grouped", experts, [4] * N, cpu, torch.float64)


def test_unsupported_experts_only_offer_megatron(megatron_parallel):
    module, config = build_sequential_experts(num_experts=2, hidden=32, ffn=16, add_bias_linear=True)
    experts = LocalExperts(module, config)
    cpu = torch.device("cpu")
    assert selector.choose_backend("auto", experts, [3, 3], cpu, torch.float32) == "megatron"
    with pytest.raises(ValueError, match="add_bias_linear"):
        selector.choose_backend("dense", experts, [3, 3], cpu, torch.float32)


def test_load_cost_profile_caches_and_reports_missing_files(tmp_path):
    profile = synthetic_profile(crossing_times)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(profile.data))
    first = load_kernel_tables(str(path), "cpu")
    assert first is load_kernel_tables(str(path), "cpu")
    assert first.backends == ["dense", "grouped"]
    with pytest.raises(ValueError, match="cost_profile="):
        load_kernel_tables(str(tmp_path / "missing.json"), "cpu")
    # A combined file: kernel tables under "experts" beside the pipeline cost model's keys.
    combined = tmp_path / "combined.json"
    pipeline = {"link_bandwidth_gbps": 100, "link_latency_us": 10, "chunk_overhead_us": 50,
                "expert_tflops": 100}
    combined.write_text(json.dumps({"pipeline": pipeline, "experts": profile.data}))
    assert load_kernel_tables(str(combined), "cpu").backends == ["dense", "grouped"]
    # A file without kernel tables (pipeline constants only): the shipped profile, none on CPU.
    pipeline_only = tmp_path / "pipeline_only.json"
    pipeline_only.write_text(json.dumps({"pipeline": pipeline}))
    assert load_kernel_tables(str(pipeline_only), "cpu") is None
    # A file that is no profile at all is an error naming the setting.
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="cost_profile="):
        load_kernel_tables(str(other), "cpu")
    with pytest.raises(ValueError, match="not a megatron-eps cost profile"):
        kernel_tables.CostProfile.from_file(str(other))
    assert load_kernel_tables(None, "cpu") is None


def test_load_summary():
    assert kernel_tables.load_summary([10] * 5) == (10.0, 0.0)
    assert kernel_tables.load_summary([0, 0]) == (0.0, 0.0)
    for skew in (0.5, 1.0, 1.5):
        _, estimated = kernel_tables.load_summary(make_counts(32, 256, skew))
        assert estimated == pytest.approx(skew, abs=0.05)


def test_near_ties_go_to_the_default_order(experts):
    cpu = torch.device("cpu")
    # grouped predicted 2% faster than dense: within the margin, the CPU default (dense) wins.
    profile = synthetic_profile(lambda b, m, s: 1.0 if b == "dense" else 0.98)
    assert selector.choose_backend("auto", experts, [64] * N, cpu, torch.float32, profile) == "dense"
    # 10% faster: a real difference.
    profile = synthetic_profile(lambda b, m, s: 1.0 if b == "dense" else 0.9)
    assert selector.choose_backend("auto", experts, [64] * N, cpu, torch.float32, profile) == "grouped"


def test_shipped_h100_profile_is_valid_and_sensible():
    import os

    from megatron_eps.policy.profile import PROFILES_DIR

    path = os.path.join(PROFILES_DIR, kernel_tables.gpu_slug("NVIDIA H100 80GB HBM3") + ".json")
    profile = kernel_tables.CostProfile.from_file(path)
    assert profile.device_name == "NVIDIA H100 80GB HBM3" and profile.dtype == "bfloat16"
    assert {"grouped", "dense", "triton"} <= set(profile.backends)
    # DSV2-Lite (64 local experts) at 16 tokens/expert: the per-expert loop is launch-bound
    # (measured ~5 ms) while the grouped kernels stream the weights once (~0.45 ms).
    low = kernel_tables.predict_time(profile, "dense", (2048, 1408), [16] * 64)
    assert low > 4 * kernel_tables.predict_time(profile, "grouped", (2048, 1408), [16] * 64)


def _with_beside_copy(profile_data, times_beside):
    """The same profile with a seconds_beside_copy table from times_beside(backend, load, skew)."""
    data = json.loads(json.dumps(profile_data))
    for load in data["shapes"][0]["loads"]:
        load["seconds_beside_copy"] = {
            b: times_beside(b, load["tokens_per_expert"], load["skew"]) for b in ("dense", "grouped")}
    return kernel_tables.CostProfile(data)


def test_a_pipelined_call_chooses_from_the_beside_copy_tables(experts):
    alone = synthetic_profile(crossing_times)
    # Beside a copy, dense suffers 10x: grouped wins everywhere.
    profile = _with_beside_copy(alone.data, lambda b, m, s: crossing_times(b, m, s) * (10 if b == "dense" else 1))
    cpu = torch.device("cpu")
    low = [8] * N
    assert selector.choose_backend("auto", experts, low, cpu, torch.float32, profile) == "dense"
    assert selector.choose_backend("auto", experts, low, cpu, torch.float32, profile, beside_copy=True) == "grouped"
    assert kernel_tables.predict_time(profile, "dense", (HIDDEN, FFN), low, beside_copy=True) == pytest.approx(
        10 * kernel_tables.predict_time(profile, "dense", (HIDDEN, FFN), low))
    # A profile without beside-copy tables answers a pipelined call from the plain ones.
    assert selector.choose_backend("auto", experts, low, cpu, torch.float32, alone, beside_copy=True) == "dense"


def test_calibration_where_the_tables_lack_the_expert_width(experts):
    cpu = torch.device("cpu")
    covering = synthetic_profile(crossing_times)  # HIDDEN x FFN, 8 experts
    fewer_experts = synthetic_profile(crossing_times, shape=(HIDDEN, FFN, 2 * N))
    other_width = synthetic_profile(crossing_times, shape=(HIDDEN, 2 * FFN, N))
    other_gpu = synthetic_profile(crossing_times, device_name="NVIDIA Z100")
    assert selector.calibration_candidates(experts, cpu, torch.float32, covering) == []
    assert selector.calibration_candidates(experts, cpu, torch.float32, fewer_experts) == []
    for profile in (other_width, other_gpu):
        candidates = selector.calibration_candidates(experts, cpu, torch.float32, profile)
        assert {"dense", "grouped"} <= set(candidates)


def test_calibration_where_the_tables_cannot_tell_the_best_apart(experts):
    cpu = torch.device("cpu")
    # dense 1e-2*m vs grouped 4e-2*sqrt(m) (GPU-bound times): equal at m = 16, 2x apart at
    # m = 64 and m = 4.
    profile = synthetic_profile(lambda b, m, s: 100 * crossing_times(b, m, 0.0))
    assert sorted(selector.calibration_candidates(experts, cpu, torch.float32, profile, [16] * N)) == [
        "dense", "grouped"]
    assert selector.calibration_candidates(experts, cpu, torch.float32, profile, [64] * N) == []
    assert selector.calibration_candidates(experts, cpu, torch.float32, profile, [4] * N) == []


def test_launch_bound_calls_are_timed_where_the_tables_are_decided(experts):
    """Below LAUNCH_BOUND_SECONDS the tables' order did not carry between runs: backends within
    LAUNCH_BOUND_REACH of the fastest are timed; the same ratio at GPU-bound times is decided."""
    cpu = torch.device("cpu")
    for scale, expected in ((1.0, ["dense", "grouped"]), (10.0, [])):
        fast = selector.LAUNCH_BOUND_SECONDS * 0.3 * scale
        profile = synthetic_profile(lambda b, m, s: fast * (1.0 if b == "dense" else 2.0))
        assert sorted(selector.calibration_candidates(experts, cpu, torch.float32, profile, [16] * N)) == expected
    profile = synthetic_profile(lambda b, m, s: 1e-4 * (1.0 if b == "dense" else 4.0))
    assert selector.calibration_candidates(experts, cpu, torch.float32, profile, [16] * N) == []


def test_a_disturbed_low_load_point_does_not_decide(experts):
    # grouped was measured 10x too slow at the smallest load (a stalled host): the table takes
    # the larger load's time there, since more rows never take less time.
    def times(backend, load, skew):
        if backend == "grouped":
            return 1e-3 * (10 if load == LOADS[0] else 1)
        return 2e-3
    profile = synthetic_profile(times)
    cpu = torch.device("cpu")
    assert kernel_tables.predict_time(profile, "grouped", (HIDDEN, FFN), [LOADS[0]] * N) == pytest.approx(1e-3)
    assert selector.choose_backend("auto", experts, [LOADS[0]] * N, cpu, torch.float32, profile) == "grouped"


def test_on_a_width_the_tables_lack_only_backends_within_reach_are_timed(experts):
    cpu = torch.device("cpu")
    # Measured at twice the width: dense 1e-4*m, grouped 4e-4*sqrt(m) (scaled alike).
    profile = synthetic_profile(lambda b, m, s: crossing_times(b, m, 0.0), shape=(HIDDEN, 2 * FFN, N))
    assert sorted(selector.calibration_candidates(experts, cpu, torch.float32, profile, [16] * N)) == [
        "dense", "grouped"]
    assert selector.calibration_candidates(experts, cpu, torch.float32, profile, [512] * N) == []
    # Without the call's load, every backend is a candidate.
    assert {"dense", "grouped"} <= set(selector.calibration_candidates(experts, cpu, torch.float32, profile))


def test_a_gpu_without_tables_borrows_the_nearest_known_gpus(tmp_path, experts):
    def write(name, capability, sm_count, tables=True):
        data = synthetic_profile(crossing_times, device_name=name).data
        data["device"].update(capability=list(capability), sm_count=sm_count)
        with open(tmp_path / f"{name}.json", "w") as f:
            json.dump({"experts": data} if tables else {"pipeline": {}}, f)

    write("hopper_small", (9, 0), 114)
    write("hopper_big", (9, 0), 132)
    write("ampere", (8, 0), 108)
    write("pipeline_only", (9, 0), 120, tables=False)
    (tmp_path / "notes.txt").write_text("not a profile")
    from megatron_eps.policy.profile import nearest_profile_path as nearest

    assert nearest((9, 0), 140, str(tmp_path)).endswith("hopper_big.json")
    assert nearest((9, 0), 100, str(tmp_path)).endswith("hopper_small.json")
    assert nearest((8, 0), 132, str(tmp_path)).endswith("ampere.json")  # capability first
    assert nearest((10, 0), 148, str(tmp_path)).endswith("hopper_big.json")
    assert nearest((9, 0), 132, str(tmp_path / "missing")) is None
    # Borrowed tables rank the backends but never decide a call alone.
    profile = kernel_tables.CostProfile.from_file(nearest((9, 0), 140, str(tmp_path)))
    profile.borrowed_for = "cpu"
    cpu = torch.device("cpu")
    assert profile.covers(cpu, torch.float32) and not profile.covers_shape(HIDDEN, FFN)
    assert selector.choose_backend("auto", experts, [8] * N, cpu, torch.float32, profile) == "dense"
    assert sorted(selector.calibration_candidates(experts, cpu, torch.float32, profile, [16] * N)) == [
        "dense", "grouped"]


def test_an_unknown_gpu_gets_the_nearest_shipped_tables_marked_borrowed(monkeypatch):
    """load_kernel_tables on a CUDA device with no profile of its own (faked here): the shipped
    tables of a GPU of the same compute capability, marked as borrowed, the file's own copy
    unmarked; the pipeline's chunking does not take their times."""
    import types

    from megatron_eps.policy import profile as profile_module

    props = types.SimpleNamespace(major=9, minor=0, multi_processor_count=140)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "NVIDIA Z100")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a, **k: props)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(profile_module, "_BORROWED", {})
    device = torch.device("cuda", 0)
    tables = profile_module.load_kernel_tables(None, device)
    assert tables is not None and tables.borrowed_for == "NVIDIA Z100"
    assert tables.device_name in ("NVIDIA H100 80GB HBM3", "NVIDIA H200")
    assert tables.covers(device, torch.bfloat16) and not tables.covers_shape(5120, 1536)
    own = profile_module.open_profile(profile_module.nearest_profile_path((9, 0), 140)).experts
    assert own.borrowed_for is None
    assert profile_module.load_kernel_tables(None, device) is tables  # looked up once
    # Another capability with no shipped tables of its own kind still borrows (nearest SMs).
    assert profile_module.nearest_profile_path((12, 0), 188) is not None


@pytest.mark.parametrize("use_kernel_tables", [True, False])
def test_the_chunking_times_experts_with_the_tables_only_where_the_profile_says_so(
        tmp_path, monkeypatch, use_kernel_tables):
    """A pipeline section fitted against the roofline (use_kernel_tables: false) keeps it: the
    chunking policy then hands the cost model no kernel tables."""
    from megatron_eps import EPSConfig
    from megatron_eps.policy import degree as policies
    from megatron_eps.policy.cost_model import LayerShape

    pipeline = {"link_bandwidth_gbps": 100, "link_latency_us": 10, "chunk_overhead_us": 50,
                "expert_tflops": 100, "use_kernel_tables": use_kernel_tables}
    path = tmp_path / f"profile_{use_kernel_tables}.json"
    path.write_text(json.dumps({"pipeline": pipeline,
                                "experts": synthetic_profile(crossing_times).data}))
    seen = {}

    def fake_choose(counts, shape, eps_config, profile, kernel_profile=None, **kwargs):
        seen["profile"], seen["tables"] = profile, kernel_profile
        return (shape.num_local_experts,)

    monkeypatch.setattr(policies, "choose_chunking", fake_choose)
    shape = LayerShape(hidden_size=HIDDEN, ffn_hidden_size=FFN, num_local_experts=N, ep_size=2, topk=2)
    policy = policies.ChunkingPolicy(shape, EPSConfig(cost_profile=str(path), min_tokens_to_pipeline=0),
                                     torch.device("cpu"))
    policy.choose(np.ones((2, 2 * N), dtype=np.int64))
    assert seen["profile"].use_kernel_tables is use_kernel_tables
    assert (seen["tables"] is not None) is use_kernel_tables


def test_beside_copy_tables_measured_beside_an_sm_copy_are_not_used(experts):
    """The stand-in check of the profile says the copy slowed a compute-bound GEMM 2.3x (it took
    SMs, unlike a copy-engine transfer): its beside-copy tables are dropped; 1.1x: kept."""
    alone = synthetic_profile(crossing_times)
    slow_dense = lambda b, m, s: crossing_times(b, m, s) * (10 if b == "dense" else 1)  # noqa: E731
    cpu = torch.device("cpu")
    for slowdown, kept in ((2.33, False), (1.1, True)):
        data = _with_beside_copy(alone.data, slow_dense).data
        data["beside_copy"] = {"gemm_seconds": 1.0, "gemm_seconds_beside_copy": slowdown}
        profile = kernel_tables.CostProfile(data)
        assert bool(profile.tables_beside_copy) is kept
        chosen = selector.choose_backend("auto", experts, [8] * N, cpu, torch.float32, profile,
                                         beside_copy=True)
        assert chosen == ("grouped" if kept else "dense")
    # The shipped H200 profile's stand-in (a pinned host-to-device copy) left the SMs free.
    import os

    from megatron_eps.policy.profile import PROFILES_DIR

    h200 = kernel_tables.CostProfile.from_file(os.path.join(PROFILES_DIR, "nvidia_h200.json"))
    assert h200.data["beside_copy"]["stand_in"] == "pinned host-to-device copy"
    assert h200.tables_beside_copy and h200.tables


def test_predictions_are_memoised_per_profile_not_per_address(experts):
    # A memo keyed by id(profile) gave a new profile the freed one's predictions.
    cpu = torch.device("cpu")
    for dense_factor, expected in ((1.0, "dense"), (4.0, "grouped")):
        profile = synthetic_profile(lambda b, m, s: 1e-2 * (dense_factor if b == "dense" else 2.0))
        assert selector.choose_backend("auto", experts, [16] * N, cpu, torch.float32, profile) == expected
        assert profile.predictions
        del profile
