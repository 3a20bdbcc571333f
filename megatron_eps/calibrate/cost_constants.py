"""``megatron-eps-calibrate pipeline``: the cost model's compute and host constants on this GPU.

One EPS MoE layer of the given shape runs at ep_size 1 over a link that only copies the rows
(``LocalCopyLink``), so every stage of the pipeline runs and nothing waits for a peer:

* ``chunk_overhead_us`` (k): the slope of T(N) with overlap off, at a GPU-bound load
  (``tokens``); ``host_chunk_us`` and ``host_base_us``: the slope and intercept of the same line
  at a host-bound load (``host_tokens``). Theil-Sen fits, so one noisy timing cannot swing them.
* ``expert_tflops``: the layer's expert runner on a balanced load of ``tokens`` tokens.
* ``memory_bandwidth_gbps``: half the read+write rate of a device-local copy (the weight reads
  of a weight-bound GEMM move in one direction).
* ``sm_count``: the GPU's SMs (the GEMM SM carve-out's model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_eps.timing import fit_line, median_seconds
from megatron_eps.comm.all_to_all import AllToAll
from megatron_eps.comm.nccl import NCCLTransport

DEGREES = (1, 2, 3, 4, 5, 8, 10, 16)


@dataclass(frozen=True)
class MoEShape:
    hidden: int
    ffn: int
    experts: int  # local experts of one rank
    topk: int
    shared_ffn: Optional[int] = None


class LocalCopyLink(AllToAll):
    """A link with nothing behind it: rows are copied in place of being sent, so a layer at
    ep_size 1 runs the placement, dispatch and combine of every chunk."""

    occupies_link = True

    def __call__(self, output, input, output_splits, input_splits):
        if output.numel():
            output.copy_(input)


def build_layer(shape: MoEShape, dtype: torch.dtype, expert_kernel: str):
    """An EPSMoELayer of ``shape`` at ep_size 1 (Megatron's model-parallel state set up here)."""
    from megatron_eps.config import EPSConfig
    from megatron_eps.inference.layers import build_moe_pair, moe_config
    from megatron_eps.inference.parallel import initialize_model_parallel

    initialize_model_parallel(1, 1, expert_model_parallel_size=1)
    config = moe_config(num_experts=shape.experts, topk=shape.topk, hidden_size=shape.hidden,
                        ffn_hidden_size=shape.ffn, shared_expert_size=shape.shared_ffn, dtype=dtype)
    eps_config = EPSConfig(pipeline_degree=1, min_tokens_to_pipeline=0, expert_kernel=expert_kernel)
    _, layer = build_moe_pair(config, eps_config, seed=1)
    layer.use_transport(NCCLTransport(LocalCopyLink()))
    layer.token_dispatcher.overlap = False
    return layer


def layer_times(layer, tokens: int, degrees, device, dtype, repeats: int) -> list:
    """Seconds of one forward of ``tokens`` tokens for each N of ``degrees`` (equal chunks)."""
    from megatron_eps.policy.degree import FixedChunking

    x = torch.randn(tokens, 1, layer.config.hidden_size, device=device, dtype=dtype)
    times = []
    with torch.no_grad():
        for n in degrees:
            layer.use_chunking(FixedChunking(n))
            times.append(median_seconds(lambda: layer(x), device, repeats=repeats))
    layer.use_chunking(None)
    return times


def expert_tflops(layer, shape: MoEShape, tokens: int, device, dtype, repeats: int) -> float:
    rows_per_expert = max(1, tokens * shape.topk // shape.experts)
    tokens_per_expert = [rows_per_expert] * shape.experts
    rows = sum(tokens_per_expert)
    x = torch.randn(rows, shape.hidden, device=device, dtype=dtype)
    probs = torch.rand(rows, device=device, dtype=torch.float32)
    runner = layer.expert_runner
    with torch.no_grad():
        runner.begin_forward(layer.eps_config)
        seconds = median_seconds(lambda: runner.run(x, tokens_per_expert, probs, 0), device,
                                 repeats=repeats)
    flops = rows * 2.0 * shape.hidden * (3 * shape.ffn)  # SwiGLU: fc1 (2F) + fc2 (F)
    return flops / seconds / 1e12


def memory_bandwidth_gbps(device, repeats: int) -> float:
    numel = (1 << 29) if device.type == "cuda" else (1 << 22)
    src = torch.empty(numel, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), device, repeats=repeats, warmup=2)
    return numel * 2 / seconds / 1e9


def calibrate_pipeline(shape: MoEShape, device, dtype=torch.bfloat16, expert_kernel: str = "auto",
                       tokens: int = 16384, host_tokens: int = 1024, repeats: int = 10) -> dict:
    """``{"pipeline": constants, "measured": how each was obtained, "points": the timings}``."""
    degrees = [n for n in DEGREES if n <= shape.experts]
    if len(degrees) < 2:
        raise ValueError(f"{shape.experts} local expert(s): the chunk overhead needs >= 2 chunks")
    layer = build_layer(shape, dtype, expert_kernel)
    gpu = layer_times(layer, tokens, degrees, device, dtype, repeats)
    host = layer_times(layer, host_tokens, degrees, device, dtype, repeats)
    k, _ = fit_line(degrees, gpu)
    host_k, host_base = fit_line(degrees, host)
    section = {
        "chunk_overhead_us": max(k, 0.0) * 1e6,
        "host_chunk_us": max(host_k, 0.0) * 1e6,
        "host_base_us": max(host_base, 0.0) * 1e6,
        "expert_tflops": expert_tflops(layer, shape, tokens, device, dtype, repeats),
        "memory_bandwidth_gbps": memory_bandwidth_gbps(device, repeats),
    }
    if device.type == "cuda":
        section["sm_count"] = float(torch.cuda.get_device_properties(device).multi_processor_count)
    where = f"H{shape.hidden} F{shape.ffn} {shape.experts} local experts top-{shape.topk}"
    measured = {
        "chunk_overhead_us": f"Theil-Sen slope of T(N), overlap off, rows copied locally, "
                             f"{tokens} tokens, {where}",
        "host_chunk_us": f"the same slope at {host_tokens} tokens (host-bound); host_base_us: "
                         "its intercept",
        "expert_tflops": f"the layer's expert runner ({expert_kernel}), balanced, {tokens} tokens",
        "memory_bandwidth_gbps": "half the read+write rate of a device-local copy",
    }
    points = {"degrees": degrees, "seconds": gpu, "host_seconds": host,
              "tokens": tokens, "host_tokens": host_tokens}
    del layer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"pipeline": section, "measured": measured, "points": points}
