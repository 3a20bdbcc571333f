"""Which row scheme a forward runs: deduplicated where the setting, the transport and the gathered
numbers agree (``dedup.DedupRows.instead_of``), else one row per (token, expert)."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from megatron_eps.comm.base import ExpertTransport
from megatron_eps.pipeline.rows.dedup import DedupRows
from megatron_eps.pipeline.rows.per_pair import PerPairRows
from megatron_eps.pipeline.rows.scheme import RowScheme


def choose_row_scheme(transport: ExpertTransport, experts, counts: np.ndarray,
                      range_counts: Optional[np.ndarray], sizes, tokens: torch.Tensor,
                      probs: torch.Tensor, routing_map: torch.Tensor, ep_rank: int, top_k: int,
                      local_rows_apart: bool, eps_config, compute_stream=None) -> RowScheme:
    """The forward's rows. ``range_counts``: the gathered unique-token counts (None where the
    deduplicated scheme is off or the transport lacks it); ``sizes``: local experts per chunk."""
    pairs = PerPairRows(transport, experts, counts, sizes, tokens, probs, routing_map, ep_rank,
                        top_k, local_rows_apart, compute_stream)
    combine_dtype = torch.float32 if eps_config.dedup_combine_dtype == "fp32" else None
    dedup = DedupRows.instead_of(pairs, range_counts, eps_config.dispatch_dedup, combine_dtype)
    return dedup if dedup is not None else pairs
