"""torch.compile(fullgraph=True) through QLinearNF4 / qpeft.nf4_matmul, forward and backward, equal to eager, and
no recompilation on a second call (torch._dynamo.config.error_on_recompile).

The ops are opaque custom ops with fakes, so Dynamo must trace them without a graph break; the "aot_eager"
backend exercises Dynamo + AOTAutograd + the fakes (what fullgraph depends on) without spending the 2 shared
CPU cores on Inductor's C++ code generation; one test also runs the default Inductor backend."""
from __future__ import annotations

import pytest
import torch

import qpeft
from qpeft.modules.qlinear_nf4 import QLinearNF4


def _fwd_bwd(fn, x, params):
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    grads = torch.autograd.grad(y, [x, *params], torch.ones_like(y) * 0.5)
    return y, grads


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qlinear_nf4_compiles_fullgraph(nested, dtype):
    torch.manual_seed(0)
    layer = QLinearNF4.from_linear(torch.nn.Linear(96, 40), compute_dtype=dtype, double_quant=nested)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 7, 96)
    y_eager, g_eager = _fwd_bwd(layer, x, [layer.bias])
    y_comp, g_comp = _fwd_bwd(compiled, x, [layer.bias])
    torch.testing.assert_close(y_comp, y_eager, rtol=0, atol=0)
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with torch._dynamo.config.patch(error_on_recompile=True):
        y2, _ = _fwd_bwd(compiled, x + 1, [layer.bias])
    torch.testing.assert_close(y2, layer(x + 1), rtol=0, atol=0)


def test_functional_compiles_with_inductor():
    torch.manual_seed(0)
    W = torch.randn(24, 64)
    packed, state = qpeft.quantize_4bit(W, blocksize=64, quant_type="fp4")
    bias = torch.randn(24, requires_grad=True)

    def fn(x):
        return torch.relu(qpeft.nf4_matmul(x, packed, state, bias)) * 2

    compiled = torch.compile(fn, fullgraph=True)
    x = torch.randn(5, 64)
    y_eager, g_eager = _fwd_bwd(fn, x, [bias])
    y_comp, g_comp = _fwd_bwd(compiled, x, [bias])
    torch.testing.assert_close(y_comp, y_eager, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    x2 = torch.randn(5, 64)
    with torch._dynamo.config.patch(error_on_recompile=True):
        y2, _ = _fwd_bwd(compiled, x2, [bias])
    torch.testing.assert_close(y2, fn(x2), rtol=1e-5, atol=1e-5)
