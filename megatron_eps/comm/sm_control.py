"""SM budgets for the two sides of the pipeline: NCCL's CTAs and the cuBLAS GEMMs' SMs.

Both knobs are optional (EPSConfig.comm_num_ctas, EPSConfig.gemm_sm_carveout) and no-ops on CPU.

* ``comm_num_ctas`` caps the CTAs (thread blocks, one per channel) NCCL uses for collectives. NCCL
  reads its settings when a communicator is created, so this must happen **before**
  ``torch.distributed.init_process_group`` / ``new_group`` (NCCL creates communicators lazily
  on the first collective of a group, but it reads the environment of the process, and
  torch passes per-group options only at group creation): ``apply_comm_cta_cap(n)`` sets
  ``NCCL_MAX_CTAS`` and ``NCCL_MAX_NCHANNELS`` in the environment (every communicator of the
  process).
* ``gemm_sm_carveout`` holds SMs back from cuBLAS/cuBLASLt GEMMs through
  ``torch._C._set_sm_carveout_experimental`` while the pipeline runs, and restores the previous
  value afterwards. It affects cuBLAS(Lt) GEMMs only: CUTLASS kernels such as
  ``torch._grouped_mm`` are not capped by it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Optional

import torch

logger = logging.getLogger(__name__)

NCCL_CTA_ENV = ("NCCL_MAX_CTAS", "NCCL_MAX_NCHANNELS")


def apply_comm_cta_cap(num_ctas: Optional[int], override: bool = False) -> bool:
    """Set NCCL_MAX_CTAS / NCCL_MAX_NCHANNELS to ``num_ctas``. Call before the process group exists.

    Returns True if the environment now carries the cap. An existing different value is kept
    unless ``override`` (the user's environment wins). Warns if a process group already exists
    (its communicators may have read the old values). No-op without CUDA or for None.
    """
    if num_ctas is None or not torch.cuda.is_available():
        return False
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        logger.warning(
            "eps comm_num_ctas=%s applied after torch.distributed was initialized: NCCL "
            "communicators created already keep their CTA count (set it before "
            "init_process_group)",
            num_ctas,
        )
    applied = True
    for name in NCCL_CTA_ENV:
        current = os.environ.get(name)
        if current is not None and current != str(num_ctas) and not override:
            logger.warning("eps comm_num_ctas=%s: keeping %s=%s from the environment", num_ctas, name, current)
            applied = False
            continue
        os.environ[name] = str(int(num_ctas))
    return applied


def carveout_supported() -> bool:
    return torch.cuda.is_available() and hasattr(torch._C, "_set_sm_carveout_experimental")


@contextlib.contextmanager
def gemm_sm_carveout(num_sms: Optional[int]):
    """Hold ``num_sms`` SMs back from cuBLAS GEMMs inside the block; restore the old value after.

    No-op for None, without CUDA, or when torch lacks the experimental hook.
    """
    if num_sms is None or not carveout_supported():
        yield False
        return
    getter = getattr(torch._C, "_get_sm_carveout_experimental", None)
    previous = getter() if getter is not None else None
    torch._C._set_sm_carveout_experimental(int(num_sms))
    try:
        yield True
    finally:
        torch._C._set_sm_carveout_experimental(previous)


def current_gemm_carveout() -> Optional[int]:
    getter = getattr(torch._C, "_get_sm_carveout_experimental", None)
    return getter() if getter is not None else None
