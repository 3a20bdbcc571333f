"""``megatron-eps-calibrate kernels|link|pipeline|all``: writes the GPU's profile file."""
