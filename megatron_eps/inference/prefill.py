"""megatron-eps-prefill: prefill throughput of a Megatron-Core MoE GPT, stock vs EPS.

Builds a GPTModel with MoE layers from a model config (configs/*.yaml; random weights from a
fixed seed, nothing downloaded), then runs the prefill step through Megatron-Core's static
inference path (``StaticInferenceContext`` + ``GPTInferenceWrapper.run_one_forward_step``, the
step the static engine / TextGenerationController takes for prefill) for a batch of prompts per
size: once with the stock MoELayer and once with EPS (``apply_eps`` on the spec; the EPS model
loads the stock model's state_dict, so the weights are equal). It checks that the logits agree
and reports prefill tokens/s (median over timed repeats, after warm-up).

Launch::

    torchrun --nproc-per-node N examples/run_prefill.py --config configs/tiny.yaml
    python examples/run_prefill.py                      # one process, world size 1
    megatron-eps-prefill --config configs/deepseek_v2_lite.yaml --layers 8 \
        --prompt-lengths 2048,8192,32768 --json out.json

Parallel layout: expert parallelism over all ranks (EP = world size unless set); attention is
data-parallel (each rank prefills its own prompts) or, for GQA/MHA models,
tensor-parallel with ``--tensor-model-parallel-size`` (sequence parallel MoE, ETP = 1). Every
rank runs the same prompt lengths, batch size and number of steps, as EP requires.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import socket
import statistics
import sys
import time
from typing import Dict, List, Optional

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_CONFIG = "configs/tiny.yaml"
# Where the speed figures come from (the CPU run only checks outputs and shows EPS's plan).
GPU_RESULTS_NOTE = (
    "speed figures come from the committed GPU results (README 'Results', benchmarks/results/; "
    "e.g. one DeepSeek-V2 MoE layer on two H200s at 8K / 16K / 32K tokens per rank: 1.12x / "
    "1.30x / 1.31x the stock layer with grouped-GEMM experts, 2.0x / 1.7x / 1.5x stock)"
)
# Logit agreement, stock vs EPS. fp32: max |diff| <= 1e-4 * max(1, max |stock|).
# bf16/fp16: ||diff|| / ||stock|| <= 1e-2.
DEFAULT_TOLERANCE = {"fp32": 1e-4, "bf16": 1e-2, "fp16": 1e-2}


class PrefillError(RuntimeError):
    pass


def _is_main_rank() -> bool:
    """Rank 0 of a torchrun launch (or a single process): the one that prints."""
    return int(os.environ.get("RANK", "0")) == 0


# torchrun stops every rank as soon as one exits with an error, so a rank that does not print
# leaves rank 0 this long to print the error first (under load, rank 0 can reach the check
# seconds later). When rank 0 has printed and exited, torchrun ends the wait at once.
PRINTING_RANK_GRACE_S = 30.0


def _report_once(line: str) -> None:
    """``line`` on stderr from rank 0; any other rank waits for rank 0 to print it (and exit)."""
    if _is_main_rank():
        print(line, file=sys.stderr, flush=True)
    else:
        import time

        time.sleep(PRINTING_RANK_GRACE_S)


def _fail(prog: str, message: str, code: int = 2):
    """One line naming the problem, printed once (rank 0), then exit: no traceback, no usage
    block per rank."""
    _report_once(f"{prog}: error: {message}")
    sys.exit(code)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        _fail(self.prog, f"{message} (see --help)")


def quiet_known_noise() -> None:
    """Drop warnings every run of this tool prints that say nothing to its user: Megatron's
    Transformer Engine / Apex fallback notices (EPS runs without both), Megatron's own
    deprecation notice about its config defaults, and torch's rename notice for the
    all-gather the dispatcher uses. Targeted by message; everything else still shows."""
    import logging
    import warnings

    for pattern in (
        r"Transformer Engine and Apex are not installed",
        r"Apex is not installed",
        r"full scope is deprecated",
        r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
    ):
        warnings.filterwarnings("ignore", message=pattern)
    # torchrun's elastic agent and Megatron's INFO chatter stay at WARNING.
    logging.getLogger("megatron.core").setLevel(logging.WARNING)


_OOM_ERRORS = tuple(
    e for e in (getattr(torch, "OutOfMemoryError", None),
                getattr(torch.cuda, "OutOfMemoryError", None)) if isinstance(e, type)
) or (MemoryError,)


# --------------------------------------------------------------------------- arguments
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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: allowed values are integers >= 1")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: allowed values are integers >= 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    from megatron_eps.arguments import add_eps_args

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
            action.help = ("accepted for Megatron-LM compatibility; this tool always runs the EPS "
                           "model beside the stock one (--stock-only skips EPS)")
    return parser


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{text!r}: allowed values are numbers > 0")
    return value


# --------------------------------------------------------------------------- model configs
def shipped_configs_dir() -> Optional[str]:
    """The model configs shipped with megatron-eps: megatron_eps/configs/ in an installed wheel,
    configs/ in a source checkout."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # megatron_eps/
    for candidate in (os.path.join(package, "configs"), os.path.join(os.path.dirname(package), "configs")):
        if os.path.isdir(candidate) and any(f.endswith(".yaml") for f in os.listdir(candidate)):
            return candidate
    return None


