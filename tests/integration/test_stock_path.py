"""EPSMoELayer runs Megatron's stock forward where the pipeline cannot pay off or cannot run:
decode steps and small batches (decided from the input shape), CUDA-graph capture, and the
drop-and-pad Megatron turns on at run time for graphed decode (set_decode_expert_padding)."""

import pytest
import torch

from megatron_eps.moe_layer import STOCK_FORWARD_BELOW_TOKENS
from megatron_eps.testing import run_distributed
from tests.integration import stock_path_cases


def test_small_batches_take_the_stock_path_and_prefill_the_pipeline():
    cases = [("decode_1", 1, 1), ("decode_64", 1, 64), ("small", 100, 2),
             ("at_threshold", STOCK_FORWARD_BELOW_TOKENS, 1), ("prefill", 512, 2)]
    got = run_distributed(stock_path_cases.which_path, 1, cases)[0]
    assert got["decode_1"] == ("stock", True)
    assert got["decode_64"] == ("stock", True)
    assert got["small"] == ("stock", True)
    # the threshold itself and above: pipelined, still equal to stock
    assert got["at_threshold"] == ("pipeline", True)
    assert got["prefill"] == ("pipeline", True)


@pytest.mark.slow
@pytest.mark.multigpu
def test_expert_parallel_ranks_agree_whatever_their_own_token_counts():
    # One rank below the stock threshold, its peer above: the shape alone must not send one
    # rank down the stock path while the other pipelines (their collectives would not pair).
    small, large = STOCK_FORWARD_BELOW_TOKENS // 4, STOCK_FORWARD_BELOW_TOKENS * 2
    assert run_distributed(stock_path_cases.uneven_small_batches, 2, [small, large],
                           timeout_s=120) == [True, True]


@pytest.mark.parametrize("flips", [
    [("config", "moe_pad_expert_input_to_capacity", True),
     ("config", "moe_expert_capacity_factor", 8 / 2)],
    [("dispatcher", "drop_and_pad", True), ("dispatcher", "moe_expert_capacity_factor", 4.0)],
], ids=["config", "dispatcher"])
def test_run_time_drop_and_pad_takes_the_stock_path(flips):
    got = run_distributed(stock_path_cases.which_path, 1, [("prefill", 512, 2)], flips)[0]
    path, _ = got["prefill"]
    assert path == "stock"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_capture_runs_the_stock_forward():
    got = run_distributed(stock_path_cases.graph_capture_path, 1)[0]
    assert got == {"decode": True, "prefill": True}
