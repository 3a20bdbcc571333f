"""megatron-eps-prefill: prefill throughput of a Megatron-Core MoE GPT, stock vs EPS.

Builds a GPTModel with MoE layers from a model config (configs/*.yaml; random weights from a
fixed seed, nothing downloaded), then runs the prefill step through Megatron-Core's static
inference path (``StaticInferenceContext`` + ``GPTInferenceWrapper.run_one_forward_step``, the
step the static engine / TextGenerationController takes for prefill) for a batch of prompts per
size: once with the stock MoELayer and once with EPS (``apply_eps`` on the spec; the EPS model
loads the stock model's state_dict, so the weights are equal). It checks that the logits agree
and reports prefill tokens/s (median over timed repeats, after warm-up).

Launch::

    torchrun --nproc-per-node N examples/run_prefill.py --config configs/tiny.yaml
    python examples/run_prefill.py                      # one process, world size 1
    megatron-eps-prefill --config configs/deepseek_v2_lite.yaml --layers 8 \
        --prompt-lengths 2048,8192,32768 --json out.json

Parallel layout: expert parallelism over all ranks (EP = world size unless set); attention is
data-parallel (each rank prefills its own prompts) or, for GQA/MHA models,
tensor-parallel with ``--tensor-model-parallel-size`` (sequence parallel MoE, ETP = 1). Every
rank runs the same prompt lengths, batch size and number of steps, as EP requires.
"""

from __future__ import annotations

import os
import sys


def quiet_megatron_logs() -> None:
    """Megatron's INFO chatter (and torchrun's elastic agent's) at WARNING. Its known notices are
    silenced when megatron_eps is imported (``megatron_eps.known_notices``)."""
    import logging

    logging.getLogger("megatron.core").setLevel(logging.WARNING)


def _stacks_on_termination() -> None:
    """With ``MEGATRON_EPS_STACKS_ON_SIGTERM=1``: on SIGTERM (a timeout, or torchrun stopping
    the ranks after one failed), print every thread's Python stack before exiting, so a run
    stopped from outside shows where each rank was."""
    import faulthandler
    import signal

    if os.environ.get("MEGATRON_EPS_STACKS_ON_SIGTERM") != "1":
        return

    try:
        faulthandler.register(signal.SIGTERM, all_threads=True, chain=True)
    except (AttributeError, ValueError, RuntimeError):
        pass  # not the main thread, or a platform without it


def main(argv=None) -> int:
    quiet_megatron_logs()
    _stacks_on_termination()
    import torch.distributed as dist

    from megatron_eps.config import EPSConfigError
    from megatron_eps.inference.model_config import ModelConfigError
    from megatron_eps.inference.prefill_args import parse_args, report_once
    from megatron_eps.inference.prefill_run import run
    from megatron_eps.inference.prefill_setup import PrefillError, is_main_rank

    args = parse_args(argv)
    if args.validate_only:
        if is_main_rank():
            print(f"megatron-eps-prefill: settings OK ({args.config}, "
                  f"{os.environ.get('WORLD_SIZE', '1')} rank(s))", flush=True)
        return 0
    try:
        report = run(args)
    except (EPSConfigError, ModelConfigError, PrefillError) as exc:
        # A check only the running job can make: still one line, from rank 0.
        report_once(f"megatron-eps-prefill: error: {exc}")
        return 2
    finally:
        if dist.is_initialized():
            try:
                from megatron.core import parallel_state

                parallel_state.destroy_model_parallel()
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass
    is_main = int(os.environ.get("RANK", "0")) == 0
    if report.get("logits_agree") is False:
        if is_main:
            print("ERROR: stock and EPS logits disagree beyond the tolerance", file=sys.stderr)
        return 1
    if report.get("errors"):
        if is_main:
            print(f"ERROR: some sizes did not run: {'; '.join(report['errors'])}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