def shipped_config_names() -> List[str]:
    directory = shipped_configs_dir()
    if directory is None:
        return []
    return sorted(f[: -len(".yaml")] for f in os.listdir(directory) if f.endswith(".yaml"))


def resolve_config(name: str, flag: str = "--config") -> str:
    """A model config path from a path or the name of a shipped config (``deepseek_v2_lite``,
    ``deepseek_v2_lite.yaml`` or ``configs/deepseek_v2_lite.yaml``, from any directory)."""
    from megatron_eps.inference.model_config import ModelConfigError

    if os.path.isfile(name):
        return name
    base = os.path.basename(name)
    stem = base[: -len(".yaml")] if base.endswith(".yaml") else base
    directory = shipped_configs_dir()
    looks_shipped = os.path.dirname(name) in ("", "configs") and stem in shipped_config_names()
    if directory is not None and looks_shipped:
        return os.path.join(directory, stem + ".yaml")
    raise ModelConfigError(
        f"{flag} {name!r}: no such file, and no shipped config of that name; allowed: a YAML "
        f"file or one of {', '.join(shipped_config_names()) or '(none shipped)'}"
    )


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and validate everything before any process group or model exists.

    A bad value ends here with one line naming the setting and the allowed values (printed by
    rank 0 only) and exit status 2: model config, EPS settings (incl. the cost profile), the
    parallel layout for WORLD_SIZE ranks, Megatron settings EPS cannot run, the expert kernel
    on this device, and a first estimate of the memory the largest prompt needs.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    use_cuda = _use_cuda(args.device)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available; allowed values here: auto, cpu")
    from megatron_eps.inference.model_config import ModelConfigError

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
    from megatron_eps.config import EPSConfigError

    try:
        validate_setup(args)
    except (EPSConfigError, ModelConfigError, PrefillError) as exc:
        parser.error(str(exc))
    return args


def transformer_config_for(mc, args, tp: int, ep: int, on_cpu: bool):
    """The model's TransformerConfig for these parallel sizes (the prompt must split over TP)."""
    if tp > 1:
        for length in args.prompt_lengths:
            if (args.batch_size * length) % tp:
                raise PrefillError(
                    f"--prompt-lengths {length} x --batch-size {args.batch_size} must be divisible "
                    f"by --tensor-model-parallel-size {tp} (sequence-parallel MoE)"
                )
    return mc.transformer_config(
        dtype=DTYPES[args.dtype],
        tensor_model_parallel_size=tp,
        expert_model_parallel_size=ep,
        use_cpu_initialization=on_cpu,
    )


def validate_setup(args) -> Dict[str, object]:
    """Every check that needs no process group: raises EPSConfigError / ModelConfigError /
    PrefillError naming the setting. Returns what it built (model config, parallel sizes)."""
    from megatron_eps.config import EPSConfig
    from megatron_eps.inference.model_config import load_model_config
    from megatron_eps.moe_layer import check_megatron_config

    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = _use_cuda(args.device)
    device = torch.device("cuda") if use_cuda else torch.device("cpu")
    mc = load_model_config(args.config, num_layers=args.layers)
    eps = EPSConfig.from_args(args)
    par = mc.resolve_parallel(world, args.tensor_model_parallel_size, args.expert_model_parallel_size)
    tp, ep = par["tensor_model_parallel_size"], par["expert_model_parallel_size"]
    dtype = DTYPES[args.dtype]
    config = transformer_config_for(mc, args, tp, ep, on_cpu=not use_cuda)
    if not args.stock_only:
        eps_run = eps.replace(enabled=True)
        check_megatron_config(config, eps_run, ep)
        _check_expert_kernel(eps_run, mc, device, dtype)
        from megatron_eps.comm.selection import check_transport_setting

        # The facts this process has (device, libraries); the node and peer checks follow at
        # layer construction, still before any collective of the layer.
        check_transport_setting(eps_run.transport, None, ep)
        from megatron_eps.policy.profile import warn_if_profile_for_other_device
        from megatron_eps.policy.kernel_tables import device_name

        import logging

        quiet = logging.getLogger("megatron_eps.quiet")
        quiet.disabled = True
        warn_if_profile_for_other_device(
            eps.cost_profile, device_name(device), log=None if _is_main_rank() else quiet
        )
    _check_memory(args, mc, par, world, device)
    return {"model_config": mc, "parallel": par, "eps_config": eps}


def _check_expert_kernel(eps, mc, device, dtype) -> None:
    """An explicit expert_kernel must run on this device (e.g. triton needs a GPU)."""
    from megatron_eps.config import EPSConfigError

    name = eps.expert_kernel
    if name in ("auto", "megatron"):
        return
    from megatron_eps.experts import base
    from megatron_eps.calibrate.kernels import synthetic_experts

    base._import_builtin_backends()
    backend = base._REGISTRY.get(name)
    # One expert of the model's shape: enough to ask the backend whether it runs here.
    ffn = int(mc.fields["moe_ffn_hidden_size"])
    probe = synthetic_experts(mc.hidden_size, ffn, 1, dtype, device)
    reason = (backend.unavailable_reason(probe, device, dtype) if backend is not None
              else "its module could not be imported")
    if reason is not None:
        available = [n for n, cls in sorted(base._REGISTRY.items())
                     if n == "megatron" or cls.unavailable_reason(probe, device, dtype) is None]
        raise EPSConfigError(
            f"eps expert_kernel={name!r} cannot run here ({device.type}, {str(dtype)[6:]}): "
            f"{reason}; allowed values here: {', '.join(['auto'] + available)}"
        )


