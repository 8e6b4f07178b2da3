"""Triton and CUDA quantizers against the PyTorch reference: the same bytes, the same values.

Triton runs on a GPU or on CPU tensors under TRITON_INTERPRET=1 (small odd shapes, fp16/fp32: the
interpreter cannot do bf16 arithmetic). The CUDA C++ kernels and bf16 need a GPU (requires_cuda).
"""
from __future__ import annotations

import pytest
import torch

import qpeft
from qpeft.formats import codes
from qpeft.reference import quantize as ref
from utils import (DTYPES, HAS_CUDA, TRITON_INTERPRET, compile_for_sm90, has_triton, requires_cuda,
                   requires_triton_runtime, triton_device, triton_dtypes)

BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]


@pytest.fixture(autouse=True)
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors on a shared 2-core box: OpenMP spin-waiting only costs time
    yield
    torch.set_num_threads(threads)


def _check_rejects_non_finite(device: str) -> None:
    """The public API finds NaN/Inf through the absmax the backend returns (every backend must propagate)."""
    for bad in (float("nan"), float("inf"), -float("inf")):
        for dtype in (torch.float32, torch.float16):
            A = torch.randn(3, 100, dtype=dtype, device=device)
            A[2, 77] = bad  # in the partial tail block (300 = 4 x 64 + 44)
            B = torch.randn(3, 100, dtype=dtype, device=device)
            B[0, 5] = bad   # in a full block
            for X in (A, B):
                with pytest.raises(ValueError, match="1 non-finite values"):
                    qpeft.quantize_4bit(X, 64, "nf4")
                with pytest.raises(ValueError, match="1 non-finite values"):
                    qpeft.quantize_blockwise(X, blocksize=64)


def _inputs(bs: int, dtype: torch.dtype, device: str, seed: int) -> list[torch.Tensor]:
    """numel not a multiple of bs (with a partial tail), odd numel below one block, an all-zero block."""
    g = torch.Generator().manual_seed(seed)
    odd = torch.randn(2, bs + 5, generator=g) * 3
    odd[0, 0] = 50.0
    tiny = torch.randn(7, generator=g)
    zero_block = torch.randn(bs * 2 + 1, generator=g)
    zero_block[bs:2 * bs] = 0
    return [t.to(device=device, dtype=dtype) for t in (odd, tiny, zero_block)]


def _check_4bit(A: torch.Tensor, bs: int, qt: str, quantize, dequantize, out_dtypes) -> None:
    what = f"{qt} bs={bs} {A.dtype} {tuple(A.shape)}"
    A_cpu = A.cpu()
    packed_ref, absmax_ref = ref.quantize_4bit_ref(A_cpu, bs, qt)
    packed, absmax = quantize(A.contiguous(), bs, qt)
    assert torch.equal(packed.cpu(), packed_ref), f"packed bytes differ: {what}"
    assert torch.equal(absmax.cpu(), absmax_ref), f"absmax differs: {what}"
    code = (codes.nf4() if qt == "nf4" else codes.fp4()).to(A.device)
    for dt in out_dtypes:
        out = dequantize(packed, absmax, code, bs, list(A.shape), dt)
        want = ref.dequantize_4bit_ref(packed_ref, absmax_ref, code.cpu(), bs, list(A.shape), dt)
        assert out.dtype == dt and torch.equal(out.cpu(), want), f"dequantized values differ: {what} -> {dt}"


def _check_8bit(A: torch.Tensor, bs: int, code: torch.Tensor, quantize, dequantize, out_dtypes) -> None:
    what = f"8-bit bs={bs} {A.dtype} {tuple(A.shape)} code[{code.numel()}]"
    q_ref, absmax_ref = ref.quantize_blockwise_ref(A.cpu(), code, bs)
    q, absmax = quantize(A.contiguous(), code.to(A.device), bs)
    assert torch.equal(q.cpu(), q_ref), f"codes differ: {what}"
    assert torch.equal(absmax.cpu(), absmax_ref), f"absmax differs: {what}"
    for dt in out_dtypes:
        out = dequantize(q, absmax, code.to(A.device), bs, dt)
        want = ref.dequantize_blockwise_ref(q_ref, absmax_ref, code, bs, dt)
        assert torch.equal(out.cpu(), want), f"dequantized values differ: {what} -> {dt}"


def _triton_launchers():
    from qpeft.triton_kernels import quantize as tk

    return tk


