"""``--eps-*`` command-line arguments, usable as Megatron-LM's ``extra_args_provider``."""

from __future__ import annotations

import argparse

from megatron_eps.config import CHUNK_SPLITS, EXPERT_KERNELS, TRANSPORTS

# argparse dest -> EPSConfig field. Flags left at None do not override the YAML file.
ARG_TO_FIELD = {
    "eps_pipeline_degree": "pipeline_degree",
    "eps_expert_kernel": "expert_kernel",
    "eps_min_tokens_to_pipeline": "min_tokens_to_pipeline",
    "eps_cost_profile": "cost_profile",
    "eps_max_pipeline_degree": "max_pipeline_degree",
    "eps_chunk_split": "chunk_split",
    "eps_comm_num_ctas": "comm_num_ctas",
    "eps_gemm_sm_carveout": "gemm_sm_carveout",
    "eps_transport": "transport",
}


def _pipeline_degree(text: str):
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--eps-pipeline-degree {text!r}: allowed values are an integer >= 1 or 'auto'"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"--eps-pipeline-degree {text!r}: allowed values are an integer >= 1 or 'auto'"
        )
    return value


def _int_at_least(minimum: int, flag: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(
                f"{flag} {text!r}: allowed values are integers >= {minimum}"
            )
        return value

    return parse


def add_eps_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the megatron-eps argument group to ``parser`` and return it.

    Use as ``initialize_megatron(extra_args_provider=megatron_eps.add_eps_args)`` or call it on
    your own parser. Read the result with ``EPSConfig.from_args(args)``.
    """
    group = parser.add_argument_group("megatron-eps", "EPS-MoE expert pipeline scheduler")
    group.add_argument(
        "--eps-moe",
        action="store_true",
        default=False,
        help="Run MoE layers with the EPS pipelined dispatcher (EPSMoELayer).",
    )
    group.add_argument(
        "--eps-config",
        type=str,
        default=None,
        metavar="PATH",
        help="YAML file with EPS settings (top level or an 'eps:' section). Explicit --eps-* "
        "flags override it.",
    )
    group.add_argument(
        "--eps-pipeline-degree",
        type=_pipeline_degree,
        default=None,
        metavar="N|auto",
        help="Chunks per MoE layer: an integer >= 1 or 'auto' (cost model). Default: auto.",
    )
    group.add_argument(
        "--eps-expert-kernel",
        type=str,
        choices=EXPERT_KERNELS,
        default=None,
        help="Expert GEMM backend. Default: auto (from the cost table).",
    )
    group.add_argument(
        "--eps-min-tokens-to-pipeline",
        type=_int_at_least(0, "--eps-min-tokens-to-pipeline"),
        default=None,
        metavar="T",
        help="Run unpipelined below this many tokens per rank (mean over the EP group). "
        "Default: 2048.",
    )
    group.add_argument(
        "--eps-cost-profile",
        type=str,
        default=None,
        metavar="PATH",
        help="JSON cost profile from megatron-eps-calibrate. Default: the shipped profile for "
        "this GPU, if any.",
    )
    group.add_argument(
        "--eps-max-pipeline-degree",
        type=_int_at_least(1, "--eps-max-pipeline-degree"),
        default=None,
        metavar="N",
        help="Upper bound for --eps-pipeline-degree auto. Default: 16.",
    )
    group.add_argument(
        "--eps-comm-num-ctas",
        type=_int_at_least(1, "--eps-comm-num-ctas"),
        default=None,
        metavar="C",
        help="Cap on the CTAs NCCL uses for the all-to-alls. Default: NCCL's choice.",
    )
    group.add_argument(
        "--eps-gemm-sm-carveout",
        type=_int_at_least(0, "--eps-gemm-sm-carveout"),
        default=None,
        metavar="S",
        help="SMs held back from the GEMMs while chunks overlap with the all-to-alls, so the "
        "communication kernels find free SMs. Default: 0.",
    )
    group.add_argument(
        "--eps-chunk-split",
        type=str,
        choices=CHUNK_SPLITS,
        default=None,
        help="Experts per chunk: equal (the paper), tail (last chunk one expert), or auto (the "
        "cost model picks per forward). Default: auto.",
    )
    group.add_argument(
        "--eps-transport",
        type=str,
        choices=TRANSPORTS,
        default=None,
        help="How chunks travel between expert-parallel ranks: copy_engine (SM-free copies "
        "into the peers' symmetric memory; one node with NVLink), nccl (all_to_all_single), "
        "or auto (copy_engine where it works, else nccl). Default: auto.",
    )
    return parser
