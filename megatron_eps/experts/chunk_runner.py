"""How a layer's pipeline runs a chunk's experts (``ExpertRunner``).

The pipeline (``pipeline.dispatcher.pipelined_forward``) calls ``prepare(calls, device)`` once
per forward, then ``run(tokens, tokens_per_expert, probs, first_expert)`` per chunk -> the
chunk's expert outputs; it never reaches back into the layer. (How to chunk is the other object
a layer hands its pipeline: ``policy.degree.ChunkingPolicy``.)
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from megatron_eps.experts.base import LocalExperts, get_backend
from megatron_eps.policy.profile import load_kernel_tables


class ExpertRunner:
    """Runs a chunk's local experts with the backend ``expert_kernel`` and the load call for.

    An explicit kernel is resolved once per (device, dtype); ``auto`` asks the selector per
    chunk. ``backends_used`` lists the backend of every chunk since ``begin_forward``.
    """

    def __init__(self, local_experts: LocalExperts, eps_config):
        self.local_experts = local_experts
        self.eps_config = eps_config
        self.backends_used: List[str] = []
        self._resolved = {}
        self._tables = {}
        self._tuners = {}
        self._beside_copy = False

    def begin_forward(self, eps_config) -> None:
        if eps_config is not self.eps_config:
            self.eps_config = eps_config
            self._resolved.clear()
            self._tables.clear()
            self._tuners.clear()
        self.backends_used = []
        self._beside_copy = False
        self.local_experts.begin_forward()

    def prepare(self, calls: Sequence[Sequence[int]], device: torch.device,
                beside_copy: bool = False) -> None:
        """Before the first chunk: stage the expert row offsets of every call of the forward
        (``calls``: rows per expert of each, ``ChunkLayout.expert_calls``) in one copy to
        ``device`` (the tokens', where the experts run). ``beside_copy``: this forward's chunks
        run beside transfers (pipelined over a link), so ``auto`` chooses and calibrates for
        that condition."""
        from megatron_eps.experts.gemm_common import DeviceRowEnds, row_ends, stage_int32_batch

        self._beside_copy = beside_copy
        offsets = [row_ends(counts) for counts in calls if not isinstance(counts, DeviceRowEnds)]
        self.local_experts.staged_int32 = stage_int32_batch(offsets, device)

    def device_row_ends_backend(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        """The backend that runs these experts from rows per expert the host never reads
        (``gemm_common.DeviceRowEnds``), or None where the ``expert_kernel`` setting names a
        backend that needs host counts or none such can run here. ``auto`` takes the first
        available one in the GPU default order: without the counts on the host there is no
        load to choose by."""
        from megatron_eps.experts.base import get_backend, gpu_default_order

        kernel = self.eps_config.expert_kernel
        key = ("device_row_ends", kernel, torch.device(device), dtype)
        if key not in self._resolved:
            names = gpu_default_order() if kernel == "auto" else (kernel,)
            self._resolved[key] = next(
                (name for name in names
                 if get_backend(name).takes_device_row_ends
                 and get_backend(name).unavailable_reason(self.local_experts, device, dtype) is None),
                None)
        return self._resolved[key]

    def resolve(self, tokens: torch.Tensor, tokens_per_expert: Sequence[int]) -> Optional[str]:
        """The backend for this call, or None when this load is to be calibrated first."""
        from megatron_eps.experts.selector import choose_backend

        kernel = self.eps_config.expert_kernel
        key = (kernel, tokens.device, tokens.dtype)
        if kernel != "auto" and key in self._resolved:
            return self._resolved[key]  # an explicit choice never depends on the load
        if kernel == "auto" and self._calibrates(tokens):
            decided = self._tuner(tokens.device).decision(self._tune_key(tokens, tokens_per_expert))
            if decided is not None or self._candidates(tokens, tokens_per_expert):
                return decided
        name = choose_backend(
            kernel, self.local_experts, tokens_per_expert, tokens.device, tokens.dtype,
            profile=self._kernel_tables(tokens.device),
            beside_copy=self._beside_copy,
        )
        if kernel != "auto":
            self._resolved[key] = name
        return name

    def run(self, tokens, tokens_per_expert, probs, first_expert) -> torch.Tensor:
        from megatron_eps.experts.gemm_common import DeviceRowEnds

        if isinstance(tokens_per_expert, DeviceRowEnds):
            name = self.device_row_ends_backend(tokens.device, tokens.dtype)
            if name is None:
                raise ValueError(f"expert_kernel={self.eps_config.expert_kernel!r} cannot run "
                                 "from rows per expert held on the device")
            self.backends_used.append(name)
            return self._run_backend(name, tokens, tokens_per_expert, probs, first_expert)
        name = self.resolve(tokens, tokens_per_expert)
        if name is None:
            tuner, key = self._tuner(tokens.device), self._tune_key(tokens, tokens_per_expert)
            candidates = self._candidates(tokens, tokens_per_expert)
            args = (tokens, tokens_per_expert, probs, first_expert)
            compiling = tuner.compiling(key, candidates, lambda n: self._compile_in_background(n, *args))
            if compiling:
                # Timed once every candidate has compiled; meanwhile one that is ready runs
                # (with none ready, the first waits for its own compilation).
                name = next((n for n in candidates if n not in compiling), candidates[0])
                tuner.untimed_calls += 1
                out = self._run_backend(name, *args)
            else:
                name, out = tuner.tune(key, candidates, lambda n: self._run_backend(n, *args))
            self.backends_used.append(name)
            return out
        self.backends_used.append(name)
        return self._run_backend(name, tokens, tokens_per_expert, probs, first_expert)

    def _run_backend(self, name, tokens, tokens_per_expert, probs, first_expert):
        backend, tokens = self._backend_and_rows(name, tokens)
        return backend.forward(self.local_experts, tokens, tokens_per_expert, probs, first_expert)

    def _compile_in_background(self, name, tokens, tokens_per_expert, probs, first_expert):
        backend, tokens = self._backend_and_rows(name, tokens)
        return backend.compile_in_background(self.local_experts, tokens, tokens_per_expert, probs,
                                             first_expert)

    @staticmethod
    def _backend_and_rows(name, tokens):
        backend = get_backend(name)
        if not (backend.accepts_strided_rows or tokens.is_contiguous()):
            tokens = tokens.contiguous()
        return backend, tokens

    # ------------------------------------------------------------------ self-calibration
    # Tests set a timer (e.g. a fake one) to calibrate anywhere; otherwise CUDA events.
    _timer = None

    @property
    def timer(self):
        return self._timer

    @timer.setter
    def timer(self, timer) -> None:
        self._timer = timer
        self._tuners.clear()  # the next lookup hands the tuner this timer

    def _calibrates(self, tokens) -> bool:
        mode = self.eps_config.kernel_autotune
        if mode == "off":
            return False
        return mode == "on" or tokens.is_cuda or self.timer is not None

    def _candidates(self, tokens, tokens_per_expert):
        from megatron_eps.experts.selector import calibration_candidates

        return calibration_candidates(self.local_experts, tokens.device, tokens.dtype,
                                      self._kernel_tables(tokens.device), tokens_per_expert,
                                      self._beside_copy)

    def _kernel_tables(self, device):
        """The kernel tables for ``device``, looked up once per settings (every chunk asks)."""
        if device not in self._tables:
            self._tables[device] = load_kernel_tables(self.eps_config.cost_profile, device)
        return self._tables[device]

    def _tuner(self, device):
        """The autotuner for ``device``, looked up once per settings (every chunk asks)."""
        if device not in self._tuners:
            from megatron_eps.experts.autotune import autotuner_for

            self._tuners[device] = autotuner_for(device, self.eps_config.kernel_cache, self.timer)
        return self._tuners[device]

    def _tune_key(self, tokens, tokens_per_expert) -> str:
        from megatron_eps.experts.autotune import KernelAutotuner

        w = self.local_experts.weights()
        shape = (w.hidden_size, w.ffn_hidden_size, len(tokens_per_expert))
        return KernelAutotuner.key(shape, tokens.dtype, tokens_per_expert, self._beside_copy)
