"""Diagnostics behind the pipeline numbers (GPU): where the host time of a chunk goes, whether
torch._grouped_mm honours the SM carve-out, how faithful each link emulator is under a GEMM
load, and a small DSV2 sweep over emulator x carve-out. Prints a report and writes JSON.

Run: python benchmarks/diag_overlap.py --out diag.json
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_pipeline as bp  # noqa: E402


def log(*a):
    print(*a, flush=True)


def section(result, name):
    def wrap(fn):
        t = time.monotonic()
        try:
            result[name] = fn()
        except Exception:  # noqa: BLE001
            result[name] = {"error": traceback.format_exc()}
        log(f"== {name} ({time.monotonic() - t:.1f}s): {json.dumps(result[name], default=str)[:3000]}")
        return fn

    return wrap


def host_us(fn, n=200):
    """Mean host time of fn() (no sync inside the loop), after a warm-up."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    dt = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    return dt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", default="8192,32768")
    args = ap.parse_args()
    bp.init_megatron()
    from megatron_eps.experts.activation import ActivationSpec
    from megatron_eps.bench.link_emulator import EmulatedLinkAllToAll, calibrate_sleep_cycles_per_ms
    from megatron_eps.comm.sm_control import gemm_sm_carveout

    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    dev = "cuda"
    H, F, E = 5120, 1536, 20
    cycles = calibrate_sleep_cycles_per_ms()
    result["sleep_cycles_per_ms"] = cycles

    @section(result, "carveout_grouped_mm")
    def _():
        rows = 8192 * 6
        x = torch.randn(rows, H, device=dev, dtype=torch.bfloat16)
        w = torch.randn(E, 2 * F, H, device=dev, dtype=torch.bfloat16)
        offs = torch.arange(1, E + 1, device=dev, dtype=torch.int32) * (rows // E)
        out = {}
        for c in (None, 8, 16, 66):
            with gemm_sm_carveout(c):
                ms, _ = bp.time_ms(lambda: torch._grouped_mm(x, w.transpose(1, 2), offs=offs))
            out[str(c)] = ms
        return out

    @section(result, "link_emulators")
    def _():
        out = {}
        src = torch.randn(8192 * 6, H, device=dev, dtype=torch.bfloat16)
        dst = torch.empty_like(src)
        a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
        comm = torch.cuda.Stream(priority=-1)
        for spin, ctas in (("sleep", 1), ("timer", 16), ("timer", 8)):
            link = EmulatedLinkAllToAll(160.0, 10.0, 7 / 8, cycles_per_ms=cycles, spin=spin, num_ctas=ctas)
            modeled = link.link_seconds(src.numel() * 2) * 1e3
            link(dst, src, [src.shape[0]], [src.shape[0]])
            torch.cuda.synchronize()
            ok = bool(torch.equal(dst, src))
            idle, _ = bp.time_ms(lambda: link(dst, src, [src.shape[0]], [src.shape[0]]))
            loaded = {}
            for carve in (None, 16):
                samples = []
                for _ in range(5):
                    torch.cuda.synchronize()
                    with gemm_sm_carveout(carve):
                        for _ in range(6):
                            a @ a  # ~1.5 ms each: the comm stream runs under GEMM load
                    with torch.cuda.stream(comm):
                        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        s.record()
                        link(dst, src, [src.shape[0]], [src.shape[0]])
                        e.record()
                    with gemm_sm_carveout(carve):
                        for _ in range(6):
                            a @ a
                    torch.cuda.synchronize()
                    samples.append(s.elapsed_time(e))
                loaded[str(carve)] = statistics.median(samples)
            out[f"{spin}/{ctas}"] = {"copy_ok": ok, "modeled_ms": modeled, "idle_ms": idle, "under_gemm_ms": loaded}
        return out

    _, eps = bp.build_layer("dsv2", "grouped")
    link160 = EmulatedLinkAllToAll(160.0, 10.0, 7 / 8, cycles_per_ms=cycles, spin="timer", num_ctas=16)

    @section(result, "host_costs_us")
    def _():
        from megatron_eps.experts.base import get_backend

        local = eps.expert_runner.local_experts
        rows = 1024 * 6
        x = torch.randn(rows, H, device=dev, dtype=torch.bfloat16)
        p = torch.rand(rows, device=dev)
        tpe = [rows // E] * E
        w = local.weights()
        offs = torch.arange(1, E + 1, device=dev, dtype=torch.int32) * (rows // E)
        fc1 = torch._grouped_mm(x, w.fc1.transpose(1, 2), offs=offs)
        spec = ActivationSpec.swiglu()
        small = torch.empty(64, H, device=dev, dtype=torch.bfloat16)
        ev = torch.cuda.Event()
        s2 = torch.cuda.Stream()
        sleep_link = EmulatedLinkAllToAll(160.0, 10.0, 7 / 8, cycles_per_ms=cycles, spin="sleep")
        out = {
            "grouped_mm": host_us(lambda: torch._grouped_mm(x, w.fc1.transpose(1, 2), offs=offs)),
            "activation": host_us(lambda: w.activation.apply(fc1, p)),
            "activation_swiglu_spec": host_us(lambda: spec.apply(fc1, p)),
            "grouped_backend_forward_all": host_us(lambda: get_backend("grouped").forward(local, x, tpe, p, 0)),
            "link_timer_small": host_us(lambda: link160(small, small.clone(), [64], [64]), n=100),
            "link_sleep_small": host_us(lambda: sleep_link(small, small.clone(), [64], [64]), n=100),
            "clone_small": host_us(lambda: small.clone()),
            "event_record_wait": host_us(lambda: (ev.record(), s2.wait_event(ev))),
            "record_stream": host_us(lambda: x.record_stream(s2)),
            "new_empty": host_us(lambda: x.new_empty((rows, H))),
            "index_select": host_us(lambda: x.index_select(0, offs.long())),
        }
        return out

    @section(result, "forward_profile_1k_N16")
    def _():
        x = bp.make_input("dsv2", 1024)
        bp.set_mode(eps, 16, link160, overlap=True)
        with torch.no_grad():
            for _ in range(3):
                eps(x)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(10):
                eps(x)
            host_ms = (time.perf_counter() - t) / 10 * 1e3
            torch.cuda.synchronize()
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(10):
                eps(x)
            torch.cuda.synchronize()
            pr.disable()
        buf = io.StringIO()
        st = pstats.Stats(pr, stream=buf)
        st.sort_stats("tottime").print_stats(40)
        st.sort_stats("cumulative").print_stats(40)
        log(buf.getvalue())
        times = {}
        with torch.no_grad():
            for n in (1, 4, 16):
                bp.set_mode(eps, n, link160, overlap=True)
                times[n], _ = bp.time_ms(lambda: eps(x))
        return {"host_ms_per_forward_N16": host_ms, "T_N_ms": times}

    @section(result, "sweep")
    def _():
        out = {}
        links = {
            "sleep": EmulatedLinkAllToAll(160.0, 10.0, 7 / 8, cycles_per_ms=cycles, spin="sleep"),
            "timer16": link160,
            "timer8": EmulatedLinkAllToAll(160.0, 10.0, 7 / 8, cycles_per_ms=cycles, spin="timer", num_ctas=8),
        }
        from megatron_eps.comm import ProcessGroupAllToAll

        for tokens in [int(t) for t in args.tokens.split(",")]:
            x = bp.make_input("dsv2", tokens)
            row = {}
            with torch.no_grad():
                bp.set_mode(eps, 1, ProcessGroupAllToAll(None), overlap=True)
                row["T_comp"], _ = bp.time_ms(lambda: eps(x))
                rows = int(eps.token_dispatcher.last_record.global_counts.sum())
                for lname, link in links.items():
                    row[f"{lname}/T_comm"] = bp.comm_only_ms(link, "dsv2", tokens, rows, 10)
                    bp.set_mode(eps, 1, link, overlap=False)
                    row[f"{lname}/T_seq"], _ = bp.time_ms(lambda: eps(x))
                    for carve in (None, 8, 16):
                        if lname == "sleep" and carve is not None:
                            continue
                        eps.eps_config.gemm_sm_carveout = carve
                        for n in (2, 4, 8, 20):
                            bp.set_mode(eps, n, link, overlap=True)
                            row[f"{lname}/c{carve}/N{n}"], _ = bp.time_ms(lambda: eps(x))
                        eps.eps_config.gemm_sm_carveout = None
                    best = min(v for k, v in row.items() if k.startswith(lname + "/c"))
                    row[f"{lname}/eta"] = (row[f"{lname}/T_seq"] - best) / min(row[f"{lname}/T_comm"], row["T_comp"])
            out[tokens] = row
            log(tokens, json.dumps({k: round(v, 3) for k, v in row.items()}))
        return out

    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, default=str)


if __name__ == "__main__":
    main()
