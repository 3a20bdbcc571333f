"""Rank-side bodies of the multi-rank EPS-vs-stock tests (run through run_distributed).

Each function runs on every rank of a gloo (CPU) or NCCL (GPU) group, builds a stock MoELayer
and an EPSMoELayer with identical weights for many cases, and returns per-case measurements;
the pytest side asserts on them, so a failure names the case.
"""

from __future__ import annotations

import itertools
import types

import torch
import torch.distributed as dist

from megatron_eps import EPSConfig
from megatron_eps.moe_layer import route_allowing_empty
from megatron_eps.policy.degree import FixedChunking
from megatron_eps.policy.chunks import chunk_sizes
from megatron_eps.testing import Utils
from megatron_eps.inference.layers import build_moe_pair, moe_config

HIDDEN = 32
FFN = 16
SHARED_FFN = 24


def _device():
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def make_tokens(rank: int, world: int, routing: str, seed: int, dtype):
    """Per-rank input [S, B, H]: uneven sequence lengths across ranks; for routing='zero_rank'
    the last rank holds no tokens."""
    gen = torch.Generator().manual_seed(seed * 1000 + rank)
    seq = 3 + 4 * rank + (seed % 3)
    if routing == "zero_rank" and rank == world - 1:
        seq = 0
    x = torch.randn(seq, 2, HIDDEN, generator=gen)
    if routing == "hot":
        # Positive activations + a router row that is large for one expert => every token
        # picks that expert first.
        x = x.abs() + 0.1
    return x.to(dtype=dtype, device=_device())


def make_hot_router(layer, hot_expert: int):
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[hot_expert].fill_(1.0)


