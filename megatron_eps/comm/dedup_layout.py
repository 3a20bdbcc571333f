"""The chunk layout of the deduplicated scheme: one row per (token, destination rank, chunk).

A ``DedupChunkLayout`` is a ``ChunkLayout`` whose send and receive splits count unique tokens
instead of (token, expert) pairs, so a transport that moves ``send_splits`` / ``recv_splits``
rows per chunk moves the deduplicated rows unchanged; the received rows stay in (source rank,
token) order (nothing to regroup: the expansion into (expert, source rank, token) order is a
gather, ``dedup_rows.expand_rows``). ``tokens_per_expert`` and ``recv_counts`` keep counting the
expanded rows the experts see.

The unique counts come from ``range_counts[src, dst, a, b]`` (tokens of rank src routed to at
least one of rank dst's local experts a .. b-1, ``dedup_rows.range_unique_counts`` gathered with
the count matrix), so every rank derives the same layout for whatever chunking was chosen.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import numpy as np
import torch

from megatron_eps.pipeline.layout import ChunkLayout

# ``dispatch_dedup: auto`` deduplicates when it saves at least this fraction of remote bytes.
AUTO_MIN_SAVING = 0.10


@dataclass
class DedupChunkLayout(ChunkLayout):
    """``ChunkLayout`` in unique rows (module docstring), plus what the expansion needs."""

    pairs: Optional[ChunkLayout] = None  # the per-(token, expert) layout of the same chunks
    slots: int = 1  # most experts one received row carries (one token, one chunk, one rank)
    combine_dtype: Optional[torch.dtype] = None  # dtype of the returned sums (None: the model's)
    # [src, dst, chunk] unique rows of every rank, for decisions every rank must share.
    unique_rows: Optional[np.ndarray] = None
    pair_rows_sent: Optional[np.ndarray] = None  # [src, dst] (token, expert) rows of every rank

    @classmethod
    def from_pairs(cls, pairs: ChunkLayout, counts: np.ndarray, range_counts: np.ndarray,
                   top_k: int, combine_dtype: Optional[torch.dtype] = None) -> "DedupChunkLayout":
        """pairs: the layout of the chosen chunks; counts: [src, expert] and range_counts:
        [src, dst, L, L + 1], both gathered from every rank; top_k: the router's experts per
        token."""
        range_counts = np.asarray(range_counts, dtype=np.int64)
        ep_size, me = pairs.ep_size, pairs.ep_rank
        local = pairs.num_local_experts
        if range_counts.shape != (ep_size, ep_size, local, local + 1):
            raise ValueError(
                f"range counts of shape {range_counts.shape}, expected "
                f"{(ep_size, ep_size, local, local + 1)}"
            )
        unique = np.stack([range_counts[:, :, a, b] for a, b in pairs.expert_ranges], axis=2)
        send_splits = [[int(x) for x in unique[me, :, g]] for g in range(pairs.num_chunks)]
        recv_splits = [[int(x) for x in unique[:, me, g]] for g in range(pairs.num_chunks)]
        offsets = [0]
        for sends in send_splits:
            offsets.append(offsets[-1] + sum(sends))
        widest = max(b - a for a, b in pairs.expert_ranges)
        shared = {f.name: getattr(pairs, f.name) for f in fields(ChunkLayout)}
        shared.update(send_splits=send_splits, recv_splits=recv_splits, send_offsets=offsets)
        return cls(
            **shared,
            pairs=pairs,
            slots=max(1, min(top_k, widest)),
            combine_dtype=combine_dtype,
            unique_rows=unique,
            pair_rows_sent=np.asarray(counts, dtype=np.int64).reshape(
                ep_size, ep_size, local).sum(axis=2),
        )

    def rank_major_to_expert_major(self, chunk: int):
        return None  # the expansion orders the rows (dedup_rows.expand_rows)

    def expert_major_to_rank_major(self, chunk: int):
        return None  # the pre-reduction returns one row per received row, in received order

    def pair_rows(self, chunk: int) -> int:
        """Rows the experts of ``chunk`` run here after the expansion."""
        return sum(self.tokens_per_expert[chunk])

    def saves_remote_bytes(self, dispatch_row_bytes: int, pair_dispatch_row_bytes: int,
                           combine_row_bytes: int, pair_combine_row_bytes: int,
                           min_saving: float = AUTO_MIN_SAVING) -> bool:
        """Whether the whole group's remote bytes fall by at least ``min_saving`` (the same
        answer on every rank: it reads only gathered numbers)."""
        remote = ~np.eye(self.ep_size, dtype=bool)
        unique = int(self.unique_rows.sum(axis=2)[remote].sum())
        pairs = int(self.pair_rows_sent[remote].sum())
        dedup = unique * (dispatch_row_bytes + combine_row_bytes)
        per_pair = pairs * (pair_dispatch_row_bytes + pair_combine_row_bytes)
        return per_pair > 0 and dedup <= (1.0 - min_saving) * per_pair


def pair_row_bytes(tokens: torch.Tensor, probs: torch.Tensor, packed_columns: int):
    """(dispatch, combine) bytes of one row of the per-(token, expert) scheme: the hidden state
    and its weight (packed in ``packed_columns`` columns, or sent apart), and the output."""
    hidden_bytes = tokens.shape[-1] * tokens.element_size()
    weight_bytes = packed_columns * tokens.element_size() if packed_columns else probs.element_size()
    return hidden_bytes + weight_bytes, hidden_bytes


def dedup_row_bytes(layout: DedupChunkLayout, tokens: torch.Tensor, probs: torch.Tensor):
    """(dispatch, combine) bytes of one row of the deduplicated scheme: the hidden state with
    its packed expert indices and weights, and the partial sum in ``layout.combine_dtype``."""
    from megatron_eps.comm.dedup_rows import meta_columns

    hidden = tokens.shape[-1]
    columns = meta_columns(hidden, tokens.dtype, probs.dtype, layout.slots)
    combine_dtype = layout.combine_dtype or tokens.dtype
    return ((hidden + columns) * tokens.element_size(),
            hidden * torch.empty((), dtype=combine_dtype).element_size())
