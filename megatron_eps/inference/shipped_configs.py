"""The model configs shipped with megatron-eps, and a ``--config`` value resolved to a file."""

from __future__ import annotations

import os
from typing import List, Optional

from megatron_eps.inference.model_config import ModelConfigError


def shipped_configs_dir() -> Optional[str]:
    """The model configs shipped with megatron-eps: megatron_eps/configs/ in an installed wheel,
    configs/ in a source checkout."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # megatron_eps/
    for candidate in (os.path.join(package, "configs"), os.path.join(os.path.dirname(package), "configs")):
        if os.path.isdir(candidate) and any(f.endswith(".yaml") for f in os.listdir(candidate)):
            return candidate
    return None


def shipped_config_names() -> List[str]:
    directory = shipped_configs_dir()
    if directory is None:
        return []
    return sorted(f[: -len(".yaml")] for f in os.listdir(directory) if f.endswith(".yaml"))


def resolve_config(name: str, flag: str = "--config") -> str:
    """A model config path from a path or the name of a shipped config (``deepseek_v2_lite``,
    ``deepseek_v2_lite.yaml`` or ``configs/deepseek_v2_lite.yaml``, from any directory)."""
    if os.path.isfile(name):
        return name
    base = os.path.basename(name)
    stem = base[: -len(".yaml")] if base.endswith(".yaml") else base
    directory = shipped_configs_dir()
    looks_shipped = os.path.dirname(name) in ("", "configs") and stem in shipped_config_names()
    if directory is not None and looks_shipped:
        return os.path.join(directory, stem + ".yaml")
    raise ModelConfigError(
        f"{flag} {name!r}: no such file, and no shipped config of that name; allowed: a YAML "
        f"file or one of {', '.join(shipped_config_names()) or '(none shipped)'}"
    )

