"""megatron-eps-prefill's setup: the checks that need no process group, then the process group,
the models and the prompts."""

from __future__ import annotations

import os
import sys
from typing import Dict, Optional

import torch

from megatron_eps.config import EPSConfig, EPSConfigError
from megatron_eps.experts import base
from megatron_eps.experts.weights import synthetic_experts
from megatron_eps.inference.baselines import GroupedGemmExperts
from megatron_eps.inference.model_config import load_model_config
from megatron_eps.inference.parallel import initialize_distributed, seed_model_parallel
from megatron_eps.moe_layer import check_megatron_config

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class PrefillError(RuntimeError):
    pass


def is_main_rank() -> bool:
    """Rank 0 of a torchrun launch (or a single process): the one that prints."""
    return int(os.environ.get("RANK", "0")) == 0


def wants_cuda(device: str) -> bool:
    if device == "cpu":
        return False
    return torch.cuda.is_available()


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
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = wants_cuda(args.device)
    device = torch.device("cuda") if use_cuda else torch.device("cpu")
    mc = load_model_config(args.config, num_layers=args.layers)
    eps = EPSConfig.from_args(args)
    _honour_eps_switch(args, eps)
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
            eps.cost_profile, device_name(device), log=None if is_main_rank() else quiet
        )
    _check_memory(args, mc, par, world, device)
    return {"model_config": mc, "parallel": par, "eps_config": eps}


def _honour_eps_switch(args, eps) -> None:
    """``eps.enabled: false`` in the EPS settings (and no ``--eps-moe``) runs the stock model
    alone, as ``--stock-only`` does; said once, before anything runs."""
    if args.stock_only or eps.enabled:
        return
    flag = getattr(args, "eps_config_flag", "--eps-config")
    if args.eps_only:
        raise PrefillError(f"--eps-only: {flag} {args.eps_config} sets eps.enabled: false; "
                           "allowed: drop --eps-only, add --eps-moe, or set eps.enabled: true")
    args.stock_only = True
    if is_main_rank():
        print(f"note: {flag} {args.eps_config} sets eps.enabled: false: running the stock model "
              "alone (--eps-moe runs EPS beside it)", file=sys.stderr, flush=True)


def _check_expert_kernel(eps, mc, device, dtype) -> None:
    """An explicit expert_kernel must run on this device (e.g. triton needs a GPU)."""
    name = eps.expert_kernel
    if name in ("auto", "megatron"):
        return
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
    length = max(args.prompt_lengths)  # the longest prompt decides
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


# --------------------------------------------------------------------------- distributed
def init_distributed(args) -> Dict[str, int]:
    """Default process group: torchrun's env, or a world of one. NCCL on GPUs, gloo on CPU."""
    use_cuda = wants_cuda(args.device)
    if not use_cuda:
        torch.set_num_threads(args.cpu_threads)
    return initialize_distributed(args.dist_timeout, use_cuda=use_cuda)


# --------------------------------------------------------------------------- models and prompts
def swap_in_grouped_experts(model) -> int:
    """The fair baseline: every stock MoELayer's experts run as one grouped GEMM over the same
    weights (``inference.baselines``). Returns how many layers were changed."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

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


def make_prompts(seed: int, dp_rank: int, batch: int, length: int, vocab: int, device):
    """Random token ids; equal on the ranks of one TP group, different across DP ranks."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + dp_rank * 7919 + length)
    tokens = torch.randint(0, vocab, (batch, length), generator=gen, dtype=torch.long)
    return tokens.to(device)

