"""megatron-eps-prefill's report: where the run happened, the table, and what EPS decided."""

from __future__ import annotations

import os
import platform
import socket
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from megatron_eps import compat
from megatron_eps.comm import cuda_ops
from megatron_eps.comm.selection import ranks_share_gpu
from megatron_eps.moe_layer import EPSMoELayer
from megatron_eps.provenance import __version__, git_commit

# Where the speed figures come from (the CPU run only checks outputs and shows EPS's plan).
GPU_RESULTS_NOTE = (
    "speed figures come from the committed GPU results (README 'Results', benchmarks/results/; "
    "e.g. one DeepSeek-V2 MoE layer on two H200s at 8K / 16K / 32K tokens per rank: 1.12x / "
    "1.30x / 1.31x the stock layer with grouped-GEMM experts, 2.0x / 1.7x / 1.5x stock)"
)



# --------------------------------------------------------------------------- metadata
def run_commit(args) -> Optional[str]:
    return args.git_commit or git_commit()


def device_info(device) -> Dict[str, object]:
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


def run_versions() -> Dict[str, str]:
    """The software of this run, as the report records it."""
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "megatron_core": str(compat.MCORE_VERSION),
        "megatron_eps": __version__,
    }
    if torch.cuda.is_available():
        versions["copy_engine_copies"] = cuda_ops.copy_issue_mode()
    return versions


def ranks_share_gpu_here(device, world: int) -> bool:
    return device.type == "cuda" and world > 1 and ranks_share_gpu()



# --------------------------------------------------------------------------- formatting
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
            entry["transport"] = _transport_used(layer, record)
        out.append(entry)
    return out


def _transport_used(layer, record) -> str:
    """The transport the layer's last forward ran on, as it moved the rows: ``transport: nccl``
    is the process group's all-to-all, which on CPU ranks (or ranks sharing a GPU) is gloo's."""
    name = str(getattr(record, "transport", "") or "nccl")
    group = getattr(layer.token_dispatcher, "ep_group", None)
    if name != "nccl" or group is None or not dist.is_initialized():
        return name
    backend = str(dist.get_backend(group))
    return name if backend == "nccl" else f"{backend} all-to-all (transport: nccl)"


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

