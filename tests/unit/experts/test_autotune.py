"""Self-calibration of expert_kernel auto: the cache file, the decisions, and the ranks' agreement
on the pipeline degree when their caches differ (CPU, with a fake timer)."""

import json
import logging
import os
import time

from types import SimpleNamespace

import pytest
import torch

from megatron_eps.experts import autotune
from megatron_eps.experts.autotune import KernelAutotuner, load_bucket
from megatron_eps.testing import run_distributed


def _fake_timer(table):
    """A timer that says ``table[name](bucket)`` seconds for each backend and runs it."""

    def timer(fn, label):
        return table[label](), fn()

    return timer


def test_buckets_are_coarse():
    assert load_bucket([100, 100, 100]) == load_bucket([110, 95, 100])
    assert load_bucket([100] * 4) != load_bucket([400] * 4)
    assert load_bucket([100, 100, 100, 100])[1] == 0
    assert load_bucket([400, 0, 0, 0])[1] == 2
    assert load_bucket([0, 0]) == (-1, 0)


def test_a_call_beside_a_transfer_is_its_own_bucket(tmp_path):
    counts = [10, 12, 9, 11]
    alone = KernelAutotuner.key((64, 32, 4), torch.bfloat16, counts)
    beside = KernelAutotuner.key((64, 32, 4), torch.bfloat16, counts, beside_copy=True)
    assert alone != beside
    tuner = KernelAutotuner(str(tmp_path / "k.json"), "GPU A",
                            _fake_timer({"dense": lambda: 2.0, "grouped": lambda: 1.0}))
    tuner.tune(alone, ["dense", "grouped"], lambda name: torch.zeros(1))
    assert tuner.decision(alone) == "grouped" and tuner.decision(beside) is None
    assert tuner.tuning_seconds > 0


def test_cache_round_trip_and_keying(tmp_path):
    path = str(tmp_path / "k.json")
    tuner = KernelAutotuner(path, "GPU A", _fake_timer({"dense": lambda: 2.0, "grouped": lambda: 1.0}))
    key = KernelAutotuner.key((64, 32, 4), torch.bfloat16, [10, 12, 9, 11])
    winner, out = tuner.tune(key, ["dense", "grouped"], lambda name: torch.full((2,), len(name)))
    assert winner == "grouped" and torch.equal(out, torch.full((2,), 7))
    assert tuner.timed_calls == 2
    again = KernelAutotuner(path, "GPU A", _fake_timer({}))
    assert again.decision(key) == "grouped"
    assert again.decision(KernelAutotuner.key((64, 32, 4), torch.float16, [10, 12, 9, 11])) is None
    data = json.load(open(path))
    assert data["device"] == "GPU A" and data["decisions"][key]["times_us"] == {"dense": 2e6, "grouped": 1e6}


def test_each_candidate_is_ranked_by_its_median_round(tmp_path):
    """triton is once much faster (a lucky round) but slower in the others: the median ranks it
    behind grouped, where a minimum would have picked it."""
    rounds = {"triton": iter([1.0, 5.0, 5.0]), "grouped": iter([3.0, 3.0, 3.0])}
    order = []

    def timer(fn, label):
        order.append(label)
        return next(rounds[label]), fn()

    tuner = KernelAutotuner(str(tmp_path / "k.json"), "GPU A", timer)
    key = KernelAutotuner.key((64, 32, 4), torch.bfloat16, [8, 8, 8, 8])
    winner, _ = tuner.tune(key, ["triton", "grouped"], lambda name: torch.zeros(1))
    assert winner == "grouped"
    assert order == ["triton", "grouped", "grouped", "triton", "triton", "grouped"]
    assert tuner.timed_calls == 2


