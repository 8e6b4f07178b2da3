"""The DoRA op family: qpeft::dora_weight_norm (L2, reference and Triton) and qpeft.autograd.dora.dora_linear (L3)
against fp64 oracles and PEFT's DoraLinearLayer, on random data and odd shapes (K % blocksize != 0, odd K, ranks
1..40, NF4 / FP4, with and without double quant).

CPU runs use the reference; the `triton` tests run the kernel (TRITON_INTERPRET=1 QPEFT_BACKEND=triton on CPU,
fp16/fp32 only, or on a GPU)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import qpeft
from qpeft.autograd.dora import dora_linear, dora_weight_norm
from qpeft.modules.qlinear_nf4 import QLinearNF4
from qpeft.reference.dora import dora_weight_norm_ref
from utils import assert_close_2x, requires_triton_runtime, triton_device, triton_dtypes

# (N, K, r, blocksize): K % blocksize != 0 (a block spans two rows), odd K (a row starts mid-byte), rank 1,
# ranks around the kernel's rank chunk (32), a tall layer
SHAPES = [(8, 64, 1, 64), (37, 45, 5, 32), (96, 130, 16, 64), (33, 257, 33, 128), (160, 96, 40, 256)]


def _weight(N, K, blocksize, quant_type="nf4", double_quant=True, seed=0):
    g = torch.Generator().manual_seed(seed + N + K)
    W = torch.randn(N, K, generator=g) / K**0.5
    packed, state = qpeft.quantize_4bit(W, blocksize=blocksize, quant_type=quant_type, double_quant=double_quant)
    return packed, state


def _adapters(N, K, r, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed + r)
    return (torch.randn(r, K, generator=g) / K**0.5).to(dtype), (torch.randn(N, r, generator=g) / r**0.5).to(dtype)


def _oracle(packed, state, A, B, scale):
    """fp64: the exactly dequantized weight (qpeft.dequantize_4bit in fp32 is exact: code * absmax) + s B A."""
    w = qpeft.dequantize_4bit(packed, state, torch.float32).double()
    return torch.linalg.vector_norm(w + scale * (B.double() @ A.double()), dim=1)


def _op(packed, state, A, B, scale):
    return dora_weight_norm((packed, state), A, B, scale)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fmt", [("nf4", True), ("nf4", False), ("fp4", True)])
def test_reference_norm_matches_fp64_oracle(shape, fmt):
    N, K, r, bs = shape
    packed, state = _weight(N, K, bs, *fmt)
    A, B = _adapters(N, K, r)
    out = _op(packed, state, A, B, 0.7)
    assert out.dtype == torch.float32 and out.shape == (N,)
    oracle = _oracle(packed, state, A, B, 0.7)
    # fp32 sums of K squares: relative error of a few ulps times sqrt(K)
    torch.testing.assert_close(out.double(), oracle, rtol=5e-6, atol=0)
    assert (oracle > 0).all()


def test_norm_of_a_qlinear_matches_its_dequantized_weight_and_dense_base():
    torch.manual_seed(0)
    layer = QLinearNF4.from_linear(nn.Linear(72, 40), compute_dtype=torch.float32)
    A, B = _adapters(40, 72, 6)
    out = dora_weight_norm(layer, A, B, 2.0)
    dense = dora_weight_norm(layer.dequantize(torch.float32), A, B, 2.0)
    torch.testing.assert_close(out, dense, rtol=2e-6, atol=0)
    # A and B of another dtype are read as fp32: the same as converting them first
    torch.testing.assert_close(dora_weight_norm(layer, A.half(), B.half(), 2.0),
                               dora_weight_norm(layer, A.half().float(), B.half().float(), 2.0), rtol=2e-6, atol=0)


def test_norm_op_fake_and_compile():
    packed, state = _weight(32, 64, 64)
    A, B = _adapters(32, 64, 4)
    from qpeft.autograd.nf4_matmul import weight_args

    p, absmax, code, bs, N, K, na, nc, off = weight_args(packed, state)
    torch.library.opcheck(torch.ops.qpeft.dora_weight_norm.default,
                          (p.reshape(-1), absmax, code, bs, N, K, na, nc, off, A, B, 0.5))
    compiled = torch.compile(lambda A, B: dora_weight_norm((packed, state), A, B, 0.5), fullgraph=True,
                             backend="aot_eager")
    torch.testing.assert_close(compiled(A, B), _op(packed, state, A, B, 0.5))


def test_norm_op_rejects_bad_shapes():
    packed, state = _weight(32, 64, 64)
    A, B = _adapters(32, 64, 4)
    with pytest.raises(RuntimeError, match=r"B must have shape \(32, 4\)"):
        _op(packed, state, A, B[:16], 0.5)
    with pytest.raises(RuntimeError, match=r"A must have shape \(r, 64\)"):
        _op(packed, state, A[:, :32], B, 0.5)
    with pytest.raises(ValueError, match="base must be"):
        dora_weight_norm(object(), A, B, 0.5)


# ------------------------------------------------------------------------------------------- dora_linear (L3)
class _Linear(nn.Module):
    """x @ weight^T with `weight` a plain tensor (so gradients reach the caller's tensor)."""

    def __init__(self, weight):
        super().__init__()
        self.weight = weight

    def forward(self, x):
        return x @ self.weight.t()


def _peft_dora(weight, bias, A, B, scale, magnitude, x):
    """PEFT's DoraLinearLayer.forward on a dense weight: result + DoRA's extra output (dropout off)."""
    from peft.tuners.lora.dora import DoraLinearLayer

    layer = DoraLinearLayer(fan_in_fan_out=False)
    layer.weight = magnitude  # DoraLinearLayer.forward reads self.weight as the magnitude
    base = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    with torch.no_grad():
        base.weight.copy_(weight)
        if bias is not None:
            base.bias.copy_(bias)
    lora_A, lora_B = _Linear(A), _Linear(B)
    result = base(x)
    xa = x.to(A.dtype)
    return (result + layer(xa, lora_A=lora_A, lora_B=lora_B, scaling=scale, base_layer=base,
                           base_result=result)).to(x.dtype)


@pytest.mark.parametrize("nf4", [False, True])
def test_dora_linear_is_peft_dora_math(nf4):
    """fp32, no dropout: qpeft's fused DoRA == PEFT's DoraLinearLayer on the same (dequantized) weight, and the
    gradients of x, A, B and the magnitude agree."""
    peft = pytest.importorskip("peft")  # noqa: F841
    torch.manual_seed(0)
    N, K, r, s = 48, 80, 6, 1.5
    linear = nn.Linear(K, N).requires_grad_(False)
    base = QLinearNF4.from_linear(linear, compute_dtype=torch.float32) if nf4 else linear
    weight = base.dequantize(torch.float32) if nf4 else linear.weight.detach()
    bias = linear.bias.detach()
    A, B = _adapters(N, K, r)
    magnitude = dora_weight_norm(weight, A, B, s) * (1 + 0.1 * torch.randn(N))
    x = torch.randn(3, 7, K)
    dy = torch.randn(3, 7, N)

    def run(fn):
        xs, As, Bs, ms = (t.clone().requires_grad_() for t in (x, A, B, magnitude))
        y = fn(xs, As, Bs, ms)
        return (y, *torch.autograd.grad(y, (xs, As, Bs, ms), dy))

    ours = run(lambda x, A, B, m: dora_linear(x, base, A, B, s, m, bias=bias))
    theirs = run(lambda x, A, B, m: _peft_dora(weight, bias, A, B, s, m, x))
    for a, b, name in zip(ours, theirs, ("y", "dx", "dA", "dB", "dmagnitude")):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5, msg=name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dora_linear_half_precision_within_2x(dtype):
    """16-bit activations, fp32 adapters: error vs an fp64 oracle within 2x of plain PyTorch in that dtype (PEFT's
    DoRA with everything in the activation dtype, i.e. its adapters too: the LoRA epilogue of qpeft's NF4 GEMM
    reads xA^T and B in the activation dtype)."""
    torch.manual_seed(1)
    N, K, r, s = 64, 96, 8, 2.0
    layer = QLinearNF4.from_linear(nn.Linear(K, N), compute_dtype=dtype)
    weight = layer.dequantize(torch.float32)
    bias = layer.bias.detach()
    A, B = _adapters(N, K, r)
    magnitude = dora_weight_norm(weight, A, B, s) * (1 + 0.1 * torch.randn(N))
    x = torch.randn(5, K).to(dtype)
    ours = dora_linear(x, layer, A, B, s, magnitude, bias=bias.to(dtype))
    w64 = weight.double()
    n64 = torch.linalg.vector_norm(w64 + s * (B.double() @ A.double()), dim=1)
    x64 = x.double()
    oracle = (magnitude.double() / n64) * (x64 @ w64.t() + s * (x64 @ A.double().t()) @ B.double().t()) \
        + bias.to(dtype).double()
    theirs = _peft_dora(weight.to(dtype), bias.to(dtype), A.to(dtype), B.to(dtype), s, magnitude.to(dtype), x)
    assert ours.dtype == dtype
    assert_close_2x(ours, oracle, theirs)


def test_dora_linear_dropout_is_peft_math_with_the_same_mask():
    torch.manual_seed(2)
    N, K, r, s, p = 40, 64, 4, 1.0, 0.3
    layer = QLinearNF4.from_linear(nn.Linear(K, N), compute_dtype=torch.float32)
    weight = layer.dequantize(torch.float32)
    A, B = _adapters(N, K, r)
    m = dora_weight_norm(weight, A, B, s) * 1.1
    x = torch.randn(6, K)
    torch.manual_seed(7)
    y = dora_linear(x, layer, A, B, s, m, bias=layer.bias, dropout_p=p, training=True)
    torch.manual_seed(7)
    xd = nn.functional.dropout(x, p, training=True)
    g = m / torch.linalg.vector_norm(weight + s * B @ A, dim=1)
    expected = x @ weight.t() + layer.bias + (g - 1) * (xd @ weight.t()) + g * s * (xd @ A.t() @ B.t())
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    assert not torch.equal(y, dora_linear(x, layer, A, B, s, m, bias=layer.bias))  # the mask mattered


def test_dora_linear_rejects_bad_magnitude():
    layer = nn.Linear(16, 8)
    A, B = _adapters(8, 16, 2)
    with pytest.raises(ValueError, match="magnitude has shape"):
        dora_linear(torch.randn(2, 16), layer, A, B, 1.0, torch.ones(9))


# ------------------------------------------------------------------------------------------- Triton kernel
@pytest.mark.triton
@requires_triton_runtime
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fmt", [("nf4", True), ("fp4", False)])
@pytest.mark.parametrize("adapter_dtype", triton_dtypes())
def test_triton_norm_matches_reference(shape, fmt, adapter_dtype):
    from qpeft.autograd.nf4_matmul import weight_args
    from qpeft.triton_kernels.dora import dora_weight_norm_triton

    N, K, r, bs = shape
    dev = triton_device()
    packed, state = _weight(N, K, bs, *fmt)
    packed, state = packed.to(dev), state.to(dev)
    A, B = (t.to(dev) for t in _adapters(N, K, r, adapter_dtype))
    p, absmax, code, bs, N, K, na, nc, off = weight_args(packed, state)
    out = dora_weight_norm_triton(p.reshape(-1), absmax, code, bs, N, K, na, nc, off, A, B, 0.7)
    ref = dora_weight_norm_ref(p.reshape(-1), absmax, code, bs, N, K, na, nc, off, A, B, 0.7)
    assert_close_2x(out, _oracle(packed, state, A, B, 0.7), ref, eps=1e-7, what="dora weight norm")
    # the op dispatches to the kernel here (QPEFT_BACKEND=triton)
    torch.testing.assert_close(_op(packed, state, A, B, 0.7), out, rtol=0, atol=0)