def estimate_prefill_bytes(mc, batch: int, length: int, dtype_bytes: int, ep: int,
                           check_logits: str, both_modes: bool) -> Dict[str, float]:
    """A lower bound of the memory one rank needs for one prefill (bytes, by part): weights
    (plus the CPU copy the EPS model loads from), the KV cache of every layer, the activations
    of one layer (hidden states, routed rows, expert intermediates) and the logits."""
    f = mc.fields
    hidden, topk = mc.hidden_size, int(f["moe_router_topk"])
    ffn = int(f["moe_ffn_hidden_size"])
    tokens = batch * length
    counts = mc.parameter_counts()
    experts = counts["routed_experts_per_layer"] * mc.num_moe_layers
    weights = (counts["total"] - experts + experts / ep) * dtype_bytes
    if both_modes:
        weights *= 2
    if mc.attention == "mla":
        kv_width = int(f.get("kv_lora_rank", 512)) + int(f.get("qk_pos_emb_head_dim", 64))
    else:
        heads = int(f["num_attention_heads"])
        kv_width = 2 * int(f.get("num_query_groups") or heads) * int(
            f.get("kv_channels") or hidden // heads)
    kv_cache = mc.num_layers * tokens * kv_width * dtype_bytes
    gated = 2 if mc.activation in ("swiglu", "geglu") else 1
    activations = tokens * dtype_bytes * (4 * hidden + 2 * topk * hidden + (gated + 1) * topk * ffn)
    logit_rows = tokens if check_logits == "all" else batch
    logits = logit_rows * mc.vocab_size * (dtype_bytes + 4) * (2 if both_modes else 1)
    return {"weights": weights, "kv_cache": kv_cache, "activations": activations,
            "logits": logits}


def _available_bytes(device) -> Optional[float]:
    """Memory one rank may use: the GPU's, or this host's available memory over its ranks."""
    if device.type == "cuda":
        index = int(os.environ.get("LOCAL_RANK", "0")) % max(torch.cuda.device_count(), 1)
        return float(torch.cuda.get_device_properties(index).total_memory)
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: line.split()[1] for line in f}
        available = float(info["MemAvailable"]) * 1024
    except (OSError, KeyError, ValueError, IndexError):
        return None
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    return available / max(ranks_here, 1)


def _check_memory(args, mc, par, world, device) -> None:
    """Refuse prompt lengths whose lower-bound memory estimate exceeds what a rank has."""
    available = _available_bytes(device)
    if available is None:
        return
    dtype_bytes = torch.tensor([], dtype=DTYPES[args.dtype]).element_size()
    both = not (args.stock_only or args.eps_only)
    ep = par["expert_model_parallel_size"]
    for length in sorted(args.prompt_lengths, reverse=True)[:1]:
        parts = estimate_prefill_bytes(mc, args.batch_size, length, dtype_bytes, ep,
                                       args.check_logits, both)
        need = sum(parts.values())
        if need <= available:
            return
        per_token = (sum(estimate_prefill_bytes(mc, args.batch_size, 2, dtype_bytes, ep,
                                                args.check_logits, both).values())
                     - sum(estimate_prefill_bytes(mc, args.batch_size, 1, dtype_bytes, ep,
                                                  args.check_logits, both).values()))
        fixed = sum(parts.values()) - per_token * length
        longest = int(max(available - fixed, 0) // max(per_token, 1))
        gib = 2.0**30
        detail = ", ".join(f"{k.replace('_', ' ')} {v / gib:,.1f}" for k, v in parts.items())
        if longest < 1:
            raise PrefillError(
                f"--config {args.config}: the weights alone need ~{fixed / gib:,.1f} GiB per rank "
                f"({args.dtype}{', stock + EPS copies' if both else ''}), this "
                f"{'GPU' if device.type == 'cuda' else 'host'} has ~{available / gib:,.1f} GiB per "
                "rank; allowed: fewer layers (--layers N), --dtype bf16, --stock-only/--eps-only, "
                "or more expert-parallel ranks"
            )
        raise PrefillError(
            f"--prompt-lengths {length} with --batch-size {args.batch_size}: a prefill needs at "
            f"least ~{need / gib:,.1f} GiB per rank (GiB: {detail}), this "
            f"{'GPU' if device.type == 'cuda' else 'host'} has ~{available / gib:,.1f} GiB per "
            f"rank; allowed: prompt lengths up to about {longest:,} tokens at this batch size"
        )


def _use_cuda(device: str) -> bool:
    if device == "cpu":
        return False
    return torch.cuda.is_available()


# --------------------------------------------------------------------------- distributed
def init_distributed(args) -> Dict[str, int]:
    """Default process group: torchrun's env, or a world of one. NCCL on GPUs, gloo on CPU."""
    import torch.distributed as dist

    use_cuda = _use_cuda(args.device)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    else:
        from megatron_eps.testing.cpu_shims import install_cpu_shims

        install_cpu_shims(force=torch.cuda.is_available())
        torch.set_num_threads(args.cpu_threads)
    if not dist.is_initialized():
        from megatron_eps.testing.distributed import process_group_backend

        dist.init_process_group(
            backend=process_group_backend(use_cuda),
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=args.dist_timeout),
        )
    return {"rank": rank, "world_size": world, "local_rank": local_rank}


