"""The README's CPU quick start for the Python API runs as written (issue 10, item 10)."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_readme_cpu_python_snippet_runs_as_written(tmp_path):
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    match = re.search(r"<!-- cpu-quickstart -->\s*```python\n(.*?)```\s*<!-- /cpu-quickstart -->",
                      readme, re.S)
    assert match, "README lost its CPU quick-start snippet"
    script = tmp_path / "snippet.py"
    script.write_text(match.group(1))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    for key in ("RANK", "WORLD_SIZE", "MASTER_PORT", "PYTHONWARNINGS"):
        env.pop(key, None)
    from megatron_eps.testing.distributed import free_port

    env["MASTER_PORT"] = str(free_port())
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    diff = float(re.search(r"layer max \|diff\|: (\S+)", proc.stdout).group(1))
    assert diff <= 1e-5
    assert "logits: (2, 16, 128)" in proc.stdout
    # Only the two result lines: no notices of optional dependencies (megatron_eps.known_notices)
    # or anything else.
    assert proc.stderr == "", proc.stderr[-4000:]
    assert proc.stdout.splitlines() == [f"layer max |diff|: {diff}", "logits: (2, 16, 128)"]
