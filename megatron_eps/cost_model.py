"""The pipeline degree N: explicit, or chosen from a calibrated cost model (EPS-MoE Sec. 5.2).

Every input to ``choose_pipeline_degree`` is data every rank of the expert-parallel group
holds (the all-gathered count matrix, the layer's shape, the config, the profile file), and the
function is deterministic, so every rank picks the same N and the chunked all-to-alls match.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from megatron_eps.config import EPSConfig


@dataclass(frozen=True)
class LayerShape:
    """Shape facts of one MoE layer the cost model needs (identical on every EP rank)."""

    hidden_size: int
    ffn_hidden_size: int
    num_local_experts: int
    ep_size: int
    topk: int
    gated: bool = True
    bytes_per_element: int = 2

    @classmethod
    def from_megatron(cls, config, num_local_experts: int, ep_size: int, dtype_bytes: int):
        return cls(
            hidden_size=config.hidden_size,
            ffn_hidden_size=config.moe_ffn_hidden_size or config.ffn_hidden_size,
            num_local_experts=num_local_experts,
            ep_size=ep_size,
            topk=config.moe_router_topk,
            gated=bool(config.gated_linear_unit),
            bytes_per_element=dtype_bytes,
        )


@dataclass(frozen=True)
class PipelineProfile:
    """Calibrated constants of the pipeline cost model for one GPU and link.

    link_bandwidth_gbps: all-to-all bytes per second per rank, in GB/s (one direction).
    link_latency_us: fixed cost of one all-to-all.
    chunk_overhead_us: k, the extra time each additional chunk costs (launches, regrouping,
        smaller GEMMs), measured to be linear in N as in the paper.
    expert_tflops: achieved expert-GEMM throughput used when no kernel cost table is given.
    """

    link_bandwidth_gbps: float
    link_latency_us: float
    chunk_overhead_us: float
    expert_tflops: float
    source: str = "unspecified"

    @classmethod
    def from_json(cls, path: str) -> "PipelineProfile":
        with open(path) as f:
            data = json.load(f)
        section = data.get("pipeline", data)
        try:
            return cls(
                link_bandwidth_gbps=float(section["link_bandwidth_gbps"]),
                link_latency_us=float(section["link_latency_us"]),
                chunk_overhead_us=float(section["chunk_overhead_us"]),
                expert_tflops=float(section["expert_tflops"]),
                source=path,
            )
        except KeyError as exc:
            raise ValueError(
                f"eps cost_profile {path!r} lacks pipeline key {exc}; expected keys: "
                "link_bandwidth_gbps, link_latency_us, chunk_overhead_us, expert_tflops"
            ) from None


def mean_tokens_per_rank(counts: np.ndarray, topk: int) -> float:
    """Input tokens per EP rank, averaged over the group (from the global count matrix)."""
    return float(np.asarray(counts).sum()) / (max(topk, 1) * max(np.asarray(counts).shape[0], 1))


def predict_times(counts: np.ndarray, shape: LayerShape, profile: PipelineProfile, ep_rank=None):
    """(T_comm, T_comp) in seconds for the unpipelined layer, for the busiest rank.

    Communication: dispatch + combine bytes that leave or enter a rank over the link.
    Computation: the expert GEMM FLOPs of the rank that receives the most rows.
    Using the busiest rank (not this rank) keeps the estimate identical on every rank.
    """
    counts = np.asarray(counts, dtype=np.int64)
    ep = shape.ep_size
    per_dst = counts.reshape(ep, ep, shape.num_local_experts)  # [src, dst, local expert]
    rows_in = per_dst.sum(axis=(0, 2))  # rows each rank computes
    remote_out = per_dst.sum(axis=(1, 2)) - np.einsum("iik->i", per_dst)  # rows sent away
    remote_in = rows_in - np.einsum("iik->i", per_dst)
    remote_rows = np.maximum(remote_out, remote_in).max(initial=0)
    if ep == 1:
        remote_rows = rows_in.max(initial=0)  # an emulated link moves every row
    row_bytes = shape.hidden_size * shape.bytes_per_element
    link = profile.link_bandwidth_gbps * 1e9
    t_comm = 2 * (remote_rows * row_bytes / link + profile.link_latency_us * 1e-6)
    fc1_width = shape.ffn_hidden_size * (2 if shape.gated else 1)
    flops_per_row = 2 * shape.hidden_size * (fc1_width + shape.ffn_hidden_size)
    t_comp = rows_in.max(initial=0) * flops_per_row / (profile.expert_tflops * 1e12)
    return float(t_comm), float(t_comp)


def pipelined_time(n: int, t_comm: float, t_comp: float, overhead_s: float) -> float:
    """Paper's model: serial time minus the hidden part L(N) plus the overhead R(N) = k N."""
    hidden = min(t_comm, t_comp) * (n - 1) / n
    return t_comm + t_comp - hidden + overhead_s * n


def choose_pipeline_degree(
    counts: np.ndarray,
    shape: LayerShape,
    eps_config: EPSConfig,
    profile: Optional[PipelineProfile] = None,
) -> int:
    """N for this forward. Deterministic in its arguments, all of which every EP rank shares.

    - Below ``min_tokens_to_pipeline`` tokens per rank (group mean): 1.
    - An explicit ``pipeline_degree``: that value, clamped to the number of local experts.
    - ``"auto"``: the N in [1, min(local experts, max_pipeline_degree)] that minimizes
      ``pipelined_time`` under ``profile``; without a profile, 1 (no calibrated model, no guess).
    """
    upper = max(1, min(shape.num_local_experts, eps_config.max_pipeline_degree))
    if mean_tokens_per_rank(counts, shape.topk) < eps_config.min_tokens_to_pipeline:
        return 1
    if eps_config.pipeline_degree != "auto":
        return max(1, min(int(eps_config.pipeline_degree), shape.num_local_experts))
    if profile is None:
        return 1
    t_comm, t_comp = predict_times(counts, shape, profile)
    overhead = profile.chunk_overhead_us * 1e-6
    best_n, best_t = 1, pipelined_time(1, t_comm, t_comp, overhead)
    for n in range(2, upper + 1):
        t = pipelined_time(n, t_comm, t_comp, overhead)
        if t < best_t * (1 - 1e-9):
            best_n, best_t = n, t
    return best_n


_PROFILE_CACHE: dict = {}


def load_pipeline_profile(path: Optional[str], device) -> Optional[PipelineProfile]:
    """The profile at ``path``, else the one shipped for this GPU (megatron_eps/profiles/)."""
    if path is None:
        path = shipped_profile_path(device)
        if path is None:
            return None
    if path not in _PROFILE_CACHE:
        with open(path) as f:
            data = json.load(f)
        _PROFILE_CACHE[path] = PipelineProfile.from_json(path) if "pipeline" in data else None
    return _PROFILE_CACHE[path]


def shipped_profile_path(device) -> Optional[str]:
    """megatron_eps/profiles/<gpu name slug>.json for a CUDA device, if it exists."""
    import torch

    if device is None or torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    slug = "".join(c.lower() if c.isalnum() else "_" for c in name).strip("_")
    path = os.path.join(os.path.dirname(__file__), "profiles", f"{slug}.json")
    return path if os.path.isfile(path) else None
