"""How one forward's local experts are grouped into chunks: a chunking is N (equal chunks, the
paper's split) or the number of local experts in each chunk; ``chunk_sizes`` turns either into
sizes. Also how many of a chunk's own rows run as a GEMM call of their own (``local_head_rows``).

The cost model, the degree choice and the pipeline's layout all read chunks through these
functions, so a chunking means the same thing to each of them.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import numpy as np

# The largest row tile of the expert GEMMs (torch._grouped_mm's and the Triton kernel's).
LOCAL_ROWS_ALIGN = 128


def local_head_rows(own_rows, align: int = LOCAL_ROWS_ALIGN) -> np.ndarray:
    """Of each expert's rows from its own rank, those its local part takes: whole multiples of
    ``align`` rows. The rest runs with the peers' rows, so the two GEMM calls of a chunk run no
    more row tiles than one call would (one H200: own rows split off whole cost DSV2's experts
    17-33% more GEMM time at 4K-8K tokens/rank; benchmarks/local_rows_tradeoff.py)."""
    own = np.asarray(own_rows, dtype=np.int64)
    return (own // align) * align


def split_local_experts(num_local_experts: int, num_chunks: int) -> List[Tuple[int, int]]:
    """Contiguous local-expert ranges [start, end) for each chunk, sizes differing by <= 1."""
    if not 1 <= num_chunks <= num_local_experts:
        raise ValueError(
            f"num_chunks must be in [1, {num_local_experts}] (local experts), got {num_chunks}"
        )
    base, extra = divmod(num_local_experts, num_chunks)
    ranges, start = [], 0
    for i in range(num_chunks):
        end = start + base + (1 if i < extra else 0)
        ranges.append((start, end))
        start = end
    return ranges


# How a layer's local experts are grouped into chunks: an int N (N chunks of equal size, the
# paper's split) or the number of experts in each chunk, in order.
Chunking = Union[int, Sequence[int]]

def tail_split(num_local_experts: int, num_chunks: int) -> Tuple[int, ...]:
    """Experts per chunk for N chunks whose last chunk holds a single expert.

    The last combine cannot overlap any GEMM (it waits for the last one), so it is the
    pipeline's drain; one expert instead of 1/N of them shrinks it (the first dispatch, the
    fill, overlaps the shared experts). The other chunks split the rest evenly.
    """
    if not 1 <= num_chunks <= num_local_experts:
        raise ValueError(
            f"num_chunks must be in [1, {num_local_experts}] (local experts), got {num_chunks}"
        )
    if num_chunks == 1:
        return (num_local_experts,)
    head = split_local_experts(num_local_experts - 1, num_chunks - 1)
    return tuple(end - start for start, end in head) + (1,)


def chunk_sizes(num_local_experts: int, chunking: Chunking, split: str = "equal") -> Tuple[int, ...]:
    """Experts per chunk for ``chunking`` (the one place a chunking is normalised).

    An int N is clamped to [1, local experts] (a chunk holds at least one expert) and split as
    ``split`` says (equal or tail); sizes must be >= 1 each and cover the local experts.
    """
    if isinstance(chunking, (int, np.integer)):
        n = max(1, min(int(chunking), num_local_experts))
        if split == "tail":
            return tail_split(num_local_experts, n)
        if split != "equal":
            raise ValueError(f"chunk split must be one of equal, tail for a fixed N, got {split!r}")
        return tuple(end - start for start, end in split_local_experts(num_local_experts, n))
    sizes = tuple(int(s) for s in chunking)
    if not sizes or min(sizes) < 1 or sum(sizes) != num_local_experts:
        raise ValueError(
            f"chunk sizes {list(sizes)} must be >= 1 each and sum to the {num_local_experts} "
            "local experts"
        )
    return sizes


def ranges_of_sizes(sizes: Sequence[int]) -> List[Tuple[int, int]]:
    """[start, end) local-expert ranges of chunks holding ``sizes`` experts each."""
    ranges, start = [], 0
    for size in sizes:
        ranges.append((start, start + int(size)))
        start += int(size)
    return ranges
