import os
import re

import pytest
import torch

from fake_cuda import fake_cuda  # noqa: F401  (fixture: a pretend CUDA device for CPU tests)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def pytest_report_header(config):
    return (f"qpeft: torch {torch.__version__}, cuda {torch.cuda.is_available()}, "
            f"QPEFT_BACKEND={os.environ.get('QPEFT_BACKEND', 'auto')}, "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}")


# A test that cannot run without a CUDA device carries the `gpu` marker, so that `pytest -m gpu` (tests/run_gpu.sh
# quick) selects exactly those on a lent GPU, where the CPU suite has already run in CI. The skip conditions are the
# source of truth (requires_cuda in tests/utils.py and the like): a skipif whose reason names a CUDA device or a GPU
# marks its tests; a test that only compiles for sm_90 (nvcc, Triton offline) runs on the CPU and is not marked.
_NEEDS_GPU = re.compile(r"\bCUDA (device|GPU)\b|\bGPU\b")


def needs_gpu(item) -> bool:
    return any(_NEEDS_GPU.search(str(m.kwargs.get("reason", ""))) for m in item.iter_markers("skipif"))


def pytest_collection_modifyitems(config, items):
    for item in items:
        if needs_gpu(item) and not item.get_closest_marker("gpu"):
            item.add_marker(pytest.mark.gpu)
