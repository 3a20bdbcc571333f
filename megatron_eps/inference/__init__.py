"""The prefill harness beside the core: the megatron-eps-prefill CLI (``prefill``), the model
configs (``model_config``) and an SDPA attention for MLA without Transformer Engine. The core
(layer, pipeline, transports, kernels) never imports this package."""
