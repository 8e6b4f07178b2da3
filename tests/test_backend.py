"""Backend selection (qpeft._backend.select): CPU -> reference, auto fallbacks, explicit choices that raise."""
import pytest
import torch

import qpeft
from qpeft import _backend

CUDA = torch.device("cuda", 0)  # select() only reads the device type/index: no GPU is touched here


@pytest.fixture
def fake_status(monkeypatch):
    """Replace the (cached) availability probes with controllable answers."""
    state = {"cuda": (True, "built"), "triton": (True, "available")}
    monkeypatch.setattr(_backend, "cuda_ext_status", lambda: state["cuda"])
    monkeypatch.setattr(_backend, "triton_status", lambda: state["triton"])
    monkeypatch.setattr(_backend, "_warned", set())
    return state


def test_cpu_tensors_use_the_reference(monkeypatch, fake_status):
    for b in ("auto", "cuda", "torch"):
        monkeypatch.setenv("QPEFT_BACKEND", b)
        assert _backend.select("op", torch.device("cpu")) == "torch"


def test_triton_on_cpu_only_under_the_interpreter(monkeypatch, fake_status):
    monkeypatch.setenv("QPEFT_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backend.select("op", torch.device("cpu")) == "triton"
    assert _backend.select("op", torch.device("cpu"), triton=False) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert _backend.select("op", torch.device("cpu")) == "torch"


def test_auto_prefers_cuda_then_triton_then_torch(monkeypatch, fake_status):
    monkeypatch.setenv("QPEFT_BACKEND", "auto")
    assert _backend.select("op", CUDA) == "cuda"
    assert _backend.select("op", CUDA, cuda=False) == "triton"
    fake_status["cuda"] = (False, "nvcc not found")
    with pytest.warns(RuntimeWarning, match="nvcc not found"):
        assert _backend.select("op", CUDA) == "triton"
    fake_status["triton"] = (False, "no triton")
    with pytest.warns(RuntimeWarning, match="no triton"):
        assert _backend.select("op", CUDA) == "torch"


def test_auto_warns_once_per_reason(monkeypatch, fake_status, recwarn):
    monkeypatch.setenv("QPEFT_BACKEND", "auto")
    fake_status["cuda"] = (False, "nvcc not found")
    for _ in range(3):
        _backend.select("op", CUDA)
    assert sum("nvcc not found" in str(w.message) for w in recwarn.list) == 1


def test_prefer_triton_only_under_auto(monkeypatch, fake_status):
    monkeypatch.setenv("QPEFT_BACKEND", "auto")
    assert _backend.select("op", CUDA, prefer_triton=True) == "triton"
    fake_status["triton"] = (False, "no triton")
    assert _backend.select("op", CUDA, prefer_triton=True) == "cuda"
    monkeypatch.setenv("QPEFT_BACKEND", "cuda")
    fake_status["triton"] = (True, "available")
    assert _backend.select("op", CUDA, prefer_triton=True) == "cuda"


def test_explicit_backend_that_cannot_run_raises_with_reason(monkeypatch, fake_status):
    monkeypatch.setenv("QPEFT_BACKEND", "cuda")
    fake_status["cuda"] = (False, "nvcc not found")
    with pytest.raises(RuntimeError, match="nvcc not found"):
        _backend.select("op", CUDA)
    with pytest.raises(RuntimeError, match="no CUDA C\\+\\+ implementation"):
        _backend.select("op", CUDA, cuda=False)
    monkeypatch.setenv("QPEFT_BACKEND", "triton")
    fake_status["triton"] = (False, "triton not importable")
    with pytest.raises(RuntimeError, match="triton not importable"):
        _backend.select("op", CUDA)


def test_bad_backend_name_raises(monkeypatch):
    monkeypatch.setenv("QPEFT_BACKEND", "fast")
    with pytest.raises(ValueError, match="QPEFT_BACKEND must be one of"):
        _backend.select("op", torch.device("cpu"))


def test_backend_info_reports_reasons():
    info = qpeft.backend_info()
    assert set(info) >= {"requested", "torch", "cuda_ext", "triton"}
    ok, why = info["cuda_ext"]
    assert isinstance(ok, bool) and why
    if not torch.cuda.is_available():
        assert ok is False and "no CUDA device" in why


def test_import_compiles_nothing():
    import subprocess
    import sys

    # resolving the public API must not probe (and so build) the CUDA extension
    code = ("import qpeft; qpeft.quantize_4bit; qpeft.LoraLinear; qpeft.add_prefix_tuning; "
            "import qpeft._backend as b; assert b.cuda_ext_status.cache_info().currsize == 0; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
