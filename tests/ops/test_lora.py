"""The fused LoRA op family: qpeft.lora_linear (L3) and the qpeft::lora_* ops (L2) against the pure-PyTorch
reference and plain PyTorch, on random data, odd shapes, every dtype, with and without dropout / bias.

CPU runs use the reference implementations; the `triton` tests run the Triton kernels (under
TRITON_INTERPRET=1 QPEFT_BACKEND=triton on CPU, fp16/fp32 only, or on a GPU)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import qpeft
from qpeft.autograd.lora import lora_linear
from qpeft.reference import lora as ref
from utils import (DTYPES, assert_close_2x, compile_for_sm90, has_triton, requires_cuda, requires_triton_runtime,
                   triton_device, triton_dtypes)

# (M, K, N, r): odd sizes, r below / above the 16-wide MMA minimum, rank-1
SHAPES = [(1, 8, 8, 1), (37, 45, 53, 5), (64, 96, 80, 16), (19, 33, 130, 20)]
CPU_SHAPES = SHAPES + [(128, 256, 192, 64)]


def _inputs(M, K, N, r, dtype, device="cpu", bias=True, lead=()):
    g = torch.Generator().manual_seed(M * 1000 + K * 10 + r)
    x = torch.randn(*lead, M, K, generator=g).to(device, dtype)
    W = (torch.randn(N, K, generator=g) / K**0.5).to(device, dtype)
    A = (torch.randn(r, K, generator=g) / K**0.5).to(device)          # fp32 adapters, as PEFT keeps them
    B = (torch.randn(N, r, generator=g) / r**0.5).to(device)
    b = torch.randn(N, generator=g).to(device, dtype) if bias else None
    dy = torch.randn(*lead, M, N, generator=g).to(device, dtype)
    return x, W, A, B, b, dy


def _run(fn, x, A, B, dy, bias=None):
    x = x.detach().clone().requires_grad_()
    A = A.detach().clone().requires_grad_()
    B = B.detach().clone().requires_grad_()
    args = [x, A, B]
    if bias is not None:
        bias = bias.detach().clone().requires_grad_()
        args.append(bias)
    y = fn(x, A, B, bias)
    grads = torch.autograd.grad(y, args, dy)
    return (y, *grads)


def _plain_torch(W, scale, seed, p):
    """PEFT-style computation in plain PyTorch, in the activation dtype (the 2x rule's 'same dtype')."""
    def fn(x, A, B, bias):
        dt = x.dtype
        x2d = x.reshape(-1, x.shape[-1])
        xd = ref.lora_dropout_ref(x2d, seed, p).to(dt) if p > 0 else x2d
        y = F.linear(x2d, W, bias) + scale * ((xd @ A.to(dt).t()) @ B.to(dt).t())
        return y.reshape(*x.shape[:-1], W.shape[0])
    return fn


def _ref32(W, scale, seed, p):
    def fn(x, A, B, bias):
        return ref.lora_linear_ref(x.float(), W.float(), A, B, scale, None if bias is None else bias.float(),
                                   seed, p)
    return fn


def _fused(W, scale, seed, p, training=True):
    def fn(x, A, B, bias):
        return lora_linear(x, W, A, B, scale, bias, dropout_p=p, training=training, seed=seed)
    return fn


def _check_against_reference(M, K, N, r, dtype, p, bias, device="cpu", lead=()):
    x, W, A, B, b, dy = _inputs(M, K, N, r, dtype, device, bias, lead)
    seed = torch.tensor([1234], dtype=torch.int64, device=device)
    scale = 1.7
    out = _run(_fused(W, scale, seed, p), x, A, B, dy, b)
    r32 = _run(_ref32(W, scale, seed, p), x, A, B, dy.float(), b)
    names = ["y", "dx", "dA", "dB", "dbias"]
    if dtype == torch.float32:  # the fp32 bar: 1e-5 relative to the gradient's magnitude
        for name, o, e in zip(names, out, r32):
            tol = 1e-5 * e.abs().max().item() + 1e-6
            assert (o.float() - e).abs().max().item() <= tol, f"{name}: {(o.float() - e).abs().max():.3e} > {tol:.3e}"
        return
    same = _run(_plain_torch(W, scale, seed, p), x, A, B, dy, b)
    for name, o, e, s in zip(names, out, r32, same):
        factor = 2.0 if name == "y" else 3.0  # style guide: 2x forward, 2-3x gradients (two roundings)
        assert_close_2x(o, e, s, factor=factor, eps=1e-5, what=f"{name} ({dtype}, p={p})")


# ------------------------------------------------------------------------------------------ reference path
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", CPU_SHAPES)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_lora_linear_matches_reference_cpu(shape, dtype, p):
    _check_against_reference(*shape, dtype, p, bias=True)


def test_lora_linear_batched_no_bias_noncontiguous():
    x, W, A, B, _, dy = _inputs(10, 24, 20, 4, torch.float32, lead=(3,))
    xt = x.transpose(0, 1)  # (10, 3, 24), non-contiguous
    y = lora_linear(xt, W, A, B, 0.5)
    assert y.shape == (10, 3, 20)
    torch.testing.assert_close(y, lora_linear(xt.contiguous(), W, A, B, 0.5), rtol=0, atol=0)
    torch.testing.assert_close(y, ref.lora_linear_ref(xt, W, A, B, 0.5), rtol=1.3e-6, atol=1e-5)
    # a transposed view of B / A is handled as well
    Bt = B.t().contiguous().t()
    torch.testing.assert_close(lora_linear(x, W, A, Bt, 0.5), lora_linear(x, W, A, B, 0.5), rtol=0, atol=0)


def test_lora_linear_empty_batch():
    x, W, A, B, b, _ = _inputs(3, 16, 8, 2, torch.float32)
    x = x[:0].requires_grad_()
    A.requires_grad_()
    y = lora_linear(x, W, A, B, 1.0, b, dropout_p=0.2, training=True)
    assert y.shape == (0, 8)
    y.sum().backward()
    assert x.grad.shape == (0, 16) and torch.equal(A.grad, torch.zeros_like(A))


def test_lora_linear_nn_linear_base_and_public_name():
    lin = torch.nn.Linear(12, 7).requires_grad_(False)
    x = torch.randn(5, 12)
    A, B = torch.randn(3, 12), torch.randn(7, 3)
    y = qpeft.lora_linear(x, lin, A, B, 2.0)
    torch.testing.assert_close(y, lin(x) + 2.0 * (x @ A.t()) @ B.t(), rtol=1.3e-6, atol=1e-5)


def test_dropout_only_in_training_and_reproducible():
    x, W, A, B, b, _ = _inputs(40, 32, 24, 4, torch.float32)
    eval_y = lora_linear(x, W, A, B, 1.0, b, dropout_p=0.5, training=False)
    torch.testing.assert_close(eval_y, ref.lora_linear_ref(x, W, A, B, 1.0, b), rtol=1.3e-6, atol=1e-5)
    torch.manual_seed(3)
    y1 = lora_linear(x, W, A, B, 1.0, b, dropout_p=0.5, training=True)
    torch.manual_seed(3)
    y2 = lora_linear(x, W, A, B, 1.0, b, dropout_p=0.5, training=True)
    y3 = lora_linear(x, W, A, B, 1.0, b, dropout_p=0.5, training=True)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)  # seed drawn from torch's generator
    assert not torch.allclose(y1, y3)  # a fresh mask per call
    assert not torch.allclose(y1, eval_y)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_mask_statistics(p):
    seed = torch.tensor([99], dtype=torch.int64)
    keep = ref.lora_dropout_keep_ref(seed, 256, 256, p)
    n = keep.numel()
    frac = keep.float().mean().item()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(frac - (1 - p)) < 6 * sigma, f"keep fraction {frac:.4f}, expected {1 - p} +- {6 * sigma:.4f}"
    # rows and columns are not correlated: every row keeps about the same share
    row = keep.float().mean(1)
    assert (row - (1 - p)).abs().max().item() < 6 * (p * (1 - p) / 256) ** 0.5
    other = ref.lora_dropout_keep_ref(torch.tensor([100], dtype=torch.int64), 256, 256, p)
    assert (keep != other).float().mean().item() > 0.5 * 2 * p * (1 - p)  # seeds give independent masks
    x = torch.randn(256, 256)
    xd = ref.lora_dropout_ref(x, seed, p)
    torch.testing.assert_close(xd, torch.where(keep, x * (1.0 / (1.0 - p)), torch.zeros(())), rtol=0, atol=0)