# --------------------------------------------------------------------------- model building
def swap_in_grouped_experts(model) -> int:
    """The fair baseline: every stock MoELayer's experts run as one grouped GEMM over the same
    weights (megatron_eps.testing.baselines). Returns how many layers were changed."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_eps.testing.baselines import GroupedGemmExperts

    changed = 0
    for module in model.modules():
        if type(module) is MoELayer:
            module.experts = GroupedGemmExperts(module.experts, module.config)
            changed += 1
    return changed


def build_model(mc, config, eps_config=None, state_dict=None):
    """GPTModel from the model config; EPS MoE layers if ``eps_config``; weights from
    ``state_dict`` if given (otherwise the current RNG state decides them)."""
    spec = mc.layer_spec(config)
    if eps_config is not None:
        from megatron_eps.spec import apply_eps

        spec = apply_eps(spec, eps_config)
    model = mc.build_gpt_model(config, spec)
    if torch.cuda.is_available() and not config.use_cpu_initialization:
        model = model.cuda()
    if state_dict is not None:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        unexpected = [k for k in unexpected if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise PrefillError(
                "the EPS model's parameters differ from the stock model's: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
    model.eval()
    return model


def seed_all(seed: int, device) -> None:
    """Seed torch and Megatron's RNG tracker. On GPUs the regular tracker gives each EP rank
    its own expert weights; on CPU the inference tracker (no CUDA RNG) is the one that works,
    and CPU initialisation draws every weight from the default generator."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(seed)
        model_parallel_cuda_manual_seed(seed)
    else:
        model_parallel_cuda_manual_seed(seed, inference_rng_tracker=True)


def make_prompts(seed: int, dp_rank: int, batch: int, length: int, vocab: int, device):
    """Random token ids; equal on the ranks of one TP group, different across DP ranks."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + dp_rank * 7919 + length)
    tokens = torch.randint(0, vocab, (batch, length), generator=gen, dtype=torch.long)
    return tokens.to(device)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_prefill(model, tokens, config, vocab_size, check_logits: str):
    """One prefill through the static inference path; returns the logits (as the wrapper gives
    them: [B, 1, V] with last-token materialisation, [B, L, V] otherwise)."""
    from megatron_eps import compat

    batch, length = tokens.shape
    context = compat.make_static_inference_context(
        batch, length, materialize_only_last_token_logits=(check_logits == "last")
    )
    wrapper = compat.make_gpt_inference_wrapper(
        model,
        context,
        hidden_size=config.hidden_size,
        params_dtype=config.params_dtype,
        padded_vocab_size=vocab_size,
        max_batch_size=batch,
        max_sequence_length=length,
    )
    wrapper.prep_model_for_inference()
    inputs = wrapper.prep_inference_input(tokens)
    window = wrapper.get_batch_for_context_window(inputs, 0, length)
    return wrapper, context, window


def timed_prefills(model, tokens, config, vocab_size, args, device, progress=None, label="",
                   profile=True):
    """Warm-up + timed repeats of the prefill step; returns (times_s, logits of the last run,
    warm-up steps taken, self-calibration runs inside the timed steps). With ``profile`` and
    ``--profile-dir``, one more step is traced after the timed ones.

    The last warm-up step is repeated while it calibrated EPS's expert kernels (or waited for
    their compilation) on some rank: that one-time cost per load bucket stays out of the timed
    steps (the kernel cache file keeps the decisions for later runs)."""
    import torch.distributed as dist

    from megatron_eps import compat
    from megatron_eps.experts.autotune import calibration_activity, warm_up_while_calibrating

    wrapper, context, window = run_prefill(model, tokens, config, vocab_size, args.check_logits)
    logits = None

    def step():
        nonlocal logits
        context.reset()
        dist.barrier()
        _sync(device)
        start = time.perf_counter()
        with compat.inference_engine_mode():
            logits = wrapper.run_one_forward_step(window)
        _sync(device)
        if args.check_logits == "last" and logits.dim() == 3 and logits.shape[1] != 1:
            # Kept on the host and compared in float64 per mode, every token's logits of a
            # long prompt take minutes and tens of GB: fail at the first step instead.
            raise RuntimeError(
                f"the model returned logits for {logits.shape[1]} positions where the last "
                "token's were asked for (megatron_eps.compat.inference_engine_mode)")
        if progress is not None:
            progress.update(1)
        return time.perf_counter() - start

    for _ in range(args.warmup - 1):
        step()
    warmup = args.warmup
    if args.warmup:
        warmup += warm_up_while_calibrating(step, device) - 1
        if progress is not None:
            progress.total += warmup - args.warmup
    runs_before = calibration_activity()[0]
    times = [step() for _ in range(args.repeats)]
    calibrated_while_timed = calibration_activity()[0] - runs_before
    profile_dir = getattr(args, "profile_dir", None)  # stand-in args in tests lack it
    if profile_dir and profile:
        _profiled_step(step, device, model, os.path.join(
            profile_dir, f"prefill_{label or 'model'}_{tokens.shape[1]}_rank{dist.get_rank()}.json"))
    # The step takes as long as its slowest rank.
    t = torch.tensor(times, dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    # In the model's dtype: at 32K tokens and a 100K vocabulary, fp32 logits are 13 GB per
    # mode and length, and every rank keeps one copy per mode on the host.
    out = logits
    del wrapper, context, window
    return t.cpu().tolist(), out, warmup, calibrated_while_timed


def _profiled_step(step, device, model, path: str) -> None:
    """One more step under torch.profiler (host ops and GPU kernels), as a Chrome trace. EPS's
    layers mark their phases in it (``eps.counts``, ``eps.layout``, ``eps.experts[0]``, ...), so
    the host time between the token-count copy and the first expert GEMM is attributed."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    dispatchers = [getattr(m, "token_dispatcher", None)
                   for m in (model.modules() if model is not None else ())]
    marked = [d for d in dispatchers if getattr(d, "profiler_ranges", None) is False]
    for m in marked:
        m.profiler_ranges = True
    try:
        with torch.profiler.profile(activities=activities) as prof:
            step()
    finally:
        for m in marked:
            m.profiler_ranges = False
    prof.export_chrome_trace(path)


