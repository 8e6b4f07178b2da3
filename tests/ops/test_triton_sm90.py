"""Every Triton kernel in triton_kernels/, compiled for an H100 / H200 (sm_90) on a machine without a GPU.

The launchers run with CPU tensors while their launches are recorded instead of run
(utils.recorded_triton_launches), so what is compiled is exactly what a GPU run would compile: the same
arguments, constexprs, tiles and launch options, for the shapes below (decode and prefill sizes of LLaMA
layers, every dtype, every epilogue, both quantization formats; an autotuned kernel once per config). Each
compiled kernel must lower without errors (the interpreter cannot catch typing or lowering failures: Triton
3.6 / 3.8 typing a constant as fp64 was one), must not spill registers (no local-memory loads or stores in its
SASS) and must fit in the 227 KB of shared memory a Hopper block may use. `test_every_kernel_is_compiled`
fails for a kernel no case launches: a new kernel needs a case here.
"""
from __future__ import annotations

import inspect
import pkgutil

import pytest
import torch

import qpeft
from utils import TRITON_INTERPRET, has_triton, recorded_triton_launches, sm90_resource_usage, spill_instructions

pytestmark = pytest.mark.skipif(TRITON_INTERPRET or not has_triton(),
                                reason="compiles real Triton kernels for sm_90 (not under the interpreter)")

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SHARED_MEMORY_LIMIT = 227 * 1024  # bytes of shared memory one block may use on sm_90


def _randn(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape).to(dtype)