# --- Triton (GPU, or CPU under the interpreter) --------------------------------------------------------------
@pytest.mark.triton
@requires_triton_runtime
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_triton_4bit_matches_reference(blocksize):
    tk = _triton_launchers()
    for dtype in triton_dtypes():
        for A in _inputs(blocksize, dtype, triton_device(), seed=blocksize + dtype.itemsize):
            for qt in ("nf4", "fp4"):
                _check_4bit(A, blocksize, qt, tk.quantize_4bit_triton, tk.dequantize_4bit_triton, triton_dtypes())


@pytest.mark.triton
@requires_triton_runtime
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_triton_8bit_matches_reference(blocksize):
    tk = _triton_launchers()
    short = codes.quantile_code(torch.randn(500, generator=torch.Generator().manual_seed(1)), 4)
    for dtype in triton_dtypes():
        for A in _inputs(blocksize, dtype, triton_device(), seed=2 * blocksize):
            for code in (codes.dynamic_map(), short):
                _check_8bit(A, blocksize, code, tk.quantize_blockwise_triton, tk.dequantize_blockwise_triton,
                            triton_dtypes())


@pytest.mark.triton
@requires_triton_runtime
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter on NaN input
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_public_api_on_triton_backend(quant_type, monkeypatch):
    """quantize_4bit with double quant through the L2 ops on the Triton backend == the reference backend."""
    A = torch.randn(37, 53, generator=torch.Generator().manual_seed(11)).to(triton_device(), torch.float16)
    monkeypatch.setenv("QPEFT_BACKEND", "triton")
    packed, st = qpeft.quantize_4bit(A, 64, quant_type, double_quant=True)
    out = qpeft.dequantize_4bit(packed, st)
    monkeypatch.setenv("QPEFT_BACKEND", "torch")
    packed_r, st_r = qpeft.quantize_4bit(A.cpu(), 64, quant_type, double_quant=True)
    assert torch.equal(packed.cpu(), packed_r)
    assert torch.equal(st.absmax.cpu(), st_r.absmax) and torch.equal(st.state2.absmax.cpu(), st_r.state2.absmax)
    assert torch.equal(st.offset.cpu(), st_r.offset)
    assert torch.equal(out.cpu(), qpeft.dequantize_4bit(packed_r, st_r))
    monkeypatch.setenv("QPEFT_BACKEND", "triton")
    _check_rejects_non_finite(triton_device())


@pytest.mark.triton
@requires_triton_runtime
def test_triton_launchers_reject_bad_input():
    tk = _triton_launchers()
    A = torch.randn(8, 64, device=triton_device())
    with pytest.raises(ValueError, match="A must be contiguous"):
        tk.quantize_4bit_triton(A.t(), 64, "nf4")
    with pytest.raises(ValueError, match="blocksize must be one of"):
        tk.quantize_blockwise_triton(A, codes.dynamic_map().to(A.device), 96)
    packed, absmax = tk.quantize_4bit_triton(A, 64, "nf4")
    with pytest.raises(ValueError, match="absmax must be contiguous float32 with 8 entries"):
        tk.dequantize_4bit_triton(packed, absmax[:4], codes.nf4().to(A.device), 64, [8, 64], torch.float32)
    with pytest.raises(ValueError, match="code must have 16 entries"):
        tk.dequantize_4bit_triton(packed, absmax, codes.dynamic_map().to(A.device), 64, [8, 64], torch.float32)


# --- GPU: CUDA C++ and Triton vs the reference (and bitsandbytes' CUDA kernels) ------------------------------
@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_gpu_backends_match_reference(backend, dtype, blocksize, monkeypatch):
    monkeypatch.setenv("QPEFT_BACKEND", backend)
    ops = torch.ops.qpeft
    q4 = lambda A, bs, qt: ops.quantize_4bit(A, bs, qt)  # noqa: E731
    dq4 = lambda p, a, c, bs, shape, dt: ops.dequantize_4bit(p, a, c, bs, shape, dt)  # noqa: E731
    q8 = lambda A, c, bs: ops.quantize_blockwise(A, c, bs)  # noqa: E731
    dq8 = lambda q, a, c, bs, dt: ops.dequantize_blockwise(q, a, c, bs, dt)  # noqa: E731
    inputs = _inputs(blocksize, dtype, "cuda", seed=blocksize)
    inputs.append((torch.randn(1021, 997, device="cuda") * 2).to(dtype))  # ~1M values, odd everything
    for A in inputs:
        for qt in ("nf4", "fp4"):
            _check_4bit(A, blocksize, qt, q4, dq4, DTYPES)
        _check_8bit(A, blocksize, codes.dynamic_map(), q8, dq8, DTYPES)


