"""Raw CUDA ops of csrc/ (torch.ops.qpeft_C.*) against the PyTorch reference, on the GPU.

- quantize / dequantize (4-bit NF4/FP4 and 8-bit blockwise): bit-exact with python/qpeft/reference/quantize.py
  on random data, odd sizes (partial tail blocks, odd element counts), every blocksize class and input
  dtype, and with misaligned (contiguous, offset by one element) tensors that take the scalar paths;
- nf4_matmul_out / nf4_matmul_dx_out / dense_lora_matmul_out: FA's 2x rule against an fp64 oracle on the
  exactly dequantized weight, for the GEMV (M <= 16, one or two 8-row passes) and tiled paths, fast and
  element-wise (odd K, K not a multiple of the blocksize, misaligned x) chunks, fp32/double-quantized absmax,
  bias and LoRA epilogues;
- CUDA-graph capture, and clear errors that name the offending argument.
"""
from __future__ import annotations

import pytest
import torch

from qpeft.formats import codes
from qpeft.reference import nf4_matmul as mref
from qpeft.reference import quantize as qref
from utils import DTYPES, assert_close_2x, requires_cuda

pytestmark = requires_cuda
DEVICE = "cuda"
QUANT_SIZES = [1, 7, 31, 64, 100, 1000, 4096 + 37, 3 * 4096]


@pytest.fixture(scope="module", autouse=True)
def _extension():
    from qpeft import _jit

    if _jit.find_nvcc() is None:
        pytest.skip("nvcc not found: the CUDA extension cannot be built")
    _jit.load()


