"""The deduplicated row scheme: one row per (token, destination rank, chunk).

The source sends a token once to each rank holding at least one of its experts in the chunk,
with its expert indices and weights packed behind the hidden state (``unique_rows``); the expert
rank expands each received row into one row per expert, runs the experts and sums each received
row's weighted outputs in fp32 in expert order before the combine; the source sums the returned
rows of each token in fp32 in send order (chunk, rank), rounds once and adds the shared
experts' output.

A ``DedupChunkLayout`` is a ``ChunkLayout`` whose send and receive splits count unique tokens
instead of (token, expert) pairs, so a transport that moves ``send_splits`` / ``recv_splits``
rows per chunk moves the deduplicated rows unchanged; the received rows stay in (source rank,
token) order (nothing to regroup: the expansion into (expert, source rank, token) order is a
gather, ``unique_rows.expand_rows``). ``tokens_per_expert`` and ``recv_counts`` keep counting the
expanded rows the experts see.

The unique counts come from ``range_counts[src, dst, a, b]`` (tokens of rank src routed to at
least one of rank dst's local experts a .. b-1, ``unique_rows.range_unique_counts`` gathered with
the count matrix), so every rank derives the same layout for whatever chunking was chosen.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import List, Optional, Tuple

import numpy as np
import torch

from megatron_eps import row_kernels
from megatron_eps.comm.base import ExpertTransport
from megatron_eps.pipeline.layout import ChunkLayout
from megatron_eps.pipeline.rows import unique_rows
from megatron_eps.pipeline.rows.scheme import RowScheme

# ``dispatch_dedup: auto`` deduplicates when it saves at least this fraction of remote bytes.
AUTO_MIN_SAVING = 0.10
_ALIGN_BYTES = 16


def meta_columns(hidden: int, token_dtype: torch.dtype, probs_dtype: torch.dtype,
                 slots: int) -> int:
    """Columns (of the token dtype) behind the hidden state that carry ``slots`` int32 expert
    indices and ``slots`` weights; a multiple of 16 bytes, so aligned rows stay aligned. 0 when
    the hidden state's bytes do not keep the packed fields aligned (no dedup then)."""
    token_bytes = torch.empty((), dtype=token_dtype).element_size()
    prob_bytes = torch.empty((), dtype=probs_dtype).element_size()
    if (hidden * token_bytes) % max(8, prob_bytes):
        return 0
    need = slots * (4 + prob_bytes)
    padded = -(-need // _ALIGN_BYTES) * _ALIGN_BYTES
    return padded // token_bytes


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
        return None  # the expansion orders the rows (unique_rows.expand_rows)

    def expert_major_to_rank_major(self, chunk: int):
        return None  # the pre-reduction returns one row per received row, in received order

    def pair_rows(self, chunk: int) -> int:
        """Rows the experts of ``chunk`` run here after the expansion."""
        return sum(self.tokens_per_expert[chunk])

    def saves_remote_bytes(self, row_bytes: Tuple[int, int], pair_row_bytes: Tuple[int, int],
                           min_saving: float = AUTO_MIN_SAVING) -> bool:
        """Whether the whole group's remote bytes fall by at least ``min_saving`` when each
        unique row moves ``row_bytes`` (dispatch, combine) instead of each pair's
        ``pair_row_bytes`` (dispatch, combine). The same answer on every rank: it reads only
        gathered numbers."""
        remote = ~np.eye(self.ep_size, dtype=bool)
        unique = int(self.unique_rows.sum(axis=2)[remote].sum())
        pairs = int(self.pair_rows_sent[remote].sum())
        dedup = unique * sum(row_bytes)
        per_pair = pairs * sum(pair_row_bytes)
        return per_pair > 0 and dedup <= (1.0 - min_saving) * per_pair


def dedup_row_bytes(layout: DedupChunkLayout, tokens: torch.Tensor, probs: torch.Tensor):
    """(dispatch, combine) bytes of one row of the deduplicated scheme: the hidden state with
    its packed expert indices and weights, and the partial sum in ``layout.combine_dtype``."""
    hidden = tokens.shape[-1]
    columns = meta_columns(hidden, tokens.dtype, probs.dtype, layout.slots)
    combine_dtype = layout.combine_dtype or tokens.dtype
    return ((hidden + columns) * tokens.element_size(),
            hidden * torch.empty((), dtype=combine_dtype).element_size())


def place_chunk_unique_rows(transport: ExpertTransport, layout: DedupChunkLayout, chunk: int,
                            tokens: torch.Tensor, probs: torch.Tensor,
                            routing_map: torch.Tensor) -> torch.Tensor:
    """Chunk ``chunk``'s rows (``unique_rows.place_unique_rows``) into the transport's send rows;
    returns the [D * T] send row within the chunk of each (destination rank, token), -1 where
    none. tokens: [T, H]; probs: [T, E]; routing_map: [T, E] bool."""
    send = transport.send_rows(chunk)
    sent = unique_rows.place_unique_rows(
        tokens, probs, routing_map, layout.ep_size, layout.expert_ranges[chunk], send.rows,
        layout.slots, dst_rows=send.dst_rows,
    )
    transport.rows_placed(chunk)
    return sent


def run_unique_rows_experts(transport: ExpertTransport, layout: DedupChunkLayout, experts,
                            chunk: int, hidden_size: int, probs_dtype: torch.dtype,
                            combine_dtype: torch.dtype) -> None:
    """The EXPERTS step of a chunk: each received row [W] expanded into one row per expert of the
    chunk it carries, the experts run, and each received row's weighted expert outputs summed in
    fp32 in expert order into one [H] row of ``combine_dtype``, handed back to the transport."""
    received, _ = transport.received(chunk)
    start, end = layout.expert_ranges[chunk]
    x, p, table = unique_rows.expand_rows(
        received, hidden_size, layout.slots, end - start, layout.pair_rows(chunk), probs_dtype
    )
    out = experts.run(x, layout.tokens_per_expert[chunk], p, start)
    transport.hand_back(chunk, row_kernels.sum_rows(out, table, combine_dtype))


class DedupRows(RowScheme):
    """One row per (token, destination rank, chunk) (module docstring)."""

    name = "dedup"

    def __init__(self, pairs, layout: DedupChunkLayout, row_bytes):
        super().__init__(pairs.transport, pairs.experts)
        self.layout, self.pairs, self.row_bytes = layout, pairs, row_bytes
        self.tokens, self.probs, self.routing_map = pairs.tokens, pairs.probs, pairs.routing_map
        self.compute_stream = pairs.compute_stream
        hidden = self.tokens.shape[-1]
        self.width = hidden + meta_columns(hidden, self.tokens.dtype, self.probs.dtype,
                                           layout.slots)
        self.combine_dtype = layout.combine_dtype or self.tokens.dtype
        self.sent_rows: List[torch.Tensor] = []

    @classmethod
    def instead_of(cls, pairs, range_counts: Optional[np.ndarray], setting: str,
                   combine_dtype: Optional[torch.dtype]) -> Optional["DedupRows"]:
        """The deduplicated scheme for the chunks of ``pairs`` (``per_pair.PerPairRows``), or
        None to keep one row per pair: the setting (``dispatch_dedup``) off, a transport without
        the scheme (``range_counts`` None), rows whose weights cannot be packed, or ``auto``
        judging the saving too small. Decided from gathered numbers, so the same on every rank."""
        if range_counts is None or setting == "off":
            return None
        layout = DedupChunkLayout.from_pairs(pairs.layout, pairs.counts, range_counts,
                                             pairs.top_k, combine_dtype)
        tokens, probs = pairs.tokens, pairs.probs
        if not meta_columns(tokens.shape[-1], tokens.dtype, probs.dtype, layout.slots):
            return None
        row_bytes = dedup_row_bytes(layout, tokens, probs)
        if setting == "auto" and not layout.saves_remote_bytes(row_bytes, pairs.row_bytes):
            return None
        return cls(pairs, layout, row_bytes)

    def bytes_sent(self):
        return self.layout.bytes_sent(*self.row_bytes)

    def pair_bytes_sent(self):
        return self.pairs.bytes_sent()

    def place(self, chunk: int) -> None:
        sent = place_chunk_unique_rows(self.transport, self.layout, chunk, self.tokens,
                                       self.probs, self.routing_map)
        if self.compute_stream is not None:
            sent.record_stream(self.compute_stream)  # read by the final sum
        self.sent_rows.append(sent)

    def run_experts(self, chunk: int, part: Optional[str] = None) -> None:
        run_unique_rows_experts(self.transport, self.layout, self.experts, chunk,
                                self.tokens.shape[-1], self.probs.dtype, self.combine_dtype)

    def output(self, shared_output):
        layout = self.layout
        table = unique_rows.return_table(self.sent_rows, layout.send_offsets[:-1],
                                         self.tokens.shape[0], layout.send_offsets[-1])
        return row_kernels.sum_rows(self.transport.combined_rows(), table, self.tokens.dtype,
                                    shared_output)
