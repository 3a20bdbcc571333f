"""megatron-eps-prefill end to end on CPU (gloo): tiny config, EP=2, stock vs EPS logits."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from megatron_eps.testing import skip_unless_ranks_fit

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "examples", "run_prefill.py")


def _env():
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONWARNINGS"] = "ignore"
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env.pop("MASTER_PORT", None)
    return env


def _run(cmd, timeout=240):
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _torchrun(nproc, *args, timeout=240):
    skip_unless_ranks_fit(nproc)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(_free_port()), SCRIPT, *args]
    return _run(cmd, timeout)


def _free_port():
    from megatron_eps.testing.distributed import free_port

    return free_port()


# A fixed degree: tiny.yaml's auto keeps one chunk on CPU, and these runs check the pipeline.
COMMON = ["--config", "configs/tiny.yaml", "--prompt-lengths", "32,96", "--batch-size", "2",
          "--repeats", "3", "--warmup", "1", "--check-logits", "all", "--no-progress",
          "--eps-pipeline-degree", "2"]


@pytest.fixture(scope="module")
def ep2_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("prefill")
    json_path = out / "ep2.json"
    logits_path = out / "ep2_logits.pt"
    proc = _torchrun(2, *COMMON, "--json", str(json_path), "--save-logits", str(logits_path),
                     "--git-commit", "abc1234", "--profile-dir", str(out / "traces"))
    return SimpleNamespace(proc=proc, report=json.loads(json_path.read_text()),
                           logits=torch.load(logits_path), out=out)


@pytest.mark.slow
@pytest.mark.multigpu
def test_ep2_stock_and_eps_logits_match(ep2_run):
    r = ep2_run.report
    assert r["logits_agree"] is True
    assert r["parallel"] == {
        "world_size": 2, "tensor_model_parallel_size": 1, "expert_model_parallel_size": 2,
        "expert_tensor_parallel_size": 1, "data_parallel_size": 2, "attention": "data-parallel",
    }
    assert [row["prompt_length"] for row in r["results"]] == [32, 96]
    for row in r["results"]:
        cmp = row["logits"]
        assert cmp["agree"] and cmp["finite"]
        assert cmp["metric"] == "max_abs_diff_scaled" and cmp["tolerance"] == 1e-4
        assert cmp["max_abs_diff_scaled"] <= 1e-4
        assert cmp["ref_max_abs"] > 0  # real logits, not zeros
        assert row["tokens_per_step"] == 2 * row["prompt_length"] * 2
        for mode in ("stock", "eps"):
            res = row[mode]
            assert len(res["times_s"]) == 3 and all(t > 0 for t in res["times_s"])
            assert res["tokens_per_s"] == pytest.approx(row["tokens_per_step"] / res["median_s"])
        assert row["speedup"] == pytest.approx(row["eps"]["tokens_per_s"] / row["stock"]["tokens_per_s"])
        # The EPS layers really ran their own forward (an expert backend was chosen), pipelined.
        assert row["eps_expert_backends"]
        assert [d["num_chunks"] for d in row["eps_decisions"]] == [2, 2]
    # Saved rank-0 logits: all positions, both models, equal within tolerance, not trivial.
    for length in (32, 96):
        stock, eps = ep2_run.logits[length]["stock"], ep2_run.logits[length]["eps"]
        assert stock.shape == (2, length, 128)
        assert torch.allclose(stock, eps, atol=1e-4, rtol=0)
        assert stock.std() > 0


@pytest.mark.slow
@pytest.mark.multigpu
def test_ep2_profile_dir_holds_one_trace_per_mode_length_and_rank(ep2_run):
    names = sorted(p.name for p in (ep2_run.out / "traces").iterdir())
    assert names == sorted(f"prefill_{mode}_{length}_rank{rank}.json" for mode in ("stock", "eps")
                           for length in (32, 96) for rank in (0, 1))
    trace = json.loads((ep2_run.out / "traces" / "prefill_eps_96_rank0.json").read_text())
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert any(n.startswith("aten::") for n in names)
    assert {"eps.counts", "eps.layout", "eps.experts[0]"} <= names  # EPS's phases are marked
    for row in ep2_run.report["results"]:
        assert row["eps"]["calibration_runs_while_timed"] == 0


@pytest.mark.slow
@pytest.mark.multigpu
def test_ep2_json_metadata(ep2_run):
    r = ep2_run.report
    assert r["git_commit"] == "abc1234"
    assert r["versions"]["torch"] == torch.__version__
    assert r["versions"]["megatron_core"] and r["versions"]["megatron_eps"]
    assert r["device"]["type"] == "cpu"
    assert r["backend"] == "gloo"
    assert "--config configs/tiny.yaml" in r["command"]
    assert r["model"]["name"] == "tiny" and r["model"]["num_moe_experts"] == 8
    assert r["eps_config"]["enabled"] is True
    # tiny.yaml's eps section is used when --eps-config is not given; the flag overrides it.
    assert r["eps_config"]["pipeline_degree"] == 2
    assert r["eps_config"]["min_tokens_to_pipeline"] == 0
    assert r["modes"] == ["stock", "eps"]
    assert "prefill" in ep2_run.proc.stdout and "speedup" in ep2_run.proc.stdout


@pytest.mark.slow
@pytest.mark.multigpu
def test_tp2_attention_matches_data_parallel_attention(ep2_run):
    """GQA with TP attention (TP=2, EP=2, sequence-parallel MoE) gives rank 0's prompts the
    same logits as data-parallel attention (TP=1, EP=2); stock and EPS agree under TP too."""
    logits_path = ep2_run.out / "tp2_logits.pt"
    json_path = ep2_run.out / "tp2.json"
    _torchrun(2, *COMMON, "--tp", "2", "--prompt-lengths", "32", "--repeats", "1",
              "--save-logits", str(logits_path), "--json", str(json_path))
    report = json.loads(json_path.read_text())
    assert report["parallel"]["attention"] == "tensor-parallel"
    assert report["logits_agree"] is True
    tp2 = torch.load(logits_path)[32]
    for mode in ("stock", "eps"):
        assert torch.allclose(tp2[mode], ep2_run.logits[32][mode], atol=1e-5, rtol=1e-5), mode


@pytest.mark.slow
def test_mla_bf16_single_process(tmp_path):
    """MLA (DeepSeek-V2 layout) without TE, bf16, world of one, no torchrun; two rounds of
    the three modes, the second in reverse order, traced in the last round only."""
    json_path = tmp_path / "mla.json"
    _run([sys.executable, SCRIPT, "--config", "configs/tiny_mla.yaml", "--dtype", "bf16",
          "--prompt-lengths", "48", "--repeats", "2", "--warmup", "1", "--no-progress",
          "--grouped-baseline", "--rounds", "2", "--profile-dir", str(tmp_path / "traces"),
          "--json", str(json_path)])
    r = json.loads(json_path.read_text())
    assert r["rounds"] == 2 and r["modes"] == ["stock", "grouped", "eps"]
    row = r["results"][0]
    for mode in r["modes"]:
        assert len(row[mode]["times_s"]) == 4 and len(row[mode]["round_medians_s"]) == 2
        assert row[mode]["warmup_steps"] >= 2
    assert [round(x, 9) for x in row["speedup_vs_grouped_per_round"]] == [
        round(g / e, 9) for g, e in zip(row["grouped"]["round_medians_s"],
                                        row["eps"]["round_medians_s"])]
    assert sorted(p.name for p in (tmp_path / "traces").iterdir()) == [
        f"prefill_{mode}_48_rank0.json" for mode in ("eps", "grouped", "stock")]
    assert r["parallel"]["world_size"] == 1
    assert r["model"]["attention"] == "mla" and r["model"]["dtype"] == "bf16"
    cmp = r["results"][0]["logits"]
    assert cmp["metric"] == "rel_l2_err" and cmp["tolerance"] == 1e-2
    assert cmp["agree"] and cmp["rel_l2_err"] <= 1e-2


# --------------------------------------------------------------------------- pieces


def test_compare_logits_detects_disagreement():
    from megatron_eps.inference.logits import compare_logits, logits_agree

    torch.manual_seed(0)
    ref = torch.randn(2, 1, 50) * 3
    same = compare_logits(ref, ref.clone(), "fp32")
    assert same["max_abs_diff"] == 0 and logits_agree(same, "fp32", 1e-4)
    off = ref.clone()
    off[0, 0, 7] += 1e-2
    cmp = compare_logits(ref, off, "fp32")
    assert cmp["max_abs_diff"] == pytest.approx(1e-2, rel=1e-3)
    assert not logits_agree(cmp, "fp32", 1e-4)
    noisy = ref * (1 + 5e-2 * torch.randn_like(ref))
    assert not logits_agree(compare_logits(ref, noisy, "bf16"), "bf16", 1e-2)
    close = ref * (1 + 1e-3 * torch.randn_like(ref))
    assert logits_agree(compare_logits(ref, close, "bf16"), "bf16", 1e-2)
    nan = ref.clone()
    nan[0, 0, 0] = float("nan")
    assert not logits_agree(compare_logits(ref, nan, "bf16"), "bf16", 1e-2)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--prompt-lengths", "2k"], "expected comma-separated integers"),
        (["--stock-only", "--eps-only"], "not allowed with argument"),
        (["--eps-pipeline-degree", "0"], "allowed values are an integer >= 1 or 'auto'"),
        (["--eps-expert-kernel", "cublas"], "invalid choice: 'cublas'"),
        (["--dtype", "fp8"], "invalid choice: 'fp8'"),
        (["--rounds", "0"], "argument --rounds: '0': allowed values are integers >= 1"),
        (["--eps-config", "/nonexistent.yaml"], "no such file"),
        (["--eps-pipline-degree", "2"], "unrecognized arguments: --eps-pipline-degree"),
        (["--profile-dir", os.path.join(ROOT, "README.md", "traces")],
         "--profile-dir " + os.path.join(ROOT, "README.md", "traces") + ": not a writable folder"),
    ],
)
def test_cli_errors_name_the_flag(argv, message, capsys):
    from megatron_eps.inference.prefill_args import parse_args

    with pytest.raises(SystemExit) as exc:
        parse_args(["--config", os.path.join(ROOT, "configs/tiny.yaml"), *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_defaults_on_cpu():
    from megatron_eps.inference.prefill_args import parse_args

    args = parse_args(["--device", "cpu", "--eps-pipeline-degree", "3"])
    assert args.config.endswith("configs/tiny.yaml")
    assert args.dtype == "fp32" and args.prompt_lengths == [64, 256] and args.batch_size == 2
    assert args.eps_config == args.config and args.tolerance == 1e-4
    from megatron_eps.config import EPSConfig

    eps = EPSConfig.from_args(args)
    assert eps.pipeline_degree == 3  # flag beats the file's eps section (2)
    assert eps.min_tokens_to_pipeline == 0  # from the file


class _TP1:
    tp = SimpleNamespace(size=lambda: 1)


def _naive_attention(q, k, v, scale, causal_offset):
    # q [sq,b,h,d], k [sk,b,h,d], v [sk,b,h,dv]
    scores = torch.einsum("qbhd,kbhd->bhqk", q, k) * scale
    sq, sk = q.shape[0], k.shape[0]
    mask = torch.ones(sq, sk, dtype=torch.bool).tril(diagonal=causal_offset)
    scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.einsum("bhqk,kbhd->qbhd", scores.softmax(-1), v)
    return out.reshape(sq, q.shape[1], -1)


def test_sdpa_attention_matches_naive_mla_and_gqa():
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_eps.inference.sdpa_attention import SDPAttention

    torch.manual_seed(0)
    # MLA-like: 4 heads, q/k dim 24, v dim 16, softmax_scale given.
    cfg = SimpleNamespace(context_parallel_size=1, num_attention_heads=4, num_query_groups=4,
                          kv_channels=16, window_size=None, softmax_type="vanilla")
    attn = SDPAttention(cfg, 1, AttnMaskType.causal, "self", softmax_scale=0.3,
                        pg_collection=_TP1(), k_channels=24, v_channels=16)
    q, k, v = torch.randn(10, 2, 4, 24), torch.randn(10, 2, 4, 24), torch.randn(10, 2, 4, 16)
    out = attn(q, k, v, None)
    assert out.shape == (10, 2, 64)
    assert torch.allclose(out, _naive_attention(q, k, v, 0.3, 0), atol=1e-5)
    # Continuing a KV cache: 3 new queries over 10 keys, bottom-right causal.
    out = attn(q[-3:], k, v, None)
    assert torch.allclose(out, _naive_attention(q[-3:], k, v, 0.3, 7), atol=1e-5)
    # GQA: 4 query heads over 2 KV groups; default scale 1/sqrt(d).
    cfg.num_query_groups = 2
    gqa = SDPAttention(cfg, 1, AttnMaskType.causal, "self", pg_collection=_TP1())
    q, k, v = torch.randn(6, 1, 4, 16), torch.randn(6, 1, 2, 16), torch.randn(6, 1, 2, 16)
    ref = _naive_attention(q, k.repeat_interleave(2, 2), v.repeat_interleave(2, 2), 0.25, 0)
    assert torch.allclose(gqa(q, k, v, None), ref, atol=1e-5)
    # A Megatron boolean mask (True = masked) is honoured.
    mask = torch.ones(6, 6, dtype=torch.bool).triu(1)[None, None]
    assert torch.allclose(gqa(q, k, v, mask), ref, atol=1e-5)


def test_sdpa_attention_refuses_unsupported_settings():
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_eps.inference.sdpa_attention import SDPAttention

    cfg = SimpleNamespace(context_parallel_size=2, num_attention_heads=4, num_query_groups=4,
                          kv_channels=16, window_size=None, softmax_type="vanilla")
    with pytest.raises(ValueError, match="context_parallel_size must be 1"):
        SDPAttention(cfg, 1, AttnMaskType.causal, "self", pg_collection=_TP1())
    cfg.context_parallel_size = 1
    cfg.softmax_type = "learnable"
    with pytest.raises(ValueError, match="softmax_type='learnable'"):
        SDPAttention(cfg, 1, AttnMaskType.causal, "self", pg_collection=_TP1())


def _rank_warming_up(calibrating_steps, warmup, repeats):
    """One rank of timed_prefills with a stand-in model: rank 1's expert-kernel tuner is busy
    during its first ``calibrating_steps`` steps, rank 0's never."""
    from megatron_eps.experts import autotune
    from megatron_eps.inference import prefill_timing as prefill

    rank = torch.distributed.get_rank()
    tuner = SimpleNamespace(timed_calls=0, untimed_calls=0, waiting_buckets=[])
    autotune._TUNERS[("stand-in", str(rank))] = tuner
    steps = []

    class Wrapper:
        def run_one_forward_step(self, window):
            steps.append(1)
            if rank == 1 and len(steps) <= calibrating_steps:
                tuner.timed_calls += 1
            return torch.zeros(1)

    context = SimpleNamespace(reset=lambda: None)
    prefill.run_prefill = lambda *a: (Wrapper(), context, None)
    args = SimpleNamespace(warmup=warmup, repeats=repeats, check_logits="last")
    times, _, warmup_steps, while_timed = prefill.timed_prefills(None, None, None, 8, args,
                                                                torch.device("cpu"))
    return len(steps), len(times), warmup_steps, while_timed