def C():
    return torch.ops.qpeft_C


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """Same values, still contiguous, but the data pointer is one element off 16-byte alignment."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = buf[1:].view(t.shape)
    view.copy_(t)
    return view


def sample(n: int, dtype: torch.dtype, blocksize: int) -> torch.Tensor:
    """Random data with an all-zero first block (absmax 0), a large-magnitude block and exact zeros."""
    a = torch.randn(n) * 3
    if n > 2 * blocksize:
        a[:blocksize] = 0
        a[blocksize:2 * blocksize] *= 1e3
    a[::7] = 0
    return a.to(dtype).to(DEVICE)


# ------------------------------------------------------------------------------------ 4-bit quantize
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 1024, 4096])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_4bit_bit_exact(quant_type, blocksize, dtype):
    for n in QUANT_SIZES:
        A = sample(n, dtype, blocksize)
        for a in (A, misaligned(A)):
            packed = torch.empty((n + 1) // 2, 1, dtype=torch.uint8, device=DEVICE)
            absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=DEVICE)
            C().quantize_4bit_out(a, blocksize, quant_type, packed, absmax)
            ref_packed, ref_absmax = qref.quantize_4bit_ref(a.cpu(), blocksize, quant_type)
            assert torch.equal(absmax.cpu(), ref_absmax), (n, "absmax")
            assert torch.equal(packed.cpu().reshape(-1), ref_packed.reshape(-1)), (n, "packed")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantize_4bit_ties_go_to_the_lower_code(quant_type):
    # Each block holds its absmax 1.0 and then every fp32 midpoint exactly: strict `>` must pick the lower code.
    values, _ = codes.sorted_codebook(quant_type)
    mids = qref.midpoints(values)
    block = torch.cat([torch.ones(1), mids, -mids, torch.zeros(64 - 1 - 2 * mids.numel())])
    A = block.repeat(5).to(DEVICE)
    packed = torch.empty(A.numel() // 2, dtype=torch.uint8, device=DEVICE)
    absmax = torch.empty(5, device=DEVICE)
    C().quantize_4bit_out(A, 64, quant_type, packed, absmax)
    ref_packed, ref_absmax = qref.quantize_4bit_ref(A.cpu(), 64, quant_type)
    assert torch.equal(packed.cpu(), ref_packed.reshape(-1)) and torch.equal(absmax.cpu(), ref_absmax)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_4bit_bit_exact(quant_type, blocksize, dtype):
    code = (codes.nf4() if quant_type == "nf4" else codes.fp4()).to(DEVICE)
    for n in QUANT_SIZES:
        packed = torch.randint(0, 256, ((n + 1) // 2,), dtype=torch.uint8)
        absmax = torch.rand(-(-n // blocksize)) * 4 + 1e-3
        ref = qref.dequantize_4bit_ref(packed, absmax, code.cpu(), blocksize, [n], dtype)
        for p, out in ((packed.to(DEVICE), torch.empty(n, dtype=dtype, device=DEVICE)),
                       (misaligned(packed.to(DEVICE)), misaligned(torch.empty(n, dtype=dtype, device=DEVICE)))):
            C().dequantize_4bit_out(p, absmax.to(DEVICE), code, blocksize, out)
            assert torch.equal(out.cpu(), ref), n


# ------------------------------------------------------------------------------------ 8-bit blockwise
def _code8(kind: str) -> torch.Tensor:
    return codes.dynamic_map() if kind == "dynamic" else torch.linspace(-1, 1, 16)


@pytest.mark.parametrize("code_kind", ["dynamic", "linear16"])
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_blockwise_bit_exact(code_kind, blocksize, dtype):
    code = _code8(code_kind)
    for n in QUANT_SIZES:
        A = sample(n, dtype, blocksize)
        for a in (A, misaligned(A)):
            q = torch.empty(n, dtype=torch.uint8, device=DEVICE)
            absmax = torch.empty(-(-n // blocksize), device=DEVICE)
            C().quantize_blockwise_out(a, code.to(DEVICE), blocksize, q, absmax)
            ref_q, ref_absmax = qref.quantize_blockwise_ref(a.cpu(), code, blocksize)
            assert torch.equal(absmax.cpu(), ref_absmax), (n, "absmax")
            assert torch.equal(q.cpu(), ref_q.reshape(-1)), (n, "q")


@pytest.mark.parametrize("code_kind", ["dynamic", "linear16"])
@pytest.mark.parametrize("blocksize", [32, 256, 4096])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_blockwise_bit_exact(code_kind, blocksize, dtype):
    code = _code8(code_kind)
    for n in QUANT_SIZES:
        q = torch.randint(0, code.numel(), (n,), dtype=torch.uint8)
        absmax = torch.randn(-(-n // blocksize)) * 2
        ref = qref.dequantize_blockwise_ref(q, absmax, code, blocksize, dtype)
        for qq, out in ((q.to(DEVICE), torch.empty(n, dtype=dtype, device=DEVICE)),
                        (misaligned(q.to(DEVICE)), misaligned(torch.empty(n, dtype=dtype, device=DEVICE)))):
            C().dequantize_blockwise_out(qq, absmax.to(DEVICE), code.to(DEVICE), blocksize, out)
            assert torch.equal(out.cpu(), ref), n


# ------------------------------------------------------------------------------------ matmuls
def make_weight(N: int, K: int, blocksize: int = 64, quant_type: str = "nf4", nested: bool = False) -> dict:
    """A 4-bit W (N, K) from the reference quantizer, plus `w32`: the exact fp32 weight it encodes."""
    W = torch.randn(N, K) / K ** 0.5
    packed, absmax = qref.quantize_4bit_ref(W, blocksize, quant_type)
    code = codes.nf4() if quant_type == "nf4" else codes.fp4()
    st = dict(packed=packed.reshape(-1, 1), absmax=absmax, code=code, blocksize=blocksize,
              nested_absmax=None, nested_code=None, offset=None)
    if nested:
        offset = absmax.mean()
        qabs, nabs = qref.quantize_blockwise_ref(absmax - offset, codes.dynamic_map(), 256)
        st.update(absmax=qabs, nested_absmax=nabs, nested_code=codes.dynamic_map(), offset=offset)
    w32 = mref.dequantize_weight_ref(packed, mref.decode_absmax_ref(st["absmax"], st["nested_absmax"],
                                                                    st["nested_code"], st["offset"]),
                                     code, blocksize, N, K)
    st = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in st.items()}
    st["w32"] = w32.to(DEVICE)
    return st


def _wargs(st):
    return (st["packed"], st["absmax"], st["code"], st["blocksize"], st["nested_absmax"], st["nested_code"],
            st["offset"])


# (M, N, K): M <= 16 with K % 32 == 0 -> GEMV ((9, 72, 160): two passes, 8 + 1 rows); (5, 24, 48) K % 32 != 0
# -> tiled; (20, 72, 160) tiled, vector chunks; (17, 130, 100) and (70, 65, 257) element-wise chunks
# (K % 16 != 0, odd); (130, 96, 512) several m tiles and a partial n tile. blocksize 64 with K = 96 / 100 /
# 160 / 257: absmax blocks straddle rows.
MATMUL_SHAPES = [(1, 64, 128), (3, 33, 96), (8, 40, 64), (9, 72, 160), (5, 24, 48), (20, 72, 160),
                 (17, 130, 100), (70, 65, 257), (130, 96, 512)]
RANK = 8


@pytest.mark.parametrize("M,N,K", MATMUL_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("epilogue", [False, True])
def test_nf4_matmul_out(M, N, K, dtype, nested, epilogue):
    st = make_weight(N, K, nested=nested)
    x = torch.randn(M, K, device=DEVICE).to(dtype)
    bias = torch.randn(N, device=DEVICE).to(dtype) if epilogue else None
    xa = torch.randn(M, RANK, device=DEVICE).to(dtype) if epilogue else None
    B = (torch.randn(N, RANK, device=DEVICE) * 0.1).to(dtype) if epilogue else None
    scale = 0.5
    for xx in ((x, misaligned(x)) if M <= 16 else (x,)):  # misaligned x: GEMV -> tiled fallback
        out = torch.empty(M, N, dtype=dtype, device=DEVICE)
        C().nf4_matmul_out(xx, *_wargs(st), bias, xa, B, scale, out)
        ref = xx.double() @ st["w32"].double().t()
        same = xx @ st["w32"].to(dtype).t()
        if epilogue:
            ref = ref + bias.double() + scale * (xa.double() @ B.double().t())
            same = same + bias + scale * (xa @ B.t())
        assert_close_2x(out, ref, same, what=f"nf4_matmul {M}x{N}x{K} {dtype}")


@pytest.mark.parametrize("M,N,K", MATMUL_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("epilogue", [False, True])
def test_nf4_matmul_dx_out(M, N, K, dtype, nested, epilogue):
    st = make_weight(N, K, nested=nested)
    dy = torch.randn(M, N, device=DEVICE).to(dtype)
    dyb = torch.randn(M, RANK, device=DEVICE).to(dtype) if epilogue else None
    A = (torch.randn(RANK, K, device=DEVICE) * 0.1).to(dtype) if epilogue else None
    scale = 2.0
    dx = torch.empty(M, K, dtype=dtype, device=DEVICE)
    C().nf4_matmul_dx_out(dy, *_wargs(st), dyb, A, scale, dx)
    ref = dy.double() @ st["w32"].double()
    same = dy @ st["w32"].to(dtype)
    if epilogue:
        ref = ref + scale * (dyb.double() @ A.double())
        same = same + scale * (dyb @ A)
    assert_close_2x(dx, ref, same, what=f"nf4_matmul_dx {M}x{N}x{K} {dtype}")


@pytest.mark.parametrize("blocksize", [32, 256, 4096])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("M", [2, 33])
def test_nf4_matmul_blocksizes_and_fp4(blocksize, quant_type, M):
    N, K = 48, 160  # K % blocksize != 0 for every blocksize here
    st = make_weight(N, K, blocksize, quant_type, nested=True)
    x = torch.randn(M, K, device=DEVICE, dtype=torch.float16)
    out = torch.empty(M, N, dtype=torch.float16, device=DEVICE)
    C().nf4_matmul_out(x, *_wargs(st), None, None, None, 0.0, out)
    assert_close_2x(out, x.double() @ st["w32"].double().t(), x @ st["w32"].half().t())
    dy = torch.randn(M, N, device=DEVICE, dtype=torch.float16)
    dx = torch.empty(M, K, dtype=torch.float16, device=DEVICE)
    C().nf4_matmul_dx_out(dy, *_wargs(st), None, None, 0.0, dx)
    assert_close_2x(dx, dy.double() @ st["w32"].double(), dy @ st["w32"].half())


@pytest.mark.parametrize("M,N,K", [(1, 64, 128), (9, 72, 160), (17, 130, 100), (130, 96, 512)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("factor_dtype", ["same", "fp32"])
def test_dense_lora_matmul_out(M, N, K, dtype, factor_dtype):
    fdt = dtype if factor_dtype == "same" else torch.float32  # LoRA factors / xa are often kept in fp32
    x = torch.randn(M, K, device=DEVICE).to(dtype)
    weight = (torch.randn(N, K, device=DEVICE) / K ** 0.5).to(dtype)
    bias = torch.randn(N, device=DEVICE).to(dtype)
    xa = torch.randn(M, RANK, device=DEVICE).to(fdt)
    B = (torch.randn(N, RANK, device=DEVICE) * 0.1).to(fdt)
    out = torch.empty(M, N, dtype=dtype, device=DEVICE)
    C().dense_lora_matmul_out(x, weight, bias, xa, B, 0.25, out)
    ref = x.double() @ weight.double().t() + bias.double() + 0.25 * (xa.double() @ B.double().t())
    same = x @ weight.t() + bias + 0.25 * (xa.to(dtype) @ B.to(dtype).t())
    assert_close_2x(out, ref, same, what=f"dense_lora {M}x{N}x{K} {dtype}")


@pytest.mark.parametrize("M", [4, 64])
def test_nf4_matmul_is_cuda_graph_capturable(M):
    # No host sync, no allocation: capture, then replay on new input data.
    st = make_weight(256, 512, nested=True)
    x = torch.randn(M, 512, device=DEVICE, dtype=torch.bfloat16)
    out = torch.empty(M, 256, dtype=torch.bfloat16, device=DEVICE)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        C().nf4_matmul_out(x, *_wargs(st), None, None, None, 0.0, out)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        C().nf4_matmul_out(x, *_wargs(st), None, None, None, 0.0, out)
    x.copy_(torch.randn_like(x))
    graph.replay()
    eager = torch.empty_like(out)
    C().nf4_matmul_out(x, *_wargs(st), None, None, None, 0.0, eager)
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


# ------------------------------------------------------------------------------------ validation
def test_bad_inputs_raise_errors_that_name_the_argument():
    st = make_weight(32, 64, nested=True)
    x = torch.randn(4, 64, device=DEVICE, dtype=torch.float16)
    out = torch.empty(4, 32, dtype=torch.float16, device=DEVICE)
    w = dict(packed=st["packed"], absmax=st["absmax"], code=st["code"], blocksize=64, nested_absmax=st["nested_absmax"],
             nested_code=st["nested_code"], offset=st["offset"])

    def mm(**kw):
        a = {**w, "x": x, "bias": None, "xa": None, "B": None, "out": out, **kw}
        C().nf4_matmul_out(a["x"], a["packed"], a["absmax"], a["code"], a["blocksize"], a["nested_absmax"],
                           a["nested_code"], a["offset"], a["bias"], a["xa"], a["B"], 1.0, a["out"])

    cases = [
        (dict(blocksize=48), "blocksize must be a power of two"),
        (dict(blocksize=8192), "blocksize must be a power of two"),
        (dict(x=torch.randn(64, 4, device=DEVICE, dtype=torch.float16).t()), "x must be contiguous"),
        (dict(x=x.to(torch.int32)), "x must be float32, float16 or bfloat16"),
        (dict(out=out.float()), "out must have x's dtype"),
        (dict(out=out.cpu()), "out is on cpu"),
        (dict(packed=st["packed"][:-1]), "packed must hold"),
        (dict(absmax=st["absmax"].float()), "absmax must be"),
        (dict(offset=None), "must be given together"),
        (dict(code=st["code"][:8]), "code must have 16 entries"),
        (dict(nested_absmax=st["nested_absmax"].half()), "nested_absmax must be"),
        (dict(bias=torch.randn(31, device=DEVICE, dtype=torch.float16)), "bias must have shape"),
        (dict(xa=torch.randn(4, 8, device=DEVICE, dtype=torch.float16)), "must be given together"),
        (dict(xa=torch.randn(4, 8, device=DEVICE, dtype=torch.float16),
              B=torch.randn(8, 32, device=DEVICE, dtype=torch.float16)), "lora_B must be"),
    ]
    for kw, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            mm(**kw)

    A = torch.randn(100, device=DEVICE)
    with pytest.raises(RuntimeError, match="quant_type must be 'nf4' or 'fp4'"):
        C().quantize_4bit_out(A, 64, "int4", torch.empty(50, dtype=torch.uint8, device=DEVICE),
                              torch.empty(2, device=DEVICE))
    with pytest.raises(RuntimeError, match="absmax must have"):
        C().quantize_4bit_out(A, 64, "nf4", torch.empty(50, dtype=torch.uint8, device=DEVICE),
                              torch.empty(1, device=DEVICE))
    with pytest.raises(RuntimeError, match="code must have 2..256 entries"):
        C().quantize_blockwise_out(A, torch.zeros(300, device=DEVICE), 64, torch.empty(100, dtype=torch.uint8,
                                                                                       device=DEVICE),
                                   torch.empty(2, device=DEVICE))
    with pytest.raises(RuntimeError, match="weight must be"):
        C().dense_lora_matmul_out(x, torch.randn(32, 63, device=DEVICE, dtype=torch.float16), None,
                                  torch.randn(4, 8, device=DEVICE, dtype=torch.float16),
                                  torch.randn(32, 8, device=DEVICE, dtype=torch.float16), 1.0, out)
