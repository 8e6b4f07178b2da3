"""pytest-benchmark wrappers of the suites: `pytest benchmarks --benchmark-only`.

Small shapes on the CPU (the PyTorch reference path), the suites' real shapes on a GPU. They time only; the
correctness of every op is in tests/. Skipped as a whole when pytest-benchmark is not installed.
"""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks.*` importable from any cwd

if importlib.util.find_spec("pytest_benchmark") is None:
    collect_ignore_glob = ["test_bench_*.py"]

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
DTYPE = torch.bfloat16 if GPU else torch.float32


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def run_synced(fn):
    """fn, then a device sync so pytest-benchmark's wall clock sees the GPU work."""
    def wrapped():
        out = fn()
        if GPU:
            torch.cuda.synchronize()
        return out
    return wrapped
