"""Megatron-LM's own, unmodified gpt_static_inference.py (legacy static engine) generating with
the stock model and with EPS (through ``python -m megatron_eps.launch``), on a random-weight MoE
checkpoint written by scripts/write_moe_checkpoint.py; and a decode-step benchmark of one MoE
layer, stock vs EPS. One JSON report (``--out DIR``/megatron_lm.json), rewritten after each step
so a run cut short still reports what finished.

    python benchmarks/megatron_lm_generation.py --megatron-lm PATH --out DIR [--steps ...]

Steps: ckpt (fp32 and bf16 checkpoints), fp32 (tokens equal), bf16 (prompt log-probs, tokens
agreeing, prefill times from the engine's timing), graphs (decode CUDA graphs on),
ep2 (two ranks sharing the GPU over gloo, EP=2), decode (layer decode step, batch 1-64).

Prompts are token ids written as numbers; the tokenizer is a Hugging Face one that
scripts/write_number_tokenizer.py writes into the work folder (``--tokenizer-type
HuggingFaceTokenizer``): Megatron-LM's NullTokenizer has no BOS id, which the static engine reads,
and cannot tokenize the word "warmup" that the CUDA-graph warm-up sends.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ("ckpt", "fp32", "bf16", "graphs", "ep2", "decode")
PROMPT_LENGTHS = (512, 1024, 1536, 2048, 2560, 3072, 3584, 4096)
GENERATE = 32
VOCAB = 32000


VERSION_PROBE = """
import json, sys, torch, megatron.core as m
try:
    import tokenizers, transformers
    hf = {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__}
except ImportError:
    hf = {"transformers": None, "tokenizers": None}
