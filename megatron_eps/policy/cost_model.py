"""The pipeline degree N: explicit, or chosen from a calibrated cost model (EPS-MoE Sec. 5.2).

Model (all times in seconds; see docs/pipeline.md for the derivation):

* Communication of chunk g: two all-to-alls (dispatch, whose rows carry their routing weights
  in 16 extra bytes, and combine), each
  ``bytes / link_bandwidth + link_latency``. The bytes of a collective are those of the busiest
  rank of the group (max over ranks of the remote rows it sends or receives), since an
  all-to-all ends when its slowest rank does.
* Computation of chunk g on rank r: the expert GEMMs of the experts in the chunk, from the
  kernel engineer's cost tables (``megatron_eps.experts.selector.predict_time``) when they
  exist, else a roofline ``max(FLOPs / expert_tflops, weight bytes / memory bandwidth)`` per
  expert. Shared experts are issued on the compute stream while dispatch 0 is in flight.
* The pipelined time of N chunks is the makespan of ``schedule.build_plan(N)`` simulated on two
  in-order streams with the plan's events (the same plan ``run_plan`` issues), plus the
  measured per-chunk overhead ``k (N - 1)``. For equal chunks this is the paper's
  ``T_comm + T_comp - min(T_comm, T_comp) (N-1)/N + k N + b``, minimal near
  ``N* = sqrt(min(T_comm, T_comp) / k)``; the simulation also covers uneven chunks, the
  shared experts and the pipeline fill/drain.
* The paper's enable condition (Sec. 4) drops N whose chunking inflates the pieces:
  ``N S(m/N) / S(m) <= 1 + eps0`` (comm) and ``sum_g G(chunk g) / G(all) <= 1 + eps1`` (GEMM).

Every input to ``choose_chunking`` is data every rank of the expert-parallel group holds
(the all-gathered count matrix, the layer's shape, the config, the profile file), and the
function is deterministic, so every rank picks the same N and the chunked all-to-alls match.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, fields
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from megatron_eps.config import EPSConfig
from megatron_eps.pipeline.layout import chunk_sizes, ranges_of_sizes
from megatron_eps.pipeline.schedule import simulate_plan

# Bytes each dispatched row carries for its routing weight (dispatcher.probs_columns).
PACKED_PROBS_BYTES_PER_ROW = 16


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
    shared_ffn_hidden_size: int = 0  # total shared-expert width (0: no shared experts)

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
            shared_ffn_hidden_size=int(
                getattr(config, "moe_shared_expert_intermediate_size", None) or 0
            ),
        )

    @property
    def fc1_width(self) -> int:
        return self.ffn_hidden_size * (2 if self.gated else 1)

    @property
    def flops_per_row(self) -> float:
        """FLOPs of one routed row through one expert (fc1 + fc2)."""
        return 2.0 * self.hidden_size * (self.fc1_width + self.ffn_hidden_size)

    @property
    def expert_weight_bytes(self) -> float:
        return float(self.hidden_size * (self.fc1_width + self.ffn_hidden_size) * self.bytes_per_element)

    @property
    def row_bytes(self) -> int:
        return self.hidden_size * self.bytes_per_element


@dataclass(frozen=True)
class PipelineProfile:
    """Calibrated constants of the pipeline cost model for one GPU and link.

    link_bandwidth_gbps: all-to-all bytes per second per rank, in GB/s (one direction).
    link_latency_us: fixed cost of one all-to-all call.
    chunk_overhead_us: k, the extra time each additional chunk costs (launches, regrouping,
        smaller GEMMs, the host issuing more work), measured to be linear in N as in the paper.
    expert_tflops: achieved expert-GEMM throughput used when no kernel cost table is given.
    chunk_overhead_base_us: b, a fixed cost of pipelining at all (N > 1).
    memory_bandwidth_gbps: device memory bandwidth for weight-bound (small-load) expert GEMMs;
        None: FLOPs only.
    overlap_efficiency: fraction of the ideally hidden time that overlap really hides (GEMMs
        slow down beside a communication kernel; 1.0 = ideal).
    comm_inflation_eps / gemm_inflation_eps: eps0 / eps1 of the paper's enable condition.
    host_chunk_us: host time to issue one chunk (dispatch, experts, combine calls). The GPU
        cannot run ahead of the host, so a layer takes at least ``host_base_us + host_chunk_us
        * N``; 0 ignores the host.
    host_base_us: host time of the layer that does not depend on N (router, permutation, the
        count matrix's sync, the unpermutation), measured with host_chunk_us.
    min_gain: ``auto`` pipelines only when the predicted time beats one chunk's by at least
        this fraction (hysteresis against the model's error; 0: any predicted gain).
    sm_count: SMs of the GPU; with ``gemm_sm_carveout`` the GEMMs of an overlapped plan get
        ``sm_count - carveout`` of them, so their time is scaled by ``sm_count / (sm_count -
        carveout)``. None: the carve-out is not modeled.
    link_piece_us: fixed time of each copy a copy-engine transport issues (one per peer and
        expert of a chunk), on top of ``link_latency_us`` per chunk; 0 for NCCL.
    emulated_remote_fraction: only for the single-GPU link emulator (benchmarks): with
        ep_size 1 the link moves this fraction of every row (7/8 emulates rank 0 of EP=8). None
        (every real deployment): at ep_size 1 nothing crosses a link.
    """

    link_bandwidth_gbps: float
    link_latency_us: float
    chunk_overhead_us: float
    expert_tflops: float
    source: str = "unspecified"
    chunk_overhead_base_us: float = 0.0
    memory_bandwidth_gbps: Optional[float] = None
    overlap_efficiency: float = 1.0
    comm_inflation_eps: float = 0.32
    gemm_inflation_eps: float = 0.03
    emulated_remote_fraction: Optional[float] = None
    host_chunk_us: float = 0.0
    host_base_us: float = 0.0
    min_gain: float = 0.0
    sm_count: Optional[float] = None
    link_piece_us: float = 0.0

    _REQUIRED = ("link_bandwidth_gbps", "link_latency_us", "chunk_overhead_us", "expert_tflops")

    def __post_init__(self):
        for name in ("link_bandwidth_gbps", "expert_tflops"):
            if not getattr(self, name) > 0:
                raise ValueError(f"pipeline profile {name} must be > 0, got {getattr(self, name)}")
        for name in (
            "link_latency_us",
            "chunk_overhead_us",
            "chunk_overhead_base_us",
            "host_chunk_us",
            "host_base_us",
            "link_piece_us",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"pipeline profile {name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.min_gain < 1.0:
            raise ValueError(f"min_gain must be in [0, 1), got {self.min_gain}")
        if not 0.0 <= self.overlap_efficiency <= 1.0:
            raise ValueError(f"overlap_efficiency must be in [0, 1], got {self.overlap_efficiency}")

    @classmethod
    def from_dict(cls, section: dict, source: str = "dict") -> "PipelineProfile":
        missing = [k for k in cls._REQUIRED if k not in section]
        if missing:
            raise ValueError(
                f"eps cost_profile {source!r} lacks pipeline key(s) {', '.join(missing)}; "
                f"expected keys: {', '.join(cls._REQUIRED)}"
            )
        known = {f.name for f in fields(cls)} - {"source"}
        values = {k: section[k] for k in known if k in section and section[k] is not None}
        for k, v in list(values.items()):
            values[k] = float(v)
        return cls(source=source, **values)

    @classmethod
    def from_json(cls, path: str) -> "PipelineProfile":
        with open(path) as f:
            data = json.load(f)
        return cls.from_dict(data.get("pipeline", data), source=path)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "source"}


# --------------------------------------------------------------------------- communication
def mean_tokens_per_rank(counts: np.ndarray, topk: int) -> float:
    """Input tokens per EP rank, averaged over the group (from the global count matrix)."""
    return float(np.asarray(counts).sum()) / (max(topk, 1) * max(np.asarray(counts).shape[0], 1))


def _per_dst(counts: np.ndarray, shape: LayerShape) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.int64)
    ep = shape.ep_size
    if counts.shape != (ep, ep * shape.num_local_experts):
        raise ValueError(
            f"count matrix shape {counts.shape} does not match ep_size={ep}, "
            f"num_local_experts={shape.num_local_experts}"
        )
    return counts.reshape(ep, ep, shape.num_local_experts)  # [src, dst, local expert]


def _remote_rows_per_chunk(per_dst: np.ndarray, starts: Sequence[int], profile: PipelineProfile):
    """[chunk] rows the busiest rank moves over the link in each chunk's all-to-all.

    ``per_dst`` [src, dst, local expert]; chunk g holds local experts starts[g]..starts[g+1]-1.
    """
    ep = per_dst.shape[0]
    pair = np.add.reduceat(per_dst, list(starts), axis=2).astype(np.float64)  # [src, dst, chunk]
    if ep == 1:
        if profile.emulated_remote_fraction is None:
            return np.zeros(pair.shape[2])
        return pair[0, 0] * profile.emulated_remote_fraction
    local = np.einsum("iig->ig", pair)  # [rank, chunk]
    sent = pair.sum(axis=1) - local
    received = pair.sum(axis=0) - local
    return np.maximum(sent, received).max(axis=0)


def collective_time(remote_rows, row_bytes: float, profile: PipelineProfile):
    """One all-to-all call: bytes over the link plus the call's latency; 0 if nothing moves."""
    rows = np.asarray(remote_rows, dtype=np.float64)
    t = rows * row_bytes / (profile.link_bandwidth_gbps * 1e9) + profile.link_latency_us * 1e-6
    t = np.where(rows > 0, t, 0.0)
    return float(t) if t.ndim == 0 else t


def _chunk_ranges(shape: LayerShape, chunking) -> List[Tuple[int, int]]:
    return ranges_of_sizes(chunk_sizes(shape.num_local_experts, chunking))


def chunk_comm_times(
    counts: np.ndarray, shape: LayerShape, profile: PipelineProfile, chunking
) -> Tuple[List[float], List[float]]:
    """(dispatch, combine) seconds of each chunk; the same on every rank (max over ranks).

    ``chunking``: N (equal chunks) or the number of local experts in each chunk."""
    ranges = _chunk_ranges(shape, chunking)
    starts = [s for s, _ in ranges]
    rows = _remote_rows_per_chunk(_per_dst(counts, shape), starts, profile)
    dispatch = collective_time(rows, shape.row_bytes + PACKED_PROBS_BYTES_PER_ROW, profile)
    combine = collective_time(rows, shape.row_bytes, profile)
    if profile.link_piece_us:
        # Copy-engine transports copy one piece per (peer, expert) of the chunk (the combine
        # also one per expert for this rank's own rows); each costs the copy engine a fixed time.
        experts = np.array([b - a for a, b in ranges], dtype=np.float64)
        piece = profile.link_piece_us * 1e-6 * experts
        dispatch = dispatch + piece * (shape.ep_size - 1)
        combine = combine + piece * shape.ep_size
    return [float(x) for x in dispatch], [float(x) for x in combine]


# --------------------------------------------------------------------------- computation
def _kernel_table_time(kernel_profile, shape: LayerShape, tokens_per_expert) -> Optional[float]:
    """Seconds from the kernel engineer's cost tables, or None when they are not available."""
    if kernel_profile is None:
        return None
    try:
        from megatron_eps.experts import selector
    except ImportError:
        return None
    predict = getattr(selector, "predict_time", None)
    if predict is None:
        return None
    try:
        value = predict(kernel_profile, None, shape, list(int(t) for t in tokens_per_expert))
    except Exception:  # noqa: BLE001 - an incompatible table falls back to the roofline
        return None
    return None if value is None else float(value)


def experts_time(
    tokens_per_expert: Sequence[int],
    shape: LayerShape,
    profile: PipelineProfile,
    kernel_profile=None,
) -> float:
    """Seconds of the expert GEMMs for these rows per expert (one backend call)."""
    table = _kernel_table_time(kernel_profile, shape, tokens_per_expert)
    if table is not None:
        return table
    rate = profile.expert_tflops * 1e12
    total = 0.0
    for rows in tokens_per_expert:
        if rows <= 0:
            continue  # an empty expert costs no tiles and reads no weights
        t = rows * shape.flops_per_row / rate
        if profile.memory_bandwidth_gbps:
            t = max(t, shape.expert_weight_bytes / (profile.memory_bandwidth_gbps * 1e9))
        total += t
    return total


def shared_experts_time(tokens: float, shape: LayerShape, profile: PipelineProfile) -> float:
    if shape.shared_ffn_hidden_size <= 0 or tokens <= 0:
        return 0.0
    width = shape.shared_ffn_hidden_size
    flops = 2.0 * tokens * shape.hidden_size * (width * (2 if shape.gated else 1) + width)
    t = flops / (profile.expert_tflops * 1e12)
    if profile.memory_bandwidth_gbps:
        weights = shape.hidden_size * width * (3 if shape.gated else 2) * shape.bytes_per_element
        t = max(t, weights / (profile.memory_bandwidth_gbps * 1e9))
    return t


def chunk_compute_times(
    counts: np.ndarray,
    shape: LayerShape,
    profile: PipelineProfile,
    chunking,
    kernel_profile=None,
    _per_expert: Optional[np.ndarray] = None,
) -> np.ndarray:
    """[rank, chunk] seconds of each rank's expert GEMMs per chunk."""
    ranges = _chunk_ranges(shape, chunking)
    if _per_expert is None:
        _per_expert = _per_expert_times(counts, shape, profile, kernel_profile)
    if _per_expert is not None:
        return np.add.reduceat(_per_expert, [start for start, _ in ranges], axis=1)
    rows = _per_dst(counts, shape).sum(axis=0)  # [dst rank, local expert]
    out = np.zeros((shape.ep_size, len(ranges)))
    for r in range(shape.ep_size):
        for g, (start, end) in enumerate(ranges):
            out[r, g] = experts_time(rows[r, start:end], shape, profile, kernel_profile)
    return out


def _per_expert_times(counts, shape, profile, kernel_profile) -> Optional[np.ndarray]:
    """[rank, local expert] roofline seconds, or None when kernel tables decide per call."""
    rows = _per_dst(counts, shape).sum(axis=0)
    if kernel_profile is not None and _kernel_table_time(kernel_profile, shape, rows[0, :1]) is not None:
        return None
    return _roofline_expert_times(rows, shape, profile)


def _roofline_expert_times(rows: np.ndarray, shape: LayerShape, profile: PipelineProfile):
    rows = np.asarray(rows, dtype=np.float64)
    t = rows * shape.flops_per_row / (profile.expert_tflops * 1e12)
    if profile.memory_bandwidth_gbps:
        t = np.maximum(t, shape.expert_weight_bytes / (profile.memory_bandwidth_gbps * 1e9))
    return np.where(rows > 0, t, 0.0)


def pipelined_time(n: int, t_comm: float, t_comp: float, overhead_s: float) -> float:
    """Paper's closed form for equal chunks: serial time minus the hidden part L(N) plus R(N) = k N."""
    hidden = min(t_comm, t_comp) * (n - 1) / n
    return t_comm + t_comp - hidden + overhead_s * n


@dataclass(frozen=True)
class Prediction:
    """Model outputs for one N (seconds)."""

    num_chunks: int
    t_comm: float  # all collectives, serial
    t_comp: float  # expert + shared GEMMs of the busiest rank, serial
    t_serial: float  # everything on one stream (the N-chunk plan without overlap), + overhead
    t_pipelined: float  # overlapped makespan incl. overhead
    enabled: bool  # the paper's enable condition holds for this N


class _Inputs:
    """What every N shares for one count matrix (computed once per forward)."""

    def __init__(self, counts, shape: LayerShape, profile: PipelineProfile, kernel_profile=None):
        self.per_expert = _per_expert_times(counts, shape, profile, kernel_profile)
        tokens = np.asarray(counts).sum(axis=1) / max(shape.topk, 1)
        self.shared = np.array([shared_experts_time(float(t), shape, profile) for t in tokens])
        self.one_chunk = (
            chunk_comm_times(counts, shape, profile, 1),
            chunk_compute_times(counts, shape, profile, 1, kernel_profile, self.per_expert),
        )


def predict(
    counts: np.ndarray,
    shape: LayerShape,
    profile: PipelineProfile,
    chunking,
    kernel_profile=None,
    _inputs: Optional[_Inputs] = None,
    dispatch_ahead: Optional[int] = None,
    gemm_sm_carveout: Optional[int] = None,
) -> Prediction:
    """The model's times for ``chunking`` (N equal chunks, or experts per chunk); identical on
    every rank.

    The all-to-alls couple the ranks: chunk g's combine ends only once every rank has finished
    X(g), so the plan is simulated with each chunk's GEMM time of its slowest rank.
    """
    if _inputs is None:
        _inputs = _Inputs(counts, shape, profile, kernel_profile)
    dispatch, combine = chunk_comm_times(counts, shape, profile, chunking)
    compute = chunk_compute_times(counts, shape, profile, chunking, kernel_profile, _inputs.per_expert)
    num_chunks = len(dispatch)
    shared = _inputs.shared
    enabled = True
    if num_chunks > 1:
        # The paper's condition is about splitting itself: judged on GEMM times at full SMs.
        enabled = _enable_condition((dispatch, combine, compute), *_inputs.one_chunk, profile)
    if num_chunks > 1 and gemm_sm_carveout and profile.sm_count:
        # dispatcher: the carve-out holds only while chunks overlap (N > 1)
        slowdown = profile.sm_count / max(profile.sm_count - gemm_sm_carveout, 1.0)
        compute, shared = compute * slowdown, shared * slowdown
    overhead = profile.chunk_overhead_us * 1e-6 * (num_chunks - 1)
    if num_chunks > 1:
        overhead += profile.chunk_overhead_base_us * 1e-6
    t_comm = float(sum(dispatch) + sum(combine))
    slowest = compute.max(axis=0).tolist() if compute.size else [0.0] * num_chunks
    s = float(shared.max(initial=0.0))
    serial = t_comm + float(sum(slowest)) + s
    ideal = simulate_plan(dispatch, slowest, combine, s, dispatch_ahead)
    gpu = serial - (serial - ideal) * profile.overlap_efficiency + overhead
    # The host bound counts the layer's fixed host time; the GPU side leaves the same fixed
    # work (router, permutation) out, which only errs towards fewer chunks when host-bound.
    host = (profile.host_base_us + profile.host_chunk_us * num_chunks) * 1e-6
    return Prediction(
        num_chunks=num_chunks,
        t_comm=t_comm,
        t_comp=float((compute.sum(axis=1) + shared).max(initial=0.0)),
        t_serial=max(serial + overhead, host),
        t_pipelined=max(gpu, host),
        enabled=enabled,
    )


def _enable_condition(chunked, comm_one, compute_one, profile: PipelineProfile) -> bool:
    dispatch, combine, compute = chunked
    comm_1 = sum(comm_one[0]) + sum(comm_one[1])
    if comm_1 > 0 and (sum(dispatch) + sum(combine)) / comm_1 > 1 + profile.comm_inflation_eps:
        return False
    g1, gn = compute_one.sum(axis=1), compute.sum(axis=1)
    for one, many in zip(g1, gn):
        if one > 0 and many / one > 1 + profile.gemm_inflation_eps:
            return False
    return True


def enable_condition(
    counts: np.ndarray, shape: LayerShape, profile: PipelineProfile, chunking, kernel_profile=None
) -> bool:
    """The paper's condition: chunking inflates neither the collectives (N S(m/N) / S(m) <=
    1 + eps0) nor the GEMMs (sum of chunk GEMM times / one-call time <= 1 + eps1)."""
    chunked = chunk_comm_times(counts, shape, profile, chunking) + (
        chunk_compute_times(counts, shape, profile, chunking, kernel_profile),
    )
    return _enable_condition(
        chunked,
        chunk_comm_times(counts, shape, profile, 1),
        chunk_compute_times(counts, shape, profile, 1, kernel_profile),
        profile,
    )


def predict_times(counts: np.ndarray, shape: LayerShape, profile: PipelineProfile, ep_rank=None):
    """(T_comm, T_comp) in seconds for the unpipelined layer, for the busiest rank."""
    p = predict(counts, shape, profile, 1)
    return p.t_comm, p.t_comp


def candidate_degrees(shape: LayerShape, eps_config: EPSConfig) -> List[int]:
    upper = max(1, min(shape.num_local_experts, eps_config.max_pipeline_degree))
    return list(range(1, upper + 1))


def candidate_chunkings(
    shape: LayerShape, eps_config: EPSConfig, families: Sequence[str] = ("equal",)
) -> List[Tuple[int, ...]]:
    """The multi-chunk splits ``pipeline_degree="auto"`` compares, in order (fewer chunks first).

    For each split family and each distinct size of the largest chunk, the fewest chunks that
    reach it: a chunk's GEMMs and all-to-alls scale with its experts, so the largest chunk sets
    the pipeline's step, while every extra chunk adds overhead (20 experts: N = 2, 3, 4, 5, 7,
    10, 20). Not a heuristic cut-off: the predicted time is not convex in N (uneven splits), so
    every candidate is evaluated.
    """
    experts = shape.num_local_experts
    out, seen_largest = [], set()
    for family in families:
        seen_largest.clear()
        for n in candidate_degrees(shape, eps_config)[1:]:
            sizes = chunk_sizes(experts, n, family)
            largest = max(sizes)
            if largest in seen_largest or sizes in out:
                continue
            seen_largest.add(largest)
            out.append(sizes)
    return out


def choose_chunking(
    counts: np.ndarray,
    shape: LayerShape,
    eps_config: EPSConfig,
    profile: Optional[PipelineProfile] = None,
    kernel_profile=None,
    dispatch_ahead: Optional[int] = None,
    split: Optional[str] = None,
) -> Tuple[int, ...]:
    """Local experts per chunk for this forward (N = the tuple's length).

    Deterministic in its arguments, all of which every EP rank shares:

    - Below ``min_tokens_to_pipeline`` tokens per rank (group mean): one chunk.
    - An explicit ``pipeline_degree`` N: N chunks (clamped to [1, local experts]), split as
      ``split`` says (default ``eps_config.chunk_split``; ``auto`` means equal here).
    - ``"auto"``: the chunking with the least predicted time among N in [1, min(local experts,
      max_pipeline_degree)] and the splits allowed (``auto``: equal and tail), subject to the
      enable condition (ties: fewer chunks, then the equal split); without a profile, one chunk.

    Decisions under ``"auto"`` are cached by a coarse summary of the count matrix (every
    count to within 2^(1/8), about 9%): equal summaries get the decision of the first count
    matrix seen with that summary. All ranks see the same matrices in the same order, so their
    caches, and their choices, stay identical.
    """
    experts = shape.num_local_experts
    split = split or eps_config.chunk_split
    if mean_tokens_per_rank(counts, shape.topk) < eps_config.min_tokens_to_pipeline:
        return (experts,)
    if eps_config.pipeline_degree != "auto":
        n = max(1, min(int(eps_config.pipeline_degree), experts))
        return chunk_sizes(experts, n, "tail" if split == "tail" else "equal")
    if profile is None:
        return (experts,)
    if shape.ep_size == 1 and profile.emulated_remote_fraction is None:
        return (experts,)  # no all-to-all at all: nothing to overlap, so skip the model's host time
    counts = np.asarray(counts, dtype=np.int64)
    key = (
        _load_summary(counts),
        shape,
        profile,
        id(kernel_profile),
        dispatch_ahead,
        split,
        eps_config.max_pipeline_degree,
        eps_config.gemm_sm_carveout,
    )
    cached = _DECISIONS.get(key)
    if cached is not None:
        return cached
    families = ("equal", "tail") if split == "auto" else (split,)
    inputs = _Inputs(counts, shape, profile, kernel_profile)
    best = (experts,)
    carveout = eps_config.gemm_sm_carveout
    best_t = predict(counts, shape, profile, best, kernel_profile, inputs, dispatch_ahead).t_pipelined
    best_t *= 1.0 - profile.min_gain  # what a multi-chunk split must beat
    for sizes in candidate_chunkings(shape, eps_config, families):
        p = predict(counts, shape, profile, sizes, kernel_profile, inputs, dispatch_ahead, carveout)
        if p.enabled and p.t_pipelined < best_t * (1 - 1e-9):
            best, best_t = sizes, p.t_pipelined
    if len(_DECISIONS) >= _DECISION_CACHE_SIZE:
        _DECISIONS.pop(next(iter(_DECISIONS)))  # oldest first: the same on every rank
    _DECISIONS[key] = best
    return best


_DECISIONS: Dict[tuple, Tuple[int, ...]] = {}
_DECISION_CACHE_SIZE = 1024


def _load_summary(counts: np.ndarray) -> bytes:
    """The count matrix to within a factor 2^(1/8) per entry (the cache key of choose_chunking)."""
    return np.rint(np.log2(1.0 + counts) * 8.0).astype(np.int16).tobytes() + str(counts.shape).encode()


def optimal_degree_closed_form(t_comm: float, t_comp: float, chunk_overhead_s: float) -> float:
    """The paper's N* = sqrt(min(T_comm, T_comp) / k) (continuous)."""
    if chunk_overhead_s <= 0:
        return math.inf
    return math.sqrt(min(t_comm, t_comp) / chunk_overhead_s)


# --------------------------------------------------------------------------- profiles
_PROFILE_CACHE: dict = {}


def load_pipeline_profile(
    path: Optional[str], device, transport: Optional[str] = None
) -> Optional[PipelineProfile]:
    """The profile at ``path``, else the one shipped for this GPU (megatron_eps/profiles/).

    With ``transport`` ("nccl", "copy_engine"), the link figures calibrated for that transport
    (the file's ``links`` section: link_bandwidth_gbps, link_latency_us, overlap_efficiency,
    chunk_overhead_us) replace the pipeline section's, when the file has them.

    A file without the pipeline keys (e.g. a kernel-only cost table) gives None. A file that is
    no valid profile (corrupt JSON, a list, ``{}``, a malformed section) raises EPSConfigError
    naming ``cost_profile``; one measured on another device is used, with a warning (once).
    """
    if path is None:
        path = shipped_profile_path(device)
        if path is None:
            return None
    if path not in _PROFILE_CACHE:
        from megatron_eps.config import (
            check_cost_profile_file,
            read_cost_profile_json,
        )

        # Corrupt, empty or malformed files: EPSConfigError (a ValueError) naming cost_profile.
        holds = check_cost_profile_file(path)
        data = read_cost_profile_json(path)
        section = data.get("pipeline", data)
        _PROFILE_CACHE[path] = (
            PipelineProfile.from_dict(section, source=path) if holds["pipeline"] else None
        )
        links = data.get("links", {}) if isinstance(data, dict) else {}
        _LINKS_CACHE[path] = links if isinstance(links, dict) else {}
    if _PROFILE_CACHE[path] is not None and device is not None:
        from megatron_eps.config import warn_if_profile_for_other_device
        from megatron_eps.experts.selector import device_name

        warn_if_profile_for_other_device(path, device_name(device))
    profile = _PROFILE_CACHE[path]
    link = _LINKS_CACHE[path].get(transport) if transport else None
    if profile is None or not link:
        return profile
    key = (path, transport)
    if key not in _LINK_PROFILES:
        known = {f.name for f in fields(PipelineProfile)} - {"source"}
        unknown = sorted(set(link) - known)
        if unknown:
            from megatron_eps.config import EPSConfigError

            raise EPSConfigError(
                f"eps cost_profile {path!r}: links.{transport} has unknown key(s) "
                f"{', '.join(unknown)}"
            )
        _LINK_PROFILES[key] = dataclasses.replace(
            profile, source=f"{path} [{transport}]", **{k: float(v) for k, v in link.items()}
        )
    return _LINK_PROFILES[key]


_LINKS_CACHE: Dict[str, dict] = {}
_LINK_PROFILES: Dict[tuple, PipelineProfile] = {}


def gpu_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia_h100_80gb_hbm3'."""
    return "".join(c.lower() if c.isalnum() else "_" for c in name).strip("_")


def shipped_profile_path(device) -> Optional[str]:
    """megatron_eps/profiles/<gpu name slug>.json for a CUDA device, if it exists: the one
    profile file per GPU, with ``experts`` (kernel tables), ``pipeline`` and ``links`` sections.
    """
    import torch

    if device is None or torch.device(device).type != "cuda":
        return None
    slug = gpu_slug(torch.cuda.get_device_name(device))
    path = os.path.join(os.path.dirname(__file__), "profiles", f"{slug}.json")
    return path if os.path.isfile(path) else None
