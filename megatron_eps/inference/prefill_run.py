"""megatron-eps-prefill's run: every mode built and timed per prompt length, in alternating
rounds, the logits compared, and the report written."""

from __future__ import annotations

import datetime
import json
import os
import statistics
import sys
import time
from typing import Dict, List

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_eps.comm.sm_control import apply_comm_cta_cap
from megatron_eps.config import EPSConfig
from megatron_eps.inference.logits import compare_logits, logits_agree
from megatron_eps.inference.model_config import load_model_config
from megatron_eps.inference.parallel import seed_model_parallel
from megatron_eps.inference.prefill_report import (device_info, eps_decisions, format_table,
                                                   ranks_share_gpu_here, run_commit, run_versions)
from megatron_eps.inference.prefill_setup import (build_model, init_distributed,
                                                  make_prompts,
                                                  swap_in_grouped_experts,
                                                  transformer_config_for, wants_cuda)
from megatron_eps.inference.prefill_timing import sync, timed_prefills

_OOM_ERRORS = tuple(
    e for e in (getattr(torch, "OutOfMemoryError", None),
                getattr(torch.cuda, "OutOfMemoryError", None)) if isinstance(e, type)
) or (MemoryError,)


def run(args) -> Dict[str, object]:
    """Every mode of ``args`` (``prefill_args.parse_args``) timed; the report (printed and
    written by rank 0)."""
    # NCCL reads its CTA cap when communicators are created: before the process group.
    apply_comm_cta_cap(EPSConfig.from_args(args).comm_num_ctas)
    dist_info = init_distributed(args)
    rank, world = dist_info["rank"], dist_info["world_size"]
    device = torch.device("cuda", torch.cuda.current_device()) if wants_cuda(args.device) else torch.device("cpu")

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
    # parse_args turned eps.enabled: false into --stock-only; where EPS runs, it is on.
    eps_config = EPSConfig.from_args(args).replace(enabled=True)
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
        seed_model_parallel(args.seed, on_cuda=device.type == "cuda")
        t0 = time.perf_counter()
        model = build_model(mc, config, eps_config if mode == "eps" else None, state_dict)
        if mode == "grouped":
            swap_in_grouped_experts(model)
        sync(device)
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
        "git_commit": run_commit(args),
        "versions": run_versions(),
        "device": device_info(device),
        "backend": dist.get_backend(),
        "ranks_share_gpu": ranks_share_gpu_here(device, dist.get_world_size()),
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
