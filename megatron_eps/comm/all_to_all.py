"""The variable-size all-to-all under ``NCCLTransport``, behind a small interface so a benchmark can swap it.

``ProcessGroupAllToAll`` is the real thing (torch.distributed: NCCL on GPUs, gloo on CPU).
``megatron_eps.bench.link_emulator.EmulatedLinkAllToAll`` stands in for a multi-GPU link on one GPU,
for benchmarks only.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist


class AllToAll:
    """Variable-size all-to-all over the expert-parallel group.

    ``__call__(output, input, output_splits, input_splits)`` fills ``output`` [sum(output_splits),
    ...] with the rows every rank sends to this one; ``input`` [sum(input_splits), ...] holds the
    rows this rank sends, grouped by destination rank. It is issued on the current stream and
    completes in stream order (nothing blocks the host on GPUs).
    """

    group_size: int = 1
    # True when the all-to-all costs link time even within one rank (the link emulator), so
    # the pipeline must issue it even at ep_size == 1.
    occupies_link: bool = False

    def __call__(
        self,
        output: torch.Tensor,
        input: torch.Tensor,
        output_splits: Sequence[int],
        input_splits: Sequence[int],
    ) -> None:
        raise NotImplementedError


class ProcessGroupAllToAll(AllToAll):
    """torch.distributed.all_to_all_single on a process group (the EP group)."""

    def __init__(self, group):
        self.group = group
        self.group_size = dist.get_world_size(group) if group is not None else 1

    def __call__(self, output, input, output_splits, input_splits):
        if self.group_size == 1:
            if output.data_ptr() != input.data_ptr() and output.numel():
                output.copy_(input)
            return
        dist.all_to_all_single(
            output,
            input,
            output_split_sizes=list(output_splits),
            input_split_sizes=list(input_splits),
            group=self.group,
        )
