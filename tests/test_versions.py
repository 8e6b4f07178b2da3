"""Supported versions (qpeft._versions): one set of lower bounds in the package, setup.py and the image lane's
constraints file, each checked here, and the errors a user gets outside them."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from qpeft import _backend, _versions

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("text, parsed", [("2.11.0+cu130", (2, 11, 0)), ("5.17", (5, 17)), ("2.12.0a0", (2, 12, 0)),
                                          ("0.21.2.dev0", (0, 21, 2)), ("3.6.0rc1", (3, 6, 0))])
def test_parse(text, parsed):
    assert _versions.parse(text) == parsed


def _strip_zeros(v: tuple[int, ...]) -> tuple[int, ...]:
    while v and v[-1] == 0:
        v = v[:-1]
    return v


def test_installed_versions_are_supported():
    for name in _versions.MINIMUM:
        assert _versions.unsupported_reason(name) is None, _versions.unsupported_reason(name)


def test_setup_py_declares_the_same_lower_bounds():
    setup = (ROOT / "setup.py").read_text()
    for name, minimum in _versions.MINIMUM.items():
        bounds = set(re.findall(rf'"{name}>=([0-9.]+)', setup))
        assert bounds == {minimum}, (name, bounds)
        assert not re.search(rf'"{name}[^"]*<', setup), f"{name} has an upper bound in setup.py"


def test_image_lane_pins_the_lower_bounds():
    """The image lane tests exactly the oldest supported release of each library."""
    pins = dict(re.findall(r"^([a-z_-]+)==([0-9.]+)\s*$", (ROOT / "tests/constraints/image.txt").read_text(), re.M))
    assert set(pins) == set(_versions.MINIMUM)
    for name, minimum in _versions.MINIMUM.items():
        assert _strip_zeros(_versions.parse(pins[name])) == _strip_zeros(_versions.parse(minimum)), name


def test_too_old_or_missing_names_the_version_and_the_range(monkeypatch):
    assert _versions.unsupported_reason("torch", "2.10.1") == "torch 2.10.1 is older than qpeft supports (torch>=2.11)"
    assert _versions.unsupported_reason("triton", "3.6.0") is None
    monkeypatch.setattr(_versions, "installed", lambda name: {"transformers": "5.16.2"}.get(name))
    with pytest.raises(ImportError, match=re.escape("transformers 5.16.2 is older than qpeft supports "
                                                    "(transformers>=5.17)")):
        _versions.require.__wrapped__("transformers")  # uncached: the cached one saw the real install
    with pytest.raises(ImportError, match=re.escape("peft is not installed (qpeft supports peft>=0.21.2)")):
        _versions.require.__wrapped__("peft")


@pytest.mark.parametrize("triton_version, numpy_version, broken", [
    ("3.6.0", "2.5.2", True), ("3.6.0", "2.4.0", True), ("3.6.0", "2.3.5", False), ("3.7.1", "2.5.2", False),
    ("3.9.0", "2.4.6", False)])
def test_interpreter_reason(triton_version, numpy_version, broken):
    reason = _versions.interpreter_reason(triton_version, numpy_version)
    assert (reason is not None) == broken
    if broken:
        assert f"Triton {triton_version}" in reason and "numpy<2.4" in reason and "triton>=3.7" in reason


def test_interpreter_request_that_cannot_run_raises(monkeypatch):
    """QPEFT_BACKEND=triton under TRITON_INTERPRET=1 is an explicit request: it raises, never falls back."""
    monkeypatch.setenv("QPEFT_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_backend, "triton_status", lambda: (False, "the Triton 3.6.0 interpreter ... numpy<2.4"))
    with pytest.raises(RuntimeError, match=r"QPEFT_BACKEND=triton but Triton is unavailable: the Triton 3\.6\.0"):
        _backend.select("op", torch.device("cpu"))


def test_triton_status_refuses_an_old_triton(monkeypatch):
    triton = pytest.importorskip("triton")
    monkeypatch.setattr(triton, "__version__", "3.5.1")
    _backend.triton_status.cache_clear()
    try:
        ok, why = _backend.triton_status()
    finally:
        _backend.triton_status.cache_clear()
    assert not ok and why == "triton 3.5.1 is older than qpeft supports (triton>=3.6)"
