"""Megatron-LM's own code with EPS: its real parse_args, model builder (model_provider +
gpt_builders.gpt_builder) and checkpointing (torch_dist), from the unmodified snapshot in
$MEGATRON_LM_ROOT (default: ../shared/megatron-lm beside the checkout; the folder of the
installed megatron-core's version there, e.g. core_v0.16.1). Each run is a subprocess with the
snapshot first on PYTHONPATH, on CPU ranks (gloo).

* the launcher (``python -m megatron_eps.launch SCRIPT``) adds the --eps-* group to Megatron's
  parser and selects the EPS spec; ``--spec megatron_eps.megatron_lm gpt_layer_spec`` works
  without it; settings come from flags, from the YAML named by $MEGATRON_EPS_CONFIG, or both;
* a bad setting ends the run with one line naming it, before Megatron starts its process group;
* a checkpoint saved by Megatron-LM from the stock model loads into the EPS model with equal
  logits at EP 1 and 2, and one saved from the EPS model at EP 2 loads into the stock model.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_eps.testing.distributed import free_port

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = os.path.join(REPO, "scripts")


def megatron_lm_checkout():
    """(path, None) of the Megatron-LM snapshot matching the installed megatron-core, or
    (None, reason)."""
    from megatron.core.package_info import __version__

    root = os.environ.get("MEGATRON_LM_ROOT") or os.path.join(REPO, "..", "shared", "megatron-lm")
    root = os.path.abspath(root)
    if os.path.isdir(os.path.join(root, "megatron", "training")):
        return root, None
    wanted = f"core_v{__version__}"
    candidates = [wanted] + sorted(
        name for name in (os.listdir(root) if os.path.isdir(root) else [])
        if name.startswith("core_") and __version__.rsplit(".", 1)[0] in name)
    for name in candidates:
        path = os.path.join(root, name)
        if os.path.isdir(os.path.join(path, "megatron", "training")):
            return path, None
    return None, (f"no Megatron-LM checkout for megatron-core {__version__}: set MEGATRON_LM_ROOT "
                  f"to one (looked in {root})")


CHECKOUT, SKIP_REASON = megatron_lm_checkout()
pytestmark = [
    pytest.mark.skipif(CHECKOUT is None, reason=SKIP_REASON or ""),
    pytest.mark.skipif(torch.cuda.is_available(),
                       reason="runs Megatron-LM on CPU ranks (gloo) as CI does"),
]

MODEL = (
    "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --ffn-hidden-size 128 "
    "--seq-length 128 --max-position-embeddings 128 --num-experts 8 --moe-ffn-hidden-size 32 "
    "--moe-router-topk 2 --moe-token-dispatcher-type alltoall --disable-bias-linear --swiglu "
    "--normalization RMSNorm --position-embedding-type rope --untie-embeddings-and-output-weights "
    "--tokenizer-type NullTokenizer --vocab-size 128 --micro-batch-size 1 "
    # CPU ranks: gloo, weights made on the CPU, no fused or TE kernels, no CUDA RNG state
    "--distributed-backend gloo --use-cpu-initialization --transformer-impl local "
    "--no-gradient-accumulation-fusion --inference-rng-tracker --no-rope-fusion "
    "--no-bias-swiglu-fusion --no-masked-softmax-fusion --no-persist-layer-norm "
    "--attention-dropout 0 --hidden-dropout 0 --no-save-rng --no-save-optim"
).split()
EPS_SPEC = ["--spec", "megatron_eps.megatron_lm", "gpt_layer_spec"]


def environment(extra=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [CHECKOUT, REPO] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.pop("MEGATRON_EPS_CONFIG", None)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra or {})
    return env


def run_megatron(script, argv, ranks=1, launcher=False, env=None, timeout=240):
    """``script`` (a file) with ``argv``: one process, or under torch.distributed.run with
    ``ranks`` processes; through ``python -m megatron_eps.launch`` when ``launcher``."""
    env = dict(env or {})
    if ranks == 1:
        command = [sys.executable]
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(free_port()))
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
                   "--master-port", str(free_port())]
    command += ["-m", "megatron_eps.launch", script] if launcher else [script]
    return subprocess.run(command + list(argv), env=environment(env), capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


def checked(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def logits_run(tmp_path, name, load, **kwargs):
    out = str(tmp_path / f"{name}.pt")
    extra = kwargs.pop("argv", [])
    checked(run_megatron(os.path.join(SCRIPTS, "megatron_lm_logits.py"),
                         MODEL + ["--load", load, "--logits-out", out] + extra, **kwargs))
    with open(out + ".json") as f:
        report = json.load(f)
    report["logits"] = torch.load(out)
    return report


def write_yaml(path, text):
    path.write_text(text)
    return str(path)


# --------------------------------------------------------------------------- argument parsing
@pytest.mark.slow
def test_real_parse_args_with_the_launcher_hook(tmp_path):
    yaml_path = write_yaml(tmp_path / "eps.yaml", "pipeline_degree: 3\nexpert_kernel: dense\n")
    bad_yaml = write_yaml(tmp_path / "bad.yaml", "pipeline_degre: 3\n")
    cases = [
        {"argv": MODEL},  # no EPS asked for: the stock spec
        {"argv": MODEL + ["--eps-moe"]},  # --eps-moe alone
        {"argv": MODEL + ["--eps-moe", "--eps-pipeline-degree", "4"]},
        {"argv": MODEL, "env": {"MEGATRON_EPS_CONFIG": yaml_path}},
        {"argv": MODEL + ["--eps-expert-kernel", "grouped"],
         "env": {"MEGATRON_EPS_CONFIG": yaml_path}},  # both: the flag wins
        {"argv": MODEL + ["--eps-moe", "--eps-pipeline-degree", "0"]},
        {"argv": MODEL + ["--eps-moe", "--eps-pipline-degree", "2"]},
        {"argv": MODEL + ["--eps-moe", "--moe-token-dispatcher-type", "allgather"]},
        {"argv": MODEL + ["--eps-moe", "--moe-expert-capacity-factor", "1.0"]},
        {"argv": MODEL + ["--eps-moe", "--expert-tensor-parallel-size", "2"]},
        {"argv": MODEL + ["--eps-moe", "--spec", "my.module", "my_spec"]},
        {"argv": MODEL, "env": {"MEGATRON_EPS_CONFIG": bad_yaml}},
    ]
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "tests", "integration", "megatron_lm_parse_cases.py")],
        input=json.dumps(cases), env=environment(), capture_output=True, text=True, timeout=240,
        cwd=REPO)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULTS ")]
    assert lines, result.stdout[-2000:] + result.stderr[-4000:]
    (stock, alone, flags, from_env, both, degree0, misspelt, allgather, capacity, etp, other_spec,
     bad_key) = json.loads(lines[0][len("RESULTS "):])
    assert stock == {"exit": None, "spec": None, "eps": None}
    assert alone["spec"] == EPS_SPEC[1:] and alone["eps"]["enabled"] is True
    assert alone["eps"]["pipeline_degree"] == "auto"
    assert flags["eps"]["pipeline_degree"] == 4
    assert from_env["spec"] == EPS_SPEC[1:] and from_env["eps"]["enabled"] is True
    assert (from_env["eps"]["pipeline_degree"], from_env["eps"]["expert_kernel"]) == (3, "dense")
    assert (both["eps"]["pipeline_degree"], both["eps"]["expert_kernel"]) == (3, "grouped")

    def one_line(entry, *needles):
        assert entry["exit"] == 2, entry
        last = entry["stderr"].strip().splitlines()[-1]
        assert "Traceback" not in entry["stderr"]
        for needle in needles:
            assert needle in last, last
        return last

    one_line(degree0, "--eps-pipeline-degree '0'", "an integer >= 1 or 'auto'")
    one_line(misspelt, "unrecognized arguments: --eps-pipline-degree")
    one_line(allgather, "megatron-eps:", "moe_token_dispatcher_type (--moe-token-dispatcher-type)",
             "'allgather'", "alltoall")
    one_line(capacity, "megatron-eps:", "moe_expert_capacity_factor")
    one_line(etp, "megatron-eps:", "expert_tensor_parallel_size (--expert-tensor-parallel-size)",
             "allowed values: 1")
    one_line(other_spec, "megatron-eps:", "--spec my.module my_spec", "drop --spec")
    one_line(bad_key, "megatron-eps:", "$MEGATRON_EPS_CONFIG", "'pipeline_degre'", "allowed keys")


@pytest.mark.slow
def test_bad_setting_stops_the_launcher_before_any_process_group():
    result = run_megatron(os.path.join(SCRIPTS, "write_moe_checkpoint.py"),
                          MODEL + ["--eps-moe", "--moe-token-dispatcher-type", "flex",
                                   "--save", "/nonexistent"], launcher=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "initializing torch distributed" not in result.stdout
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("megatron-eps:") and "'flex'" in last and "alltoall" in last, last


# --------------------------------------------------------------------------- checkpoints
@pytest.mark.slow
def test_stock_checkpoint_round_trips_through_the_eps_model(tmp_path):
    stock_ckpt = str(tmp_path / "stock_ckpt")
    checked(run_megatron(os.path.join(SCRIPTS, "write_moe_checkpoint.py"),
                         MODEL + ["--save", stock_ckpt]))
    stock = logits_run(tmp_path, "stock_ep1", stock_ckpt)
    assert stock["moe_layer_classes"] == ["MoELayer"] and stock["spec"] is None
    scale = stock["logits"].abs().max().item()
    assert scale > 0

    # EP 1, the launcher, settings from flags
    eps_flags = logits_run(tmp_path, "eps_ep1", stock_ckpt, launcher=True, argv=[
        "--eps-moe", "--eps-pipeline-degree", "2", "--eps-min-tokens-to-pipeline", "0"])
    # EP 2, --spec without the launcher, settings from the YAML named by the environment
    yaml_path = write_yaml(tmp_path / "eps.yaml",
                           "pipeline_degree: 2\nmin_tokens_to_pipeline: 0\nexpert_kernel: dense\n")
    eps_env = logits_run(tmp_path, "eps_ep2", stock_ckpt, ranks=2,
                         argv=["--expert-model-parallel-size", "2"] + EPS_SPEC,
                         env={"MEGATRON_EPS_CONFIG": yaml_path})
    for run, kernel in ((eps_flags, "auto"), (eps_env, "dense")):
        assert run["moe_layer_classes"] == ["EPSMoELayer"] and run["moe_layers"] == 2
        assert all(s["enabled"] and s["pipeline_degree"] == 2 for s in run["eps_settings"])
        assert all(s["expert_kernel"] == kernel for s in run["eps_settings"])
        # the pipelined forward ran (two chunks per layer), not the stock fallback
        assert all(len(chunks) == 2 for chunks in run["pipelined_backends"])
        diff = (run["logits"] - stock["logits"]).abs().max().item()
        assert diff <= 1e-5 * max(1.0, scale), diff
    assert eps_env["expert_model_parallel_size"] == 2

    # The reverse: the EPS model at EP 2 saves (launcher, YAML and a flag), the stock model
    # at EP 1 loads it, and so does the EPS model at EP 1.
    eps_ckpt = str(tmp_path / "eps_ckpt")
    checked(run_megatron(os.path.join(SCRIPTS, "write_moe_checkpoint.py"),
                         MODEL + ["--save", eps_ckpt, "--expert-model-parallel-size", "2",
                                  "--seed", "77", "--eps-min-tokens-to-pipeline", "0"],
                         ranks=2, launcher=True, env={"MEGATRON_EPS_CONFIG": yaml_path}))
    stock_back = logits_run(tmp_path, "stock_from_eps", eps_ckpt)
    eps_back = logits_run(tmp_path, "eps_from_eps", eps_ckpt, launcher=True,
                          argv=["--eps-moe", "--eps-min-tokens-to-pipeline", "0"])
    assert stock_back["moe_layer_classes"] == ["MoELayer"]
    assert eps_back["moe_layer_classes"] == ["EPSMoELayer"]
    assert not torch.equal(stock_back["logits"], stock["logits"])  # another seed: other weights
    diff = (eps_back["logits"] - stock_back["logits"]).abs().max().item()
    assert diff <= 1e-5 * max(1.0, stock_back["logits"].abs().max().item()), diff
