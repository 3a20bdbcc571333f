"""The tokenizer of the Megatron-LM generation benchmark (scripts/write_number_tokenizer.py:
token ids written as numbers) through Megatron-LM's own tokenizer builders and inference code,
from the unmodified snapshots (see test_megatron_lm.py), for the flags the benchmark passes:

* core_v0.16.1 (CI's megatron-core): Megatron-LM's real parse_args, then the builder of
  megatron.training (initialize_megatron, so the checkpoint writer) and megatron.core's (the
  inference example's);
* core_r0.19.0 (the GPU machines'): its megatron.core builder with the defaults of its own
  TokenizerConfig (its megatron.training needs Python 3.12), and its NullTokenizer beside it,
  which fails where the benchmark's tokenizer must not: the BOS id that TextGenerationController
  reads for every prompt, and the prompt "warmup" of the CUDA-graph warm-up.

Each must give: a prompt's ids equal to its numbers, "warmup" as one token, ``bos`` without an
error, text back from the ids, and a padded vocabulary equal to the benchmark's VOCAB.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.benchmark_scripts import load_benchmark_script
from tests.integration.test_megatron_lm import CHECKOUT, REPO, SCRIPTS, SKIP_REASON

CASES = os.path.join(REPO, "tests", "integration", "number_tokenizer_cases.py")
PROMPT_IDS = [0, 17, 31998, 5, 5, 100, 2048]
PROMPT = " ".join(str(i) for i in PROMPT_IDS)


@pytest.fixture(scope="module")
def benchmark():
    return load_benchmark_script("megatron_lm_generation")


def write(path, *extra):
    result = subprocess.run(
        [sys.executable, os.path.join(SCRIPTS, "write_number_tokenizer.py"), str(path), *extra],
        capture_output=True, text=True, timeout=60)
    return result


def snapshot_env(checkout):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [checkout, REPO] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.pop("MEGATRON_LM_EXTRA_FLAGS", None)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["RANK"] = "0"
    return env


def cases(checkout, argv):
    result = subprocess.run([sys.executable, CASES] + argv, env=snapshot_env(checkout),
                            capture_output=True, text=True, timeout=300, cwd=REPO)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULTS ")]
    assert lines, result.stdout[-2000:] + result.stderr[-4000:]
    return json.loads(lines[0][len("RESULTS "):])


def check_usable(report, vocab, padded=True):
    """What gpt_static_inference.py's legacy static engine asks of the tokenizer works."""
    assert "build" not in report, report
    unknown = vocab - 1
    assert report["vocab_size"] == {"value": vocab}
    if padded:
        assert report["padded_vocab_size"] == vocab
    assert report["ids"] == {"value": PROMPT_IDS}
    assert report["warmup"] == {"value": [unknown]}
    assert report["bos"] == {"value": None}
    assert report["eod"] == {"value": unknown}
    assert report["detokenize"] == {"value": PROMPT}
    assert report["controller_prompt"] == {"value": PROMPT_IDS}
    assert report["controller_warmup"] == {"value": [unknown]}
    # the end of document is stripped from generated text
    assert report["controller_detokenize"] == {"value": PROMPT}


def test_tokenizer_files_read_by_the_tokenizers_package(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    result = write(tmp_path / "tok", "--vocab-size", "300")
    assert result.returncode == 0, result.stderr
    tokenizer = tokenizers.Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json"))
    assert tokenizer.get_vocab_size() == 300
    assert tokenizer.encode("0 17  298\n5 warmup 299 -1").ids == [0, 17, 298, 5, 299, 299, 299]
    assert tokenizer.decode([3, 299, 17]) == "3 17"
    with open(tmp_path / "tok" / "tokenizer_config.json") as f:
        config = json.load(f)
    assert config["eos_token"] == config["unk_token"] == "<unk>" and "bos_token" not in config

    bad = write(tmp_path / "bad", "--vocab-size", "1")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "--vocab-size must be at least 2, got 1" in bad.stderr.strip().splitlines()[-1]


def test_benchmark_flags_name_the_tokenizer_folder(benchmark, tmp_path, monkeypatch):
    monkeypatch.delenv("MEGATRON_LM_EXTRA_FLAGS", raising=False)
    folder = benchmark.write_tokenizer(str(tmp_path / "number tokenizer"))
    flags = benchmark.model_flags(4160, folder)
    assert flags[flags.index("--tokenizer-type") + 1] == "HuggingFaceTokenizer"
    assert flags[flags.index("--tokenizer-model") + 1] == folder
    assert "NullTokenizer" not in flags and "--vocab-size" not in flags
    with open(os.path.join(folder, "tokenizer.json")) as f:
        vocab = json.load(f)["model"]["vocab"]
    assert len(vocab) == benchmark.VOCAB and vocab["<unk>"] == benchmark.VOCAB - 1


@pytest.mark.slow
@pytest.mark.skipif(CHECKOUT is None, reason=SKIP_REASON or "")
def test_megatron_lm_builders_take_the_benchmark_tokenizer(benchmark, tmp_path, monkeypatch):
    monkeypatch.delenv("MEGATRON_LM_EXTRA_FLAGS", raising=False)
    folder = benchmark.write_tokenizer(str(tmp_path / "tok"))
    flags = benchmark.model_flags(4160, folder)
    results = cases(CHECKOUT, ["parse_args", PROMPT, "--"] + flags)
    # initialize_megatron's builder sets the padded vocabulary the checkpoint is written with
    check_usable(results.pop("megatron.training"), benchmark.VOCAB)
    # the inference example's builder: on 0.16 it leaves the padding to the other one
    assert len(results) == 1, list(results)
    report = next(iter(results.values()))
    check_usable(report, benchmark.VOCAB, padded=report["padded_vocab_size"] is not None)


def core_r0_19_checkout():
    root = os.environ.get("MEGATRON_LM_ROOT") or os.path.join(REPO, "..", "shared", "megatron-lm")
    path = os.path.join(os.path.abspath(root), "core_r0.19.0")
    return path if os.path.isdir(os.path.join(path, "megatron", "core", "tokenizers")) else None


@pytest.mark.slow
@pytest.mark.skipif(core_r0_19_checkout() is None,
                    reason="no Megatron-LM core_r0.19.0 snapshot (set MEGATRON_LM_ROOT)")
def test_core_r0_19_builder_takes_it_where_null_tokenizer_fails(benchmark, tmp_path):
    folder = benchmark.write_tokenizer(str(tmp_path / "tok"))
    results = cases(core_r0_19_checkout(), ["tokenizer_config", PROMPT, folder])
    check_usable(results["megatron.core.tokenizers.utils.build_tokenizer"], benchmark.VOCAB)
    null = results["NullTokenizer"]
    assert null["ids"] == {"value": PROMPT_IDS}
    assert "no attribute 'bos_id'" in null["bos"]["error"]
    assert "no attribute 'bos_id'" in null["controller_prompt"]["error"]
    assert "int()" in null["warmup"]["error"]
