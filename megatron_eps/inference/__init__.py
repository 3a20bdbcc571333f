"""What the commands drive, beside the core: model configs and the GPT model built from them, the
process group and the CPU shims, small MoE layers and the grouped-GEMM baseline, and the
megatron-eps-prefill command (``prefill``, ``prefill_*``, ``logits``). The core (layer,
pipeline, transports, kernels) never imports this package."""