@pytest.mark.parametrize("calibrating_steps, expected_warmup", [(0, 1), (3, 4), (12, 13)])
def test_warmup_goes_on_on_every_rank_while_one_calibrates(calibrating_steps, expected_warmup):
    from megatron_eps.testing import run_distributed

    results = run_distributed(_rank_warming_up, 2, calibrating_steps, 1, 3, timeout_s=120)
    for steps, timed, warmup_steps, while_timed in results:
        assert (steps, timed, warmup_steps) == (expected_warmup + 3, 3, expected_warmup)
        assert while_timed == 0


def _rank_with_logits(positions, check_logits):
    """timed_prefills over a stand-in model whose step returns [1, positions, 8] logits."""
    from megatron_eps.inference import prefill_timing as prefill

    class Wrapper:
        def run_one_forward_step(self, window):
            return torch.zeros(1, positions, 8)

    prefill.run_prefill = lambda *a: (Wrapper(), SimpleNamespace(reset=lambda: None), None)
    args = SimpleNamespace(warmup=0, repeats=1, check_logits=check_logits)
    try:
        _, logits, _, _ = prefill.timed_prefills(None, None, None, 8, args, torch.device("cpu"))
    except RuntimeError as exc:
        return str(exc)
    return tuple(logits.shape)


def test_every_tokens_logits_where_the_last_was_asked_for_fail_at_the_first_step():
    """Megatron 0.19 materialises only the last token's logits inside its inference mode
    (compat.inference_engine_mode); a step that returns more fails at once instead of filling
    the host with a long prompt's logits."""
    from megatron_eps.testing import run_distributed

    assert run_distributed(_rank_with_logits, 1, 1, "last", timeout_s=120) == [(1, 1, 8)]
    assert run_distributed(_rank_with_logits, 1, 5, "all", timeout_s=120) == [(1, 5, 8)]
    [message] = run_distributed(_rank_with_logits, 1, 5, "last", timeout_s=120)
    assert "logits for 5 positions" in message


def test_inference_engine_mode_sets_megatrons_flag_where_it_has_one():
    from megatron_eps import compat

    try:
        from megatron.core.inference.utils import InferenceMode
    except ImportError:
        InferenceMode = None
    with compat.inference_engine_mode():
        if InferenceMode is not None:
            assert InferenceMode.is_active()
    if InferenceMode is not None:
        assert not InferenceMode.is_active()
