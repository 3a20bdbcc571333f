"""Run in a subprocess with a Megatron-LM checkout first on PYTHONPATH: build the tokenizer of
scripts/write_number_tokenizer.py through Megatron's own tokenizer builders and use it as the
inference code does. Prints one line ``RESULTS {builder: {...}}``.

    number_tokenizer_cases.py parse_args PROMPT -- <Megatron flags>
        Megatron-LM's real parse_args on the flags (megatron.training imports), then every
        builder this checkout has: megatron.training's (the one initialize_megatron uses, so
        checkpoint writing) and megatron.core.tokenizers' (the one gpt_static_inference.py uses).
    number_tokenizer_cases.py tokenizer_config PROMPT TOKENIZER_DIR
        For checkouts whose megatron.training does not import here (core_r0.19.0 needs Python
        3.12): the arguments from Megatron's own TokenizerConfig dataclass (its defaults), then
        megatron.core.tokenizers' builder; also Megatron's NullTokenizer for the same prompt.
"""

import argparse
import copy
import importlib
import importlib.util
import inspect
import json
import os
import sys
import types


def core_builder():
    """megatron.core's build_tokenizer: 0.19 and later in tokenizers.utils, 0.16 in
    tokenizers.text.utils."""
    for name in ("megatron.core.tokenizers.utils.build_tokenizer",
                 "megatron.core.tokenizers.text.utils.build_tokenizer"):
        try:
            return name, importlib.import_module(name).build_tokenizer
        except ImportError:
            continue
    return None, None


def controller_calls(tokenizer):
    """Megatron's TextGenerationController tokenize / detokenize of a prompt: static methods
    taking the tokenizer (0.19 and later), or methods reading only ``self.tokenizer`` (0.16)."""
    from megatron.core.inference.text_generation_controllers.text_generation_controller import (
        TextGenerationController as Controller,
    )

    if isinstance(inspect.getattr_static(Controller, "tokenize_prompt"), staticmethod):
        return (lambda text: Controller.tokenize_prompt(tokenizer, text),
                lambda ids: Controller.detokenize(tokenizer, ids))
    holder = types.SimpleNamespace(tokenizer=tokenizer)
    return (lambda text: Controller.tokenize_prompt(holder, text),
            lambda ids: Controller._detokenize(holder, ids))


def attempt(function, *arguments):
    try:
        return {"value": function(*arguments)}
    except Exception as exc:  # recorded for the test to assert on
        return {"error": f"{type(exc).__name__}: {exc}"}


def use(build, args, prompt):
    """What the inference path asks of the tokenizer, each answer or the error it raised."""
    args = copy.deepcopy(args)
    args.padded_vocab_size = None
    built = attempt(build, args)
    if "error" in built:
        return {"build": built["error"]}
    tokenizer = built["value"]
    ids = attempt(tokenizer.tokenize, prompt)
    report = {
        "class": f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}",
        "vocab_size": attempt(lambda: tokenizer.vocab_size),
        "padded_vocab_size": args.padded_vocab_size,
        "ids": ids,
        "warmup": attempt(tokenizer.tokenize, "warmup"),
        "bos": attempt(lambda: tokenizer.bos),
        "eod": attempt(lambda: tokenizer.eod),
    }
    if "value" in ids:
        report["detokenize"] = attempt(tokenizer.detokenize, ids["value"])
    tokenize_prompt, detokenize = controller_calls(tokenizer)
    report["controller_prompt"] = attempt(tokenize_prompt, prompt)
    report["controller_warmup"] = attempt(tokenize_prompt, "warmup")
    if "value" in ids and "value" in report["eod"]:
        report["controller_detokenize"] = attempt(
            detokenize, ids["value"] + [report["eod"]["value"]])
    return report


def from_parse_args(prompt, flags):
    from megatron.training import arguments, global_vars

    sys.argv = ["script.py"] + flags
    args = arguments.parse_args()
    results = {"megatron.training": use(global_vars.build_tokenizer, args, prompt)}
    name, build = core_builder()
    if build is not None:
        results[name] = use(build, args, prompt)
    return results


def from_tokenizer_config(prompt, tokenizer_dir):
    import megatron

    # megatron/training/config/training_config.py imports only the standard library: loaded by
    # its path, without megatron.training's __init__ (which needs a newer Python here)
    path = os.path.join(os.path.dirname(megatron.__path__[0]), "megatron", "training", "config",
                        "training_config.py")
    spec = importlib.util.spec_from_file_location("megatron_training_config", path)
    config = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(config)
    base = vars(config.TokenizerConfig())
    # not tokenizer settings in Megatron's config: its parser's default, one rank, no TP
    base.update(make_vocab_size_divisible_by=128, tensor_model_parallel_size=1, rank=0)
    name, build = core_builder()
    hf = argparse.Namespace(**dict(base, tokenizer_type="HuggingFaceTokenizer",
                                   tokenizer_model=tokenizer_dir))
    null = argparse.Namespace(**dict(base, tokenizer_type="NullTokenizer", vocab_size=32000))
    return {name: use(build, hf, prompt), "NullTokenizer": use(build, null, prompt)}


def main():
    mode, prompt = sys.argv[1], sys.argv[2]
    if mode == "parse_args":
        flags = sys.argv[sys.argv.index("--") + 1:]
        results = from_parse_args(prompt, flags)
    else:
        results = from_tokenizer_config(prompt, sys.argv[3])
    print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
    main()
