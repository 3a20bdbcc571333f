"""The cost model of the pipelined forward: predicted times of a chunking (EPS-MoE Sec. 5.2).

Model (all times in seconds; see docs/pipeline.md for the derivation):

* Communication of chunk g: two all-to-alls (dispatch, whose rows carry their routing weights
  in 16 extra bytes, and combine), each
  ``bytes / link_bandwidth + link_latency``. The bytes of a collective are those of the busiest
  rank of the group (max over ranks of the remote rows it sends or receives), since an
  all-to-all ends when its slowest rank does.
* Computation of chunk g on rank r: the expert GEMMs of the experts in the chunk, from the
  kernel engineer's cost tables (``policy.kernel_tables.predict_time``) when they
  exist, else a roofline ``max(FLOPs / expert_tflops, weight bytes / memory bandwidth)`` per
  expert. Shared experts are issued on the compute stream while dispatch 0 is in flight.
* The pipelined time of N chunks is the makespan of ``schedule.build_plan(N)`` simulated on two
  in-order streams with the plan's events (the same plan ``run_plan`` issues), plus the
  measured per-chunk overhead ``k (N - 1)``. For equal chunks this is the paper's
  ``T_comm + T_comp - min(T_comm, T_comp) (N-1)/N + k N + b``, minimal near
  ``N* = sqrt(min(T_comm, T_comp) / k)``; the simulation also covers uneven chunks, the
  shared experts, the pipeline fill/drain and (``local_rows_apart``) each chunk's GEMMs over
  a rank's own rows as a call of their own.
* The paper's enable condition (Sec. 4) drops N whose chunking inflates the pieces:
  ``N S(m/N) / S(m) <= 1 + eps0`` (comm) and ``sum_g G(chunk g) / G(all) <= 1 + eps1`` (GEMM).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from megatron_eps.policy.chunks import chunk_sizes, local_head_rows, ranges_of_sizes
from megatron_eps.policy.schedule import simulate_plan
from megatron_eps.policy.kernel_tables import predict_time
from megatron_eps.policy.profile import PipelineProfile

# Bytes each dispatched row carries for its routing weight (permutation.probs_columns).
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


# --------------------------------------------------------------------------- communication
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
    pair = np.add.reduceat(per_dst, list(starts), axis=2).astype(np.float64)  # [src, dst, chunk]
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


def dedup_meta_bytes(shape: LayerShape, experts_in_chunk: int) -> int:
    """Bytes a deduplicated row carries behind the hidden state: an int32 index and an fp32
    weight per slot, padded to 16 bytes (pipeline.rows.dedup.meta_columns)."""
    slots = max(1, min(shape.topk, experts_in_chunk))
    return -(-slots * 8 // 16) * 16


def _unique_rows(range_counts: np.ndarray, ranges) -> np.ndarray:
    """[src, dst, chunk] rows of the deduplicated scheme (one per token, rank and chunk)."""
    range_counts = np.asarray(range_counts, dtype=np.int64)
    return np.stack([range_counts[:, :, a, b] for a, b in ranges], axis=2)


def chunk_comm_times(
    counts: np.ndarray, shape: LayerShape, profile: PipelineProfile, chunking,
    range_counts: Optional[np.ndarray] = None,
    partial_sum_bytes: Optional[int] = None,
) -> Tuple[List[float], List[float]]:
    """(dispatch, combine) seconds of each chunk; the same on every rank (max over ranks).

    ``chunking``: N (equal chunks) or the number of local experts in each chunk.
    ``range_counts`` [src, dst, L, L + 1] (dispatch_dedup): the rows are one per (token, rank,
    chunk), read from the unique-token counts of each chunk's experts; a token with experts in
    two chunks of a rank travels twice, so more chunks save less. ``partial_sum_bytes``: bytes
    per element of the combine's partial sums (None: the model's)."""
    ranges = _chunk_ranges(shape, chunking)
    if range_counts is not None:
        widest = max(b - a for a, b in ranges)
        return unique_rows_comm_times(_unique_rows(range_counts, ranges), shape, profile, widest,
                                      partial_sum_bytes)
    rows = _remote_rows_per_chunk(_per_dst(counts, shape), [s for s, _ in ranges], profile)
    experts = np.array([b - a for a, b in ranges], dtype=np.float64)
    return _link_times(rows, shape.row_bytes + PACKED_PROBS_BYTES_PER_ROW, shape.row_bytes,
                       experts, shape, profile)


def unique_rows_comm_times(
    unique: np.ndarray, shape: LayerShape, profile: PipelineProfile, experts_per_row: int,
    partial_sum_bytes: Optional[int] = None,
) -> Tuple[List[float], List[float]]:
    """(dispatch, combine) seconds of each chunk of the deduplicated scheme, whatever the chunks
    are: ``unique`` [src, dst, chunk] rows (one per token, rank and chunk); a row carries the
    expert ids and weights of up to ``experts_per_row`` experts (the widest chunk's)."""
    rows = _remote_rows_per_chunk(unique, list(range(unique.shape[2])), profile)
    combine_row = shape.hidden_size * partial_sum_bytes if partial_sum_bytes else shape.row_bytes
    # Deduplicated rows travel as one piece per (peer, chunk) (for_unique_rows).
    return _link_times(rows, shape.row_bytes + dedup_meta_bytes(shape, experts_per_row),
                       combine_row, np.ones(unique.shape[2]), shape, profile)


def _link_times(rows, dispatch_row: float, combine_row: float, pieces, shape: LayerShape,
                profile: PipelineProfile):
    dispatch = collective_time(rows, dispatch_row, profile)
    combine = collective_time(rows, combine_row, profile)
    if profile.link_piece_us:
        # Copy-engine transports copy ``pieces`` per peer of the chunk (the combine as many again
        # for this rank's own rows); each costs the copy engine a fixed time.
        piece = profile.link_piece_us * 1e-6 * np.asarray(pieces, dtype=np.float64)
        dispatch = dispatch + piece * (shape.ep_size - 1)
        combine = combine + piece * shape.ep_size
    return [float(x) for x in dispatch], [float(x) for x in combine]


# --------------------------------------------------------------------------- computation
def _kernel_table_time(kernel_profile, shape: LayerShape, tokens_per_expert) -> Optional[float]:
    """Seconds from the kernel engineer's cost tables, or None when they are not available."""
    if kernel_profile is None:
        return None
    try:
        value = predict_time(kernel_profile, None, shape, list(int(t) for t in tokens_per_expert))
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


def rows_per_expert(counts: np.ndarray, shape: LayerShape) -> np.ndarray:
    """[rank, local expert] rows each rank's experts receive."""
    return _per_dst(counts, shape).sum(axis=0)


def local_part_rows(counts: np.ndarray, shape: LayerShape) -> np.ndarray:
    """[rank, local expert] rows of each rank's local part with the local rows apart: whole
    row tiles of the rows it routed to its own experts (``chunks.local_head_rows``)."""
    ranks = np.arange(shape.ep_size)
    return local_head_rows(_per_dst(counts, shape)[ranks, ranks])


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
    rows = rows_per_expert(counts, shape)
    if _per_expert is None:
        _per_expert = _per_expert_times(rows, shape, profile, kernel_profile)
    if _per_expert is not None:
        return np.add.reduceat(_per_expert, [start for start, _ in ranges], axis=1)
    out = np.zeros((shape.ep_size, len(ranges)))
    for r in range(shape.ep_size):
        for g, (start, end) in enumerate(ranges):
            out[r, g] = experts_time(rows[r, start:end], shape, profile, kernel_profile)
    return out


def _per_expert_times(rows, shape, profile, kernel_profile) -> Optional[np.ndarray]:
    """[rank, local expert] roofline seconds of ``rows`` [rank, local expert], or None when
    kernel tables decide per call."""
    if kernel_profile is not None and _kernel_table_time(kernel_profile, shape, rows[0, :1]) is not None:
        return None
    return _roofline_expert_times(rows, shape, profile)


def _roofline_expert_times(rows: np.ndarray, shape: LayerShape, profile: PipelineProfile):
    rows = np.asarray(rows, dtype=np.float64)
    t = rows * shape.flops_per_row / (profile.expert_tflops * 1e12)
    if profile.memory_bandwidth_gbps:
        t = np.maximum(t, shape.expert_weight_bytes / (profile.memory_bandwidth_gbps * 1e9))
    return np.where(rows > 0, t, 0.0)


@dataclass(frozen=True)
class Prediction:
    """Model outputs for one N (seconds)."""

    num_chunks: int
    t_comm: float  # all collectives, serial
    t_comp: float  # expert + shared GEMMs of the busiest rank, serial
    t_serial: float  # everything on one stream (the N-chunk plan without overlap), + overhead
    t_pipelined: float  # overlapped makespan incl. overhead
    enabled: bool  # the paper's enable condition holds for this N


class CountInputs:
    """What every N shares for one count matrix (computed once per forward)."""

    def __init__(self, counts, shape: LayerShape, profile: PipelineProfile, kernel_profile=None,
                 range_counts=None, partial_sum_bytes=None):
        self.range_counts, self.partial_sum_bytes = range_counts, partial_sum_bytes
        self._rows = rows_per_expert(counts, shape)
        self.per_expert = _per_expert_times(self._rows, shape, profile, kernel_profile)
        self._counts, self._shape, self._local_rows = counts, shape, None
        tokens = np.asarray(counts).sum(axis=1) / max(shape.topk, 1)
        self.shared = np.array([shared_experts_time(float(t), shape, profile) for t in tokens])
        self.one_chunk = (
            chunk_comm_times(counts, shape, profile, 1, range_counts, partial_sum_bytes),
            chunk_compute_times(counts, shape, profile, 1, kernel_profile, self.per_expert),
        )

    def local_fraction(self, chunking) -> np.ndarray:
        """[rank, chunk] the share of each rank's rows in a chunk that its local part takes
        (local rows apart)."""
        if self._local_rows is None:
            self._local_rows = local_part_rows(self._counts, self._shape)
        starts = [a for a, _ in _chunk_ranges(self._shape, chunking)]
        local = np.add.reduceat(self._local_rows, starts, axis=1)
        return local / np.maximum(np.add.reduceat(self._rows, starts, axis=1), 1)


def predict(
    counts: np.ndarray,
    shape: LayerShape,
    profile: PipelineProfile,
    chunking,
    kernel_profile=None,
    _inputs: Optional[CountInputs] = None,
    dispatch_ahead: Optional[int] = None,
    gemm_sm_carveout: Optional[int] = None,
    range_counts: Optional[np.ndarray] = None,
    partial_sum_bytes: Optional[int] = None,
    local_rows_apart: bool = False,
) -> Prediction:
    """The model's times for ``chunking`` (N equal chunks, or experts per chunk); identical on
    every rank.

    The all-to-alls couple the ranks: chunk g's combine ends only once every rank has finished
    X(g), so the plan is simulated with each chunk's GEMM time of its slowest rank.
    ``range_counts``, ``partial_sum_bytes``: the deduplicated scheme (``chunk_comm_times``).
    ``local_rows_apart``: each chunk's GEMMs are two calls, over the local part and over the
    rest (``schedule.build_plan(local_apart=True)``). The chunk's GEMM time splits between them
    by rows (the chunk's slowest rank's), and the second call costs one more chunk overhead:
    whole row tiles in the local part keep the tiles of one call, and on one H200 the two calls
    of DSV2 at EP=2 took 2-3% more GEMM time than one at 8K-32K tokens/rank
    (benchmarks/results/transport/local_rows_tradeoff_h200_17511ff.json). Charging each call a roofline
    with its own weight read instead predicted apart at 1.5x the time of together at 4K.
    """
    if _inputs is None:
        _inputs = CountInputs(counts, shape, profile, kernel_profile, range_counts, partial_sum_bytes)
    dispatch, combine = chunk_comm_times(counts, shape, profile, chunking, _inputs.range_counts,
                                         _inputs.partial_sum_bytes)
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
    overhead = chunking_overhead(num_chunks, profile)
    t_comm = float(sum(dispatch) + sum(combine))
    slowest = compute.max(axis=0) if compute.size else np.zeros(num_chunks)
    slowest_local, second_calls = None, 0.0
    if local_rows_apart and compute.size:
        # The slowest rank's two calls of each chunk: its time split by its local share.
        share = _inputs.local_fraction(chunking)[compute.argmax(axis=0), np.arange(num_chunks)]
        slowest_local = (slowest * share).tolist()
        slowest = slowest * (1.0 - share)
        second_calls = profile.chunk_overhead_us * 1e-6 * num_chunks
    slowest = slowest.tolist()
    s = float(shared.max(initial=0.0))
    serial = t_comm + float(sum(slowest)) + float(sum(slowest_local or ())) + s
    gpu = overlapped_time(dispatch, slowest, combine, s, profile, dispatch_ahead,
                          slowest_local) + second_calls
    # The host bound counts the layer's fixed host time; the GPU side leaves the same fixed
    # work (router, permutation) out, which only errs towards fewer chunks when host-bound.
    host = (profile.host_base_us + profile.host_chunk_us * num_chunks) * 1e-6
    return Prediction(
        num_chunks=num_chunks,
        t_comm=t_comm,
        t_comp=float((compute.sum(axis=1) + shared).max(initial=0.0)),
        t_serial=max(serial + overhead + second_calls, host),
        t_pipelined=max(gpu, host),
        enabled=enabled,
    )


def chunking_overhead(num_chunks: int, profile: PipelineProfile) -> float:
    """Seconds N chunks cost over one: ``k (N - 1)``, plus ``b`` when N > 1."""
    overhead = profile.chunk_overhead_us * 1e-6 * (num_chunks - 1)
    if num_chunks > 1:
        overhead += profile.chunk_overhead_base_us * 1e-6
    return overhead


def overlapped_time(dispatch: Sequence[float], compute: Sequence[float],
                    combine: Sequence[float], shared: float, profile: PipelineProfile,
                    dispatch_ahead: Optional[int] = None,
                    local_compute: Optional[Sequence[float]] = None) -> float:
    """GPU seconds of the plan with these per-chunk times (the busiest rank's): the serial sum
    less the part the simulated plan hides, times ``overlap_efficiency``, plus the chunking
    overhead. ``local_compute``: GEMMs over the rank's own rows, apart (``compute`` then
    covers the peers' rows)."""
    local_total = 0.0 if local_compute is None else float(sum(local_compute))
    serial = float(sum(dispatch) + sum(combine) + sum(compute) + local_total + shared)
    ideal = simulate_plan(list(dispatch), list(compute), list(combine), shared, dispatch_ahead,
                          None if local_compute is None else list(local_compute))
    return (serial - (serial - ideal) * profile.overlap_efficiency
            + chunking_overhead(len(compute), profile))


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