def test_dropout_gradient_uses_the_forward_mask():
    # dx of the LoRA branch must be zero exactly where the forward dropped x (mask regenerated from the seed)
    x, W, A, B, _, dy = _inputs(16, 20, 12, 3, torch.float32)
    W = torch.zeros_like(W)  # isolate the LoRA branch (x still random)
    seed = torch.tensor([5], dtype=torch.int64)
    xr = x.clone().requires_grad_()
    y = lora_linear(xr, W, A, B, 1.0, dropout_p=0.4, training=True, seed=seed)
    (dx,) = torch.autograd.grad(y, xr, dy)
    keep = ref.lora_dropout_keep_ref(seed, 16, 20, 0.4)
    assert (dx[~keep] == 0).all() and (dx[keep] != 0).all()


def _frozen_adapter_dx(device):
    x, W, A, B, _, dy = _inputs(9, 16, 10, 2, torch.float32, device)
    xr = x.clone().requires_grad_()
    (dx,) = torch.autograd.grad(lora_linear(xr, W, A, B, 1.0), xr, dy)  # A, B frozen: dx only
    torch.testing.assert_close(dx, dy @ W + (dy @ B) @ A, rtol=1.3e-6, atol=1e-5)


def test_frozen_adapter_needs_only_dx():
    _frozen_adapter_dx("cpu")


