"""The shims that let Megatron-Core's MoE layer and GPTModel run on CPU ranks (gloo).

Megatron calls torch.cuda.* for streams, events and the current device even on paths that need
no GPU. On a machine without CUDA, ``install_cpu_shims()`` replaces exactly those calls with
CPU stand-ins; on a CUDA machine it does nothing. Every CPU shim megatron-eps needs lives here,
so tests, examples and benchmarks share one list.

Shims (each one names the Megatron call it serves):
  1. Transformer Engine names in moe_utils that are left undefined without TE.
  2. torch.cuda.current_device() -> the CPU device (used as ``device=`` by router, mappings,
     experts, utils).
  3. torch.cuda.Stream / current_stream / stream / Event / synchronize stand-ins (dispatcher and
     shared-expert streams, D2H events, inference timing).
  4. moe_utils.maybe_move_tensor_to_cpu also turns CPU tensors into numpy when asked, because
     gloo's all_to_all_single takes split sizes as lists/numpy, not tensors.
  5. A stub for megatron.core.transformer.moe.ops.paged_stash (0.18+) when triton is missing.
  6. Causal masks built with device="cuda" and ``Tensor.cuda()`` in the inference path.
"""

from __future__ import annotations

import contextlib
import sys
import time
import types

import torch

_INSTALLED = False


class _CPUStream:
    """Stands in for torch.cuda.Stream: work on CPU is already ordered."""

    def __init__(self, *args, **kwargs):
        self.device = torch.device("cpu")

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        event = event if event is not None else _CPUEvent()
        event.record(self)
        return event

    def synchronize(self):
        pass

    def query(self):
        return True

    def __eq__(self, other):
        return isinstance(other, _CPUStream)

    def __hash__(self):
        return 0


class _CPUEvent:
    """Stands in for torch.cuda.Event; times with the host clock."""

    def __init__(self, *args, **kwargs):
        self._time = None

    def record(self, stream=None):
        self._time = time.perf_counter()

    def synchronize(self):
        pass

    def wait(self, stream=None):
        pass

    def query(self):
        return True

    def elapsed_time(self, end_event):
        return (end_event._time - self._time) * 1000.0


_DEFAULT_STREAM = _CPUStream()


def _current_stream(device=None):
    return _DEFAULT_STREAM


@contextlib.contextmanager
def _stream_context(stream=None):
    yield stream


def install_cpu_shims(force: bool = False) -> bool:
    """Install the CPU stand-ins if CUDA is unavailable (or ``force``). Idempotent.

    Returns True if the shims are active.
    """
    global _INSTALLED
    if _INSTALLED:
        return True
    if torch.cuda.is_available() and not force:
        return False
    _INSTALLED = True

    # 2, 3: torch.cuda stand-ins.
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.Stream = _CPUStream
    torch.cuda.Event = _CPUEvent
    torch.cuda.current_stream = _current_stream
    torch.cuda.default_stream = _current_stream
    torch.cuda.stream = _stream_context
    torch.cuda.synchronize = lambda device=None: None
    torch.Tensor.record_stream = lambda self, stream: None

    # 6: inference path moves tensors with .cuda() and builds masks on "cuda".
    torch.Tensor.cuda = lambda self, *args, **kwargs: self

    # 5: 0.18+ imports triton unguarded in paged_stash.
    try:
        import triton  # noqa: F401
    except ImportError:
        stub = types.ModuleType("megatron.core.transformer.moe.ops.paged_stash")
        sys.modules.setdefault("megatron.core.transformer.moe.ops.paged_stash", stub)

    # 1: TE names left undefined without Transformer Engine.
    from megatron.core.transformer.moe import moe_utils

    for name in (
        "fused_compute_score_for_moe_aux_loss",
        "fused_moe_aux_loss",
        "fused_permute",
        "fused_permute_with_probs",
        "fused_sort_chunks_by_index",
        "fused_sort_chunks_by_index_with_probs",
        "fused_topk_with_score_function",
        "fused_unpermute",
        "te_general_gemm",
    ):
        if not hasattr(moe_utils, name):
            setattr(moe_utils, name, None)

    # 4: split sizes as numpy for gloo.
    original = moe_utils.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy() if as_numpy else tensor
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    from megatron.core.transformer.moe import token_dispatcher

    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu

    # 6: causal masks created with device="cuda" (defined in transformer.utils, imported by name
    # into fused_softmax).
    def get_default_causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)

    for module_name in ("megatron.core.transformer.utils", "megatron.core.fusions.fused_softmax"):
        try:
            module = __import__(module_name, fromlist=["get_default_causal_mask"])
        except ImportError:
            continue
        if hasattr(module, "get_default_causal_mask"):
            module.get_default_causal_mask = get_default_causal_mask
    return True

