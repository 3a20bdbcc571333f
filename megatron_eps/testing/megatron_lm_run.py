"""Set-up for the project's own Megatron-LM scripts (scripts/write_moe_checkpoint.py,
scripts/megatron_lm_logits.py): on a machine without CUDA they run on CPU ranks."""

from __future__ import annotations


def megatron_lm_run_setup() -> bool:
    """Prepare a Megatron-LM run in this process; returns ``allow_no_cuda`` for
    ``initialize_megatron`` (True on CPU, where the CPU shims are installed).

    These scripts read no dataset, so Megatron's start-up compilation of its dataset helpers
    (make + g++ + pybind11, into the Megatron-LM tree) is skipped.
    """
    import torch

    from megatron.core.datasets import utils as dataset_utils

    dataset_utils.compile_helpers = lambda: None
    if torch.cuda.is_available():
        return False
    from megatron_eps.inference.cpu_shims import install_cpu_shims

    install_cpu_shims()
    # initialize_megatron builds Megatron's model-parallel groups only where it counts a device
    torch.cuda.device_count = lambda: 1
    torch.cuda.set_device = lambda device: None
    # save_checkpoint stores the CUDA generator's state unconditionally
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    # the legacy fused kernels are CUDA code (nvcc); the CPU run uses the unfused paths
    try:
        from megatron.legacy import fused_kernels
    except ImportError:
        pass
    else:
        fused_kernels.load = lambda args: None
    from megatron.training import checkpointing

    checkpointing.read_metadata = _on_cpu(checkpointing.read_metadata)
    return True


def _on_cpu(function):
    """``function`` with tensors it creates on "cuda" created on the CPU instead (Megatron's
    read_metadata all-reduces the iteration on a CUDA tensor)."""
    import functools

    import torch

    @functools.wraps(function)
    def run(*args, **kwargs):
        make_tensor = torch.tensor

        def tensor_on_cpu(*a, device=None, **k):
            if device is not None and str(device).startswith("cuda"):
                device = "cpu"
            return make_tensor(*a, device=device, **k)

        torch.tensor = tensor_on_cpu
        try:
            return function(*args, **kwargs)
        finally:
            torch.tensor = make_tensor

    return run
