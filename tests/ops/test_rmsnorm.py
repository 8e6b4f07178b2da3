"""qpeft.rms_norm (qpeft::rms_norm / rms_norm_backward) against the RMSNorm modules of transformers (Llama, Mistral,
Qwen2, Qwen3, Gemma, Gemma2, Gemma3) and an fp64 oracle: forward, dx and dw within the 2x rule, every dtype, odd
shapes, fp32 norm weights under 16-bit activations; the Triton kernels under the interpreter (fp16/fp32)."""
from __future__ import annotations

import importlib

import pytest
import torch

import qpeft
from qpeft.reference.rmsnorm import rms_norm_backward_ref, rms_norm_ref
from utils import DTYPES, assert_close_2x, requires_triton_runtime, triton_device, triton_dtypes

# (module path, class, casting, offset): how each family's RMSNorm maps onto rms_norm's arguments
FAMILIES = [
    ("llama", "LlamaRMSNorm", "llama", 0.0),
    ("mistral", "MistralRMSNorm", "llama", 0.0),
    ("qwen2", "Qwen2RMSNorm", "llama", 0.0),
    ("qwen3", "Qwen3RMSNorm", "llama", 0.0),
    ("gemma", "GemmaRMSNorm", "gemma", 1.0),
    ("gemma2", "Gemma2RMSNorm", "gemma", 1.0),
    ("gemma3", "Gemma3RMSNorm", "gemma", 1.0),
]
SHAPES = [(1, 8), (7, 37), (33, 130), (5, 257)]  # (rows, H): odd H, H not a power of two, a single row


def _module(family, cls, H, eps, dtype, w_dtype=None):
    mod = getattr(importlib.import_module(f"transformers.models.{family}.modeling_{family}"), cls)(H, eps=eps)
    with torch.no_grad():  # random weights: neither Llama's ones nor Gemma's zeros
        mod.weight.copy_(torch.randn(H) * 0.5 + (1.0 if mod.weight.abs().sum() > 0 else 0.0))
    return mod.to(w_dtype or dtype)


def _eps(mod):
    return getattr(mod, "variance_epsilon", getattr(mod, "eps", None))


def _oracle(x, w, eps, offset):
    """fp64, no intermediate rounding."""
    x64 = x.double()
    return (offset + w.double()) * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)


def _fwd_bwd(fn, x, w, dy):
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    y = fn(x, w)
    dx, dw = torch.autograd.grad(y, (x, w), dy.to(y.dtype))
    return y, dx, dw


def _check_family(family, cls, casting, offset, dtype, shape, device="cpu", w_dtype=None, lead=()):
    rows, H = shape
    mod = _module(family, cls, H, 1e-5, dtype, w_dtype)
    w = mod.weight.detach().to(device)
    mod = mod.to(device)
    eps = _eps(mod)
    g = torch.Generator().manual_seed(rows * 100 + H)
    x = (torch.randn(*lead, rows, H, generator=g) * 3 + 0.5).to(device, dtype)
    dy = torch.randn(*lead, rows, H, generator=g).to(device)

    def hf(xx, ww):
        return torch.func.functional_call(mod, {"weight": ww}, (xx,))

    ours = _fwd_bwd(lambda xx, ww: qpeft.rms_norm(xx, ww, eps, offset, casting), x, w, dy)
    base = _fwd_bwd(hf, x, w, dy)
    oracle = _fwd_bwd(lambda xx, ww: _oracle(xx, ww, eps, offset), x.double(), w.double(), dy.double())
    assert ours[0].dtype == base[0].dtype and ours[0].shape == base[0].shape  # HF's output dtype (promotion)
    assert ours[1].dtype == x.dtype and ours[2].dtype == w.dtype
    for name, o, b, e, factor in zip(("y", "dx", "dw"), ours, base, oracle, (2.0, 2.0, 2.0)):
        assert_close_2x(o, e, b, factor, eps=1e-6 * max(1.0, e.abs().max().item()),
                        what=f"{name} {cls} {dtype} w {w.dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family,cls,casting,offset", FAMILIES)
def test_matches_transformers_modules(family, cls, casting, offset, dtype):
    for shape in SHAPES:
        _check_family(family, cls, casting, offset, dtype, shape)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("family,cls,casting,offset", [FAMILIES[0], FAMILIES[5]])
def test_fp32_weight_with_16bit_input(family, cls, casting, offset, dtype):
    # prepare_model_for_kbit_training keeps norms in fp32: Llama's `weight * x.to(bf16)` then returns fp32
    _check_family(family, cls, casting, offset, dtype, (9, 40), w_dtype=torch.float32, lead=(2,))


