import os
import sys

# Make `tests.unit...` and `tests.integration...` importable in spawned ranks and keep CPU threads modest.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("OMP_NUM_THREADS", "1")
