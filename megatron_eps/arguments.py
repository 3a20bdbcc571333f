"""``--eps-*`` command-line arguments, usable as Megatron-LM's ``extra_args_provider``.

Generated from ``EPSConfig``'s fields (``config.settings()``): their flags, help texts, allowed
values and checks, so a new setting is one edit in config.py.
"""

from __future__ import annotations

import argparse

from megatron_eps.config import EPSConfigError, Setting, cli_fields, flag_of, parse_setting, settings

# argparse dest -> EPSConfig field. Flags left at None do not override the YAML file.
ARG_TO_FIELD = cli_fields()


def _parser_for(name: str, setting: Setting):
    """Text -> the setting's value, or argparse's error naming the flag and the allowed values."""
    flag = flag_of(name)

    def parse(text: str):
        try:
            return parse_setting(name, text)
        except EPSConfigError:
            allowed = Setting.ALLOWED.get(setting.kind)
            if allowed is None:
                raise argparse.ArgumentTypeError(f"{flag} {text!r}: not allowed") from None
            raise argparse.ArgumentTypeError(f"{flag} {text!r}: allowed values are {allowed}") from None

    parse.__name__ = name  # argparse names the type in some messages
    return parse


def add_eps_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the megatron-eps argument group to ``parser`` and return it.

    Use as ``initialize_megatron(extra_args_provider=megatron_eps.add_eps_args)`` or call it on
    your own parser. Read the result with ``EPSConfig.from_args(args)``.
    """
    group = parser.add_argument_group("megatron-eps", "EPS-MoE expert pipeline scheduler")
    group.add_argument(flag_of("enabled"), action="store_true", default=False,
                       help=settings()["enabled"].help)
    group.add_argument(
        "--eps-config",
        type=str,
        default=None,
        metavar="PATH",
        help="YAML file with EPS settings (top level or an 'eps:' section). Explicit --eps-* "
        "flags override it.",
    )
    for name in cli_fields().values():
        setting = settings()[name]
        options = dict(default=None, help=setting.help)
        if setting.kind == "choice":
            options.update(type=str, choices=setting.choices)
        elif setting.kind == "kernel":
            from megatron_eps.experts.base import kernel_names

            options.update(type=str, choices=kernel_names())
        elif setting.kind in ("path", "outpath"):
            options.update(type=str, metavar=setting.metavar)
        else:
            options.update(type=_parser_for(name, setting), metavar=setting.metavar)
        group.add_argument(flag_of(name), **options)
    return parser