@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_backends_reject_non_finite(backend, monkeypatch):
    monkeypatch.setenv("QPEFT_BACKEND", backend)
    _check_rejects_non_finite("cuda")


@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_public_api_matches_bitsandbytes_cuda(backend, monkeypatch):
    """NF4 on whole blocks (bnb's CUDA kernel multiplies by 1/absmax everywhere, our tail block divides like its
    CPU backend; its FP4 tree and ours differ in the sign of values within 1/384 of zero)."""
    F = pytest.importorskip("bitsandbytes.functional")
    monkeypatch.setenv("QPEFT_BACKEND", backend)
    A = torch.randn(512, 768, device="cuda", dtype=torch.bfloat16)
    for bs in BLOCKSIZES:
        packed, st = qpeft.quantize_4bit(A, bs, "nf4", double_quant=False)
        bpacked, bst = F.quantize_4bit(A, blocksize=bs, quant_type="nf4")
        assert torch.equal(packed, bpacked) and torch.equal(st.absmax, bst.absmax), bs
        assert torch.equal(qpeft.dequantize_4bit(packed, st), F.dequantize_4bit(bpacked, bst)), bs


@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_opcheck(backend, monkeypatch):
    monkeypatch.setenv("QPEFT_BACKEND", backend)
    A = torch.randn(5, 37, device="cuda", dtype=torch.bfloat16)
    packed, absmax = ref.quantize_4bit_ref(A.cpu(), 64, "nf4")
    q8, absmax8 = ref.quantize_blockwise_ref(A.cpu(), codes.dynamic_map(), 32)
    cuda = lambda *ts: [t.cuda() for t in ts]  # noqa: E731
    cases = [("quantize_4bit", (A, 64, "nf4")), ("quantize_4bit", (A.float(), 32, "fp4")),
             ("dequantize_4bit", (*cuda(packed, absmax, codes.nf4()), 64, [5, 37], torch.bfloat16)),
             ("quantize_blockwise", (A, codes.dynamic_map().cuda(), 32)),
             ("dequantize_blockwise", (*cuda(q8, absmax8, codes.dynamic_map()), 32, torch.float16))]
    for name, args in cases:
        torch.library.opcheck(getattr(torch.ops.qpeft, name).default, args)


