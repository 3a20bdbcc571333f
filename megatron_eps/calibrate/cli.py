"""``megatron-eps-calibrate kernels|link|pipeline|all``: measure this GPU, write its profile.

    megatron-eps-calibrate all --config deepseek_v2_lite --out megatron_eps/profiles/
    torchrun --nproc-per-node 8 -m megatron_eps.calibrate link --out profile.json
    megatron-eps-calibrate --config tiny --out kernels.json       (no subcommand: kernels)

``kernels`` times the expert GEMM backends (``megatron_eps.calibrate.kernels``; its options);
``link`` fits the expert-parallel link (``calibrate.link``); ``pipeline`` measures the cost
model's compute and host constants (``calibrate.cost_constants``); ``all`` does the three and writes
one complete profile. ``--out`` is a file or a directory (then ``<dir>/<gpu slug>.json``);
an existing profile keeps the sections not measured. Under torchrun every rank measures and
rank 0 writes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_eps.calibrate import kernels as kernel_calibration
from megatron_eps.calibrate.kernels import CalibrateError
from megatron_eps.errors import EPSConfigError
from megatron_eps.policy.kernel_tables import read_cost_profile_json
from megatron_eps.inference.model_config import ModelConfigError

PROG = "megatron-eps-calibrate"
# What each subcommand measures; without one, ``kernels`` runs.
SUBCOMMANDS = {
    "kernels": "time the expert GEMM backends over a grid of loads (the default)",
    "link": "fit the expert-parallel link of every transport (merged into an existing profile)",
    "pipeline": "measure the cost model's compute and host constants",
    "all": "the three, into one complete profile",
}


def top_parser() -> argparse.ArgumentParser:
    """The command's own parser: its subcommands (each has ``--help`` of its own)."""
    lines = [f"  {name:<9} {what}" for name, what in SUBCOMMANDS.items()]
    parser = argparse.ArgumentParser(
        prog=PROG, usage=f"{PROG} [{'|'.join(SUBCOMMANDS)}] [options]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Measure this GPU and write (or merge into) its profile file.",
        epilog="subcommands:\n" + "\n".join(lines)
        + f"\n\n'{PROG} SUBCOMMAND --help' lists a subcommand's options.")
    parser.add_argument("command", nargs="?", choices=tuple(SUBCOMMANDS), help=argparse.SUPPRESS)
    return parser


def build_parser(command: str) -> argparse.ArgumentParser:
    """The options of ``link``, ``pipeline`` and ``all`` beyond the kernel calibration's own
    (shape, device and dtype options are the kernel calibration's: see ``kernels --help``)."""
    parser = argparse.ArgumentParser(prog=f"{PROG} {command}", description=(
        "Measure this GPU and merge the result into its profile file. Shape, device and dtype "
        "options as for 'megatron-eps-calibrate kernels'."))
    parser.add_argument("--out", required=True, help="profile file, or a directory for <gpu slug>.json")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per point")
    if command in ("link", "all", "pipeline"):
        parser.add_argument("--min-kib", type=int, default=64, help="smallest link message per rank")
        parser.add_argument("--max-mib", type=int, default=256, help="largest link message per rank")
        parser.add_argument("--pieces", type=int, default=80,
                            help="copies per copy-engine transfer (local experts)")
    if command in ("pipeline", "all"):
        parser.add_argument("--topk", type=int, default=None, help="experts per token (default: the "
                            "config's moe_router_topk, else 2)")
        parser.add_argument("--shared-ffn", type=int, default=None, help="shared-expert width "
                            "(default: the config's moe_shared_expert_intermediate_size)")
        parser.add_argument("--tokens", type=int, default=None,
                            help="GPU-bound load for the chunk overhead (default 16384; 256 on CPU)")
        parser.add_argument("--host-tokens", type=int, default=None,
                            help="host-bound load for the host's per-chunk time (default 1024; 32 on CPU)")
        parser.add_argument("--kernel", default="auto", help="expert_kernel of the measured layer")
    parser.add_argument("--min-gain", type=float, default=None,
                        help="the profile's min_gain (auto's hysteresis); default: kept")
    if command == "link":
        parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and (argv[0] in ("-h", "--help") or not argv[0].startswith("-")):
        top_parser().parse_args(argv[:1])  # --help, or an unknown subcommand: argparse says so
    command = argv.pop(0) if argv and argv[0] in SUBCOMMANDS else "kernels"
    if command == "kernels":
        return kernel_calibration.main(argv)
    parser = build_parser(command)
    args, rest = parser.parse_known_args(argv)
    try:
        return _run(command, parser, args, rest)
    except (CalibrateError, EPSConfigError, ModelConfigError) as exc:
        parser.error(str(exc))


