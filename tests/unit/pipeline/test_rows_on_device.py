"""Rows planned on the device (``plan_rows_on_device``): without expert parallelism the layer
runs from routing counts the host never reads. Checked against the stock MoELayer and against
the host-planned forward on random inputs, one hot expert, empty experts and uneven loads;
and where it must not apply, it does not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_eps import EPSConfig

HIDDEN, FFN, SHARED = 64, 32, 48


def _pair(dtype=torch.float32, experts=8, topk=2, shared=True, **eps_kw):
    from megatron_eps.inference.layers import build_moe_pair, moe_config

    config = moe_config(num_experts=experts, topk=topk, hidden_size=HIDDEN, ffn_hidden_size=FFN,
                        shared_expert_size=SHARED if shared else None, dtype=dtype)
    settings = dict(min_tokens_to_pipeline=0, plan_rows_on_device="on")
    settings.update(eps_kw)
    stock, eps = build_moe_pair(config, EPSConfig(**settings), seed=11)
    eps.stock_forward_below_tokens = 0
    return stock, eps


def _device():
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _rel(ref, out):
    ref, out = ref.double(), out.double()
    return ((ref - out).norm() / ref.norm()).item()


def _route_hot(layer, expert):
    """Every token picks ``expert`` first (positive inputs, one large router row)."""
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[expert].fill_(1.0)


def _route_away_from(layer, empty, experts):
    """No token picks an expert of ``empty`` (their router rows far below the rest)."""
    with torch.no_grad():
        for e in empty:
            layer.router.weight[e].fill_(-1.0)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("routing", ["random", "hot", "empty_experts"])
@pytest.mark.parametrize("experts,topk,shared", [(8, 2, True), (16, 6, False), (4, 1, True)])
def test_rows_on_device_equal_stock_and_the_host_plan(parallel, dtype, tol, routing, experts,
                                                       topk, shared):
    stock, eps = _pair(dtype, experts, topk, shared)
    gen = torch.Generator().manual_seed(experts * 10 + topk)
    x = torch.randn(97, 3, HIDDEN, generator=gen)  # 291 tokens: every tile boundary uneven
    if routing == "hot":
        x = x.abs() + 0.1
        for layer in (stock, eps):
            _route_hot(layer, experts - 1)
    elif routing == "empty_experts":
        x = x.abs() + 0.1
        for layer in (stock, eps):
            _route_away_from(layer, range(0, experts, 2), experts)
    x = x.to(dtype=dtype, device=_device())
    with torch.no_grad():
        expected, _ = stock(x)
        on_device, _ = eps(x)
        record = eps.token_dispatcher.last_record
        backends = list(eps.last_expert_backends)
        eps.eps_config = EPSConfig(**{**eps.eps_config.to_dict(), "plan_rows_on_device": "off"})
        on_host, _ = eps(x)
        host_record = eps.token_dispatcher.last_record
    assert record.device_counts is not None and host_record.device_counts is None
    assert backends == ["grouped"]
    counts = record.global_counts
    assert np.array_equal(counts, host_record.global_counts)
    assert int(counts.sum()) == x.shape[0] * x.shape[1] * topk
    if routing == "hot":
        assert counts[0, experts - 1] == x.shape[0] * x.shape[1]
    if routing == "empty_experts":
        assert (counts[0, ::2] == 0).all() and (counts[0, 1::2] > 0).any()
    assert _rel(expected, on_device) <= tol
    assert _rel(on_host, on_device) <= tol


def test_the_experts_take_the_grouped_gemm_from_device_offsets(parallel):
    stock, eps = _pair(torch.float32, expert_kernel="auto")
    x = torch.randn(64, 4, HIDDEN, device=_device())
    with torch.no_grad():
        eps(x)
    assert eps.last_expert_backends == ["grouped"]
    assert eps.token_dispatcher.last_record.host_counts is None  # nothing read during the forward


@pytest.mark.parametrize("change,reason", [
    (dict(plan_rows_on_device="off"), "the setting is off"),
    (dict(pipeline_degree=2), "an explicit number of chunks"),
    (dict(expert_kernel="dense"), "a backend that needs host counts"),
    (dict(dispatch_dedup="on"), "the deduplicated rows"),
])
def test_the_host_reads_the_counts_where_the_plan_needs_them(parallel, change, reason):
    stock, eps = _pair(torch.float32, **change)
    x = torch.randn(64, 4, HIDDEN, device=_device())
    with torch.no_grad():
        expected, _ = stock(x)
        out, _ = eps(x)
    record = eps.token_dispatcher.last_record
    assert record.device_counts is None, reason
    assert record.host_counts is not None, reason
    assert _rel(expected, out) <= 1e-5


def test_auto_plans_on_the_host_on_cpus_and_with_a_padding_mask(parallel):
    stock, eps = _pair(torch.float32, plan_rows_on_device="auto")
    x = torch.randn(64, 4, HIDDEN, device=_device())
    dispatcher = eps.token_dispatcher
    tokens = x.reshape(-1, HIDDEN)
    transport = eps.transport_choice.resolve(x.device)
    chunking = eps.chunking_policy(x)
    planned = dispatcher.plans_rows_on_device(tokens, transport, eps.expert_runner, chunking, True)
    assert planned == x.is_cuda
    assert not dispatcher.plans_rows_on_device(tokens, transport, eps.expert_runner, chunking,
                                               all_tokens_routed=False)


def test_a_bad_setting_names_the_allowed_values():
    from megatron_eps import EPSConfigError

    with pytest.raises(EPSConfigError, match="plan_rows_on_device.*auto.*on.*off"):
        EPSConfig(plan_rows_on_device="sometimes")


def test_a_forward_without_tokens_planned_on_the_device(parallel):
    stock, eps = _pair(torch.float32)
    x = torch.randn(0, 2, HIDDEN, device=_device())
    with torch.no_grad():
        out, _ = eps(x)
    assert out.shape == x.shape
    record = eps.token_dispatcher.last_record
    assert record.device_counts is not None and int(record.global_counts.sum()) == 0
