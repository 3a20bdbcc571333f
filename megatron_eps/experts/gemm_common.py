"""Argument checks and input preparation shared by the GEMM backends (grouped, dense, triton, te)."""

from __future__ import annotations

import itertools
from typing import Dict, List, NamedTuple, Optional, Sequence

import numpy as np
import torch

from megatron_eps.staging import to_device
from megatron_eps.experts.base import ExpertBackend
from megatron_eps.experts.weights import ExpertWeights, StackedExperts, unsupported_module_reason


class ExpertCall(NamedTuple):
    """One backend call, validated: the weights of the experts in range and the prepared input."""

    fc1: torch.Tensor  # [n, F1, H]
    fc2: torch.Tensor  # [n, H, F]
    hidden: torch.Tensor  # [M, H], probs already folded in when probs_on_input
    probs: Optional[torch.Tensor]  # [M] or None (None: nothing to scale with)
    counts: List[int]  # tokens per expert, host ints, len n (or a DeviceRowEnds)
    weights: ExpertWeights


class DeviceRowEnds(NamedTuple):
    """Rows per expert known only on the device: what a forward hands the experts when the host
    never reads the routing counts (``pipeline.rows.per_pair``, rows planned on the device).

    ``ends``: [n] int32 on the device, the experts' cumulative row ends (the ``offs`` of
    torch._grouped_mm); ``num_rows``: their total, known on the host (every token has top-k
    rows). Only the backends that take device offsets run such a call (``grouped``).
    """

    ends: torch.Tensor
    num_rows: int

    def __len__(self) -> int:
        return self.ends.shape[0]


def gemm_unavailable_reason(local_experts, device, dtype) -> Optional[str]:
    """Reasons shared by every GEMM backend (module/config support), or None."""
    if isinstance(local_experts, StackedExperts):
        return None
    return unsupported_module_reason(local_experts.module, local_experts.config)


def prepare_call(
    weights: ExpertWeights,
    hidden: torch.Tensor,
    tokens_per_expert,
    probs: torch.Tensor,
    first_expert: int,
    backend: str,
) -> ExpertCall:
    """The validated call. ``tokens_per_expert``: host ints, or a ``DeviceRowEnds`` (then the
    call's ``counts`` is that object and only its total is checked here)."""
    on_device = isinstance(tokens_per_expert, DeviceRowEnds)
    counts = tokens_per_expert if on_device else [int(c) for c in tokens_per_expert]
    n = len(counts)
    if first_expert < 0 or first_expert + n > weights.num_experts:
        raise ValueError(
            f"expert_kernel={backend!r}: experts {first_expert}..{first_expert + n - 1} are out of "
            f"range for {weights.num_experts} local experts"
        )
    if hidden.dim() != 2 or hidden.shape[1] != weights.hidden_size:
        raise ValueError(
            f"expert_kernel={backend!r}: hidden must be [M, {weights.hidden_size}], got "
            f"{tuple(hidden.shape)}"
        )
    if on_device:
        if counts.num_rows != hidden.shape[0]:
            raise ValueError(
                f"expert_kernel={backend!r}: the device row ends count {counts.num_rows} rows, "
                f"hidden has {hidden.shape[0]}"
            )
    elif sum(counts) != hidden.shape[0] or any(c < 0 for c in counts):
        raise ValueError(
            f"expert_kernel={backend!r}: tokens_per_expert {counts} must be >= 0 and sum to the "
            f"{hidden.shape[0]} rows of hidden"
        )
    if hidden.dtype != weights.dtype or hidden.device != weights.device:
        raise ValueError(
            f"expert_kernel={backend!r}: hidden is {hidden.dtype} on {hidden.device} but the "
            f"expert weights are {weights.dtype} on {weights.device}"
        )
    if probs is not None and probs.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"expert_kernel={backend!r}: probs has {probs.shape[0]} rows, hidden {hidden.shape[0]}"
        )
    probs = probs.reshape(-1) if probs is not None else None
    if weights.activation.probs_on_input and probs is not None:
        # Megatron scales the input and then multiplies by ones: the same as not scaling later.
        hidden = (probs.unsqueeze(-1) * hidden).to(hidden.dtype)
        probs = None
    fc1 = weights.fc1[first_expert : first_expert + n]
    fc2 = weights.fc2[first_expert : first_expert + n]
    return ExpertCall(fc1, fc2, hidden, probs, counts, weights)


class GemmExpertBackend(ExpertBackend):
    """A backend over the stacked expert weights: ``forward`` validates and prepares the call
    (prepare_call), then ``compute`` runs it."""

    @classmethod
    def unavailable_reason(cls, local_experts, device, dtype):
        return gemm_unavailable_reason(local_experts, device, dtype)

    def forward(self, local_experts, hidden, tokens_per_expert, probs, first_expert):
        call = prepare_call(
            local_experts.weights(), hidden, tokens_per_expert, probs, first_expert, self.name
        )
        if call.hidden.shape[0] == 0:
            return call.hidden.new_empty(call.hidden.shape)
        return self.compute(call, local_experts, first_expert)

    def compute(self, call: ExpertCall, local_experts, first_expert: int) -> torch.Tensor:
        """[M, H] output of ``call`` (experts first_expert .. first_expert + n - 1; M > 0)."""
        raise NotImplementedError


def row_ends(counts: Sequence[int]) -> List[int]:
    """The experts' cumulative row ends: the ``offs`` torch._grouped_mm and the triton GEMMs take."""
    return list(itertools.accumulate(counts))


def expert_offsets(counts: Sequence[int], device: torch.device, staged=None) -> torch.Tensor:
    """``row_ends(counts)`` as an int32 [n] tensor on ``device``: found in ``staged`` when the
    layer staged them for this forward (stage_int32_batch), else one pinned, non-blocking copy;
    a ``DeviceRowEnds``' own ``ends``."""
    if isinstance(counts, DeviceRowEnds):
        return counts.ends
    return pinned_int32(row_ends(counts), device, staged)


def stage_int32_batch(
    value_lists: Sequence[Sequence[int]], device: torch.device
) -> Dict[tuple, torch.Tensor]:
    """Copy several int lists to the device in one pinned transfer, for later pinned_int32 calls.

    A pipelined layer knows every chunk's expert offsets before the first chunk runs; staging
    them together replaces one pin + copy per chunk (a host cost on the critical path of the
    pipeline) with one per layer. Returns ``{(device, values): int32 device tensor}``, which the
    caller keeps for the forward (``LocalExperts.staged_int32``) and hands to pinned_int32.
    """
    staged: Dict[tuple, torch.Tensor] = {}
    device = torch.device(device)
    flat = [v for values in value_lists for v in values]
    if device.type != "cuda" or not flat:
        return staged
    on_device = to_device(flat, device, np.int32)
    start = 0
    for values in value_lists:
        staged.setdefault((device, tuple(values)), on_device[start : start + len(values)])
        start += len(values)
    return staged


def pinned_int32(
    values: Sequence[int], device: torch.device, staged: Optional[Dict[tuple, torch.Tensor]] = None
) -> torch.Tensor:
    """Host ints -> int32 device tensor without a host sync (pinned, non-blocking copy).

    A plain ``torch.tensor(values, device=cuda)`` synchronizes the stream, which would stall the
    expert pipeline (``staging.to_device`` does not). Values found in ``staged``
    (stage_int32_batch) are returned without a copy.
    """
    if device.type == "cuda" and staged:
        found = staged.get((torch.device(device), tuple(values)))
        if found is not None:
            return found
    return to_device(values, device, np.int32)
