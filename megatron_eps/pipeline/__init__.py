"""The pipelined MoE forward: the dispatcher (a thin Megatron subclass) owns its one skeleton,
the row schemes (``rows``) supply its rows, the chunk layout says where they go, and the runner
issues the plan on two streams."""