def test_a_candidate_failing_in_the_first_round_is_not_timed_again(tmp_path):
    calls = []

    def timer(fn, label):
        calls.append(label)
        if label == "triton":
            raise RuntimeError("no GPU")
        return 1.0, fn()

    tuner = KernelAutotuner(str(tmp_path / "k.json"), "GPU A", timer)
    key = KernelAutotuner.key((64, 32, 4), torch.bfloat16, [8, 8, 8, 8])
    assert tuner.tune(key, ["triton", "grouped"], lambda name: torch.zeros(1))[0] == "grouped"
    assert calls == ["triton", "grouped"]


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", "FOREIGN_DEVICE", "OLD_VERSIONS"])
def test_corrupt_or_foreign_cache_warns_and_starts_afresh(tmp_path, caplog, content):
    path = tmp_path / "k.json"
    good = KernelAutotuner(str(path), "GPU A", _fake_timer({"dense": lambda: 1.0}))
    key = KernelAutotuner.key((8, 8, 1), torch.float32, [5])
    good.tune(key, ["dense"], lambda name: torch.zeros(1))
    if content == "FOREIGN_DEVICE":
        data = json.load(open(path)); data["device"] = "GPU B"; path.write_text(json.dumps(data))
    elif content == "OLD_VERSIONS":
        data = json.load(open(path)); data["versions"]["torch"] = "0.0"; path.write_text(json.dumps(data))
    else:
        path.write_text(content)
    with caplog.at_level(logging.WARNING):
        fresh = KernelAutotuner(str(path), "GPU A", _fake_timer({"dense": lambda: 1.0}))
    assert fresh.decision(key) is None
    assert "calibrating afresh" in caplog.text
    fresh.tune(key, ["dense"], lambda name: torch.zeros(1))  # and it can write again
    assert KernelAutotuner(str(path), "GPU A", _fake_timer({})).decision(key) == "dense"


class _FakeCompile:
    """A background compilation that finishes after ``polls`` looks."""

    def __init__(self, polls):
        self.polls, self.waited = polls, False

    def done(self):
        self.polls -= 1
        return self.polls < 0

    def wait(self):
        self.waited = True


def test_candidates_still_compiling_are_timed_once_compiled(tmp_path):
    tuner = KernelAutotuner(str(tmp_path / "k.json"), "GPU A",
                            _fake_timer({"dense": lambda: 2.0, "grouped": lambda: 3.0, "triton": lambda: 1.0}))
    key = KernelAutotuner.key((64, 32, 4), torch.bfloat16, [10, 12, 9, 11])
    handles, started = {"triton": _FakeCompile(1)}, []

    def start(name):
        started.append(name)
        return handles.get(name)

    names = ["dense", "grouped", "triton"]
    assert tuner.compiling(key, names, start) == ["triton"]  # started once, at the first meeting
    assert tuner.compiling(key, names, start) == []  # compiled: installed, ready to time
    assert started == names and handles["triton"].waited
    assert tuner.tune(key, names, lambda name: torch.zeros(1))[0] == "triton"
    assert tuner.decision(key) == "triton"


def test_a_candidate_that_fails_to_start_compiling_is_still_timed(tmp_path, caplog):
    tuner = KernelAutotuner(str(tmp_path / "k.json"), "GPU A", _fake_timer({"dense": lambda: 1.0}))
    key = KernelAutotuner.key((8, 8, 1), torch.float32, [5])

    def start(name):
        raise RuntimeError("no compiler")

    with caplog.at_level(logging.WARNING):
        assert tuner.compiling(key, ["dense"], start) == []
    assert "did not start compiling" in caplog.text


@pytest.mark.slow
def test_a_layer_runs_a_ready_backend_until_the_others_compiled(tmp_path):
    """First meeting: grouped starts compiling in the background, dense runs untimed and nothing
    is recorded; once grouped has compiled the bucket is timed; outputs equal stock throughout."""
    used, untimed, timed, decided, errors = run_distributed(
        _deferring_rank, 1, str(tmp_path / "cache.json"), None)[0]
    assert used == [{"dense"}, {"dense"}, {"grouped"}, {"grouped"}]
    assert untimed == 2 and timed == 2 and decided == ["grouped"]
    assert max(errors) <= 1e-5


def _small_self_calibrating_pair(cache):
    """(stock, EPS) MoE layers of 4 small experts, EPS with self-calibration on, unchunked.
    ``min_tokens_to_pipeline=0``: batches this small would otherwise take the stock forward
    (``takes_stock_path``), where no expert backend of EPS runs."""
    from megatron_eps import EPSConfig
    from megatron_eps.inference.layers import build_moe_pair, moe_config

    config = moe_config(num_experts=4, topk=2, hidden_size=32, ffn_hidden_size=16)
    return build_moe_pair(config, EPSConfig(kernel_autotune="on", kernel_cache=cache,
                                            pipeline_degree=1, min_tokens_to_pipeline=0))


