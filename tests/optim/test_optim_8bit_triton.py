"""The Triton multi-tensor kernel of qpeft::optim_8bit_step equals the reference bit for bit (on a GPU, or on CPU
under TRITON_INTERPRET=1 QPEFT_BACKEND=triton; the interpreter cannot do bf16 arithmetic, so fp32/fp16 there)."""
from __future__ import annotations

import copy

import pytest
import torch

import qpeft
from qpeft.reference import optim_8bit as ref

from test_optim_8bit_ref import SIZES, _inputs
from utils import requires_triton_runtime, triton_device, triton_dtypes

pytestmark = [pytest.mark.triton, requires_triton_runtime]


def _flat(args):
    return [t for x in args[:7] for t in (x if isinstance(x, list) else [x])]


@pytest.mark.parametrize("dtype", triton_dtypes(), ids=str)
@pytest.mark.parametrize("quant", [True, False], ids=["8bit", "fp32"])
@pytest.mark.parametrize("kind", ["adam", "lion"])
def test_triton_equals_reference(kind, quant, dtype):
    from qpeft.triton_kernels.optim_8bit import optim_8bit_step_triton

    dev = triton_device()
    args = _inputs(kind, quant, SIZES, dtype)
    args[1][2][5] = float("inf")  # one non-finite gradient element: the guard is part of the contract
    args[1][0][7] = float("nan")
    args = [[t.to(dev) for t in x] if isinstance(x, list) else (x.to(dev) if isinstance(x, torch.Tensor) else x)
            for x in args]
    expected = copy.deepcopy(args)
    q1, q2 = qpeft.formats.codes.dynamic_map(True, device=dev), qpeft.formats.codes.dynamic_map(False, device=dev)
    params, grads, s1, s2, a1, a2, hyper, b1, b2 = args
    ref.optim_8bit_step_ref(*expected[:6], q1, q2, expected[6], b1, b2, kind)
    optim_8bit_step_triton(params, grads, s1, s2, a1, a2, q1, q2, hyper, b1, b2, kind)
    for got, want in zip(_flat(args), _flat(expected)):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)  # bit-exact (grads hold a NaN)


def test_triton_mixed_dtypes_one_call():
    """One call over fp32 and fp16 parameters (one launch per dtype) equals the reference."""
    from qpeft.triton_kernels.optim_8bit import optim_8bit_step_triton

    dev = triton_device()
    a32 = _inputs("adam", True, [4097, 300 * 256], torch.float32, seed=1)
    a16 = _inputs("adam", True, [5000], torch.float16, seed=2, lr=7e-3)  # its own hyper row
    args = [x + y if isinstance(x, list) else x for x, y in zip(a32, a16)]
    args[6] = torch.cat([a32[6], a16[6]])
    args = [[t.to(dev) for t in x] if isinstance(x, list) else (x.to(dev) if isinstance(x, torch.Tensor) else x)
            for x in args]
    expected = copy.deepcopy(args)
    q1, q2 = qpeft.formats.codes.dynamic_map(True, device=dev), qpeft.formats.codes.dynamic_map(False, device=dev)
    ref.optim_8bit_step_ref(*expected[:6], q1, q2, expected[6], args[7], args[8], "adam")
    optim_8bit_step_triton(*args[:6], q1, q2, args[6], args[7], args[8], "adam")
    for got, want in zip(_flat(args), _flat(expected)):
        assert torch.equal(got, want)


def test_op_dispatches_to_triton_under_the_interpreter(monkeypatch):
    """With QPEFT_BACKEND=triton (and the interpreter on CPU) the op runs the Triton kernel."""
    import qpeft.ops.optim_8bit  # noqa: F401
    import qpeft.triton_kernels.optim_8bit as tk

    calls = []
    real = tk.optim_8bit_step_triton
    monkeypatch.setattr(tk, "optim_8bit_step_triton", lambda *a: (calls.append(1), real(*a)))
    monkeypatch.setenv("QPEFT_BACKEND", "triton")
    dev = triton_device()
    args = [[t.to(dev) for t in x] if isinstance(x, list) else (x.to(dev) if isinstance(x, torch.Tensor) else x)
            for x in _inputs("lion", True, [4097], torch.float32)]
    q1, q2 = qpeft.formats.codes.dynamic_map(True, device=dev), qpeft.formats.codes.dynamic_map(False, device=dev)
    torch.ops.qpeft.optim_8bit_step(*args[:6], q1, q2, args[6], args[7], args[8], "lion")
    assert calls == [1]
