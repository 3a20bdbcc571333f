"""Where a measurement came from: the code's commit, the software, the device, the command."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from typing import Dict, Optional

__version__ = "0.1.0"

COMMIT_ENV_VARS = ("MEGATRON_EPS_GIT_COMMIT", "EPS_GIT_COMMIT")


def git_commit(repo_dir: Optional[str] = None) -> Optional[str]:
    """The commit named by MEGATRON_EPS_GIT_COMMIT if set (the GPU machine gets a copy of the
    tree whose .git, if any, is not the one the run was made from), else ``git rev-parse HEAD``
    of the checkout."""
    for name in COMMIT_ENV_VARS:
        if os.environ.get(name) and os.environ[name] != "unknown":
            return os.environ[name]
    repo_dir = repo_dir or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        return subprocess.check_output(
            ["git", "rev-parse", "HEAD"], cwd=repo_dir, text=True, stderr=subprocess.DEVNULL,
            timeout=10,
        ).strip()
    except Exception:  # noqa: BLE001 - not a git checkout
        return None


def versions() -> Dict[str, Optional[str]]:
    """The software a measurement ran on (None where a package does not import)."""
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        out["triton"] = None
    try:
        from megatron.core.package_info import __version__ as mcore

        out["megatron_core"] = mcore
    except Exception:  # noqa: BLE001
        out["megatron_core"] = None
    try:
        import transformer_engine

        out["transformer_engine"] = transformer_engine.__version__
    except Exception:  # noqa: BLE001
        out["transformer_engine"] = None
    return out


def provenance(device_name: str, **what) -> dict:
    """The provenance record of a profile section: device, software versions, commit, command
    and date, plus ``what`` (how each figure was obtained)."""
    return dict(
        device=device_name,
        versions=versions(),
        git_commit=git_commit(),
        command=" ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **what,
    )


def write_result(path: Optional[str], result: dict) -> None:
    """Write a benchmark's JSON result to ``path`` (folders made as needed); None: nothing."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")