def test_reference_backward_is_the_derivative():
    g = torch.Generator().manual_seed(1)
    x, w, dy = (torch.randn(6, 19, generator=g, dtype=torch.float64), torch.randn(19, generator=g,
                dtype=torch.float64), torch.randn(6, 19, generator=g, dtype=torch.float64))
    for casting, offset in (("llama", 0.0), ("gemma", 1.0), ("llama", 0.5)):
        y, dx, dw = _fwd_bwd(lambda a, b: rms_norm_ref(a, b, 1e-6, offset, casting)[0], x, w, dy)
        _, rstd = rms_norm_ref(x, w, 1e-6, offset, casting)
        mdx, mdw = rms_norm_backward_ref(dy, x, w, rstd, offset, casting)
        torch.testing.assert_close(mdx, dx, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(mdw, dw, rtol=1e-12, atol=1e-12)


def test_saved_bytes_vs_eager():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    def saved_bytes(fn):
        seen = {}

        def pack(t):
            seen[(t.untyped_storage().data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(seen.values())

    M, H = 64, 256
    mod = LlamaRMSNorm(H).to(torch.bfloat16)
    x = torch.randn(M, H, dtype=torch.bfloat16, requires_grad=True)
    ours = saved_bytes(lambda: qpeft.rms_norm(x, mod.weight, mod.variance_epsilon))
    eager = saved_bytes(lambda: mod(x))
    assert ours == M * H * 2 + M * 4 + H * 2  # x, rstd, weight
    assert eager >= M * H * 6  # fp32 x and bf16 normalised x


def test_non_contiguous_3d_and_empty():
    x = torch.randn(4, 6, 24).transpose(0, 1)
    w = torch.randn(24)
    y = qpeft.rms_norm(x, w, 1e-6)
    torch.testing.assert_close(y, rms_norm_ref(x.reshape(-1, 24), w, 1e-6, 0.0, "llama")[0].reshape(6, 4, 24))
    e = torch.randn(0, 24, requires_grad=True)
    qpeft.rms_norm(e, w.requires_grad_(), 1e-6).sum().backward()
    assert e.grad.shape == (0, 24) and torch.equal(w.grad, torch.zeros(24))


def test_bad_input_names_the_argument():
    x, w = torch.randn(3, 8), torch.randn(8)
    with pytest.raises(ValueError, match="weight must have shape"):
        qpeft.rms_norm(x, torch.randn(7))
    with pytest.raises(TypeError, match="x must be"):
        qpeft.rms_norm(x.long(), w)
    with pytest.raises(TypeError, match="weight must be"):
        qpeft.rms_norm(x, w.to(torch.int32))
    with pytest.raises(ValueError, match="casting"):
        qpeft.rms_norm(x, w, casting="none")
    with pytest.raises(ValueError, match="eps"):
        qpeft.rms_norm(x, w, eps=-1.0)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        torch.ops.qpeft.rms_norm(x, torch.randn(7), 1e-6, 0.0, "llama")


def test_opcheck():
    x, w = torch.randn(5, 24), torch.randn(24)
    for casting in ("llama", "gemma"):
        torch.library.opcheck(torch.ops.qpeft.rms_norm.default, (x, w, 1e-6, 1.0, casting))
        y, rstd = torch.ops.qpeft.rms_norm(x, w, 1e-6, 1.0, casting)
        torch.library.opcheck(torch.ops.qpeft.rms_norm_backward.default,
                              (torch.randn_like(y), x, w, rstd, 1.0, casting))
    torch.library.opcheck(torch.ops.qpeft.rms_norm.default, (x.half(), w, 1e-6, 0.0, "llama"))


def test_compile_fullgraph():
    torch._dynamo.reset()

    def fn(x, w):
        return qpeft.rms_norm(x * 2, w, 1e-6, 1.0, "gemma").sum(-1)

    x, w = torch.randn(3, 5, 24), torch.randn(24)
    eager = _fwd_bwd(fn, x, w, torch.ones(3, 5))
    comp = _fwd_bwd(torch.compile(fn, fullgraph=True, backend="aot_eager"), x, w, torch.ones(3, 5))
    for a, b in zip(eager, comp):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------ Triton kernels
@pytest.mark.triton
@requires_triton_runtime
@pytest.mark.parametrize("dtype", triton_dtypes())
@pytest.mark.parametrize("family,cls,casting,offset", [FAMILIES[0], FAMILIES[3], FAMILIES[5]])
def test_triton_matches_transformers_modules(family, cls, casting, offset, dtype):
    from qpeft import _backend

    assert _backend.select("rms_norm", torch.device(triton_device()), cuda=False) == "triton"
    for shape in SHAPES:
        _check_family(family, cls, casting, offset, dtype, shape, device=triton_device())
    _check_family(family, cls, casting, offset, dtype, (300, 64), device=triton_device())  # rows > 256 blocks


@pytest.mark.triton
@requires_triton_runtime
def test_triton_matches_reference_closely():
    from qpeft.triton_kernels.rmsnorm import rms_norm_backward_triton, rms_norm_triton

    dev = triton_device()
    for casting, offset, dtype in (("llama", 0.0, torch.float16), ("gemma", 1.0, torch.float32)):
        x = torch.randn(70, 200, device=dev).to(dtype)
        w = torch.randn(200, device=dev)
        y, rstd = rms_norm_triton(x, w, 1e-6, offset, casting == "llama", torch.promote_types(dtype, w.dtype)
                                  if casting == "llama" else dtype)
        yr, rr = rms_norm_ref(x, w, 1e-6, offset, casting)
        torch.testing.assert_close(rstd, rr, rtol=1e-6, atol=0)
        torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
        dy = torch.randn(70, 200, device=dev).to(y.dtype)
        for a, b in zip(rms_norm_backward_triton(dy, x, w, rstd, offset, casting == "llama"),
                        rms_norm_backward_ref(dy, x, w, rr, offset, casting)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.triton
@requires_triton_runtime
def test_opcheck_triton():
    x, w = torch.randn(9, 40, device=triton_device()).half(), torch.randn(40, device=triton_device())
    torch.library.opcheck(torch.ops.qpeft.rms_norm.default, (x, w, 1e-6, 0.0, "llama"))
    y, rstd = torch.ops.qpeft.rms_norm(x, w, 1e-6, 0.0, "llama")
    torch.library.opcheck(torch.ops.qpeft.rms_norm_backward.default,
                          (torch.randn_like(y), x, w, rstd, 0.0, "llama"))