@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_more_than_2_31_elements(backend, monkeypatch):
    """int64 offsets: the blocks past 2^31 elements (bnb's test_4bit_quant_large); 4.3 GB of bf16."""
    monkeypatch.setenv("QPEFT_BACKEND", backend)
    bs = 64
    n = 2 ** 31 + 3 * bs + 5
    A = torch.empty(n, device="cuda", dtype=torch.bfloat16).normal_()
    packed, absmax = torch.ops.qpeft.quantize_4bit(A, bs, "nf4")
    assert packed.numel() == (n + 1) // 2 and absmax.numel() == -(-n // bs)
    start = (2 ** 31 // bs - 2) * bs  # a block boundary before 2^31: the tail blocks are independent
    tail = A[start:].cpu()
    p_ref, a_ref = ref.quantize_4bit_ref(tail, bs, "nf4")
    assert torch.equal(packed[start // 2:].cpu(), p_ref) and torch.equal(absmax[start // bs:].cpu(), a_ref)
    out = torch.ops.qpeft.dequantize_4bit(packed, absmax, codes.nf4().cuda(), bs, [n], torch.bfloat16)
    assert torch.equal(out[start:].cpu(), ref.dequantize_4bit_ref(p_ref, a_ref, codes.nf4(), bs, [n - start],
                                                                   torch.bfloat16))


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU dispatch rule")
def test_cpu_tensors_use_the_reference_without_the_interpreter(monkeypatch):
    from qpeft import _backend

    monkeypatch.setenv("QPEFT_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert _backend.select("quantize_4bit", torch.device("cpu")) == "torch"


# --- Triton kernels compiled for an H100 (sm_90) without a GPU: lowering, IEEE division, vector accesses -----
def _ptx_for_sm90(fn, signature: dict, constexprs: dict, aligned: list[str]) -> str:
    return compile_for_sm90(fn, signature, constexprs, aligned=aligned).asm["ptx"]


@pytest.mark.skipif(TRITON_INTERPRET or not has_triton(), reason="compiles real Triton kernels (no interpreter)")
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_triton_kernels_compile_for_sm90():
    """What a GPU run would compile, checked on the CPU: every kernel lowers to PTX; quantize divides with
    div.rn (Triton's plain fp32 `/` is the 2-ulp div.full, which would move values across midpoints); inputs
    are read with 16-byte vector loads when the launch specializes pointers and sizes to multiples of 16;
    the WORDS path stores packed bytes as vectors."""
    from qpeft.triton_kernels import quantize as tk

    sizes = {"n": "i32", "num_blocks": "i32"}
    q4 = {"a_ptr": "*bf16", "packed_ptr": "*u8", "absmax_ptr": "*fp32", "mid_ptr": "*fp32", **sizes}
    meta = dict(BLOCKSIZE=64, GROUP=64, FP4_LO=tk._FP4_LO, FP4_HI=tk._FP4_HI, ABSMAX_FLOOR=ref.ABSMAX_FLOOR)
    for words in (False, True):
        ptx = _ptx_for_sm90(tk._quantize_4bit_kernel, {**q4, "packed_ptr": "*i32" if words else "*u8"},
                            dict(meta, IS_FP4=words, WORDS=words), list(q4))
        assert "div.rn.f32" in ptx and "div.full" not in ptx and "div.approx" not in ptx
        assert "ld.global.v4.b32" in ptx
        assert ("st.global.b8" not in ptx) == words
    ptx = _ptx_for_sm90(tk._dequantize_4bit_kernel, {"packed_ptr": "*u8", "absmax_ptr": "*fp32",
                                                     "code_ptr": "*fp32", "out_ptr": "*bf16", **sizes},
                        dict(BLOCKSIZE=64, GROUP=64), ["packed_ptr", "absmax_ptr", "out_ptr", "n", "num_blocks"])
    assert "st.global.v4.b32" in ptx and "fma" not in ptx  # one rounding: code * absmax, then the cast
    ptx = _ptx_for_sm90(tk._quantize_blockwise_kernel, {"a_ptr": "*fp16", "q_ptr": "*u8", "absmax_ptr": "*fp32",
                                                        "mid_ptr": "*fp32", **sizes},
                        dict(BLOCKSIZE=256, GROUP=16, ABSMAX_FLOOR=ref.ABSMAX_FLOOR), ["a_ptr", "q_ptr", "n"])
    assert "div.rn.f32" in ptx and "div.full" not in ptx
    _ptx_for_sm90(tk._dequantize_blockwise_kernel, {"q_ptr": "*u8", "absmax_ptr": "*fp32", "code_ptr": "*fp32",
                                                    "out_ptr": "*fp32", **sizes}, dict(BLOCKSIZE=4096, GROUP=1), [])


@pytest.mark.parametrize("blocksize", [32, 64, 4096])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_the_cpu_path_quantizes_in_chunks_with_the_reference_bytes(monkeypatch, blocksize, quant_type):
    """On the CPU the op feeds the reference at most REF_QUANT_CHUNK elements at a time (its temporaries are ~17
    bytes per element: 140 MiB for one 4096 x 2048 projection of a 4-bit load otherwise) and gives the bytes of
    one reference call: odd sizes, a partial last block, chunk edges inside the tensor."""
    from qpeft.ops import quantize as qops

    monkeypatch.setattr(qops, "REF_QUANT_CHUNK", 4096)
    seen = []
    whole = ref.quantize_4bit_ref

    def spy(A, bs, qt):
        seen.append(A.numel())
        return whole(A, bs, qt)

    monkeypatch.setattr(ref, "quantize_4bit_ref", spy)
    g = torch.Generator().manual_seed(blocksize)
    for n in (3 * 4096 + 4096 + 37, 4 * 8192 + 1, 4096 * 5):
        A = torch.randn(n, generator=g) * 2
        seen.clear()
        packed, absmax = torch.ops.qpeft.quantize_4bit(A, blocksize, quant_type)
        want_packed, want_absmax = whole(A, blocksize, quant_type)
        assert max(seen) <= max(4096, blocksize) and len(seen) == -(-n // max(4096, blocksize)), (n, seen)
        assert torch.equal(packed, want_packed) and torch.equal(absmax, want_absmax), n