def _deferring_rank(cache, _unused):
    from megatron_eps.experts.base import get_backend
    from megatron_eps.testing import Utils

    Utils.initialize_model_parallel(1, 1, expert_model_parallel_size=1)
    try:
        stock, eps = _small_self_calibrating_pair(cache)
        grouped = type(get_backend("grouped"))
        grouped.compile_in_background = lambda self, *args: _FakeCompile(2)
        eps.expert_runner.timer = lambda fn, label: (1.0 if label == "grouped" else 2.0, fn())
        used, errors = [], []
        x = torch.randn(64, 1, 32)
        with torch.no_grad():
            ref, _ = stock(x)
            for _ in range(4):
                out, _ = eps(x)
                used.append(set(eps.last_expert_backends))
                errors.append(((out - ref).norm() / ref.norm()).item())
        tuner = autotune.autotuner_for(torch.device("cpu"), cache)
        return (used, tuner.untimed_calls, tuner.timed_calls,
                [d["winner"] for d in tuner.decisions.values()], errors)
    finally:
        Utils.destroy_model_parallel()


@pytest.mark.slow
def test_runner_calibrates_each_bucket_once_and_each_backend_can_win(tmp_path):
    """An EPS layer on CPU with self-calibration on and a timer under which dense wins light
    loads and grouped heavy ones: each bucket is timed once, then looked up."""
    results = run_distributed(_calibrating_rank, 1, str(tmp_path / "cache.json"), None)
    (used_light, used_heavy, timed_first, timed_again, rel) = results[0]
    assert used_light == {"dense"} and used_heavy == {"grouped"}
    assert timed_first == 4 and timed_again == 4  # 2 buckets x 2 backends, then lookups only
    assert rel <= 1e-5


def _calibrating_rank(cache, _unused):
    from megatron_eps.testing import Utils

    Utils.initialize_model_parallel(1, 1, expert_model_parallel_size=1)
    try:
        stock, eps = _small_self_calibrating_pair(cache)
        state = {}

        def timer(fn, label):
            rows = state["rows"]
            light = rows < 200
            return (1.0 if (label == "dense") == light else 2.0), fn()

        eps.expert_runner.timer = timer
        used = []
        with torch.no_grad():
            for tokens in (40, 800, 40, 800):
                state["rows"] = tokens * 2 // 4  # mean rows per expert
                x = torch.randn(tokens, 1, 32)
                out, _ = eps(x)
                used.append(set(eps.last_expert_backends))
                if tokens == 800 and len(used) == 2:
                    timed_first = autotune.autotuner_for(torch.device("cpu"), cache).timed_calls
            ref, _ = stock(x)
        tuner = autotune.autotuner_for(torch.device("cpu"), cache)
        rel = ((out - ref).norm() / ref.norm()).item()
        return used[0], used[1], timed_first, tuner.timed_calls, rel
    finally:
        Utils.destroy_model_parallel()


@pytest.mark.slow
@pytest.mark.multigpu
def test_ranks_with_different_caches_pick_the_same_chunks(tmp_path):
    """The kernel choice is per rank; the pipeline degree comes from data every rank shares.
    Two ranks whose caches name different winners still chunk identically and match stock."""
    profile = tmp_path / "pipeline.json"
    profile.write_text(json.dumps({"pipeline": {
        "link_bandwidth_gbps": 0.05, "link_latency_us": 5.0, "chunk_overhead_us": 1.0,
        "expert_tflops": 0.001}}))
    results = run_distributed(_rank_with_own_cache, 2, str(tmp_path), str(profile))
    chunks = [r["chunks"] for r in results]
    assert chunks[0] == chunks[1] and len(chunks[0]) > 1, chunks
    assert results[0]["kernels"] == {"dense"} and results[1]["kernels"] == {"grouped"}
    assert all(r["rel_err"] <= 1e-5 for r in results), results


def _rank_with_own_cache(folder, profile):
    import torch.distributed as dist

    from megatron_eps import EPSConfig
    from megatron_eps.testing import Utils
    from megatron_eps.inference.layers import build_moe_pair, moe_config

    rank = dist.get_rank()
    Utils.initialize_model_parallel(1, 1, expert_model_parallel_size=2)
    try:
        cache = f"{folder}/cache{rank}.json"
        config = moe_config(num_experts=8, topk=2, hidden_size=32, ffn_hidden_size=16, ep_size=2)
        stock, eps = build_moe_pair(config, EPSConfig(
            kernel_autotune="on", kernel_cache=cache, cost_profile=profile,
            min_tokens_to_pipeline=0))
        winner = "dense" if rank == 0 else "grouped"
        eps.expert_runner.timer = lambda fn, label: (1.0 if label == winner else 2.0, fn())
        x = torch.randn(48, 1, 32, generator=torch.Generator().manual_seed(rank))
        with torch.no_grad():
            out, _ = eps(x)
            ref, _ = stock(x)
        record = eps.token_dispatcher.last_record
        return {"chunks": list(record.experts_per_chunk), "kernels": set(eps.last_expert_backends),
                "rel_err": ((out - ref).norm() / ref.norm()).item()}
    finally:
        Utils.destroy_model_parallel()


