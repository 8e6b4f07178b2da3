"""qpeft.swiglu / geglu / glu_activation (qpeft::glu / glu_backward) against transformers' activations
(ACT2FN["silu"], ["gelu_pytorch_tanh"], ["gelu"]) times up, the families' MLP modules and an fp64 oracle: forward
and gradients within the 2x rule, every dtype; the Triton kernels under the interpreter (fp16/fp32)."""
from __future__ import annotations

import pytest
import torch

import qpeft
from qpeft.reference.swiglu import glu_backward_ref, glu_ref
from utils import DTYPES, assert_close_2x, requires_triton_runtime, triton_device, triton_dtypes

HF_ACTS = ["silu", "swish", "gelu_pytorch_tanh", "gelu"]
SHAPES = [(1, 1), (7, 37), (3, 5, 130), (2049,)]  # odd sizes; one beyond a 2048-element block


def _inputs(shape, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    gate = (torch.randn(*shape, generator=g) * 3).to(device, dtype)  # wide range: both tails of the activation
    up = torch.randn(*shape, generator=g).to(device, dtype)
    dh = torch.randn(*shape, generator=g).to(device, dtype)
    return gate, up, dh


def _run(fn, gate, up, dh):
    g = gate.detach().clone().requires_grad_(True)
    u = up.detach().clone().requires_grad_(True)
    h = fn(g, u)
    return (h.detach(), *torch.autograd.grad(h, (g, u), dh.to(h.dtype)))


def _check(act, dtype, shape, device="cpu"):
    from transformers.activations import ACT2FN

    gate, up, dh = _inputs(shape, dtype, device)
    ours = _run(lambda g, u: qpeft.glu_activation(g, u, act), gate, up, dh)
    base = _run(lambda g, u: ACT2FN[act](g) * u, gate, up, dh)
    oracle = _run(lambda g, u: ACT2FN[act](g) * u, gate.double(), up.double(), dh.double())
    for name, o, b, e in zip(("h", "dgate", "dup"), ours, base, oracle):
        assert o.dtype == b.dtype == dtype and o.shape == b.shape
        assert_close_2x(o, e, b, 2.0, eps=1e-6, what=f"{name} {act} {dtype} {shape}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", HF_ACTS)
def test_matches_transformers_activations(act, dtype):
    for shape in SHAPES:
        _check(act, dtype, shape)


@pytest.mark.parametrize("family,act", [("llama", "silu"), ("qwen3", "silu"), ("gemma2", "gelu_pytorch_tanh"),
                                        ("gemma3", "gelu_pytorch_tanh")])
def test_in_the_family_mlp(family, act):
    import importlib

    import transformers

    mod = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    cfg_cls = getattr(transformers, {"llama": "LlamaConfig", "qwen3": "Qwen3Config", "gemma2": "Gemma2Config",
                                     "gemma3": "Gemma3TextConfig"}[family])
    cfg = cfg_cls(hidden_size=32, intermediate_size=72, hidden_act=act, hidden_activation=act)
    mlp = getattr(mod, {"llama": "LlamaMLP", "qwen3": "Qwen3MLP", "gemma2": "Gemma2MLP",
                        "gemma3": "Gemma3MLP"}[family])(cfg).to(torch.bfloat16)
    x = torch.randn(9, 32, dtype=torch.bfloat16)
    name = getattr(cfg, "hidden_activation", None) or cfg.hidden_act
    ours = mlp.down_proj(qpeft.glu_activation(mlp.gate_proj(x), mlp.up_proj(x), name))
    mlp64 = mlp.double()
    oracle = mlp64(x.double())
    assert_close_2x(ours, oracle, mlp.to(torch.bfloat16)(x), 2.0, what=f"{family} MLP")


def test_swiglu_geglu_names():
    gate, up, _ = _inputs((4, 9), torch.float32)
    torch.testing.assert_close(qpeft.swiglu(gate, up), torch.nn.functional.silu(gate) * up)
    torch.testing.assert_close(qpeft.geglu(gate, up), torch.nn.functional.gelu(gate, approximate="tanh") * up)
    torch.testing.assert_close(qpeft.geglu(gate, up, "none"), torch.nn.functional.gelu(gate) * up)


def test_reference_backward_is_the_derivative():
    gate, up, dh = _inputs((5, 11), torch.float64)
    for act in ("silu", "gelu_tanh", "gelu"):
        _, dg, du = _run(lambda g, u: glu_ref(g, u, act), gate, up, dh)
        mg, mu = glu_backward_ref(dh, gate, up, act)
        torch.testing.assert_close(mg, dg, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(mu, du, rtol=1e-12, atol=1e-12)


def test_bad_input_names_the_argument():
    gate, up, _ = _inputs((3, 4), torch.float32)
    with pytest.raises(ValueError, match="activation must be one of"):
        qpeft.glu_activation(gate, up, "relu")
    with pytest.raises(ValueError, match="up must have gate's shape"):
        qpeft.swiglu(gate, up[:, :3])
    with pytest.raises(TypeError, match="up must have gate's dtype"):
        qpeft.swiglu(gate, up.half())
    with pytest.raises(TypeError, match="gate must be"):
        qpeft.swiglu(gate.long(), up)
    with pytest.raises(ValueError, match="approximate"):
        qpeft.geglu(gate, up, "erf")
    with pytest.raises(RuntimeError, match="activation must be one of"):
        torch.ops.qpeft.glu(gate, up, "swish")  # the op takes canonical names only


def test_opcheck():
    gate, up, dh = _inputs((6, 10), torch.float32)
    for act in ("silu", "gelu_tanh", "gelu"):
        torch.library.opcheck(torch.ops.qpeft.glu.default, (gate, up, act))
        torch.library.opcheck(torch.ops.qpeft.glu_backward.default, (dh, gate, up, act))


def test_compile_fullgraph():
    torch._dynamo.reset()

    def fn(g, u):
        return qpeft.geglu(g * 2, u, "none") + 1

    gate, up, dh = _inputs((4, 6), torch.float32)
    for a, b in zip(_run(fn, gate, up, dh), _run(torch.compile(fn, fullgraph=True, backend="aot_eager"), gate, up, dh)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------ Triton kernels
@pytest.mark.triton
@requires_triton_runtime
@pytest.mark.parametrize("dtype", triton_dtypes())
@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh", "gelu"])
def test_triton_matches_transformers(act, dtype):
    from qpeft import _backend

    assert _backend.select("glu", torch.device(triton_device()), cuda=False) == "triton"
    for shape in SHAPES:
        _check(act, dtype, shape, device=triton_device())


@pytest.mark.triton
@requires_triton_runtime
def test_triton_matches_reference_closely():
    from qpeft.triton_kernels.swiglu import glu_backward_triton, glu_triton

    gate, up, dh = _inputs((33, 65), torch.float32, triton_device())
    for act in ("silu", "gelu_tanh", "gelu"):
        torch.testing.assert_close(glu_triton(gate, up, act), glu_ref(gate, up, act), rtol=1e-5, atol=1e-5)
        for a, b in zip(glu_backward_triton(dh, gate, up, act), glu_backward_ref(dh, gate, up, act)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.triton
@requires_triton_runtime
def test_opcheck_triton():
    gate, up, dh = _inputs((5, 40), torch.float16, triton_device())
    torch.library.opcheck(torch.ops.qpeft.glu.default, (gate, up, "silu"))
    torch.library.opcheck(torch.ops.qpeft.glu_backward.default, (dh, gate, up, "gelu_tanh"))
