import os

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
