"""Run an unmodified Megatron-LM script with EPS:

    python -m megatron_eps.launch SCRIPT.py [--eps-moe] [--eps-config eps.yaml] [--eps-*] <Megatron args>
    torchrun --nproc-per-node 8 -m megatron_eps.launch SCRIPT.py --eps-moe ...

The ``--eps-*`` group joins Megatron-LM's own parser (its ``add_megatron_arguments`` is wrapped
for the run), so the flags parse, and are checked, with Megatron's; a misspelt flag is Megatron's
"unrecognized arguments" error. When EPS is asked for (``--eps-moe``, ``--eps-config`` or
``$MEGATRON_EPS_CONFIG``), the parsed ``--spec`` is set to ``megatron_eps.megatron_lm
gpt_layer_spec``, which builds Megatron's own spec for the config with EPSMoELayer in its MoE
layers. A setting EPS cannot run with ends the run with one line before ``initialize_megatron``
starts any process group. Nothing in Megatron-LM's files changes.
"""

from __future__ import annotations

import os
import runpy
import sys

USAGE = ("usage: python -m megatron_eps.launch SCRIPT.py [--eps-moe] [--eps-config PATH] "
         "[--eps-*] <Megatron-LM arguments>")


def eps_requested(namespace) -> bool:
    """EPS was asked for on the command line or by the environment."""
    from megatron_eps.megatron_lm import CONFIG_ENV

    return bool(getattr(namespace, "eps_moe", False) or getattr(namespace, "eps_config", None)
                or os.environ.get(CONFIG_ENV))


def finish_parsed_args(parser, namespace):
    """After Megatron-LM's parser ran: check the EPS settings against Megatron's and select the
    EPS spec, or end the run with one line (argparse's exit, status 2)."""
    from megatron_eps import megatron_lm
    from megatron_eps.config import flag_of, flag_settings

    if not eps_requested(namespace):
        stray = sorted(flag_settings(namespace))
        if stray:
            parser.exit(2, f"megatron-eps: {', '.join(flag_of(name) for name in stray)} given "
                        f"without --eps-moe; add --eps-moe (or --eps-config PATH, or "
                        f"${megatron_lm.CONFIG_ENV}) to turn EPS on\n")
        return namespace
    spec = getattr(namespace, "spec", None)
    if spec and tuple(spec) != megatron_lm.SPEC_ARGUMENT:
        parser.exit(2, f"megatron-eps: --spec {' '.join(spec)} and EPS both choose the layer "
                    f"spec; drop --spec (EPS builds Megatron's own spec with EPS layers) or "
                    f"drop --eps-moe/--eps-config\n")
    try:
        eps_config = megatron_lm.checked_settings(namespace)
    except SystemExit as exc:
        parser.exit(2, f"{exc}\n")
    if eps_config.enabled:  # a file may say enabled: false: Megatron's own layers then
        namespace.spec = list(megatron_lm.SPEC_ARGUMENT)
    return namespace


def add_eps_group_to_megatron_parser(arguments_module) -> None:
    """Wrap ``arguments_module.add_megatron_arguments`` (Megatron-LM's parser builder, looked up
    by ``parse_args`` at call time) so every parser it builds carries the ``--eps-*`` group
    and finishes with ``finish_parsed_args``. Idempotent."""
    original = arguments_module.add_megatron_arguments
    if getattr(original, "adds_eps_group", False):
        return

    def add_megatron_and_eps_arguments(parser, *args, **kwargs):
        from megatron_eps.arguments import add_eps_args

        parser = original(parser, *args, **kwargs)
        add_eps_args(parser)
        parse_known_args = parser.parse_known_args

        def parse_known_args_then_finish(*a, **k):
            namespace, rest = parse_known_args(*a, **k)
            return finish_parsed_args(parser, namespace), rest

        parser.parse_known_args = parse_known_args_then_finish
        return parser

    add_megatron_and_eps_arguments.adds_eps_group = True
    arguments_module.add_megatron_arguments = add_megatron_and_eps_arguments


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0].startswith("-"):
        print(USAGE, file=sys.stderr)
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    script = argv[0]
    if not os.path.isfile(script):
        raise SystemExit(f"megatron-eps launch: {script!r}: no such script\n{USAGE}")
    try:
        from megatron.training import arguments
    except ImportError as exc:
        raise SystemExit(f"megatron-eps launch: cannot import megatron.training ({exc}); put a "
                         "Megatron-LM checkout first on PYTHONPATH") from None
    add_eps_group_to_megatron_parser(arguments)
    # As `python SCRIPT.py` would: the script's folder first on sys.path, its argv.
    sys.argv = [script] + argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
