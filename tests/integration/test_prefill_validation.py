"""What a new user hits (issue 10): settings are checked by the real entry points before any
process group or benchmark exists, each problem is one line naming the setting (once, from
rank 0), --config problems name --config, shipped configs resolve by name, the demo says what
EPS decided and stays quiet."""

import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch

from megatron_eps.testing import skip_unless_ranks_fit

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "examples", "run_prefill.py")
ERROR = "megatron-eps-prefill: error:"

# Loaded into every Python process of a run: records each process group created and each
# collective started, so a test can tell that validation came first.
SITECUSTOMIZE = '''
import os
_marker = os.environ.get("EPS_TEST_DIST_MARKER")
if _marker:
    import torch.distributed as _dist

    def _recording(name, fn):
        def wrapper(*args, **kwargs):
            with open(_marker, "a") as f:
                f.write(name + "\\n")
            return fn(*args, **kwargs)
        return wrapper

    for _name in ("init_process_group", "all_reduce", "barrier", "all_gather_into_tensor",
                  "all_to_all_single"):
        setattr(_dist, _name, _recording(_name, getattr(_dist, _name)))
'''


def _env(tmp_path, quiet=True):
    hooks = tmp_path / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(hooks), ROOT])
    env["EPS_TEST_DIST_MARKER"] = str(tmp_path / "dist_calls.txt")
    if quiet:
        env["PYTHONWARNINGS"] = "ignore"
    else:
        env.pop("PYTHONWARNINGS", None)
    for key in ("RANK", "WORLD_SIZE", "MASTER_PORT", "LOCAL_RANK"):
        env.pop(key, None)
    return env


def _dist_calls(tmp_path):
    path = tmp_path / "dist_calls.txt"
    return path.read_text().split() if path.exists() else []


def _torchrun(tmp_path, *args, quiet=True, timeout=240):
    skip_unless_ranks_fit(2)
    from megatron_eps.testing.distributed import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(free_port()), SCRIPT, *args]
    return subprocess.run(cmd, cwd=ROOT, env=_env(tmp_path, quiet), capture_output=True,
                          text=True, timeout=timeout)


def _single(tmp_path, *args, cwd=ROOT, module=None):
    cmd = [sys.executable] + (["-m", module] if module else [SCRIPT]) + list(args)
    return subprocess.run(cmd, cwd=cwd, env=_env(tmp_path), capture_output=True, text=True,
                          timeout=240)


TINY = os.path.join(ROOT, "configs", "tiny.yaml")


def _tiny_with(tmp_path, old, new, name="bad.yaml"):
    with open(TINY) as f:
        text = f.read()
    assert old in text
    path = tmp_path / name
    path.write_text(text.replace(old, new))
    return str(path)


def _bad_setting_cases(tmp_path):
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"format": "megatron-eps-cost-profile", ')
    return {
        "allgather": (["--config", _tiny_with(tmp_path, "dispatcher_type: alltoall", "dispatcher_type: allgather")],
                      "moe_token_dispatcher_type='alltoall', got 'allgather'"),
        "capacity": (["--config", _tiny_with(tmp_path, "  num_moe_experts: 8", "  num_moe_experts: 8\n  moe_expert_capacity_factor: 1.0", "cap.yaml")],
                     "moe_expert_capacity_factor"),
        "triton_on_cpu": (["--eps-expert-kernel", "triton"],
                          "expert_kernel='triton' cannot run here"),
        "corrupt_profile": (["--eps-cost-profile", str(corrupt)], "cost_profile="),
        "seven_experts": (["--config", _tiny_with(tmp_path, "num_moe_experts: 8", "num_moe_experts: 7", "seven.yaml")],
                          "does not divide num_moe_experts=7"),
        "argparse": (["--prompt-lengths", "2k"], "expected comma-separated integers"),
        "copy_engine_on_cpu": (["--eps-transport", "copy_engine"],
                               "transport='copy_engine' cannot work here"),
    }


CASES = ["allgather", "capacity", "triton_on_cpu", "corrupt_profile", "seven_experts", "argparse",
         "copy_engine_on_cpu"]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU cases (triton on CPU, gloo ranks)")
@pytest.mark.parametrize("case", CASES)
def test_bad_settings_fail_before_any_collective_on_two_ranks(tmp_path, case):
    argv, message = _bad_setting_cases(tmp_path)[case]
    proc = _torchrun(tmp_path, *argv, "--no-progress")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert out.count(ERROR) == 1, out[-3000:]  # once, not once per rank
    line = next(l for l in out.splitlines() if l.startswith(ERROR))
    assert message in line, line
    assert "usage:" not in out
    assert "when instantiating" not in out and "prefill stock" not in out
    assert 'File "' + os.path.join(ROOT, "megatron_eps") not in out  # no traceback of ours
    assert _dist_calls(tmp_path) == []  # no process group, no collective