@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_calibration_on_the_gpu_times_real_backends(tmp_path):
    results = run_distributed(_calibrating_gpu_rank, 1, str(tmp_path / "cache.json"))
    decisions, rel = results[0]
    assert decisions and all(d["winner"] in d["times_us"] for d in decisions.values())
    assert all(len(d["times_us"]) >= 2 for d in decisions.values())
    assert rel <= 1e-2


def _calibrating_gpu_rank(cache):
    from megatron_eps import EPSConfig
    from megatron_eps.testing import Utils
    from megatron_eps.inference.layers import build_moe_pair, moe_config

    Utils.initialize_model_parallel(1, 1, expert_model_parallel_size=1)
    try:
        config = moe_config(num_experts=8, topk=2, hidden_size=256, ffn_hidden_size=128,
                            dtype=torch.bfloat16)
        stock, eps = build_moe_pair(config, EPSConfig(kernel_autotune="on", kernel_cache=cache,
                                                      pipeline_degree=2, min_tokens_to_pipeline=0))
        x = torch.randn(512, 1, 256, device="cuda", dtype=torch.bfloat16)
        rel, deadline = 0.0, time.monotonic() + 120
        with torch.no_grad():
            ref, _ = stock(x)
            # Forwards go on (untimed) while candidates compile in the background.
            while not os.path.isfile(cache) and time.monotonic() < deadline:
                out, _ = eps(x)
                rel = max(rel, ((out.double() - ref.double()).norm() / ref.double().norm()).item())
                time.sleep(0.05)
            out, _ = eps(x)
        rel = max(rel, ((out.double() - ref.double()).norm() / ref.double().norm()).item())
        return json.load(open(cache))["decisions"], rel
    finally:
        Utils.destroy_model_parallel()


@pytest.mark.slow
@pytest.mark.multigpu
def test_a_pipelined_forward_calibrates_for_the_condition_beside_a_transfer(tmp_path):
    """Over a link, a forward of several chunks times its kernels in buckets of their own
    ("beside_copy"); one chunk, or no link, in the plain buckets."""
    keys = run_distributed(_keys_of_rank, 2, str(tmp_path), None)
    for rank_keys in keys:
        assert rank_keys["chunks"] == {2: 2, 1: 1}
        assert rank_keys[2] and all(k.endswith("/beside_copy") for k in rank_keys[2])
        assert rank_keys[1] and not any(k.endswith("/beside_copy") for k in rank_keys[1])


def _keys_of_rank(folder, _unused):
    import os

    from megatron_eps import EPSConfig
    from megatron_eps.testing import Utils
    from megatron_eps.inference.layers import build_moe_pair, moe_config

    rank = int(os.environ["RANK"])
    Utils.initialize_model_parallel(1, 1, expert_model_parallel_size=2)
    try:
        out = {}
        config = moe_config(num_experts=8, topk=2, hidden_size=32, ffn_hidden_size=16, ep_size=2)
        for degree in (2, 1):
            cache = os.path.join(folder, f"rank{rank}_n{degree}.json")
            _, eps = build_moe_pair(config, EPSConfig(kernel_autotune="on", kernel_cache=cache,
                                                      pipeline_degree=degree, min_tokens_to_pipeline=0))
            eps.expert_runner.timer = lambda fn, label: (1.0 if label == "dense" else 2.0, fn())
            with torch.no_grad():
                eps(torch.randn(64, 1, 32))
            out[degree] = sorted(autotune.autotuner_for(torch.device("cpu"), cache).decisions)
            out.setdefault("chunks", {})[degree] = eps.token_dispatcher.last_record.num_chunks
        return out
    finally:
        Utils.destroy_model_parallel()


def test_warm_up_stops_at_its_time_limit_while_calibration_goes_on(monkeypatch):
    busy = SimpleNamespace(timed_calls=0, untimed_calls=0, waiting_buckets=["bucket"])
    monkeypatch.setitem(autotune._TUNERS, ("stand-in", "busy"), busy)

    def step():
        busy.untimed_calls += 1
        time.sleep(0.01)

    calls = autotune.warm_up_while_calibrating(step, torch.device("cpu"), limit_s=0.05)
    assert 2 <= calls <= 20
    busy.waiting_buckets = []
    assert autotune.warm_up_while_calibrating(lambda: None, torch.device("cpu")) == 1