LOGIT_ROWS_PER_BLOCK = 2048


def compare_logits(stock: torch.Tensor, eps: torch.Tensor, dtype: str = "fp32") -> Dict[str, float]:
    """Agreement statistics of two logit tensors, reduced over all ranks when distributed."""
    import torch.distributed as dist

    # Row blocks in float64: the whole-tensor temporaries of a 32K-token prompt would be tens of
    # GB per rank.
    stock2, eps2 = stock.reshape(-1, stock.shape[-1]), eps.reshape(-1, eps.shape[-1])
    max_abs = ref_max = err_sq = ref_sq = 0.0
    finite = True
    for start in range(0, stock2.shape[0], LOGIT_ROWS_PER_BLOCK):
        ref = stock2[start : start + LOGIT_ROWS_PER_BLOCK].double()
        got = eps2[start : start + LOGIT_ROWS_PER_BLOCK].double()
        diff = got - ref
        max_abs = max(max_abs, diff.abs().max().item())
        ref_max = max(ref_max, ref.abs().max().item())
        err_sq += diff.pow(2).sum().item()
        ref_sq += ref.pow(2).sum().item()
        finite = finite and bool(torch.isfinite(got).all()) and bool(torch.isfinite(ref).all())
    stats = torch.tensor([max_abs, ref_max, err_sq, ref_sq, float(finite)], dtype=torch.float64)
    distributed = dist.is_available() and dist.is_initialized()
    if distributed and dist.get_backend() == "nccl":
        stats = stats.cuda()
    # Max for the maxima, sums for the squared norms, min for finiteness (over all ranks).
    maxima = stats[[0, 1]].clone()
    sums = stats[[2, 3]].clone()
    finite = stats[[4]].clone()
    if distributed:
        dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    max_abs, ref_max = maxima.tolist()
    err_sq, ref_sq = sums.tolist()
    return {
        "max_abs_diff": max_abs,
        "ref_max_abs": ref_max,
        "max_abs_diff_scaled": max_abs / max(1.0, ref_max),
        "rel_l2_err": math.sqrt(err_sq) / max(math.sqrt(ref_sq), 1e-30),
        "finite": bool(finite.item() > 0.5),
    }


def logits_agree(cmp: Dict[str, float], dtype: str, tol: float) -> bool:
    """fp32: max |diff| / max(1, max |ref|) <= tol; bf16/fp16: ||diff|| / ||ref|| <= tol."""
    if not cmp["finite"]:
        return False
    metric = cmp["max_abs_diff_scaled"] if dtype == "fp32" else cmp["rel_l2_err"]
    return metric <= tol


# --------------------------------------------------------------------------- metadata
def _git_commit(args) -> Optional[str]:
    from megatron_eps.calibrate.provenance import git_commit

    return args.git_commit or git_commit()

def _device_info(device) -> Dict[str, object]:
    info = {"type": device.type, "platform": platform.platform(), "hostname": socket.gethostname()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            name=props.name,
            count=torch.cuda.device_count(),
            total_memory_gb=round(props.total_memory / 2**30, 1),
            sm_count=props.multi_processor_count,
            cuda=torch.version.cuda,
        )
    else:
        info.update(name=platform.processor() or platform.machine(), cpu_count=os.cpu_count())
    return info


def _versions() -> Dict[str, str]:
    import megatron_eps
    from megatron_eps import compat

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "megatron_core": str(compat.MCORE_VERSION),
        "megatron_eps": megatron_eps.__version__,
    }
    if torch.cuda.is_available():
        from megatron_eps.comm import cuda_ops

        versions["copy_engine_copies"] = cuda_ops.copy_issue_mode()
    return versions


