"""torch.compile(fullgraph=True) through LoraLinear / lora_linear: forward and backward match eager, and a
second call with new data does not recompile."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from qpeft.modules.lora_linear import LoraLinear
from qpeft.modules.qlinear_nf4 import QLinearNF4


def _mlp(nf4: bool, dropout: float):
    torch.manual_seed(0)
    l1, l2 = nn.Linear(24, 40), nn.Linear(40, 16)
    if nf4:
        l1 = QLinearNF4.from_linear(l1, compute_dtype=torch.float32)
    model = nn.Sequential(LoraLinear(l1, r=4, lora_dropout=dropout, init="random"), nn.GELU(),
                          LoraLinear(l2, r=3, lora_dropout=dropout, init="random"))
    return model


def _step(model, x, seed):
    torch.manual_seed(seed)
    x = x.clone().requires_grad_()
    y = model(x)
    y.square().mean().backward()
    grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return y.detach(), x.grad, grads


@pytest.mark.parametrize("nf4", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_compile_fullgraph_matches_eager(nf4, dropout):
    torch._dynamo.reset()
    model = _mlp(nf4, dropout).train()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for seed in (1, 2):  # second call: new data, same graph
        x = torch.randn(5, 7, 24, generator=torch.Generator().manual_seed(seed))
        ye, dxe, ge = _step(model, x, seed)
        if seed == 2:
            ctx = torch._dynamo.config.patch(error_on_recompile=True)
        else:
            ctx = torch._dynamo.config.patch()
        with ctx:
            yc, dxc, gc = _step(compiled, x, seed)
        torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dxc, dxe, rtol=1e-5, atol=1e-5)
        assert gc.keys() == ge.keys() and len(gc) == 4
        for n in gc:
            torch.testing.assert_close(gc[n], ge[n], rtol=1e-5, atol=1e-5, msg=n)


def test_compile_inductor_eval():
    torch._dynamo.reset()
    model = _mlp(False, 0.0).eval()
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(3, 24)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
