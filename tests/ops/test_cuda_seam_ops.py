"""The CUDA C++ branches of the ops and the modules above them, on the CPU through the fake device (tests/
fake_cuda.py): each `impl == "cuda"` branch allocates its outputs and calls its raw op with the schema of
docs/ARCHITECTURE.md, and the fake raw op computes the documented result with the reference, so the op must
return exactly what the reference returns (wrong argument order, output shape, dtype or device fails here).
QLinearNF4 and LoraLinear have no CUDA-only Python of their own: on a CUDA tensor they reach these branches,
which is what the module tests below run (and compare with the same modules on the CPU path)."""
from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

import qpeft
import qpeft.ops.lora  # noqa: F401  (registers the ops)
import qpeft.ops.multi_lora  # noqa: F401
import qpeft.ops.nf4_matmul  # noqa: F401
import qpeft.ops.quantize  # noqa: F401
from qpeft.formats import codes
from qpeft.modules.lora_linear import LoraLinear
from qpeft.modules.qlinear_nf4 import QLinearNF4
from qpeft.reference import lora as lora_ref
from qpeft.reference import multi_lora as multi_ref
from qpeft.reference import nf4_matmul as nf4_ref
from qpeft.reference import quantize as qref

from fake_cuda import A100
from utils import DTYPES

DEV = torch.device("cpu")  # the pretend GPU's tensors


def _equal(got, want):
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # also checks dtype and shape


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_ops_cuda_branches(fake_cuda, dtype):
    A = torch.randn(37, 29, dtype=dtype)  # 1073 elements: odd, a partial last block
    for quant_type in ("nf4", "fp4"):
        packed, absmax = torch.ops.qpeft.quantize_4bit(A, 64, quant_type)
        want = qref.quantize_4bit_ref(A, 64, quant_type)
        _equal(packed, want[0])
        _equal(absmax, want[1])
        code = (codes.nf4 if quant_type == "nf4" else codes.fp4)(DEV)
        _equal(torch.ops.qpeft.dequantize_4bit(packed, absmax, code, 64, [37, 29], dtype),
               qref.dequantize_4bit_ref(packed, absmax, code, 64, [37, 29], dtype))
    dyn = codes.dynamic_map(device=DEV)
    q, absmax = torch.ops.qpeft.quantize_blockwise(A, dyn, 256)
    want = qref.quantize_blockwise_ref(A, dyn, 256)
    _equal(q, want[0])
    _equal(absmax, want[1])
    _equal(torch.ops.qpeft.dequantize_blockwise(q, absmax, dyn, 256, dtype),
           qref.dequantize_blockwise_ref(q, absmax, dyn, 256, dtype))
    assert {"quantize_4bit_out", "dequantize_4bit_out", "quantize_blockwise_out",
            "dequantize_blockwise_out"} <= set(fake_cuda.names())


def test_public_quantize_checks_nan_on_a_cuda_device(fake_cuda):
    """qpeft.quantize_4bit rejects NaN from the scales when the device's backend gives a NaN block a NaN scale,
    which it asks once per device and backend with a probe."""
    A = torch.randn(1000)
    qpeft.quantize_4bit(A)
    assert fake_cuda.count("quantize_4bit_out") == 2  # the call and the probe
    qpeft.quantize_4bit(A)
    assert fake_cuda.count("quantize_4bit_out") == 3  # the probe's answer is kept
    A[500] = float("nan")
    with pytest.raises(ValueError, match="A has 1 non-finite values"):
        qpeft.quantize_4bit(A)


def _nf4_weight(N, K, nested):
    W = torch.randn(N, K)
    packed, absmax = qref.quantize_4bit_ref(W, 64, "nf4")
    if not nested:
        return packed, absmax, None, None, None
    offset = absmax.mean()
    qabs, nested_absmax = qref.quantize_blockwise_ref(absmax - offset, codes.dynamic_map(device=DEV), 256)
    return packed, qabs, nested_absmax, codes.dynamic_map(device=DEV), offset