print(json.dumps(dict(python=sys.version.split()[0], torch=torch.__version__,
                      megatron_core=m.__version__, megatron_core_from=m.__file__, **hf,
                      device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")))
"""


def model_flags(max_length: int, tokenizer: str) -> list:
    """A small MoE GPT: 4 layers, hidden 1024, 8 experts top-2 (local spec, no TE), the number
    tokenizer in the folder ``tokenizer`` (VOCAB ids, see write_tokenizer), and the flags in
    $MEGATRON_LM_EXTRA_FLAGS (e.g. the CPU ones of a dry run)."""
    return (
        f"--num-layers 4 --hidden-size 1024 --num-attention-heads 16 --ffn-hidden-size 4096 "
        f"--num-experts 8 --moe-router-topk 2 --moe-ffn-hidden-size 2048 "
        f"--moe-token-dispatcher-type alltoall --moe-router-load-balancing-type none "
        f"--seq-length {max_length} --max-position-embeddings {max_length} "
        f"--disable-bias-linear --swiglu --normalization RMSNorm --position-embedding-type rope "
        f"--untie-embeddings-and-output-weights --tokenizer-type HuggingFaceTokenizer "
        f"--transformer-impl local --no-rope-fusion --no-persist-layer-norm "
        f"--no-masked-softmax-fusion --no-bias-swiglu-fusion --no-bias-dropout-fusion "
        f"--attention-dropout 0 --hidden-dropout 0 --micro-batch-size 1 --seed 1234 "
        # no Apex here: Megatron's default gradient-accumulation fusion needs its CUDA extension
        f"--no-gradient-accumulation-fusion"
    ).split() + ["--tokenizer-model", tokenizer] + os.environ.get(
        "MEGATRON_LM_EXTRA_FLAGS", "").split()


def write_tokenizer(path: str) -> str:
    """The folder ``path`` holding a tokenizer of VOCAB ids whose words are the ids as numbers
    (id VOCAB - 1: <unk> and end of document), written by scripts/write_number_tokenizer.py.
    Megatron pads the vocabulary from the tokenizer's size, so checkpoints and generation
    that use it have embeddings of one shape."""
    subprocess.run([sys.executable, os.path.join(REPO, "scripts", "write_number_tokenizer.py"),
                    path, "--vocab-size", str(VOCAB)], check=True, stdout=subprocess.DEVNULL)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Runner:
    def __init__(self, args):
        self.args = args
        self.out = args.out
        self.megatron_lm = os.path.abspath(args.megatron_lm)
        self.report = {"benchmark": "megatron_lm_generation", "argv": sys.argv,
                       "megatron_lm": self.megatron_lm, "runs": {}, "results": {}}
        self.max_length = max(PROMPT_LENGTHS) + GENERATE + 64
        self.tokenizer = write_tokenizer(os.path.join(args.work, "number_tokenizer"))

    def env(self, extra=None):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [self.megatron_lm, REPO] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env["PYTHONUNBUFFERED"] = "1"
        # the tokenizer is a local folder: nothing to look up online, and the Rust tokenizer's
        # threads must not meet the checkpoint writer's forked processes
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env.update(extra or {})
        return env

    def save(self):
        with open(os.path.join(self.out, "megatron_lm.json"), "w") as f:
            json.dump(self.report, f, indent=1)

    def run(self, name, script, argv, launcher=False, ranks=1, extra_env=None, timeout=None):
        """One Megatron-LM process per rank (RANK/WORLD_SIZE/LOCAL_RANK set here; with several
        ranks all on GPU 0: they share it)."""
        timeout = timeout or self.args.timeout
        port = free_port()
        command = [sys.executable] + (["-m", "megatron_eps.launch"] if launcher else []) + [script]
        command += argv
        log_path = os.path.join(self.args.work, f"{name}.log")
        procs = []
        start = time.perf_counter()
        for rank in range(ranks):
            env = self.env(dict(extra_env or {}, RANK=str(rank), LOCAL_RANK="0",
                                WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1",
                                MASTER_PORT=str(port)))
            log = open(log_path + (f".rank{rank}" if rank else ""), "w")
            procs.append((subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                           cwd=self.megatron_lm), log))
        codes = []
        for proc, log in procs:
            try:
                codes.append(proc.wait(timeout=max(1, timeout - (time.perf_counter() - start))))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes.append("timeout")
            log.close()
        seconds = time.perf_counter() - start
        # the whole log of every rank beside the JSON: a failure's first lines are its cause
        os.makedirs(os.path.join(self.out, "logs"), exist_ok=True)
        for rank in range(ranks):
            suffix = f".rank{rank}" if rank else ""
            shutil.copyfile(log_path + suffix, os.path.join(self.out, "logs", f"{name}.log{suffix}"))
        with open(log_path) as f:
            lines = [line.rstrip() for line in f if "warn" not in line.lower()]
        entry = {"command": " ".join(command), "ranks": ranks, "env": extra_env or {},
                 "exit": codes, "seconds": round(seconds, 1), "log_tail": lines[-12:]}
        self.report["runs"][name] = entry
        self.save()
        print(f"[{name}] exit {codes} in {seconds:.0f}s", flush=True)
        if any(code != 0 for code in codes):
            print("\n".join(lines[-25:]), flush=True)
        return all(code == 0 for code in codes)

    # ----------------------------------------------------------------- steps
    def checkpoint(self, dtype):
        path = os.path.join(self.args.work, f"ckpt_{dtype}")
        # Megatron writes this file last: a folder without it is a write that did not finish.
        if os.path.exists(os.path.join(path, "latest_checkpointed_iteration.txt")):
            return path
        flags = model_flags(self.max_length, self.tokenizer)
        flags += ["--save", path, "--no-save-optim"]
        flags += ["--bf16"] if dtype == "bf16" else []
        ok = self.run(f"write_ckpt_{dtype}", os.path.join(REPO, "scripts", "write_moe_checkpoint.py"),
                      flags)
        return path if ok else None

    def prompt_file(self):
        path = os.path.join(self.args.work, "prompts.jsonl")
        rng = random.Random(7)
        with open(path, "w") as f:
            for length in PROMPT_LENGTHS:
                # id VOCAB - 1 is the tokenizer's end of document: never in a prompt
                tokens = [str(rng.randrange(0, VOCAB - 1)) for _ in range(length)]
                f.write(json.dumps({"text": " ".join(tokens)}) + "\n")
        return path

    def generate(self, name, dtype, eps, extra=(), launcher_env=None, ranks=1, log_probs=False):
        ckpt = self.checkpoint(dtype)
        if ckpt is None:
            return None
        output = os.path.join(self.args.work, f"{name}.json")
        script = os.path.join(self.megatron_lm, "examples", "inference", "advanced",
                              "gpt_static_inference.py")
        argv = model_flags(self.max_length, self.tokenizer) + [
            "--load", ckpt, "--prompt-file", self.prompt_file(), "--num-tokens-to-generate",
            str(GENERATE), "--top_k", "1", "--temperature", "1.0", "--inference-max-requests", "1",
            "--inference-max-seq-length", str(self.max_length), "--use-legacy-static-engine",
            "--output-path", output, "--incoming-requests-per-sec", "-1"]
        argv += ["--bf16"] if dtype == "bf16" else []
        argv += ["--return-log-probs"] if log_probs else []
        argv += list(extra)
        if eps:
            # the engine's first loads would otherwise time the expert backends (self-calibration)
            argv += ["--eps-moe", "--eps-kernel-autotune", "off"]
        if not self.run(name, script, argv, launcher=eps, ranks=ranks, extra_env=launcher_env):
            return None
        with open(output) as f:
            results = json.load(f)
        return [results[key] for key in sorted(results, key=lambda k: int(k))]

    def compare(self, label, stock, eps, log_probs=False):
        if stock is None or eps is None:
            self.report["results"][label] = {"error": "a run failed; see runs"}
            self.save()
            return
        tokens_equal = [s["generated_tokens"] == e["generated_tokens"] for s, e in zip(stock, eps)]
        agreeing = [sum(a == b for a, b in zip(s["generated_tokens"], e["generated_tokens"]))
                    for s, e in zip(stock, eps)]
        result = {
            "prompts": len(stock), "prompt_lengths": list(PROMPT_LENGTHS),
            "tokens_generated_per_prompt": GENERATE,
            "all_tokens_equal": all(tokens_equal),
            "generated_tokens_agreeing": sum(agreeing),
            "generated_tokens_total": sum(len(s["generated_tokens"]) for s in stock),
            "agreeing_per_prompt": agreeing,
            # the engine's timing: tpot[0] is the first step of a batch of one, the prefill
            "prefill_s_stock": [round(s["tpot"][0], 5) for s in stock],
            "prefill_s_eps": [round(e["tpot"][0], 5) for e in eps],
            "decode_step_median_s_stock": statistics.median(
                t for s in stock for t in s["tpot"][1:]),
            "decode_step_median_s_eps": statistics.median(t for e in eps for t in e["tpot"][1:]),
        }
        # the first prompt carries the warm-up (CUDA context, cuBLAS, kernel compilation)
        result["prefill_s_sum_after_first_stock"] = round(sum(result["prefill_s_stock"][1:]), 5)
        result["prefill_s_sum_after_first_eps"] = round(sum(result["prefill_s_eps"][1:]), 5)
        result["prefill_speedup_eps_over_stock"] = round(
            result["prefill_s_sum_after_first_stock"] / result["prefill_s_sum_after_first_eps"], 3)
        if log_probs:
            import math

            num = den = worst = 0.0
            for s, e in zip(stock, eps):
                a = s["logprobs"][: len(s["logprobs"]) - GENERATE]
                b = e["logprobs"][: len(e["logprobs"]) - GENERATE]
                for x, y in zip(a, b):
                    num += (x - y) ** 2
                    den += x * x
                    worst = max(worst, abs(x - y))
            result["prompt_logprobs_rel_l2"] = math.sqrt(num / den) if den else None
            result["prompt_logprobs_max_abs_diff"] = worst
            result["prompt_logprobs_tolerance"] = 1e-2
            result["prompt_logprobs_within_tolerance"] = (
                result["prompt_logprobs_rel_l2"] is not None
                and result["prompt_logprobs_rel_l2"] <= 1e-2)
        self.report["results"][label] = result
        self.save()
        print(f"[{label}] " + json.dumps({k: v for k, v in result.items()
                                          if not isinstance(v, list)}), flush=True)

    def decode_benchmark(self):
        env = self.env()
        command = [sys.executable, os.path.join(REPO, "benchmarks", "megatron_lm_decode.py"),
                   "--out", os.path.join(self.args.work, "decode.json")]
        start = time.perf_counter()
        try:
            proc = subprocess.run(command, env=env, capture_output=True, text=True,
                                  timeout=self.args.timeout * 2)
        except subprocess.TimeoutExpired as exc:
            proc = subprocess.CompletedProcess(command, "timeout", exc.stdout or "",
                                               f"timed out after {exc.timeout}s")
        print(proc.stdout[-3000:], proc.stderr[-3000:] if proc.returncode else "", flush=True)
        try:
            with open(os.path.join(self.args.work, "decode.json")) as f:
                self.report["results"]["decode_step"] = json.load(f)
        except OSError:
            self.report["results"]["decode_step"] = {"error": proc.stderr[-2000:]}
        self.report["runs"]["decode_step"] = {"command": " ".join(command),
                                              "exit": proc.returncode,
                                              "seconds": round(time.perf_counter() - start, 1)}
        self.save()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megatron-lm", required=True, help="Megatron-LM checkout (core_r0.19.0)")
    parser.add_argument("--out", required=True, help="folder of megatron_lm.json")
    parser.add_argument("--work", default="/tmp/megatron_lm_generation",
                        help="checkpoints, prompts, logs")
    parser.add_argument("--steps", default=",".join(STEPS),
                        help=f"comma-separated, of {', '.join(STEPS)}")
    parser.add_argument("--timeout", type=int, default=240, help="seconds per Megatron-LM run")
    args = parser.parse_args()
    steps = [s for s in args.steps.split(",") if s]
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        parser.error(f"--steps: unknown {', '.join(unknown)}; allowed: {', '.join(STEPS)}")
    os.makedirs(args.out, exist_ok=True)
    # Megatron-LM runs in its checkout's folder: the paths it is given must not be relative
    args.work = os.path.abspath(args.work)
    os.makedirs(args.work, exist_ok=True)
    runner = Runner(args)
    probe = subprocess.run([sys.executable, "-c", VERSION_PROBE], env=runner.env(),
                           capture_output=True, text=True)
    try:
        versions = json.loads(probe.stdout.strip().splitlines()[-1])
        versions["megatron_core_is_megatron_lm_own"] = os.path.abspath(
            versions["megatron_core_from"]).startswith(runner.megatron_lm)
        runner.report["device"] = versions.pop("device")
        runner.report["versions"] = versions
    except (IndexError, ValueError, KeyError):
        runner.report["versions"] = {"error": probe.stderr[-1000:]}
    runner.save()
    versions = runner.report["versions"]
    if "error" not in versions and versions["transformers"] is None:
        # Megatron's HuggingFaceTokenizer would fail in every run, deep in its start-up
        raise SystemExit("megatron_lm_generation: the tokenizer needs the 'transformers' package "
                         "(and 'tokenizers'), not importable here; install them")
    runner.report["git_commit"] = os.environ.get("MEGATRON_EPS_GIT_COMMIT")
    runner.save()
    if "ckpt" in steps:
        runner.checkpoint("fp32")
        runner.checkpoint("bf16")
    for dtype in ("fp32", "bf16"):
        if dtype not in steps:
            continue
        log_probs = dtype == "bf16"
        stock = runner.generate(f"stock_{dtype}", dtype, False, log_probs=log_probs)
        # EPS compiles its Triton kernels at the first prompt of each new kernel configuration
        # (about a second each) and Triton keeps them on disk: the first EPS process starts from
        # an empty cache of its own, the second finds it filled, as a running server does.
        # Both are reported.
        cache = {"TRITON_CACHE_DIR": os.path.join(args.work, f"triton_cache_{dtype}")}
        shutil.rmtree(cache["TRITON_CACHE_DIR"], ignore_errors=True)
        eps_cold = runner.generate(f"eps_{dtype}_cold_cache", dtype, True, log_probs=log_probs,
                                   launcher_env=cache)
        runner.compare(f"{dtype}_eps_cold_cache", stock, eps_cold, log_probs=log_probs)
        eps_warm = runner.generate(f"eps_{dtype}", dtype, True, log_probs=log_probs,
                                   launcher_env=cache)
        runner.compare(dtype, stock, eps_warm, log_probs=log_probs)
    if "decode" in steps:
        runner.decode_benchmark()
    if "graphs" in steps:
        graphs = ["--cuda-graph-impl", "local"]
        stock = runner.generate("stock_bf16_graphs", "bf16", False, extra=graphs)
        # where the stock script itself fails (see its log), EPS is not run
        eps = runner.generate("eps_bf16_graphs", "bf16", True, extra=graphs) if stock else None
        runner.compare("bf16_decode_cuda_graphs", stock, eps)
    if "ep2" in steps:
        shared = {"MEGATRON_EPS_RANKS_SHARE_GPU": "1"}
        ep2 = ["--expert-model-parallel-size", "2", "--distributed-backend", "gloo"]
        runner.compare("fp32_ep2_two_ranks_one_gpu",
                       runner.generate("stock_fp32_ep2", "fp32", False, extra=ep2, ranks=2,
                                       launcher_env=shared),
                       runner.generate("eps_fp32_ep2", "fp32", True, extra=ep2, ranks=2,
                                       launcher_env=shared))
    runner.save()


if __name__ == "__main__":
    main()
