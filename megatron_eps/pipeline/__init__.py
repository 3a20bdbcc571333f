"""The pipelined MoE forward: chunk layout, the plan (the only schedule), the runner that issues
it on two streams, the dispatcher (a thin Megatron subclass), the policies a layer hands it, and
the permutation kernels."""
