"""megatron-eps-prefill's command line: the parser, and every value checked before any process
group exists (one line naming the setting, exit status 2)."""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import List

import torch

from megatron_eps.arguments import add_eps_args
from megatron_eps.config import EPSConfigError
from megatron_eps.inference.model_config import ModelConfigError
from megatron_eps.inference.prefill_setup import (DTYPES, PrefillError, is_main_rank, wants_cuda,
                                                  validate_setup)
from megatron_eps.inference.shipped_configs import resolve_config, shipped_config_names

DEFAULT_CONFIG = "configs/tiny.yaml"

# Logit agreement, stock vs EPS. fp32: max |diff| <= 1e-4 * max(1, max |stock|).
# bf16/fp16: ||diff|| / ||stock|| <= 1e-2.
DEFAULT_TOLERANCE = {"fp32": 1e-4, "bf16": 1e-2, "fp16": 1e-2}


# torchrun stops every rank as soon as one exits with an error, so a rank that does not print
# leaves rank 0 this long to print the error first (under load, rank 0 can reach the check
# seconds later). When rank 0 has printed and exited, torchrun ends the wait at once.
PRINTING_RANK_GRACE_S = 30.0



def report_once(line: str) -> None:
    """``line`` on stderr from rank 0; any other rank waits for rank 0 to print it (and exit)."""
    if is_main_rank():
        print(line, file=sys.stderr, flush=True)
    else:
        import time

        time.sleep(PRINTING_RANK_GRACE_S)


def _fail(prog: str, message: str, code: int = 2):
    """One line naming the problem, printed once (rank 0), then exit: no traceback, no usage
    block per rank."""
    report_once(f"{prog}: error: {message}")
    sys.exit(code)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        _fail(self.prog, f"{message} (see --help)")


def _int_list(text: str) -> List[int]:
    try:
        values = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected comma-separated integers >= 1, e.g. 2048,8192,32768"
        ) from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected comma-separated integers >= 1, e.g. 2048,8192,32768"
        )
    return values