# --------------------------------------------------------------------------- main
def run(args) -> Dict[str, object]:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_eps.config import EPSConfig
    from megatron_eps.inference.model_config import load_model_config

    from megatron_eps.comm.sm_control import apply_comm_cta_cap

    # NCCL reads its CTA cap when communicators are created: before the process group.
    apply_comm_cta_cap(EPSConfig.from_args(args).comm_num_ctas)
    dist_info = init_distributed(args)
    rank, world = dist_info["rank"], dist_info["world_size"]
    device = torch.device("cuda", torch.cuda.current_device()) if _use_cuda(args.device) else torch.device("cpu")

    mc = load_model_config(args.config, num_layers=args.layers)
    par = mc.resolve_parallel(world, args.tensor_model_parallel_size, args.expert_model_parallel_size)
    tp, ep = par["tensor_model_parallel_size"], par["expert_model_parallel_size"]
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=1,
    )
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    config = transformer_config_for(mc, args, tp, ep, on_cpu=device.type == "cpu")
    eps_config = EPSConfig.from_args(args)
    if not eps_config.enabled and not args.stock_only and rank == 0:
        print(f"note: {args.eps_config}: eps.enabled is false, but this tool compares the stock "
              "model with EPS, so EPS runs anyway (--stock-only runs the stock model alone)",
              file=sys.stderr, flush=True)
    eps_config = eps_config.replace(enabled=True)
    modes = ["stock", "grouped", "eps"] if args.grouped_baseline else ["stock", "eps"]
    if args.stock_only:
        modes = ["stock"]
    elif args.eps_only:
        modes = ["eps"]

    is_main = rank == 0
    # Each round builds and times every mode, in alternating order: the host speed of a GPU
    # machine drifts by tens of percent over a minute, and at short prompts the step is
    # host-bound, so modes timed in one block each would compare drifts, not paths.
    schedule = [(r, mode) for r in range(args.rounds)
                for mode in (modes if r % 2 == 0 else modes[::-1])]
    progress = None
    total_steps = len(schedule) * len(args.prompt_lengths) * (args.warmup + args.repeats)
    if is_main and not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=total_steps, desc="prefill", unit="step", file=sys.stderr)

    results = {length: {} for length in args.prompt_lengths}
    logits = {length: {} for length in args.prompt_lengths}
    expert_backends = {}
    decisions = {}
    state_dict = None
    build_s = {}
    errors: List[str] = []
    for round_index, mode in schedule:
        seed_all(args.seed, device)
        t0 = time.perf_counter()
        model = build_model(mc, config, eps_config if mode == "eps" else None, state_dict)
        if mode == "grouped":
            swap_in_grouped_experts(model)
        _sync(device)
        build_s.setdefault(mode, time.perf_counter() - t0)
        if mode == "stock" and "eps" in modes and state_dict is None:
            # Same weights for the EPS model, kept off the GPU while the stock model runs.
            state_dict = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()
                          if torch.is_tensor(v)}
        last_round = round_index == args.rounds - 1
        for length in args.prompt_lengths:
            if "error" in results[length].get(mode, {}):
                continue  # out of memory in an earlier round
            if progress is not None:
                progress.set_description(f"prefill {mode} L={length}")
            tokens = make_prompts(args.seed, dp_rank, args.batch_size, length, mc.vocab_size, device)
            oom = None
            try:
                times, out, warmup_steps, calibrated_while_timed = timed_prefills(
                    model, tokens, config, mc.vocab_size, args, device, progress, mode,
                    profile=last_round,
                )
            except _OOM_ERRORS as exc:
                if world > 1:
                    raise  # the other ranks are inside a collective: nothing to continue
                oom = str(exc).splitlines()[0] if str(exc) else "out of memory"
            if oom is not None:
                # One process: record the size as failed and go on with the others (the
                # exception and its frames are gone here, so their memory can be freed).
                results[length][mode] = {"error": f"out of memory: {oom}"}
                logits[length][mode] = None
                errors.append(f"{mode} L={length}: out of memory")
                del tokens
                if device.type == "cuda":
                    import gc

                    gc.collect()
                    torch.cuda.empty_cache()
                continue
            entry = results[length].setdefault(mode, {
                "times_s": [], "round_medians_s": [], "warmup_steps": 0,
                # expert-kernel candidate runs of the self-calibration inside the timed steps
                # (0 when the warm-up kept them out)
                "calibration_runs_while_timed": 0})
            entry["times_s"] += times
            entry["round_medians_s"].append(statistics.median(times))
            entry["warmup_steps"] += warmup_steps
            entry["calibration_runs_while_timed"] += calibrated_while_timed
            median = statistics.median(entry["times_s"])
            tokens_global = args.batch_size * length * dp_size
            entry.update(median_s=median, tokens_per_s=tokens_global / median,
                         tokens_per_s_per_rank=tokens_global / median / world)
            if mode not in logits[length]:
                logits[length][mode] = out.cpu() if (len(modes) > 1 or args.save_logits) else None
            if mode == "eps":
                backends = sorted(
                    {b for m in model.modules() for b in getattr(m, "last_expert_backends", [])}
                )
                expert_backends[length] = backends
                decisions[length] = eps_decisions(model)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if progress is not None:
        progress.close()

    all_ok = True
    rows = []
    for length in args.prompt_lengths:
        entry = {
            "prompt_length": length,
            "batch_size_per_dp_rank": args.batch_size,
            "tokens_per_step": args.batch_size * length * dp_size,
        }
        entry.update(results[length])
        complete = all("error" not in results[length].get(m, {"error": 1}) for m in modes)
        if "stock" in modes and "eps" in modes and complete:
            cmp = compare_logits(logits[length]["stock"], logits[length]["eps"], args.dtype)
            cmp["tolerance"] = args.tolerance
            cmp["metric"] = "max_abs_diff_scaled" if args.dtype == "fp32" else "rel_l2_err"
            cmp["agree"] = logits_agree(cmp, args.dtype, args.tolerance)
            all_ok &= cmp["agree"]
            entry["logits"] = cmp
            entry["speedup"] = results[length]["eps"]["tokens_per_s"] / results[length]["stock"]["tokens_per_s"]
            if "grouped" in modes:
                entry["speedup_vs_grouped"] = (results[length]["eps"]["tokens_per_s"]
                                               / results[length]["grouped"]["tokens_per_s"])
                # per round, from modes timed minutes apart at most: the drift check
                entry["speedup_vs_grouped_per_round"] = [
                    grouped / eps for grouped, eps in zip(
                        results[length]["grouped"]["round_medians_s"],
                        results[length]["eps"]["round_medians_s"])]
                entry["logits_grouped_vs_stock"] = compare_logits(
                    logits[length]["stock"], logits[length]["grouped"], args.dtype)
        if length in expert_backends:
            entry["eps_expert_backends"] = expert_backends[length]
        if length in decisions:
            entry["eps_decisions"] = decisions[length]
        rows.append(entry)

    report = {
        "benchmark": "megatron-eps-prefill",
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
        "argv": sys.argv,
        "git_commit": _git_commit(args),
        "versions": _versions(),
        "device": _device_info(device),
        "backend": dist.get_backend(),
        "ranks_share_gpu": _ranks_share_gpu(device, dist.get_world_size()),
        "model": {
            "config": args.config,
            "name": mc.name,
            "attention": mc.attention,
            "core_attention": mc.core_attention,
            "num_layers": mc.num_layers,
            "num_moe_layers": mc.num_moe_layers,
            "hidden_size": mc.hidden_size,
            "num_moe_experts": mc.num_moe_experts,
            "moe_ffn_hidden_size": int(mc.fields["moe_ffn_hidden_size"]),
            "moe_router_topk": int(mc.fields["moe_router_topk"]),
            "moe_shared_expert_intermediate_size": mc.fields.get("moe_shared_expert_intermediate_size"),
            "vocab_size": mc.vocab_size,
            "dtype": args.dtype,
            "seed": args.seed,
        },
        "parallel": {
            "world_size": world,
            "tensor_model_parallel_size": tp,
            "expert_model_parallel_size": ep,
            "expert_tensor_parallel_size": 1,
            "data_parallel_size": dp_size,
            "attention": "tensor-parallel" if tp > 1 else "data-parallel",
        },
        "eps_config": eps_config.to_dict(),
        "inference_path": "StaticInferenceContext + GPTInferenceWrapper.run_one_forward_step",
        "warmup": args.warmup,
        "repeats": args.repeats,
        "rounds": args.rounds,
        "check_logits": args.check_logits,
        "modes": modes,
        "build_s": build_s,
        "results": rows,
        "logits_agree": all_ok if "stock" in modes and "eps" in modes else None,
        "errors": errors,
    }
    if is_main and args.save_logits:
        torch.save(logits, args.save_logits)
    if is_main:
        print(format_table(report), flush=True)
        if args.json:
            directory = os.path.dirname(os.path.abspath(args.json))
            os.makedirs(directory, exist_ok=True)
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)
            print(f"wrote {args.json}", flush=True)
    return report