def relative_error(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    reference, candidate = reference.double(), candidate.double()
    denom = reference.norm().item()
    diff = (reference - candidate).norm().item()
    return diff / denom if denom > 0 else diff


def equivalence_cases(world: int):
    """The (experts, topk, N, shared, routing, chunk split) grid for a world size, covering
    every value of each axis at least once per world size."""
    expert_counts = [e for e in (4, 8, 16, 64) if e % world == 0]
    cases = []
    for index, (experts, topk, degree) in enumerate(
        itertools.product(expert_counts, (1, 2, 6), (1, 2, 3, 4, 8))
    ):
        if topk > experts:
            continue
        shared = index % 2 == 1
        routing = ("balanced", "hot", "zero_rank")[index % 3]
        split = ("equal", "tail")[(index // 2) % 2]
        cases.append((experts, topk, degree, shared, routing, split))
    return cases


def run_equivalence(world_expected: int, dtype_name: str, expert_kernel: str, max_cases: int,
                    transport: str = "auto", dispatch_dedup: str = "off",
                    local_rows: str = "together"):
    """Compare stock and EPS outputs for the case grid; return [(case, error, N, record)]."""
    world = dist.get_world_size()
    assert world == world_expected, (world, world_expected)
    rank = dist.get_rank()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    Utils.initialize_model_parallel(1, 1, expert_model_parallel_size=world)
    results = []
    try:
        cases = equivalence_cases(world)[:max_cases]
        for seed, (experts, topk, degree, shared, routing, split) in enumerate(cases):
            config = moe_config(
                num_experts=experts,
                topk=topk,
                hidden_size=HIDDEN,
                ffn_hidden_size=FFN,
                shared_expert_size=SHARED_FFN if shared else None,
                ep_size=world,
                dtype=dtype,
            )
            eps_config = EPSConfig(
                pipeline_degree=degree,
                min_tokens_to_pipeline=0,
                expert_kernel=expert_kernel,
                chunk_split=split,
                transport=transport,
                dispatch_dedup=dispatch_dedup,
                local_rows=local_rows,
            )
            stock, eps = build_moe_pair(config, eps_config, seed=seed + 7)
            if routing == "hot":
                hot = seed % experts
                make_hot_router(stock, hot)
                make_hot_router(eps, hot)
            x = make_tokens(rank, world, routing, seed, dtype)
            if x.numel() == 0:
                # Stock Megatron's router cannot take an empty batch (a view of 0 elements);
                # give the stock layer the same empty-batch routing EPS uses so that the
                # dispatcher paths, not the router, are compared.
                stock.route = types.MethodType(route_allowing_empty, stock)
            with torch.no_grad():
                expected, _ = stock(x)
                actual, _ = eps(x)
            record = eps.token_dispatcher.last_record
            results.append(
                {
                    "case": (experts, topk, degree, shared, routing, dtype_name, split),
                    "rel_err": relative_error(expected, actual),
                    "max_abs": (expected.double() - actual.double()).abs().max().item()
                    if expected.numel()
                    else 0.0,
                    "shape_ok": tuple(expected.shape) == tuple(actual.shape),
                    "num_chunks": record.num_chunks,
                    "expected_chunks": min(degree, experts // world),
                    "experts_per_chunk": list(record.experts_per_chunk),
                    "expected_experts_per_chunk": list(
                        chunk_sizes(experts // world, min(degree, experts // world), split)
                    ),
                    "tokens": x.shape[0] * x.shape[1],
                    "routed_rows_total": int(record.global_counts.sum()),
                    "finite": bool(torch.isfinite(actual.float()).all()),
                    "transport": record.transport,
                    "dedup": record.dedup,
                    "local_rows_apart": record.local_rows_apart,
                    "bytes_sent": record.bytes_sent.to_dict(),
                    "pair_bytes_sent": record.pair_bytes_sent.to_dict(),
                }
            )
    finally:
        Utils.destroy_model_parallel()
    return results


def run_layer_stack(world_expected: int, dtype_name: str, transport: str = "auto"):
    """Three EPS layers in a row (as in a model: one transport memory and one comm stream shared
    by the layers, each with shared experts and its own N), several forwards whose sizes grow
    the buffers, shrink and leave the last rank without tokens; vs the same stock stack.
    Returns [(forward, rel_err, transport)]."""
    world = dist.get_world_size()
    assert world == world_expected, (world, world_expected)
    rank = dist.get_rank()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    Utils.initialize_model_parallel(1, 1, expert_model_parallel_size=world)
    try:
        stock_layers, eps_layers = [], []
        for depth, degree in enumerate((3, 1, 2)):
            config = moe_config(num_experts=4 * world, topk=2, hidden_size=HIDDEN,
                                ffn_hidden_size=FFN, shared_expert_size=SHARED_FFN,
                                ep_size=world, dtype=dtype)
            stock, eps = build_moe_pair(
                config, EPSConfig(pipeline_degree=degree, min_tokens_to_pipeline=0,
                                  transport=transport), seed=11 + depth)
            stock.route = types.MethodType(route_allowing_empty, stock)
            stock_layers.append(stock)
            eps_layers.append(eps)

        def run(layers, x):
            for layer in layers:
                out, _ = layer(x)
                x = torch.tanh(out) + x  # something between the layers, as attention would be
            return x

        results = []
        for forward, seq in enumerate((5, 40, 3, 64, 0)):
            if seq == 0 and rank != world - 1:
                seq = 7
            gen = torch.Generator().manual_seed(100 * forward + rank)
            x = torch.randn(seq, 2, HIDDEN, generator=gen).to(dtype=dtype, device=_device())
            with torch.no_grad():
                expected, actual = run(stock_layers, x), run(eps_layers, x)
            results.append({
                "forward": forward,
                "rel_err": relative_error(expected, actual) if expected.numel() else 0.0,
                "finite": bool(torch.isfinite(actual.float()).all()),
                "transport": eps_layers[0].token_dispatcher.last_record.transport,
            })
        return results
    finally:
        Utils.destroy_model_parallel()


def run_auto_degree_agreement(world_expected: int):
    """pipeline_degree='auto' with a profile: every rank must pick the same N although the
    ranks hold very different loads (one rank with none)."""
    import json
    import os
    import tempfile

    world = dist.get_world_size()
    assert world == world_expected
    rank = dist.get_rank()
    Utils.initialize_model_parallel(1, 1, expert_model_parallel_size=world)
    profile_dir = tempfile.mkdtemp()
    path = os.path.join(profile_dir, f"profile_{rank}.json")
    with open(path, "w") as f:
        json.dump(
            {
                "pipeline": {
                    "link_bandwidth_gbps": 1e-3,  # a slow link so that pipelining pays
                    "link_latency_us": 1.0,
                    "chunk_overhead_us": 1.0,
                    "expert_tflops": 1e-3,
                    # GEMMs timed at this rate on every device: a GPU's shipped kernel tables
                    # would time these tiny GEMMs in microseconds, and nothing would be left
                    # to overlap with the link
                    "use_kernel_tables": False,
                }
            },
            f,
        )
    try:
        config = moe_config(num_experts=8 * world, topk=2, ep_size=world)
        eps_config = EPSConfig(
            pipeline_degree="auto", min_tokens_to_pipeline=0, cost_profile=path,
            expert_kernel="megatron",
        )
        stock, eps = build_moe_pair(config, eps_config, seed=3)
        seq = [40, 3, 0, 17][rank % 4]
        x = torch.randn(seq, 1, HIDDEN, generator=torch.Generator().manual_seed(rank))
        x = x.to(_device())
        if x.numel() == 0:
            stock.route = types.MethodType(route_allowing_empty, stock)
        with torch.no_grad():
            expected, _ = stock(x)
            actual, _ = eps(x)
        return {
            "num_chunks": eps.token_dispatcher.last_record.num_chunks,
            "experts_per_chunk": list(eps.token_dispatcher.last_record.experts_per_chunk),
            "rel_err": relative_error(expected, actual),
        }
    finally:
        Utils.destroy_model_parallel()


def run_dispatcher_roundtrip(world_expected: int, dispatch_dedup: str = "off"):
    """Megatron's dropless dispatcher test, for the pipelined path: with probs = 1/topk and
    experts that only scale rows by their prob, dispatch -> experts -> combine must return the
    input exactly, for every N, on ranks with uneven (and zero) token counts. The same check
    runs through the six inherited stock methods (the N = 1 protocol)."""
    world = dist.get_world_size()
    assert world == world_expected
    rank = dist.get_rank()
    Utils.initialize_model_parallel(1, 1, expert_model_parallel_size=world)
    out = []
    try:
        for experts, topk in ((4 * world, 2), (2 * world, 1), (8 * world, 6)):
            config = moe_config(num_experts=experts, topk=topk, ep_size=world)
            _, eps = build_moe_pair(config, EPSConfig(min_tokens_to_pipeline=0,
                                                      dispatch_dedup=dispatch_dedup))
            dispatcher = eps.token_dispatcher
            seq = [5, 0, 9, 2][rank % 4]
            x = torch.randn(seq, 3, HIDDEN, generator=torch.Generator().manual_seed(rank))
            x = x.to(_device())
            scores = torch.randn(x.shape[0] * x.shape[1], experts, device=x.device)
            chosen = scores.topk(topk, dim=1).indices
            routing_map = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, chosen, True)
            probs = routing_map.float() / topk

            class ScaleByProb:
                def prepare(self, calls, device, beside_copy=False):
                    pass

                def run(self, tokens, tokens_per_expert, row_probs, first_expert):
                    assert tokens.shape[0] == sum(tokens_per_expert)
                    return tokens * row_probs.unsqueeze(-1).to(tokens.dtype)

            for degree in (1, 2, 3, experts // world):
                y = dispatcher.pipelined_forward(
                    x, probs, routing_map, ScaleByProb(), FixedChunking(degree)
                )
                assert dispatcher.last_record.dedup == (dispatch_dedup == "on")
                out.append(
                    ("pipelined", experts, topk, degree,
                     (y - x).abs().max().item() if x.numel() else 0.0,
                     dispatcher.last_record.num_chunks)
                )
            # The inherited six-method protocol, as MoELayer drives it.
            h, p = dispatcher.dispatch_preprocess(x, routing_map, probs)
            h, p = dispatcher.token_dispatch(h, p)
            h, tokens_per_expert, p = dispatcher.dispatch_postprocess(h, p)
            h = h * p.unsqueeze(-1)
            h = dispatcher.combine_preprocess(h)
            h = dispatcher.token_combine(h)
            y = dispatcher.combine_postprocess(h)
            out.append(("stock-protocol", experts, topk, 1,
                        (y - x).abs().max().item() if x.numel() else 0.0, 1))
    finally:
        Utils.destroy_model_parallel()
    return out


def run_dedup_accuracy(world_expected: int, max_cases: int):
    """The equivalence grid in bf16 against the same layer in float64 (same weights, fp64
    router so that every layer routes alike): stock, EPS with one row per pair, and EPS
    deduplicated with the partial sums travelling in bf16 and in fp32. Returns per case the
    squared L2 norms of each error and of the reference, and whether a repeated deduplicated
    forward is bit-identical. "rounding" is the squared error of the float64 output rounded
    once to bf16: the floor no bf16 layer can go below."""
    world = dist.get_world_size()
    assert world == world_expected, (world, world_expected)
    rank = dist.get_rank()
    Utils.initialize_model_parallel(1, 1, expert_model_parallel_size=world)
    results = []
    try:
        cases = [c for c in equivalence_cases(world) if c[1] > 1][:max_cases]
        for seed, (experts, topk, degree, shared, routing, split) in enumerate(cases):
            def config(dtype):
                return moe_config(num_experts=experts, topk=topk, hidden_size=HIDDEN,
                                  ffn_hidden_size=FFN,
                                  shared_expert_size=SHARED_FFN if shared else None,
                                  ep_size=world, dtype=dtype, moe_router_dtype="fp64")

            eps_config = EPSConfig(pipeline_degree=degree, min_tokens_to_pipeline=0,
                                   expert_kernel="megatron", chunk_split=split,
                                   dispatch_dedup="on", dedup_combine_dtype="model")
            stock, eps = build_moe_pair(config(torch.bfloat16), eps_config, seed=seed + 7)
            reference, _ = build_moe_pair(config(torch.float64), EPSConfig(enabled=False))
            if routing == "hot":
                make_hot_router(stock, seed % experts)
                make_hot_router(eps, seed % experts)
            reference.load_state_dict(stock.state_dict())
            x = make_tokens(rank, world, routing, seed, torch.bfloat16)
            if x.numel() == 0:
                for layer in (stock, reference):
                    layer.route = types.MethodType(route_allowing_empty, layer)
            dispatcher = eps.token_dispatcher
            outputs = {}
            with torch.no_grad():
                ref, _ = reference(x.double())
                outputs["stock"], _ = stock(x)
                outputs["dedup_bf16"], _ = eps(x)
                again, _ = eps(x)
                dedup_used = dispatcher.last_record.dedup
                eps.eps_config = eps_config.replace(dedup_combine_dtype="fp32")
                outputs["dedup_fp32"], _ = eps(x)
                eps.eps_config = eps_config.replace(dispatch_dedup="off")
                outputs["pairs"], _ = eps(x)
            row = {"case": (experts, topk, degree, shared, routing, split),
                   "reference": ref.double().norm().item() ** 2,
                   "rounding": (ref.to(torch.bfloat16).double() - ref).norm().item() ** 2,
                   "deterministic": bool(torch.equal(again, outputs["dedup_bf16"])),
                   "dedup_used": dedup_used}
            for name, out in outputs.items():
                row[name] = (out.double() - ref).norm().item() ** 2
            results.append(row)
    finally:
        Utils.destroy_model_parallel()
    return results