@pytest.mark.triton
@requires_triton_runtime
def test_triton_frozen_adapter_needs_only_dx():
    _frozen_adapter_dx(triton_device())


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("case, match", [
    ("x_int", "x must be a float32/float16/bfloat16"),
    ("K", "x has 16 features"),
    ("A_shape", r"A must have shape \(r, 16\)"),
    ("B_shape", r"B must have shape \(10, 2\)"),
    ("dtype", "weight dtype torch.float16 must equal x dtype torch.float32"),
    ("dropout", r"dropout_p must be in \[0, 1\)"),
    ("bias", r"bias must have shape \(10,\)"),
    ("trainable_base", "must be frozen"),
    ("seed", "seed must be a 1-element int64 tensor"),
    ("base_type", "base must be a weight tensor"),
])
def test_lora_linear_bad_input(case, match):
    x, W, A, B = torch.randn(4, 16), torch.randn(10, 16), torch.randn(2, 16), torch.randn(10, 2)
    kw = {}
    if case == "x_int":
        x = x.to(torch.int32)
    elif case == "K":
        W = torch.randn(10, 15)
    elif case == "A_shape":
        A = torch.randn(2, 15)
    elif case == "B_shape":
        B = torch.randn(10, 3)
    elif case == "dtype":
        W = W.half()
    elif case == "dropout":
        kw = {"dropout_p": 1.0}
    elif case == "bias":
        kw = {"bias": torch.randn(11)}
    elif case == "trainable_base":
        W.requires_grad_()
    elif case == "seed":
        kw = {"dropout_p": 0.1, "training": True, "seed": torch.tensor([1.0])}
    elif case == "base_type":
        W = "weight"
    with pytest.raises(ValueError, match=match):
        lora_linear(x, W, A, B, 1.0, **kw)


# ------------------------------------------------------------------------------------------ op registration
def _op_samples(dtype=torch.float32, device="cpu"):
    x, W, A, B, b, dy = _inputs(13, 24, 18, 5, dtype, device)
    seed = torch.tensor([7], dtype=torch.int64, device=device)
    xa = ref.lora_xa_ref(x, A, seed, 0.2)
    dyb = dy.float() @ B
    ops = torch.ops.qpeft
    return [
        (ops.lora_xa.default, (x, A, seed, 0.2)),
        (ops.lora_xa.default, (x, A, None, 0.0)),
        (ops.lora_linear.default, (x, W, b, xa, B, 0.5)),
        (ops.lora_linear.default, (x, W, None, xa, B, 0.5)),
        (ops.lora_linear_dx.default, (dy, W, dyb, A, 0.5, seed, 0.2)),
        (ops.lora_masked_dx.default, (x, dyb, A, 0.5, seed, 0.2)),
        (ops.lora_grad.default, (dy, x, xa, B, 0.5, seed, 0.2)),
        (ops.lora_grad.default, (dy, x, xa, B, 0.5, None, 0.0)),
    ]


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(dtype):
    # every check (schema, fake, autograd registration, AOT dispatch) once; schema + fake for 16-bit inputs
    utils = None if dtype == torch.float32 else ("test_schema", "test_faketensor")
    for op, args in _op_samples(dtype):
        if utils is None:
            torch.library.opcheck(op, args)
        else:
            torch.library.opcheck(op, args, test_utils=utils)