# ----------------------------------------------------------------------------------------------- quantize
def _quantize_cases():
    from qpeft.triton_kernels import quantize as tq

    for dtype in DTYPES:
        tq.quantize_4bit_triton(_randn(4096, 64, dtype=dtype), 64, "nf4")       # n % 8 == 0: word stores
        tq.quantize_4bit_triton(_randn(1001, dtype=dtype), 128, "fp4")          # odd n: byte stores
        tq.quantize_blockwise_triton(_randn(4096, 64, dtype=dtype), qpeft.formats.codes.dynamic_map(), 256)
    tq.quantize_4bit_triton(_randn(4096, 64), 4096, "nf4")
    tq.quantize_4bit_triton(_randn(4096, 64), 32, "nf4")
    tq.quantize_blockwise_triton(_randn(8192), qpeft.formats.codes.dynamic_map(), 4096)
    n = 4096 * 64
    for dtype in DTYPES:
        tq.dequantize_4bit_triton(torch.zeros(n // 2, dtype=torch.uint8), torch.ones(n // 64),
                                  qpeft.formats.codes.nf4(), 64, [4096, 64], dtype)
        tq.dequantize_blockwise_triton(torch.zeros(n, dtype=torch.uint8), torch.ones(n // 256),
                                       qpeft.formats.codes.dynamic_map(), 256, dtype)
    tq.dequantize_4bit_triton(torch.zeros(n // 2, dtype=torch.uint8), torch.ones(n // 4096), qpeft.formats.codes.fp4(),
                              4096, [n], torch.bfloat16)


# ----------------------------------------------------------------------------------------------- NF4 matmul
def _nf4_weight(N, K, blocksize=64, nested=True):
    """(packed, absmax, code, blocksize) and (nested_absmax, nested_code, offset) as the op passes them."""
    from qpeft.autograd.nf4_matmul import weight_args

    packed, state = qpeft.quantize_4bit(torch.randn(N, K), blocksize=blocksize, quant_type="nf4",
                                        double_quant=nested)
    args = weight_args(packed, state)
    return args[:4] + args[6:]


def _nf4_matmul_cases():
    from qpeft.triton_kernels.nf4_matmul import nf4_matmul_dx_triton, nf4_matmul_triton

    N, K, r = 512, 1024, 16
    nested, plain = _nf4_weight(N, K), _nf4_weight(N, K, blocksize=128, nested=False)
    odd_k = _nf4_weight(N, K + 32)  # K % blocksize != 0: the generic per-element tile loader
    for M in (1, 8, 128, 4096):  # decode GEMV, decode tl.dot, small and large GEMM tiles
        for dtype in (torch.bfloat16, torch.float16):
            x, dy = _randn(M, K, dtype=dtype), _randn(M, N, dtype=dtype)
            nf4_matmul_triton(x, *nested[:4], N, *nested[4:], _randn(N, dtype=dtype), _randn(M, r, dtype=dtype),
                              _randn(N, r, dtype=dtype), 0.5)
            nf4_matmul_dx_triton(dy, *nested[:4], K, *nested[4:], _randn(M, r, dtype=dtype),
                                 _randn(r, K, dtype=dtype), 0.5)
        nf4_matmul_triton(_randn(M, K), *plain[:4], N, *plain[4:])
        nf4_matmul_triton(_randn(M, K + 32), *odd_k[:4], N, *odd_k[4:], _randn(N), _randn(M, r), _randn(N, r), 0.5)
        nf4_matmul_dx_triton(_randn(M, N), *odd_k[:4], K + 32, *odd_k[4:], _randn(M, r), _randn(r, K + 32), 0.5)
    for M in (1, 8, 300):  # fp32 activations: IEEE dots, split-K accumulation at decode sizes
        nf4_matmul_triton(_randn(M, K, dtype=torch.float32), *nested[:4], N, *nested[4:])
        nf4_matmul_dx_triton(_randn(M, N, dtype=torch.float32), *nested[:4], K, *nested[4:])


# ----------------------------------------------------------------------------------------------- LoRA
def _lora_cases():
    from qpeft.triton_kernels.lora import lora_matmul_triton, lora_tn_triton

    M, N, K, r = 512, 1024, 768, 16
    seed = torch.tensor([1234], dtype=torch.int64)
    for dtype in (torch.bfloat16, torch.float32):
        x, W, A, B = _randn(M, K, dtype=dtype), _randn(N, K, dtype=dtype), _randn(r, K, dtype=dtype), \
            _randn(N, r, dtype=dtype)
        xa, dy = _randn(M, r, dtype=dtype), _randn(M, N, dtype=dtype)
        dot = torch.float32 if dtype == torch.float32 else dtype
        # the ops' calls (qpeft/ops/lora.py): xa = drop(x) A^T, y = x W^T + b + s xa B^T, dx, masked dx, grads
        lora_matmul_triton(x, A.t(), out_dtype=torch.float32, M=M, N=r, seed=seed, dropout_p=0.1, drop_a=True,
                           dot_dtype=dot)
        lora_matmul_triton(x, W.t(), out_dtype=dtype, M=M, N=N, bias=_randn(N, dtype=dtype), p=xa, q_t=B.t(),
                           scale=2.0, dot_dtype=dot)
        lora_matmul_triton(dy, W, out_dtype=dtype, M=M, N=K, p=xa, q_t=A, scale=2.0, seed=seed, dropout_p=0.1,
                           drop_lora=True, dot_dtype=dot)
        lora_matmul_triton(None, None, out_dtype=dtype, M=M, N=K, addend=_randn(M, K, dtype=dtype), p=xa, q_t=A,
                           scale=2.0, seed=seed, dropout_p=0.1, drop_lora=True, dot_dtype=dot)
        lora_tn_triton(_randn(M, r, dtype=torch.float32), x, scale=2.0, seed=seed, dropout_p=0.1, drop_q=True,
                       dot_dtype=dot)
        lora_tn_triton(dy, xa, scale=2.0, dot_dtype=dot)


# ----------------------------------------------------------------------------------------------- bottleneck
def _bottleneck_cases():
    from qpeft.reference.bottleneck import ACTIVATIONS
    from qpeft.triton_kernels.bottleneck import bottleneck_adapter_backward_triton, bottleneck_adapter_triton

    M, H = 256, 768
    for R in (64, 128, 256, 512):  # BLOCK_M 64, 32, 32, 16 (MAX_BOTTLENECK = 512)
        for dtype in (torch.bfloat16, torch.float32):
            for act in sorted(set(ACTIVATIONS.values())):
                x, wd, wu = _randn(M, H, dtype=dtype), _randn(R, H, dtype=dtype), _randn(H, R, dtype=dtype)
                bottleneck_adapter_triton(x, wd, _randn(R, dtype=dtype), wu, _randn(H, dtype=dtype), act, 0.5)
                bottleneck_adapter_backward_triton(_randn(M, H, dtype=dtype), x, torch.randn(M, R), wd, wu, act,
                                                   0.5)


# ----------------------------------------------------------------------------------------------- multi-LoRA
def _multi_lora_cases():
    from qpeft.triton_kernels.multi_lora import lora_expand_gathered_triton, lora_shrink_gathered_triton

    K = N = 4096
    for ranks in ([8, 16, 64, 32], [128, 8]):  # BLOCK_R 64 (one rank tile), and 128 > 64 (two tiles)
        R, L = sum(ranks), len(ranks)
        starts = torch.tensor([0] + torch.tensor(ranks).cumsum(0).tolist(), dtype=torch.int32)
        A, B, scale = torch.randn(R, K), torch.randn(N, R), torch.rand(L)
        for M in (1, 32, 512, 4096):  # decode (rows path) and prefill (segments path)
            index = torch.randint(-1, L, (M,), dtype=torch.int32)
            for dtype in DTYPES:
                x, y = _randn(M, K, dtype=dtype), _randn(M, N, dtype=dtype)
                lora_shrink_gathered_triton(x, A, starts, index, max(ranks))
                lora_expand_gathered_triton(y, torch.randn(M, max(ranks)), B, starts, scale, index)


# ----------------------------------------------------------------------------------------------- optim_8bit
def _optim_8bit_cases():
    from qpeft.reference.optim_8bit import adam_hyper
    from qpeft.triton_kernels.optim_8bit import optim_8bit_step_triton

    q1, q2 = qpeft.formats.codes.dynamic_map(True), qpeft.formats.codes.dynamic_map(False)
    sizes = [16 * 4096, 4096 * 16, 4097]  # LoRA A / B of a 4096-wide layer, an odd size
    for dtype in DTYPES:
        for kind in ("adam", "lion"):
            for quant in (True, False):
                ps = [_randn(n, dtype=dtype) for n in sizes]
                st = [torch.zeros(n, dtype=torch.uint8 if quant else torch.float32) for n in sizes]
                am = [torch.zeros(-(-n // 256)) for n in sizes] if quant else []
                st2, am2 = ([], []) if kind == "lion" else ([s.clone() for s in st], [a.clone() for a in am])
                optim_8bit_step_triton(ps, [p.clone() for p in ps], st, st2, am, am2, q1, q2,
                                       torch.tensor([adam_hyper(1e-3, 1, 0.9, 0.999, 1e-8, 0.0)] * len(sizes)),
                                       0.9, 0.999, kind)


# ----------------------------------------------------------------------------------------------- DoRA
def _dora_cases():
    from qpeft.triton_kernels.dora import dora_weight_norm_triton

    for N, K, blocksize, nested in ((4096, 4096, 64, True), (14336, 4096, 64, False), (4096, 4160, 128, True)):
        w = _nf4_weight(N, K, blocksize, nested)
        for r in (8, 16, 64, 256):  # one rank chunk, and the rank looped in chunks of 32
            for dtype in (torch.float32, torch.bfloat16):
                dora_weight_norm_triton(*w[:4], N, K, *w[4:], _randn(r, K, dtype=dtype), _randn(N, r, dtype=dtype),
                                        0.5)


# ----------------------------------------------------------------------------------------------- linear cross-entropy
def _linear_cross_entropy_cases():
    from qpeft.reference.linear_cross_entropy import Head
    from qpeft.triton_kernels import linear_cross_entropy as tl_ce

    # tiles depend on the dtype, the head and the row count (capped at 128), not on N or V beyond that: 256
    # rows and a 1k vocabulary compile what 8k tokens and 128k would (and keep the CPU-side torch ops cheap)
    N, H, V = 256, 2048, 1024
    packed, absmax, code, _, nested_absmax, nested_code, offset = _nf4_weight(V, H)
    heads = {"nf4_nested": Head(None, packed, absmax, code, nested_absmax, nested_code, offset, 64, V, H)}
    p32, a32, c32 = _nf4_weight(V, H, blocksize=128, nested=False)[:3]
    heads["nf4_plain"] = Head(None, p32, a32, c32, None, None, None, 128, V, H)
    p_odd, a_odd, c_odd = _nf4_weight(V, H + 8)[:3]  # H % blocksize != 0: the per-element decoder
    heads["nf4_unaligned"] = Head(None, p_odd, a_odd, c_odd, None, None, None, 64, V, H + 8)
    target = torch.randint(0, V, (N,))
    for dtype in DTYPES:
        for name, head in {"dense": None, **heads}.items():
            if head is None:
                head = Head(_randn(V, H, dtype=dtype), None, None, None, None, None, None, 64, V, H)
            x, bias = _randn(N, head.hidden, dtype=dtype), _randn(V, dtype=dtype)
            lse, g = torch.randn(N), torch.rand(N)
            tl_ce.lce_forward_triton(x, head, bias, target, -100, 30.0, 0.1, 1e-4)
            tl_ce.lce_forward_triton(x[:20], head, None, target[:20], -100, 0.0, 0.0, 0.0)  # 32-row tiles
            tl_ce.lce_backward_triton(x, head, bias, target, lse, g, -100, 30.0, 0.1, 1e-4, False, True)
            tl_ce.lce_forward_backward_triton(x, head, bias, target, g, -100, 30.0, 0.1, 1e-4, True)
            if name == "dense":  # trainable head: vocabulary blocks, dx accumulated in fp32 by _lce_dx_kernel
                tl_ce.lce_backward_triton(x, head, bias, target, lse, g, -100, 0.0, 0.0, 0.0, True, True)


# ----------------------------------------------------------------------------------------------- grouped NF4 experts
def _grouped_nf4_cases():
    from qpeft.quant.experts import quantize_experts
    from qpeft.triton_kernels.grouped_nf4 import (_gemm_config, grouped_lora_grad_triton, grouped_lora_shrink_triton,
                                                  grouped_nf4_matmul_dx_triton, grouped_nf4_matmul_triton)

    E, I, r = 8, 256, 16
    # (H, transposed, nested): (out, in) slices, double quant; gpt-oss (in, out) slices; H % 64 != 0 (the
    # per-element 4-bit loader)
    for H, transposed, nested in ((512, False, True), (512, True, False), (544, False, True)):
        gu = quantize_experts(torch.randn(E, *((H, 2 * I) if transposed else (2 * I, H))), double_quant=nested,
                              transposed=transposed)
        p, a, code, bs, tr, na, nc, off = gu.op_args()
        N = gu.out_features
        full = H == 512 and not transposed
        for T in (4, 96, 2048):  # slots per expert (top-2 of 8): 1 (16-row tiles), 24 (32-row), 512 (64-row)
            idx = torch.rand(T, E).topk(2, dim=1).indices
            perm, token, seg = torch.ops.qpeft.grouped_nf4_route(idx, E)
            S = perm.shape[0]
            for dtype in (DTYPES if full else (torch.bfloat16, torch.float32)):
                x, dy = _randn(T, H, dtype=dtype), _randn(S, N, dtype=dtype)
                xa, dyb = torch.randn(S, r), torch.randn(S, r)
                A, B = _randn(E, r, H, dtype=dtype), _randn(E, N, r, dtype=dtype)
                grouped_nf4_matmul_triton(x, token, p, a, code, bs, N, tr, na, nc, off, seg, None,
                                          _randn(E, N, dtype=dtype), xa, B, 0.5)
                grouped_nf4_matmul_triton(_randn(S, H, dtype=dtype), None, p, a, code, bs, N, tr, na, nc, off, seg,
                                          perm, None, None, None, 0.0)
                grouped_nf4_matmul_dx_triton(dy, perm, p, a, code, bs, H, tr, na, nc, off, seg, perm, dyb, A, 0.5)
                if H == 512 and dtype != torch.float32:  # 16-bit activations take the register code book where
                    # it fits; the gather loader stays for GPUs before sm_80 and slices not 4-byte aligned
                    gather = dict(_gemm_config(S, E, dtype), REG_BOOK=False)
                    grouped_nf4_matmul_triton(x, token, p, a, code, bs, N, tr, na, nc, off, seg, None, None, xa, B,
                                              0.5, config=gather)
                    grouped_nf4_matmul_dx_triton(dy, perm, p, a, code, bs, H, tr, na, nc, off, seg, perm, dyb, A, 0.5,
                                                 config=gather)
                if full:
                    grouped_lora_shrink_triton(x, token, A, seg)
                    grouped_lora_shrink_triton(dy, perm, B.transpose(1, 2), seg)
                    grouped_lora_grad_triton(dyb, None, x, token, seg, 0.5)
                    grouped_lora_grad_triton(dy, perm, xa, None, seg, 0.5)
                    grouped_lora_grad_triton(torch.ones(S, 1), None, dy, perm, seg, 1.0)  # bias gradient


# ----------------------------------------------------------------------------------------------- RMSNorm
def _rmsnorm_cases():
    from qpeft.triton_kernels.rmsnorm import MAX_HIDDEN, rms_norm_backward_triton, rms_norm_triton

    for H in (128, 4096, 5376, MAX_HIDDEN):  # q/k norm over the head dim, Llama-8B, Gemma-3-27B, Llama-70B
        for dtype in DTYPES:
            for w_dtype, llama in ((dtype, True), (torch.float32, True), (dtype, False)):
                x, w = _randn(512, H, dtype=dtype), _randn(H, dtype=w_dtype)
                out = torch.promote_types(dtype, w_dtype) if llama else dtype
                rms_norm_triton(x, w, 1e-6, 0.0 if llama else 1.0, llama, out)
                rms_norm_backward_triton(_randn(512, H, dtype=out), x, w, torch.rand(512), 1.0, llama)


# ----------------------------------------------------------------------------------------------- RoPE
def _rope_cases():
    from qpeft.triton_kernels.rope import rope_triton

    B, S = 2, 1024
    for dtype in DTYPES:
        # Llama q / k, Gemma's 256-wide heads, 1-warp tiles (256 and 64 pairs)
        for heads, D in ((32, 128), (8, 128), (16, 256), (8, 64), (4, 32)):
            x = _randn(B, heads, S, D, dtype=dtype).transpose(1, 2)  # HF's (B, heads, S, D) view, strided
            cos, sin = _randn(B, S, D, dtype=dtype), _randn(B, S, D, dtype=dtype)
            for backward in (False, True):
                rope_triton(x, x, cos, sin, None, backward)  # in place
                rope_triton(x, torch.empty_like(x), cos[0], sin[0], torch.zeros(1, S, dtype=torch.int64), backward)


# ----------------------------------------------------------------------------------------------- SwiGLU / GeGLU
def _swiglu_cases():
    from qpeft.triton_kernels.swiglu import ACTIVATION_IDS, glu_backward_triton, glu_triton

    for dtype in DTYPES:
        for act in ACTIVATION_IDS:
            g, u = _randn(512, 14336, dtype=dtype), _randn(512, 14336, dtype=dtype)
            glu_triton(g, u, act)
            glu_backward_triton(_randn(512, 14336, dtype=dtype), g, u, act)


CASES = {"quantize": _quantize_cases, "nf4_matmul": _nf4_matmul_cases, "lora": _lora_cases,
         "bottleneck": _bottleneck_cases, "multi_lora": _multi_lora_cases, "optim_8bit": _optim_8bit_cases,
         "dora": _dora_cases,
         "linear_cross_entropy": _linear_cross_entropy_cases,
         "grouped_nf4": _grouped_nf4_cases,
         "rmsnorm": _rmsnorm_cases, "rope": _rope_cases, "swiglu": _swiglu_cases}


def _launches(case: str):
    with recorded_triton_launches() as launches:
        CASES[case]()
    unique = {}
    for launch in launches:  # the same specialization twice compiles the same kernel: compile it once
        signature, constexprs, options, aligned = launch.source()
        key = (launch.name, tuple(sorted(signature.items())), repr(sorted(constexprs.items(), key=str)),
               tuple(sorted(options.items())), tuple(aligned))
        unique.setdefault(key, launch)
    return list(unique.values())


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", list(CASES))
def test_kernels_compile_for_sm90_without_spills(case):
    launches = _launches(case)
    assert launches, f"case {case} launched no kernel"
    for launch in launches:
        compiled = launch.compile_for_sm90()
        usage, sass = sm90_resource_usage(compiled)
        spills = spill_instructions(sass)
        assert " LOCAL:0 " in usage and not spills, \
            f"register spills in {launch}: {usage.strip()}; {len(spills)} local-memory accesses, e.g. {spills[:3]}"
        assert compiled.metadata.shared <= SHARED_MEMORY_LIMIT, \
            f"{launch} needs {compiled.metadata.shared} B of shared memory"


def _all_kernels() -> dict[str, object]:
    """Every @triton.jit function in qpeft.triton_kernels, by qualified name."""
    from triton.runtime.jit import JITFunction

    import qpeft.triton_kernels as pkg

    found = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        module = __import__(f"{pkg.__name__}.{info.name}", fromlist=["_"])
        for _name, obj in inspect.getmembers(module):
            fn = getattr(obj, "fn", obj)  # autotuned kernels wrap the JITFunction
            if isinstance(fn, JITFunction) and fn.__module__ == module.__name__:
                found[f"{info.name}.{fn.__name__}"] = fn
    return found


def test_every_kernel_is_compiled():
    """Kernels (`*_kernel`) must each be launched by some case above; the other @triton.jit functions are
    device helpers and must be called from a kernel that is (so they are compiled as part of it)."""
    kernels = _all_kernels()
    launched = {f"{launch.fn.__module__.rsplit('.', 1)[-1]}.{launch.name}"
                for case in CASES for launch in _launches(case)}
    entry_points = {k for k in kernels if k.endswith("_kernel")}
    assert entry_points, "found no Triton kernels"
    missing = sorted(entry_points - launched)
    assert not missing, f"Triton kernels without an sm_90 compile case in {__file__}: {missing}"
    helpers = {k: fn for k, fn in kernels.items() if k not in entry_points}
    sources = "\n".join(kernels[k].src for k in launched if k in kernels)
    uncalled = sorted(k for k in helpers if k.split(".")[-1] + "(" not in sources
                      and not any(k.split(".")[-1] + "(" in h.src for h in helpers.values() if h is not helpers[k]))
    assert not uncalled, f"@triton.jit helpers that no compiled kernel calls: {uncalled}"


# ------------------------------------------------------------------------- the double-quant scale's rounding
if has_triton() and not TRITON_INTERPRET:
    import triton
    import triton.language as tl

    from qpeft.triton_kernels.dora import _weight_tile
    from qpeft.triton_kernels.grouped_nf4 import _block_scale

    @triton.jit
    def _dora_tile_probe(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, out_ptr,
                         N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr):
        """The fp32 W tile of the DoRA norm kernel (its only other arithmetic is the norm's multiply-adds)."""
        rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)[:, None]
        cols = tl.arange(0, BLOCK_K).to(tl.int64)[None, :]
        mask = (rows < N) & (cols < K)
        w = _weight_tile(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, tl.load(offset_ptr),
                         rows, cols, mask, K, BLOCKSIZE, True)
        tl.store(out_ptr + rows * K + cols, w, mask=mask)

    @triton.jit
    def _grouped_scale_probe(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, out_ptr, n,
                             BLOCK: tl.constexpr):
        """The grouped NF4 kernels' per-block fp32 scale."""
        block = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        s = _block_scale(absmax_ptr, block, block < n, nested_absmax_ptr, nested_code_ptr, tl.load(offset_ptr), True)
        tl.store(out_ptr + block, s, mask=block < n)


@pytest.mark.parametrize("probe", ["dora", "grouped_nf4"])
def test_double_quant_scale_is_two_roundings_not_an_ffma(probe):
    """The DoRA norm and grouped NF4 kernels decode a double-quantized absmax as code2[q] * absmax2 rounded to
    fp32, then + offset rounded again (bitsandbytes, the reference, the CUDA kernels). Their launches leave FP
    fusion on (Triton's default up to 3.9), which would contract a plain `a * b + c` into one FFMA and move the
    scale, so every weight of its block, by up to 1 ulp: compiled for sm_90, the probe has FMUL + FADD, no FFMA."""
    from benchmarks.sass_sm90 import parse_sass, sass_of_cubin
    from benchmarks.sm90_compile import TritonLaunch

    u8, f32 = torch.empty(64, dtype=torch.uint8), torch.empty(64)
    if probe == "dora":
        launch = TritonLaunch(_dora_tile_probe, (1,), (u8, u8, f32, f32, f32, f32, f32, 40, 256),
                              dict(BLOCK_N=16, BLOCK_K=64, BLOCKSIZE=64, num_warps=4, enable_fp_fusion=True))
    else:
        launch = TritonLaunch(_grouped_scale_probe, (1,), (u8, f32, f32, f32, f32, 64),
                              dict(BLOCK=64, num_warps=2, enable_fp_fusion=True))
    sass, _ = sass_of_cubin(launch.compile().asm["cubin"])
    (kern,) = parse_sass(sass).values()
    ops = {i.base for i in kern.instrs}
    assert "FFMA" not in ops and {"FMUL", "FADD"} <= ops, sorted(ops)