@pytest.mark.slow
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tolerance", "-1"], "--tolerance: '-1': allowed values are numbers > 0"),
        (["--tolerance", "nan"], "allowed values are numbers > 0"),
        (["--prompt-lengths", "100000000"], "needs at least"),
    ],
)
def test_small_cli_checks(tmp_path, argv, message):
    proc = _single(tmp_path, *argv, "--no-progress")
    assert proc.returncode == 2
    assert message in proc.stderr and proc.stderr.count(ERROR) == 1
    assert "Traceback" not in proc.stderr
    assert _dist_calls(tmp_path) == []


def test_memory_estimate_names_the_sizes():
    from megatron_eps.inference.model_config import load_model_config
    from megatron_eps.inference.prefill_setup import estimate_prefill_bytes

    mc = load_model_config(TINY)
    small = estimate_prefill_bytes(mc, 2, 64, 4, 2, "last", True)
    big = estimate_prefill_bytes(mc, 2, 64 * 1000, 4, 2, "last", True)
    assert set(small) == {"weights", "kv_cache", "activations", "logits"}
    assert big["weights"] == small["weights"] and big["kv_cache"] == 1000 * small["kv_cache"]


@pytest.mark.parametrize(
    "write, message",
    [
        (None, "--config '{path}': no such file"),
        ("- 1\n- 2\n", "--config {path}: expected a mapping"),
        ("eps_typo", "--config {path}: eps: unknown eps key(s) 'pipline_degree'"),
        ("eps_value", "--config {path}: eps: eps pipeline_degree=-2 is not allowed"),
    ],
)
def test_config_problems_name_config_not_eps_config(tmp_path, capsys, write, message):
    from megatron_eps.inference.prefill_args import parse_args

    path = str(tmp_path / "model.yaml")
    if write == "eps_typo":
        path = _tiny_with(tmp_path, "pipeline_degree: auto", "pipline_degree: auto", "model.yaml")
    elif write == "eps_value":
        path = _tiny_with(tmp_path, "pipeline_degree: auto", "pipeline_degree: -2", "model.yaml")
    elif write is not None:
        with open(path, "w") as f:
            f.write(write)
    with pytest.raises(SystemExit) as exc:
        parse_args(["--config", path, "--device", "cpu"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message.format(path=path) in err, err
    assert "--eps-config" not in err


def test_eps_moe_help_says_what_it_does(capsys):
    from megatron_eps.inference.prefill_args import build_parser

    help_text = " ".join(build_parser().format_help().split())
    assert "run EPS beside the stock model even where the config sets eps.enabled: false" in help_text


def _parse_error(capsys, argv):
    from megatron_eps.inference.prefill_args import parse_args

    with pytest.raises(SystemExit) as exc:
        parse_args(argv + ["--device", "cpu"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count(ERROR) == 1, err
    return err


def test_a_bad_parallel_flag_is_blamed_on_the_flag(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    err = _parse_error(capsys, ["--ep", "3"])
    assert "--expert-model-parallel-size 3 does not divide the world size 2" in err, err
    assert "tiny.yaml" not in err
    # the same value from the file is blamed on the file
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert "parallel.tensor_model_parallel_size" not in _parse_error(capsys, ["--tp", "2"])


def test_empty_files_get_one_clear_line(tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    err = _parse_error(capsys, ["--eps-config", str(empty)])
    assert f"--eps-config {str(empty)!r}: the file is empty" in err, err
    err = _parse_error(capsys, ["--config", str(empty)])
    assert f"--config {empty}: the file is empty" in err, err


def test_eps_enabled_false_runs_the_stock_model_alone(tmp_path, capsys):
    from megatron_eps.inference.prefill_args import parse_args

    off = _tiny_with(tmp_path, "eps:\n", "eps:\n  enabled: false\n", "off.yaml")
    args = parse_args(["--config", off, "--device", "cpu"])
    assert args.stock_only
    assert "sets eps.enabled: false: running the stock model alone" in capsys.readouterr().err
    assert not parse_args(["--config", off, "--device", "cpu", "--eps-moe"]).stock_only
    err = _parse_error(capsys, ["--config", off, "--eps-only"])
    assert "--eps-only: --config " + off + " sets eps.enabled: false" in err, err
    # an allgather model with EPS switched off passes: only the stock model runs
    allgather = _tiny_with(tmp_path, "dispatcher_type: alltoall", "dispatcher_type: allgather",
                           "allgather.yaml")
    with open(allgather) as f:
        text = f.read()
    with open(allgather, "w") as f:
        f.write(text.replace("eps:\n", "eps:\n  enabled: false\n"))
    assert parse_args(["--config", allgather, "--device", "cpu"]).stock_only


@pytest.mark.slow
def test_shipped_configs_resolve_by_name_from_anywhere(tmp_path):
    proc = _single(tmp_path, "--config", "deepseek_v2_lite", "--layers", "2", "--validate-only",
                   cwd=tmp_path, module="megatron_eps.inference.prefill")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "settings OK" in proc.stdout and "deepseek_v2_lite.yaml" in proc.stdout
    out = tmp_path / "profile.json"
    proc = _single(tmp_path, "--config", "configs/tiny.yaml", "--loads", "8", "--skews", "0",
                   "--target-ms", "1", "--no-progress", "--out", str(out), cwd=tmp_path,
                   module="megatron_eps.calibrate.kernels")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(out.read_text())["shapes"][0]["hidden"] == 64


@pytest.mark.slow
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--hidden", "0", "--ffn", "8", "--experts", "2"], "--hidden 0: allowed values are integers >= 1"),
        (["--hidden", "8"], "--ffn, --experts missing"),
        (["--config", "nope"], "no shipped config of that name"),
    ],
)
def test_calibrate_cli_errors(tmp_path, argv, message):
    proc = _single(tmp_path, *argv, "--out", str(tmp_path / "p.json"),
                   module="megatron_eps.calibrate.kernels")
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_calibrate_device_cuda_without_gpu(tmp_path):
    proc = _single(tmp_path, "--config", "tiny", "--device", "cuda", "--out",
                   str(tmp_path / "p.json"), module="megatron_eps.calibrate.kernels")
    assert proc.returncode != 0 and "no CUDA device is available" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU demo output")
def test_demo_is_quiet_and_shows_what_eps_decided(tmp_path):
    json_path = tmp_path / "r.json"
    proc = _torchrun(tmp_path, "--prompt-lengths", "32", "--repeats", "1", "--warmup", "0",
                     "--no-progress", "--json", str(json_path), quiet=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for noise in ("Transformer Engine and Apex", "Apex is not installed", "Unknown MLP type",
                  "full scope is deprecated", "all_gather_into_tensor"):
        assert noise not in proc.stderr, noise
    assert "CPU run: it checks that EPS gives the stock model's outputs" in proc.stdout
    assert "benchmarks/results/" in proc.stdout
    # The demo's config leaves the chunks to auto; on CPU, with no cost profile, auto keeps one.
    assert "EPS plan" in proc.stdout and "N=1 chunk(s) of 4 local experts" in proc.stdout
    assert "(pipeline_degree: auto)" in proc.stdout
    # the ranks are CPU processes: the rows travel over gloo's all-to-all, and the plan says so
    assert "expert kernel dense" in proc.stdout
    assert "transport gloo all-to-all (transport: nccl)" in proc.stdout
    report = json.loads(json_path.read_text())
    decisions = report["results"][0]["eps_decisions"]
    assert [d["moe_layer"] for d in decisions] == [0, 1]
    for d in decisions:
        assert d["pipeline_degree_setting"] == "auto"
        assert d["num_chunks"] == 1 and d["experts_per_chunk"] == [4]
        assert d["chunk_split"] == "none (one chunk)" and d["expert_kernels"] == ["dense"]
        assert d["transport"] == "gloo all-to-all (transport: nccl)"


@pytest.mark.slow
def test_wheel_ships_configs_and_license(tmp_path):
    import shutil

    import build  # noqa: F401  (the test extra of setup.py installs it)

    # A copy of the sources, so that no build/ folder left by an earlier build adds its files.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".whl", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache"))
    proc = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation",
                           "--outdir", str(tmp_path), str(source)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheel = next(tmp_path.glob("megatron_eps-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for config in ("tiny", "tiny_mla", "deepseek_v2_lite", "deepseek_v2", "mixtral_8x7b", "dbrx"):
        assert f"megatron_eps/configs/{config}.yaml" in names
    assert any(n.endswith("licenses/LICENSE") or n.endswith("/LICENSE") for n in names)
    assert "megatron_eps/profiles/nvidia_h100_80gb_hbm3.json" in names
