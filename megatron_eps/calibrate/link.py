"""``megatron-eps-calibrate link``: latency and bandwidth of the expert-parallel link.

With two or more ranks (torchrun), ``all_to_all_single`` (NCCL on GPUs, gloo on CPU) is timed
for message sizes from 64 KiB to 256 MiB per rank and ``t = latency + remote bytes /
bandwidth`` is fitted by least squares; "remote bytes" are the rows a rank sends to other
ranks, which is what the cost model charges the link for. On CUDA the copy-engine transport
and the overlap of each transport with a grouped GEMM are measured too
(``calibrate.transports``), giving the profile's ``links`` section.

On one device there is no link: at ep_size 1 no row crosses one and the cost model never
pipelines. The figures written then are a device-local copy's, so that the profile is complete,
and the provenance says so.
"""

from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist

from megatron_eps.timing import fit_latency_bandwidth, median_seconds


def message_sizes(min_kib: int = 64, max_mib: int = 256) -> List[int]:
    """Bytes per rank, from ``min_kib`` KiB to ``max_mib`` MiB in steps of 4x."""
    sizes, size = [], min_kib * 1024
    while size <= max_mib * 1024 * 1024:
        sizes.append(size)
        size *= 4
    return sizes


def measure_all_to_all(device, sizes, repeats: int = 20, warmup: int = 5, group=None) -> List[dict]:
    """One point per size: the slowest rank's median ``all_to_all_single`` time."""
    world = dist.get_world_size(group)
    points = []
    for total_bytes in sizes:
        numel_per_peer = max(1, total_bytes // (4 * world))
        send = torch.randn(numel_per_peer * world, device=device, dtype=torch.float32)
        recv = torch.empty_like(send)
        seconds = median_seconds(lambda: dist.all_to_all_single(recv, send, group=group), device,
                                 repeats, warmup, group=group if group is not None else dist.group.WORLD)
        points.append({"bytes_per_rank": numel_per_peer * 4 * world,
                       "remote_bytes": numel_per_peer * 4 * (world - 1), "seconds": seconds})
    return points


def measure_local_copy(device, sizes, repeats: int = 20, warmup: int = 5) -> List[dict]:
    """One point per size: the median time of a device-local copy of that many bytes."""
    points = []
    for total_bytes in sizes:
        src = torch.empty(total_bytes // 4, device=device, dtype=torch.float32).normal_()
        dst = torch.empty_like(src)
        seconds = median_seconds(lambda: dst.copy_(src), device, repeats, warmup)
        points.append({"bytes_per_rank": src.numel() * 4, "remote_bytes": src.numel() * 4,
                       "seconds": seconds})
    return points


def calibrate_link(device, sizes=None, repeats: int = 20, warmup: int = 5, pieces: int = 80,
                   group=None) -> dict:
    """The profile's link figures: ``{"pipeline": {link_latency_us, link_bandwidth_gbps},
    "links": {transport: figures} (multi-GPU CUDA only), "points": ..., "measured": what}``."""
    sizes = sizes or message_sizes()
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    if world > 1:
        points = measure_all_to_all(device, sizes, repeats, warmup, group)
        measured = f"all_to_all_single over {world} ranks ({dist.get_backend(group)})"
    else:
        points = measure_local_copy(device, sizes, repeats, warmup)
        measured = ("one device, no link to measure: a device-local copy's latency and "
                    "bandwidth stand in (at ep_size 1 no row crosses a link and the cost model "
                    "does not pipeline); calibrate the link with torchrun on the EP group's GPUs")
    latency, bandwidth = fit_latency_bandwidth([(p["remote_bytes"], p["seconds"]) for p in points])
    result = {
        "pipeline": {"link_latency_us": latency * 1e6, "link_bandwidth_gbps": bandwidth / 1e9},
        "links": {},
        "points": {"all_to_all" if world > 1 else "local_copy": points},
        "measured": measured,
    }
    if world > 1 and device.type == "cuda":
        from megatron_eps.calibrate.transports import measure_transports

        transports = measure_transports(device, group if group is not None else dist.group.WORLD,
                                        pieces=pieces)
        result["links"] = transports["links"]
        result["points"].update(transports["points"])
        # The transport-agnostic pipeline section takes NCCL's figures (the fallback transport).
        result["pipeline"].update(
            {k: transports["links"]["nccl"][k]
             for k in ("link_latency_us", "link_bandwidth_gbps", "overlap_efficiency")})
        result["measured"] += "; per transport: copy engines and NCCL beside a grouped GEMM"
    return result


def print_link(result: dict, out=None) -> None:
    import sys

    out = out or sys.stdout
    section = result["pipeline"]
    print(f"link ({result['measured'].split(';')[0]}): latency {section['link_latency_us']:.1f} us, "
          f"bandwidth {section['link_bandwidth_gbps']:.1f} GB/s", file=out)
    for name, link in result["links"].items():
        print(f"  {name:12} latency {link['link_latency_us']:7.1f} us  per piece "
              f"{link['link_piece_us']:5.2f} us  bandwidth {link['link_bandwidth_gbps']:6.1f} GB/s  "
              f"overlap {link['overlap_efficiency']:.2f}", file=out)

