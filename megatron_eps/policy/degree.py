"""The pipeline degree: the chunking of each forward, explicit or chosen by the cost model.

Every input to ``choose_chunking`` is data every rank of the expert-parallel group holds
(the all-gathered count matrix, the layer's shape, the config, the profile file), and the
function is deterministic, so every rank picks the same chunks and the chunked all-to-alls
match.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from megatron_eps.policy.chunks import chunk_sizes
from megatron_eps.policy.cost_model import LayerShape, CountInputs, predict
from megatron_eps.policy.profile import PipelineProfile, load_kernel_tables, load_pipeline_profile


def mean_tokens_per_rank(counts: np.ndarray, topk: int) -> float:
    """Input tokens per EP rank, averaged over the group (from the global count matrix)."""
    return float(np.asarray(counts).sum()) / (max(topk, 1) * max(np.asarray(counts).shape[0], 1))


def model_decides(counts: np.ndarray, shape: LayerShape, eps_config) -> bool:
    """Whether ``choose_chunking`` consults the cost model (and so a profile) for these counts:
    ``pipeline_degree`` auto, more than one EP rank (at EP=1 there is no all-to-all to
    overlap), and at least ``min_tokens_to_pipeline`` tokens per rank. Callers skip loading a
    profile when it is False."""
    return (eps_config.pipeline_degree == "auto" and shape.ep_size > 1
            and mean_tokens_per_rank(counts, shape.topk) >= eps_config.min_tokens_to_pipeline)


def candidate_degrees(shape: LayerShape, eps_config) -> List[int]:
    upper = max(1, min(shape.num_local_experts, eps_config.max_pipeline_degree))
    return list(range(1, upper + 1))


def candidate_chunkings(
    shape: LayerShape, eps_config, families: Sequence[str] = ("equal",)
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
    eps_config,
    profile: Optional[PipelineProfile] = None,
    kernel_profile=None,
    dispatch_ahead: Optional[int] = None,
    split: Optional[str] = None,
    range_counts: Optional[np.ndarray] = None,
    local_rows_apart: bool = False,
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

    ``range_counts`` [src, dst, L, L + 1] (gathered with the counts when the dispatch is
    deduplicated): the model times the unique rows each chunk sends instead of the pairs.
    ``local_rows_apart``: the forward runs each chunk's own rows as a GEMM call of their own
    (``cost_model.predict``).
    """
    experts = shape.num_local_experts
    split = split or eps_config.chunk_split
    if mean_tokens_per_rank(counts, shape.topk) < eps_config.min_tokens_to_pipeline:
        return (experts,)
    if eps_config.pipeline_degree != "auto":
        return chunk_sizes(experts, eps_config.pipeline_degree, "tail" if split == "tail" else "equal")
    if profile is None or not model_decides(counts, shape, eps_config):
        return (experts,)
    counts = np.asarray(counts, dtype=np.int64)
    key = (
        _load_summary(counts),
        None if range_counts is None else _load_summary(np.asarray(range_counts)),
        eps_config.dedup_combine_dtype,
        shape,
        profile,
        kernel_profile,  # by identity, and held: an id() could be a freed profile's
        dispatch_ahead,
        split,
        eps_config.max_pipeline_degree,
        eps_config.gemm_sm_carveout,
        local_rows_apart,
    )
    cached = _DECISIONS.get(key)
    if cached is not None:
        return cached
    families = ("equal", "tail") if split == "auto" else (split,)
    partial_sum_bytes = 4 if eps_config.dedup_combine_dtype == "fp32" else None
    inputs = CountInputs(counts, shape, profile, kernel_profile, range_counts, partial_sum_bytes)
    best = (experts,)
    carveout = eps_config.gemm_sm_carveout
    best_t = predict(counts, shape, profile, best, kernel_profile, inputs, dispatch_ahead,
                     local_rows_apart=local_rows_apart).t_pipelined
    best_t *= 1.0 - profile.min_gain  # what a multi-chunk split must beat
    for sizes in candidate_chunkings(shape, eps_config, families):
        p = predict(counts, shape, profile, sizes, kernel_profile, inputs, dispatch_ahead, carveout,
                    local_rows_apart=local_rows_apart)
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


class ChunkingPolicy:
    """``EPSConfig.pipeline_degree`` / ``chunk_split`` for one layer shape, through the cost model.

    With ``pipeline_degree: auto`` the profile (the configured one, else the one shipped for the
    device) is read with the link figures of the transport the forward runs on.
    """

    def __init__(self, shape: LayerShape, eps_config, device: torch.device,
                 dispatch_ahead: Optional[int] = None):
        self.shape, self.eps_config, self.device = shape, eps_config, device
        self.dispatch_ahead = dispatch_ahead

    def choose(self, counts: np.ndarray, transport: Optional[str] = None,
               range_counts: Optional[np.ndarray] = None, local_rows_apart: bool = False):
        """``range_counts`` [src, dst, L, L + 1] (deduplicated dispatch): the unique tokens of
        every range of local experts, so the model counts the rows that really travel.
        ``local_rows_apart``: the forward runs each chunk's own rows apart (the model's plan)."""
        profile = kernel_profile = None
        # The profile lookup costs the host a few file checks per layer and forward: only
        # where the cost model will read it.
        if model_decides(counts, self.shape, self.eps_config):
            profile = load_pipeline_profile(self.eps_config.cost_profile, self.device, transport)
            if profile is not None and profile.use_kernel_tables:
                kernel_profile = load_kernel_tables(self.eps_config.cost_profile, self.device)
                if kernel_profile is not None and kernel_profile.borrowed_for:
                    kernel_profile = None  # another GPU's times: they rank, they do not time
        return choose_chunking(
            counts, self.shape, self.eps_config, profile, kernel_profile=kernel_profile,
            dispatch_ahead=self.dispatch_ahead, range_counts=range_counts,
            local_rows_apart=local_rows_apart,
        )

    def chunking_without_counts(self):
        """The chunking where no count matrix can change it (one chunk: ``pipeline_degree`` 1,
        or ``auto`` without expert parallelism, where the model never decides), else None."""
        degree = self.eps_config.pipeline_degree
        if degree == 1 or (degree == "auto" and self.shape.ep_size == 1):
            return (self.shape.num_local_experts,)
        return None


class FixedChunking:
    """Always the same chunking (N, or the experts of each chunk): tests and benchmarks."""

    def __init__(self, chunking):
        self.chunking = chunking

    def choose(self, counts, transport=None, range_counts=None, local_rows_apart=False):
        return self.chunking

    def chunking_without_counts(self):
        return self.chunking