def _int_at_least(minimum: int):
    """argparse type: an integer >= ``minimum``, else the allowed values."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r}: allowed values are integers >= {minimum}")
        return value

    parse.__name__ = f"integer >= {minimum}"  # argparse names the type in some messages
    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{text!r}: allowed values are numbers > 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="megatron-eps-prefill",
        description="Prefill throughput of a Megatron-Core MoE GPT: stock MoELayer vs EPS-MoE.",
    )
    g = parser.add_argument_group("model")
    g.add_argument("--config", default=None, metavar="YAML|NAME",
                   help="model config: a YAML file, or the name of a shipped one ("
                   + ", ".join(shipped_config_names()) + "). Default: tiny")
    g.add_argument("--layers", type=_positive_int, default=None, metavar="N",
                   help="override model.num_layers (reduced depth to fit one GPU)")
    g.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="parameter/activation dtype. Default: bf16 on GPU, fp32 on CPU")
    g.add_argument("--seed", type=int, default=1234, help="weight and prompt seed")
    g = parser.add_argument_group("workload")
    g.add_argument("--prompt-lengths", type=_int_list, default=None, metavar="L1,L2,...",
                   help="prompt lengths in tokens. Default: 2048,8192,32768 on GPU, 64,256 on CPU")
    g.add_argument("--batch-size", type=_positive_int, default=None, metavar="B",
                   help="prompts per data-parallel rank and step. Default: 1 on GPU, 2 on CPU")
    g.add_argument("--repeats", type=_positive_int, default=5, help="timed repeats (median)")
    g.add_argument("--warmup", type=_non_negative_int, default=2, help="untimed warm-up steps")
    g.add_argument("--rounds", type=_positive_int, default=1,
                   help="build and time every mode this many times, in alternating order "
                   "(stock, grouped, eps, then eps, grouped, stock, ...); medians over all "
                   "rounds. Evens out host-speed drift, which decides short, host-bound prompts")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--stock-only", action="store_true", help="run the stock model only")
    mode.add_argument("--eps-only", action="store_true", help="run the EPS model only")
    g.add_argument("--grouped-baseline", action="store_true",
                   help="also time the stock model with its experts run as one grouped GEMM "
                   "(torch._grouped_mm over the same weights, no overlap): what a Megatron user "
                   "with Transformer Engine's grouped GEMMs gets; EPS is reported against both")
    g.add_argument("--check-logits", choices=("last", "all"), default="last",
                   help="compare last-token logits (what prefill returns) or all positions")
    g.add_argument("--tolerance", type=_positive_float, default=None,
                   help="logit agreement bound (fp32: max abs diff / max(1, max |ref|); "
                   "bf16/fp16: relative L2 error). Default: 1e-4 fp32, 1e-2 bf16/fp16")
    g = parser.add_argument_group("parallelism and devices")
    g.add_argument("--tensor-model-parallel-size", "--tp", type=_positive_int, default=None,
                   dest="tensor_model_parallel_size",
                   help="attention tensor parallelism (GQA/MHA only). Default: config or 1")
    g.add_argument("--expert-model-parallel-size", "--ep", type=_positive_int, default=None,
                   dest="expert_model_parallel_size",
                   help="expert parallelism. Default: config or the world size")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CUDA + NCCL if a GPU is present, else CPU + gloo")
    g.add_argument("--validate-only", action="store_true",
                   help="check every setting (model config, EPS settings, parallel layout, "
                   "expert kernel, memory) and exit without running; WORLD_SIZE sets the rank "
                   "count to check for")
    g.add_argument("--cpu-threads", type=_positive_int, default=1,
                   help="torch threads per rank on CPU")
    g.add_argument("--dist-timeout", type=_positive_int, default=600, metavar="S",
                   help="process-group timeout in seconds")
    g = parser.add_argument_group("output")
    g.add_argument("--json", default=None, metavar="PATH", help="write results as JSON")
    g.add_argument("--git-commit", default=None,
                   help="commit to record when not run from a git checkout "
                   "(default: $MEGATRON_EPS_GIT_COMMIT or git rev-parse HEAD)")
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    g.add_argument("--profile-dir", default=None, metavar="DIR",
                   help="after the timed steps of each mode and length, profile one more step "
                   "(torch.profiler, host and GPU) and write its Chrome trace here, one file per "
                   "rank: prefill_<mode>_<length>_rank<r>.json")
    g.add_argument("--save-logits", default=None, metavar="PATH",
                   help="torch.save rank 0's logits {prompt_length: {mode: tensor}} (debugging, "
                   "cross-layout checks)")
    add_eps_args(parser)
    for action in parser._actions:
        if action.dest == "eps_moe":
            action.help = ("run EPS beside the stock model even where the config sets "
                           "eps.enabled: false (which runs the stock model alone)")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and validate everything before any process group or model exists.

    A bad value ends here with one line naming the setting and the allowed values (printed by
    rank 0 only) and exit status 2: model config, EPS settings (incl. the cost profile), the
    parallel layout for WORLD_SIZE ranks, Megatron settings EPS cannot run, the expert kernel
    on this device, and a first estimate of the memory the largest prompt needs.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    use_cuda = wants_cuda(args.device)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available; allowed values here: auto, cpu")

    try:
        args.config = resolve_config(args.config or DEFAULT_CONFIG)
    except ModelConfigError as exc:
        parser.error(str(exc))
    if args.dtype is None:
        args.dtype = "bf16" if use_cuda else "fp32"
    if args.prompt_lengths is None:
        args.prompt_lengths = [2048, 8192, 32768] if use_cuda else [64, 256]
    if args.batch_size is None:
        args.batch_size = 1 if use_cuda else 2
    if args.tolerance is None:
        args.tolerance = DEFAULT_TOLERANCE[args.dtype]
    if args.eps_config is None:
        # The model config's own eps: section (defaults if it has none); errors name --config.
        args.eps_config = args.config
        args.eps_config_flag = "--config"
    if args.profile_dir is not None:
        try:
            os.makedirs(args.profile_dir, exist_ok=True)
        except OSError:
            pass  # reported below, as not a writable folder
        if not (os.path.isdir(args.profile_dir) and os.access(args.profile_dir, os.W_OK)):
            parser.error(f"--profile-dir {args.profile_dir}: not a writable folder (allowed: a "
                         "folder this process can create or write to)")
    # Fail on bad settings before any process group exists.
    try:
        validate_setup(args)
    except (EPSConfigError, ModelConfigError, PrefillError) as exc:
        parser.error(str(exc))
    return args