def _ranks_share_gpu(device, world: int) -> bool:
    from megatron_eps.comm.selection import ranks_share_gpu

    return device.type == "cuda" and world > 1 and ranks_share_gpu()


def format_table(report) -> str:
    m, p = report["model"], report["parallel"]
    dev = report["device"]
    lines = [
        f"megatron-eps prefill | {m['name']} ({m['num_layers']} layers, {m['attention']}, "
        f"{m['num_moe_experts']} experts top-{m['moe_router_topk']}) | {m['dtype']} | "
        f"{dev['type']}: {dev.get('name', '')} | world {p['world_size']} (EP {p['expert_model_parallel_size']}, "
        f"TP {p['tensor_model_parallel_size']}, {p['attention']} attention)"
    ]
    if dev["type"] == "cpu":
        lines.append("CPU run: it checks that EPS gives the stock model's outputs and shows the plan "
                     "EPS chose; CPU timings say nothing about GPU speed:")
        lines.append("  " + GPU_RESULTS_NOTE + ".")
    elif report.get("ranks_share_gpu"):
        lines.append("Ranks share one GPU (gloo, MEGATRON_EPS_RANKS_SHARE_GPU=1): this checks the "
                     "outputs; its timings say nothing about speed.")
    header = f"{'prompt':>8} {'tok/step':>9} {'stock tok/s':>12} {'eps tok/s':>12} {'speedup':>8} {'logit err':>10} {'ok':>4}"
    lines += [header, "-" * len(header)]
    for row in report["results"]:
        stock = row.get("stock", {}).get("tokens_per_s")
        eps = row.get("eps", {}).get("tokens_per_s")
        if any("error" in row.get(m, {}) for m in ("stock", "eps")):
            lines.append(f"{row['prompt_length']:>8} {row['tokens_per_step']:>9} "
                         + "; ".join(f"{m}: {row[m]['error'][:60]}" for m in ("stock", "eps")
                                     if "error" in row.get(m, {})))
            continue
        speed = row.get("speedup")
        if "speedup_vs_grouped" in row:
            grouped = row["grouped"]["tokens_per_s"]
            per_round = row.get("speedup_vs_grouped_per_round", [])
            rounds = (" (rounds: " + ", ".join(f"{x:.2f}x" for x in per_round) + ")"
                      if len(per_round) > 1 else "")
            lines.append(f"{'':>8} {'':>9} grouped-experts baseline {grouped:,.0f} tok/s: "
                         f"EPS {row['speedup_vs_grouped']:.2f}x of it{rounds}")
        cmp = row.get("logits")
        err = cmp[cmp["metric"]] if cmp else None
        lines.append(
            f"{row['prompt_length']:>8} {row['tokens_per_step']:>9} "
            f"{(f'{stock:,.0f}' if stock else '-'):>12} {(f'{eps:,.0f}' if eps else '-'):>12} "
            f"{(f'{speed:.2f}x' if speed else '-'):>8} {(f'{err:.2e}' if err is not None else '-'):>10} "
            f"{('yes' if cmp['agree'] else 'NO') if cmp else '-':>4}"
        )
    plan = [row for row in report["results"] if row.get("eps_decisions")]
    if plan:
        lines.append("EPS plan (what EPS decided in the last timed run; rank 0):")
        for row in plan:
            for text in format_decisions(row["eps_decisions"]):
                lines.append(f"  prompt {row['prompt_length']}: {text}")
    return "\n".join(lines)