def test_ops_match_reference_functions():
    for op, args in _op_samples():
        name = op._schema.name.split("::")[1]
        fn = {"lora_xa": ref.lora_xa_ref, "lora_linear": ref.dense_lora_matmul_ref, "lora_linear_dx": ref.lora_dx_ref,
              "lora_masked_dx": ref.lora_masked_dx_ref, "lora_grad": ref.lora_grad_ref}[name]
        out, want = op(*args), fn(*args)
        for o, w in zip(out if isinstance(out, tuple) else (out,), want if isinstance(want, tuple) else (want,)):
            assert o.dtype == w.dtype and o.shape == w.shape
            torch.testing.assert_close(o, w, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ Triton kernels
@pytest.mark.triton
@requires_triton_runtime
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_triton_dropout_mask_bit_exact(p):
    from qpeft.triton_kernels.lora import lora_matmul_triton, lora_tn_triton

    dev = triton_device()
    seed = torch.tensor([4321], dtype=torch.int64, device=dev)
    M, K = 45, 70
    x = torch.rand(M, K, device=dev) + 0.5  # nonzero everywhere, so zeros mark dropped elements
    eye = torch.eye(K, device=dev)
    xd = lora_matmul_triton(x, eye, out_dtype=torch.float32, M=M, N=K, seed=seed, dropout_p=p, drop_a=True)
    torch.testing.assert_close(xd, ref.lora_dropout_ref(x, seed, p), rtol=1.3e-6, atol=1e-6)
    keep = ref.lora_dropout_keep_ref(seed, M, K, p, dev) if p > 0 else torch.ones_like(xd, dtype=torch.bool)
    assert torch.equal(xd != 0, keep)
    eyeM = torch.eye(M, device=dev)
    xdt = lora_tn_triton(eyeM, x, scale=1.0, seed=seed, dropout_p=p, drop_q=True)
    torch.testing.assert_close(xdt, ref.lora_dropout_ref(x, seed, p), rtol=1.3e-6, atol=1e-6)


@pytest.mark.triton
@requires_triton_runtime
@pytest.mark.parametrize("dtype", triton_dtypes())
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_triton_lora_linear_matches_reference(shape, dtype, p):
    _check_against_reference(*shape, dtype, p, bias=shape[0] % 2 == 1, device=triton_device())


@pytest.mark.triton
@requires_triton_runtime
@pytest.mark.parametrize("dtype", triton_dtypes())
def test_triton_ops_match_reference(dtype):
    dev = triton_device()
    for op, args in _op_samples(dtype, dev):
        name = op._schema.name.split("::")[1]
        fn = {"lora_xa": ref.lora_xa_ref, "lora_linear": ref.dense_lora_matmul_ref, "lora_linear_dx": ref.lora_dx_ref,
              "lora_masked_dx": ref.lora_masked_dx_ref, "lora_grad": ref.lora_grad_ref}[name]
        out, want = op(*args), fn(*args)
        for o, w in zip(out if isinstance(out, tuple) else (out,), want if isinstance(want, tuple) else (want,)):
            assert o.dtype == w.dtype and o.shape == w.shape, name
            atol, rtol = (1e-5, 1.3e-6) if dtype == torch.float32 else (2e-3, 2e-3)
            torch.testing.assert_close(o.float(), w.float(), rtol=rtol, atol=atol * max(1.0, w.abs().max().item()),
                                       msg=lambda m: f"{name}: {m}")


@pytest.mark.triton
@requires_triton_runtime
def test_triton_tn_split_reduction():
    # M long enough that the launcher splits the token reduction (partial sums reduced afterwards)
    from qpeft.triton_kernels.lora import lora_tn_triton

    dev = triton_device()
    p, q = torch.randn(1100, 5, device=dev), torch.randn(1100, 40, device=dev)
    torch.testing.assert_close(lora_tn_triton(p, q, scale=0.5), 0.5 * p.t() @ q, rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------------------------------ GPU (default backend)
@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + [(512, 4096, 4096, 16), (300, 1024, 14336 // 4, 64)])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_cuda_lora_linear_matches_reference(shape, dtype, p):
    # whatever QPEFT_BACKEND picks on the GPU (CUDA C++ forward when the extension builds, Triton otherwise)
    _check_against_reference(*shape, dtype, p, bias=True, device="cuda")


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_cuda_nf4_lora_matches_reference(dtype, p):
    from qpeft.modules.qlinear_nf4 import QLinearNF4

    torch.manual_seed(0)
    q = QLinearNF4.from_linear(torch.nn.Linear(1024, 768).cuda(), compute_dtype=dtype)
    W = q.dequantize(torch.float32)
    x, _, A, B, _, dy = _inputs(333, 1024, 768, 16, dtype, "cuda", bias=False)
    seed = torch.tensor([11], dtype=torch.int64, device="cuda")
    out = _run(lambda x_, A_, B_, b_: lora_linear(x_, q, A_, B_, 2.0, dropout_p=p, training=True, seed=seed),
               x, A, B, dy)
    r32 = _run(lambda x_, A_, B_, b_: ref.lora_linear_ref(x_.float(), W, A_, B_, 2.0, q.bias, seed, p),
               x, A, B, dy.float())
    same = _run(_plain_torch(W.to(dtype), 2.0, seed, p), x, A, B, dy, q.bias.to(dtype))[:4]
    for name, o, e, s in zip(["y", "dx", "dA", "dB"], out, r32, same):
        assert_close_2x(o, e, s, factor=2.0 if name == "y" else 3.0, eps=1e-5, what=name)


@pytest.mark.skipif(not has_triton(), reason="needs triton")
def test_triton_kernels_compile_for_sm90():
    # no GPU needed: lower both kernels to PTX for sm_90 (catches typing/lowering errors a CPU interpreter run
    # cannot) and check that bf16 products use Hopper's wgmma tensor-core instructions
    import qpeft.triton_kernels.lora as kernels

    p16, p32, i32 = "*bf16", "*fp32", "i32"
    mm_sig = {"a_ptr": p16, "b_ptr": p16, "stride_am": i32, "stride_ak": i32, "stride_bk": i32, "stride_bn": i32,
              "addend_ptr": p16, "stride_dm": i32, "stride_dn": i32, "bias_ptr": p16, "p_ptr": p32, "q_ptr": p32,
              "stride_pm": i32, "stride_pr": i32, "stride_qr": i32, "stride_qn": i32, "out_ptr": p16,
              "stride_om": i32, "stride_on": i32, "seed_ptr": "*i64", "mask_cols": i32, "drop_scale": "fp32",
              "M": i32, "N": i32, "K": i32, "R": i32, "scale": "fp32", "m_bucket": i32}
    mm_const = dict(HAS_MAIN=True, HAS_ADDEND=False, HAS_BIAS=True, HAS_LORA=True, DROP_A=True, DROP_LORA=True,
                    DROP_THRESH=1 << 22, DOT_KIND=2, PRECISION="tf32", BLOCK_M=128, BLOCK_N=128, BLOCK_K=64,
                    BLOCK_R=16, GROUP_M=8)
    ptx = compile_for_sm90(kernels._lora_matmul_kernel, mm_sig, mm_const,
                           options={"num_warps": 8, "num_stages": 3}).asm["ptx"]
    assert "wgmma" in ptx
    tn_sig = {"p_ptr": p32, "q_ptr": p16, "stride_pm": i32, "stride_pi": i32, "stride_qm": i32, "stride_qj": i32,
              "out_ptr": p32, "stride_os": i32, "stride_oi": i32, "stride_oj": i32, "seed_ptr": "*i64",
              "mask_cols": i32, "drop_scale": "fp32", "M": i32, "I": i32, "J": i32, "rows_per_split": i32,
              "scale": "fp32"}
    tn_const = dict(DROP_Q=True, DROP_THRESH=1 << 22, DOT_KIND=2, PRECISION="tf32", BLOCK_I=16, BLOCK_J=128,
                    BLOCK_M=64)
    ptx = compile_for_sm90(kernels._lora_tn_kernel, tn_sig, tn_const, options={"num_warps": 8}).asm["ptx"]
    assert "mma" in ptx