def _run(command: str, parser, args, rest: List[str]) -> int:
    kernel_args = None
    if command == "link":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        device = _device(args.device)
    else:
        kernel_args = kernel_calibration.build_parser().parse_args(rest + ["--out", os.devnull])
        device = _device(kernel_args.device)
    group = _join_process_group(device)
    name = kernel_calibration.device_info(device)["name"]
    from megatron_eps.provenance import provenance
    from megatron_eps.policy.profile import profile_path_for, write_profile_sections

    sections = {"pipeline": {}, "links": {}}
    measured = {}
    path = profile_path_for(args.out, name)
    if command == "link" and not os.path.isfile(path):
        raise CalibrateError(f"--out {path!r}: no profile to merge the link figures into; write one "
                         "with 'megatron-eps-calibrate all' (or copy the shipped one) first")
    if command in ("link", "all") or (command == "pipeline" and not _has_link(path)):
        link = _link(args, device, group)
        sections["pipeline"].update(link["pipeline"])
        sections["links"].update(link["links"])
        measured["link"] = link["measured"]
    if command in ("pipeline", "all"):
        pipeline = _pipeline(args, kernel_args, device)
        sections["pipeline"].update(pipeline["pipeline"])
        measured.update(pipeline["measured"])
    if args.min_gain is not None:
        sections["pipeline"]["min_gain"] = args.min_gain
    experts = None
    if command == "all":
        experts = _kernels(rest)
        measured["experts"] = "megatron-eps-calibrate kernels " + " ".join(rest)
    if group is None or dist.get_rank() == 0:
        write_profile_sections(path, experts=experts, pipeline=sections["pipeline"],
                               links=sections["links"] or None,
                               provenance=provenance(name, **measured))
        print(f"wrote {path} ({name})")
    if group is not None:
        dist.barrier()
    return 0


def _device(text: Optional[str]) -> torch.device:
    device = torch.device(text or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def _join_process_group(device: torch.device):
    """The process group of a torchrun launch (created here if needed), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return None
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.group.WORLD


def _has_link(path: str) -> bool:
    if not os.path.isfile(path):
        return False
    section = read_cost_profile_json(path).get("pipeline", {})
    return "link_bandwidth_gbps" in section and "link_latency_us" in section


def _link(args, device, group) -> dict:
    from megatron_eps.calibrate.link import calibrate_link, message_sizes, print_link

    result = calibrate_link(device, message_sizes(args.min_kib, args.max_mib), repeats=args.repeats,
                            warmup=3, pieces=args.pieces, group=group)
    print_link(result)
    return result


def _pipeline(args, kernel_args, device) -> dict:
    from megatron_eps.calibrate.cost_constants import MoEShape, calibrate_pipeline

    hidden, ffn, experts = kernel_calibration.shapes_from_args(kernel_args)[0]
    topk, shared = _routing_from_config(kernel_args.config)
    shape = MoEShape(hidden, ffn, experts, args.topk or topk or 2,
                     args.shared_ffn if args.shared_ffn is not None else shared)
    on_gpu = device.type == "cuda"
    result = calibrate_pipeline(
        shape, device, kernel_calibration.DTYPES[kernel_args.dtype], expert_kernel=args.kernel,
        tokens=args.tokens or (16384 if on_gpu else 256),
        host_tokens=args.host_tokens or (1024 if on_gpu else 32), repeats=args.repeats,
    )
    p = result["pipeline"]
    print(f"pipeline: k {p['chunk_overhead_us']:.1f} us/chunk, host {p['host_chunk_us']:.1f} us/chunk "
          f"+ {p['host_base_us']:.1f} us, experts {p['expert_tflops']:.1f} TFLOP/s, memory "
          f"{p['memory_bandwidth_gbps']:.0f} GB/s")
    return result


def _routing_from_config(config: Optional[str]):
    """(moe_router_topk, moe_shared_expert_intermediate_size) of a model config, or Nones."""
    if not config:
        return None, None
    from megatron_eps.config import read_yaml_file
    from megatron_eps.inference.shipped_configs import resolve_config

    data = read_yaml_file(resolve_config(config), "--config", CalibrateError) or {}
    model = data.get("model", data)
    return model.get("moe_router_topk"), model.get("moe_shared_expert_intermediate_size")


def _kernels(kernel_argv: List[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "kernels.json")
        kernel_calibration.main(list(kernel_argv) + ["--out", out])
        return read_cost_profile_json(out)


if __name__ == "__main__":
    sys.exit(main())
