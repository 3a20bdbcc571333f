"""One prefill step through Megatron-Core's static inference path, warmed up and timed."""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

from megatron_eps import compat
from megatron_eps.experts.autotune import calibration_activity, warm_up_while_calibrating


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_prefill(model, tokens, config, vocab_size, check_logits: str):
    """One prefill through the static inference path; returns the logits (as the wrapper gives
    them: [B, 1, V] with last-token materialisation, [B, L, V] otherwise)."""
    batch, length = tokens.shape
    context = compat.make_static_inference_context(
        batch, length, materialize_only_last_token_logits=(check_logits == "last")
    )
    wrapper = compat.make_gpt_inference_wrapper(
        model,
        context,
        hidden_size=config.hidden_size,
        params_dtype=config.params_dtype,
        padded_vocab_size=vocab_size,
        max_batch_size=batch,
        max_sequence_length=length,
    )
    wrapper.prep_model_for_inference()
    inputs = wrapper.prep_inference_input(tokens)
    window = wrapper.get_batch_for_context_window(inputs, 0, length)
    return wrapper, context, window


def timed_prefills(model, tokens, config, vocab_size, args, device, progress=None, label="",
                   profile=True):
    """Warm-up + timed repeats of the prefill step; returns (times_s, logits of the last run,
    warm-up steps taken, self-calibration runs inside the timed steps). With ``profile`` and
    ``--profile-dir``, one more step is traced after the timed ones.

    The last warm-up step is repeated while it calibrated EPS's expert kernels (or waited for
    their compilation) on some rank: that one-time cost per load bucket stays out of the timed
    steps (the kernel cache file keeps the decisions for later runs)."""
    wrapper, context, window = run_prefill(model, tokens, config, vocab_size, args.check_logits)
    logits = None

    def step():
        nonlocal logits
        context.reset()
        dist.barrier()
        sync(device)
        start = time.perf_counter()
        with compat.inference_engine_mode():
            logits = wrapper.run_one_forward_step(window)
        sync(device)
        if args.check_logits == "last" and logits.dim() == 3 and logits.shape[1] != 1:
            # Kept on the host and compared in float64 per mode, every token's logits of a
            # long prompt take minutes and tens of GB: fail at the first step instead.
            raise RuntimeError(
                f"the model returned logits for {logits.shape[1]} positions where the last "
                "token's were asked for (megatron_eps.compat.inference_engine_mode)")
        if progress is not None:
            progress.update(1)
        return time.perf_counter() - start

    for _ in range(args.warmup - 1):
        step()
    warmup = args.warmup
    if args.warmup:
        warmup += warm_up_while_calibrating(step, device) - 1
        if progress is not None:
            progress.total += warmup - args.warmup
    runs_before = calibration_activity()[0]
    times = [step() for _ in range(args.repeats)]
    calibrated_while_timed = calibration_activity()[0] - runs_before
    profile_dir = getattr(args, "profile_dir", None)  # stand-in args in tests lack it
    if profile_dir and profile:
        _profiled_step(step, device, model, os.path.join(
            profile_dir, f"prefill_{label or 'model'}_{tokens.shape[1]}_rank{dist.get_rank()}.json"))
    # The step takes as long as its slowest rank.
    t = torch.tensor(times, dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    # In the model's dtype: at 32K tokens and a 100K vocabulary, fp32 logits are 13 GB per
    # mode and length, and every rank keeps one copy per mode on the host.
    out = logits
    del wrapper, context, window
    return t.cpu().tolist(), out, warmup, calibrated_while_timed


def _profiled_step(step, device, model, path: str) -> None:
    """One more step under torch.profiler (host ops and GPU kernels), as a Chrome trace. EPS's
    layers mark their phases in it (``eps.counts``, ``eps.layout``, ``eps.experts[0]``, ...), so
    the host time between the token-count copy and the first expert GEMM is attributed."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    dispatchers = [getattr(m, "token_dispatcher", None)
                   for m in (model.modules() if model is not None else ())]
    marked = [d for d in dispatchers if getattr(d, "profiler_ranges", None) is False]
    for m in marked:
        m.profiler_ranges = True
    try:
        with torch.profiler.profile(activities=activities) as prof:
            step()
    finally:
        for m in marked:
            m.profiler_ranges = False
    prof.export_chrome_trace(path)