@pytest.mark.parametrize("nested", [False, True], ids=["absmax", "double-quant"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nf4_matmul_cuda_branches(fake_cuda, dtype, nested):
    fake_cuda.pretend(**A100)  # before Hopper the plan keeps every M on the CUDA C++ kernels
    N, K, r = 48, 96, 4
    packed, absmax, nabs, ncode, offset = _nf4_weight(N, K, nested)
    code = codes.nf4(DEV)
    for M in (3, 40):
        x = torch.randn(M, K, dtype=dtype)
        bias, xa, B = torch.randn(N, dtype=dtype), torch.randn(M, r, dtype=dtype), torch.randn(N, r, dtype=dtype)
        args = (packed, absmax, code, 64)
        _equal(torch.ops.qpeft.nf4_matmul(x, *args, N, nabs, ncode, offset, bias, xa, B, 0.5),
               nf4_ref.nf4_matmul_ref(x, *args, N, nabs, ncode, offset, bias, xa, B, 0.5))
        dy, dyb, A = torch.randn(M, N, dtype=dtype), torch.randn(M, r, dtype=dtype), torch.randn(r, K, dtype=dtype)
        _equal(torch.ops.qpeft.nf4_matmul_dx(dy, *args, K, nabs, ncode, offset, dyb, A, 0.5),
               nf4_ref.nf4_matmul_dx_ref(dy, *args, K, nabs, ncode, offset, dyb, A, 0.5))
    assert fake_cuda.count("nf4_matmul_out") == 2 and fake_cuda.count("nf4_matmul_dx_out") == 2


def test_nf4_matmul_on_hopper_takes_triton_above_decode_sizes(fake_cuda, monkeypatch):
    pytest.importorskip("triton")
    from utils import recorded_triton_launches

    N, K = 64, 128
    packed, absmax, *_ = _nf4_weight(N, K, False)
    code = codes.nf4(DEV)
    with recorded_triton_launches() as launches:
        torch.ops.qpeft.nf4_matmul(torch.randn(32, K, dtype=torch.bfloat16), packed, absmax, code, 64, N, None, None,
                                   None, None, None, None, 0.0)
    assert [launch.name for launch in launches] == ["_nf4_matmul_kernel"] and "nf4_matmul_out" not in fake_cuda.names()
    x = torch.randn(4, K, dtype=torch.bfloat16)  # decode: the CUDA GEMV
    _equal(torch.ops.qpeft.nf4_matmul(x, packed, absmax, code, 64, N, None, None, None, None, None, None, 0.0),
           nf4_ref.nf4_matmul_ref(x, packed, absmax, code, 64, N))
    monkeypatch.setenv("QPEFT_BACKEND", "cuda")  # an explicit backend overrides the plan
    torch.ops.qpeft.nf4_matmul(torch.randn(32, K, dtype=torch.bfloat16), packed, absmax, code, 64, N, None, None,
                               None, None, None, None, 0.0)
    assert fake_cuda.count("nf4_matmul_out") == 2


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dense_lora_cuda_branch(fake_cuda, dtype):
    fake_cuda.pretend(**A100)  # on Hopper the dense LoRA GEMM prefers Triton
    x, W, bias = torch.randn(7, 33, dtype=dtype), torch.randn(21, 33, dtype=dtype), torch.randn(21, dtype=dtype)
    xa, B = torch.randn(7, 4), torch.randn(21, 4)  # fp32 adapters stay fp32
    _equal(torch.ops.qpeft.lora_linear(x, W, bias, xa, B, 2.0), lora_ref.dense_lora_matmul_ref(x, W, bias, xa, B, 2.0))
    assert fake_cuda.names() == ["build_extension", "dense_lora_matmul_out"]


def test_dense_lora_on_hopper_prefers_triton(fake_cuda):
    pytest.importorskip("triton")
    from utils import recorded_triton_launches

    x, W = torch.randn(7, 32, dtype=torch.float16), torch.randn(16, 32, dtype=torch.float16)
    with recorded_triton_launches() as launches:
        torch.ops.qpeft.lora_linear(x, W, None, torch.randn(7, 4), torch.randn(16, 4), 2.0)
    assert {launch.name for launch in launches} == {"_lora_matmul_kernel"}  # (autotuned: one per config)
    assert "dense_lora_matmul_out" not in fake_cuda.names()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_multi_lora_cuda_branches(fake_cuda, dtype):
    M, K, N = 9, 40, 24
    rank_start = torch.tensor([0, 4, 12], dtype=torch.int32)  # two adapters, ranks 4 and 8
    index = torch.tensor([0, 1, -1, 1, 0, 0, -1, 1, 1], dtype=torch.int32)
    x, A_cat = torch.randn(M, K, dtype=dtype), torch.randn(12, K, dtype=dtype)
    xa = torch.ops.qpeft.lora_shrink_gathered(x, A_cat, rank_start, index, 8)
    _equal(xa, multi_ref.lora_shrink_gathered_ref(x, A_cat, rank_start, index, 8))
    y, B_cat, scale = torch.randn(M, N, dtype=dtype), torch.randn(N, 12, dtype=dtype), torch.tensor([0.5, 2.0])
    _equal(torch.ops.qpeft.lora_expand_gathered(y, xa, B_cat, rank_start, scale, index),
           multi_ref.lora_expand_gathered_ref(y, xa, B_cat, rank_start, scale, index))
    assert {"lora_shrink_gathered_out", "lora_expand_gathered_out"} <= set(fake_cuda.names())
    # on a GPU the index checks are device-side asserts (no host sync), not the CPU's exact ValueError
    bad = index.clone()
    bad[2] = 5
    with pytest.raises(RuntimeError, match=r"index values must be in \[-1, 2\)"):
        torch.ops.qpeft.lora_shrink_gathered(x, A_cat, rank_start, bad, 8)


def _qlinear_run(layer, x, dy):
    x = x.clone().requires_grad_(True)
    y = layer(x)
    y.backward(dy)
    return y.detach(), x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_qlinear_nf4_on_a_cuda_device(fake_cuda, dtype):
    """QLinearNF4 quantizes, runs forward and backward through the CUDA branches: the same bits as on the CPU."""
    fake_cuda.pretend(**A100)
    torch.manual_seed(0)
    dense = nn.Linear(96, 40).to(dtype)
    x, dy = torch.randn(5, 3, 96, dtype=dtype), torch.randn(5, 3, 40, dtype=dtype)
    layer = QLinearNF4.from_linear(dense, compute_dtype=torch.bfloat16)
    y, dx = _qlinear_run(layer, x, dy)
    assert {"quantize_4bit_out", "quantize_blockwise_out", "nf4_matmul_out",
            "nf4_matmul_dx_out"} <= set(fake_cuda.names())
    with fake_cuda.off():
        cpu_layer = QLinearNF4.from_linear(dense, compute_dtype=torch.bfloat16)
        for (name, a), b in zip(layer.state_dict().items(), cpu_layer.state_dict().values()):
            assert torch.equal(a, b), name
        y_cpu, dx_cpu = _qlinear_run(cpu_layer, x, dy)
    _equal(y, y_cpu)
    _equal(dx, dx_cpu)
    _equal(layer.dequantize(), cpu_layer.dequantize())


@pytest.mark.filterwarnings("ignore:qpeft. Triton unavailable:RuntimeWarning")
@pytest.mark.parametrize("nf4", [False, True], ids=["linear", "nf4"])
def test_lora_linear_on_a_cuda_device(fake_cuda, nf4, monkeypatch):
    """A GPU without Triton: the LoRA ops that only Triton implements (dropout-A, the adapter gradients) take the
    reference, the base GEMMs with their LoRA epilogue the CUDA C++ branches."""
    monkeypatch.setitem(sys.modules, "triton", None)  # Triton-only kernels cannot run on CPU tensors
    fake_cuda.pretend(**A100)
    torch.manual_seed(0)
    base = nn.Linear(64, 48).to(torch.bfloat16)
    if nf4:
        base = QLinearNF4.from_linear(base, compute_dtype=torch.bfloat16)
    layer = LoraLinear(base, r=4, lora_alpha=8, init="random")
    x, dy = torch.randn(6, 64, dtype=torch.bfloat16), torch.randn(6, 48, dtype=torch.bfloat16)

    def run():
        for p in layer.parameters():
            p.grad = None
        y, dx = _qlinear_run(layer, x, dy)
        return y, dx, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad

    got = run()
    raw = "nf4_matmul_out" if nf4 else "dense_lora_matmul_out"
    assert raw in fake_cuda.names()
    with fake_cuda.off():
        want = run()
    for g, w in zip(got, want):
        _equal(g, w)
