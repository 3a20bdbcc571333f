"""Rank-side bodies for the tests of EPSMoELayer's stock path (decode steps, small batches,
CUDA-graph capture, Megatron's run-time drop-and-pad)."""

import torch

from megatron_eps import EPSConfig
from megatron_eps.testing import Utils
from megatron_eps.inference.layers import build_moe_pair, moe_config


class PipelineCalled(AssertionError):
    pass


def _refuse_pipeline(*args, **kwargs):
    raise PipelineCalled("the pipelined forward ran")


def which_path(tokens_by_case, flips=()):
    """For each (name, sequence length, batch): 'stock' or 'pipeline', and whether the output
    equals the stock MoELayer's. ``flips``: config/dispatcher attributes set before the
    forwards, as Megatron's set_decode_expert_padding does at run time."""
    Utils.initialize_model_parallel(1, 1, expert_model_parallel_size=1)
    out = {}
    try:
        config = moe_config(num_experts=8, hidden_size=32, ffn_hidden_size=16)
        stock, eps = build_moe_pair(config, EPSConfig(pipeline_degree=2))
        for target, name, value in flips:
            owner = eps.config if target == "config" else eps.token_dispatcher
            object.__setattr__(owner, name, value)
            if target == "config":
                object.__setattr__(stock.config, name, value)
        pipelined_forward = eps.token_dispatcher.pipelined_forward
        for name, seq, batch in tokens_by_case:
            x = torch.randn(seq, batch, 32, generator=torch.Generator().manual_seed(seq * 7 + batch))
            x = x.to(next(eps.parameters()).device)
            eps.token_dispatcher.pipelined_forward = _refuse_pipeline
            with torch.inference_mode():
                try:
                    got, _ = eps(x)
                    path = "stock"
                except PipelineCalled:
                    eps.token_dispatcher.pipelined_forward = pipelined_forward
                    got, _ = eps(x)
                    path = "pipeline"
                want, _ = stock(x)
            eps.token_dispatcher.pipelined_forward = pipelined_forward
            out[name] = (path, bool(torch.allclose(got, want, rtol=1e-5, atol=1e-6)))
    finally:
        Utils.destroy_model_parallel()
    return out


def uneven_small_batches(tokens_by_rank):
    """EP=2, this rank holding ``tokens_by_rank[rank]`` tokens (one below the stock threshold,
    one above): whether both ranks got through the forward with the stock layer's output."""
    import torch.distributed as dist

    Utils.initialize_model_parallel(1, 1, expert_model_parallel_size=2)
    try:
        config = moe_config(num_experts=8, hidden_size=32, ffn_hidden_size=16, ep_size=2)
        stock, eps = build_moe_pair(config, EPSConfig(pipeline_degree=2))
        tokens = tokens_by_rank[dist.get_rank()]
        x = torch.randn(tokens, 1, 32, generator=torch.Generator().manual_seed(tokens))
        x = x.to(next(eps.parameters()).device)
        with torch.inference_mode():
            got, _ = eps(x)
            want, _ = stock(x)
        return bool(torch.allclose(got, want, rtol=1e-5, atol=1e-6))
    finally:
        Utils.destroy_model_parallel()


def decode_padding(layer, capacity_factor):
    """What Megatron's set_decode_expert_padding does to a MoE layer for graphed decode:
    drop-and-pad with a capacity (the stock dispatcher then needs no host sync)."""
    for owner in (layer.config, layer.token_dispatcher.config):
        object.__setattr__(owner, "moe_pad_expert_input_to_capacity", capacity_factor is not None)
        object.__setattr__(owner, "moe_expert_capacity_factor", capacity_factor)
    layer.token_dispatcher.drop_and_pad = capacity_factor is not None
    layer.token_dispatcher.moe_expert_capacity_factor = capacity_factor


def graph_capture_path():
    """On a GPU: capture a decode-sized and a prefill-sized forward of the EPS layer in CUDA
    graphs, with the drop-and-pad Megatron turns on for graphed decode (no-drop capacity
    num_experts / topk); both must capture (the stock path runs while capturing) and replay to
    the stock layer's output under the same padding."""
    Utils.initialize_model_parallel(1, 1, expert_model_parallel_size=1)
    out = {}
    try:
        config = moe_config(num_experts=8, hidden_size=64, ffn_hidden_size=32)
        stock, eps = build_moe_pair(config, EPSConfig(pipeline_degree=2, min_tokens_to_pipeline=0))
        for layer in (stock, eps):
            decode_padding(layer, 8 / 2)
        for name, seq in (("decode", 4), ("prefill", 512)):
            x = torch.randn(seq, 1, 64, device="cuda")
            with torch.inference_mode():
                want, _ = stock(x)
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    eps(x)  # warm-up outside the capture, as Megatron does
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    captured, _ = eps(x)
                graph.replay()
                torch.cuda.synchronize()
            out[name] = bool(torch.allclose(captured, want, rtol=1e-4, atol=1e-5))
    finally:
        Utils.destroy_model_parallel()
    return out