def eps_decisions(model) -> List[Dict[str, object]]:
    """Per EPS MoE layer, what its last forward did: chunks, split, expert kernel, transport."""
    from megatron_eps.moe_layer import EPSMoELayer

    out = []
    layers = [m for m in model.modules() if isinstance(m, EPSMoELayer)]
    for index, layer in enumerate(layers):
        record = getattr(layer.token_dispatcher, "last_record", None)
        entry: Dict[str, object] = {
            "moe_layer": index,
            "layer_number": getattr(layer, "layer_number", None),
            "pipeline_degree_setting": layer.eps_config.pipeline_degree,
            "expert_kernels": sorted(set(getattr(layer, "last_expert_backends", []))),
        }
        if record is not None:
            sizes = [int(n) for n in getattr(record, "experts_per_chunk", ()) or ()]
            entry["num_chunks"] = int(record.num_chunks)
            entry["experts_per_chunk"] = sizes
            entry["chunk_split"] = _split_name(sizes)
            entry["tokens_per_chunk"] = [int(t) for t in record.tokens_per_chunk]
            entry["transport"] = str(getattr(record, "transport", "") or "nccl")
        out.append(entry)
    return out


def _split_name(sizes: List[int]) -> str:
    if len(sizes) <= 1:
        return "none (one chunk)"
    if sizes[-1] == 1 and max(sizes[:-1]) > 1:
        return "tail"
    return "equal"


def format_decisions(decisions: List[Dict[str, object]]) -> List[str]:
    """One line per run of layers that decided alike."""
    def describe(d):
        if "num_chunks" not in d:
            return "no pipelined forward ran"
        sizes = "+".join(str(n) for n in d["experts_per_chunk"])
        return (f"N={d['num_chunks']} chunk(s) of {sizes} local experts, split {d['chunk_split']}, "
                f"expert kernel {'/'.join(d['expert_kernels']) or '-'}, transport {d['transport']}"
                f" (pipeline_degree: {d['pipeline_degree_setting']})")

    lines, start = [], 0
    for i in range(1, len(decisions) + 1):
        if i == len(decisions) or describe(decisions[i]) != describe(decisions[start]):
            first, last = decisions[start]["moe_layer"], decisions[i - 1]["moe_layer"]
            which = f"MoE layer {first}" if first == last else f"MoE layers {first}-{last}"
            lines.append(f"{which}: {describe(decisions[start])}")
            start = i
    return lines


def _stacks_on_termination() -> None:
    """With ``MEGATRON_EPS_STACKS_ON_SIGTERM=1``: on SIGTERM (a timeout, or torchrun stopping
    the ranks after one failed), print every thread's Python stack before exiting, so a run
    stopped from outside shows where each rank was."""
    import faulthandler
    import signal

    if os.environ.get("MEGATRON_EPS_STACKS_ON_SIGTERM") != "1":
        return

    try:
        faulthandler.register(signal.SIGTERM, all_threads=True, chain=True)
    except (AttributeError, ValueError, RuntimeError):
        pass  # not the main thread, or a platform without it


def main(argv=None) -> int:
    quiet_known_noise()
    _stacks_on_termination()
    args = parse_args(argv)
    if args.validate_only:
        if _is_main_rank():
            print(f"megatron-eps-prefill: settings OK ({args.config}, "
                  f"{os.environ.get('WORLD_SIZE', '1')} rank(s))", flush=True)
        return 0
    import torch.distributed as dist

    from megatron_eps.config import EPSConfigError
    from megatron_eps.inference.model_config import ModelConfigError

    try:
        report = run(args)
    except (EPSConfigError, ModelConfigError, PrefillError) as exc:
        # A check only the running job can make: still one line, from rank 0.
        _report_once(f"megatron-eps-prefill: error: {exc}")
        return 2
    finally:
        if dist.is_initialized():
            try:
                from megatron.core import parallel_state

                parallel_state.destroy_model_parallel()
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass
    is_main = int(os.environ.get("RANK", "0")) == 0
    if report.get("logits_agree") is False:
        if is_main:
            print("ERROR: stock and EPS logits disagree beyond the tolerance", file=sys.stderr)
        return 1
    if report.get("errors"):
        if is_main:
            print(f"ERROR: some sizes did not run: {'; '.join(report['errors'])}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
