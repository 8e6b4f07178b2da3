"""qpeft.nf4_matmul (L3) and the qpeft::nf4_matmul / qpeft::nf4_matmul_dx ops (L2) against an fp64 matmul on
the dequantized weight (fp64, so that fp32 inputs have an oracle more precise than themselves) and plain
PyTorch in the same dtype (the 2x rule), on random data, odd M/N/K (K % blocksize != 0 included), NF4 and
FP4, with and without double quant, bias and the LoRA epilogue.

CPU runs use the reference; the `triton` tests run the Triton kernels (TRITON_INTERPRET=1 QPEFT_BACKEND=triton
on CPU with fp16/fp32, or on a GPU)."""
from __future__ import annotations

import pytest
import torch

import qpeft
from qpeft.autograd.nf4_matmul import nf4_matmul, weight_args
from qpeft.reference import nf4_matmul as ref
from utils import (DTYPES, TRITON_INTERPRET, assert_close_2x, compile_for_sm90, has_triton, narrow_global_loads,
                   requires_cuda, requires_triton_runtime, triton_device, triton_dtypes)

# (M, N, K): single row, odd everything, K % 64 != 0 (blocks span rows), odd K (rows start mid-byte)
SHAPES = [(1, 33, 70), (5, 17, 131), (20, 48, 96), (3, 40, 128)]
FORMATS = [("nf4", 64, True), ("nf4", 32, False), ("fp4", 128, True), ("fp4", 64, False)]


def make_weight(N, K, quant_type="nf4", blocksize=64, nested=True, device="cpu", seed=0):
    """(packed, state, W fp32 dequantized) for a random (N, K) weight quantized with qpeft."""
    g = torch.Generator().manual_seed(seed)
    W = (torch.randn(N, K, generator=g) / K ** 0.5).to(device)
    packed, state = qpeft.quantize_4bit(W, blocksize=blocksize, quant_type=quant_type, double_quant=nested)
    return packed, state, qpeft.dequantize_4bit(packed, state, torch.float32)


def _inputs(M, N, K, dtype, device="cpu", r=0, seed=1):
    g = torch.Generator().manual_seed(seed)
    t = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
    lora = (t(M, r), t(N, r) / r, t(r, K) / K ** 0.5) if r else (None, None, None)
    return t(M, K), t(N), t(M, N), lora


# --- the reference itself ----------------------------------------------------------------------------------
@pytest.mark.parametrize("quant_type,blocksize,nested", FORMATS)
def test_reference_dequantizes_like_bitsandbytes(quant_type, blocksize, nested):
    bnbf = pytest.importorskip("bitsandbytes.functional")
    W = torch.randn(48, 4 * blocksize)  # K % blocksize == 0: bnb 0.50.2's CPU dequant mis-handles the rest
    packed, st = bnbf.quantize_4bit(W, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)
    nested_args = (st.state2.absmax, st.state2.code, st.offset) if nested else (None, None, None)
    got = ref.dequantize_weight_ref(packed, ref.decode_absmax_ref(st.absmax, *nested_args), st.code, blocksize,
                                    *W.shape)
    assert torch.equal(got, bnbf.dequantize_4bit(packed, st))


def test_reference_blocks_span_rows():
    """K % blocksize != 0: block b covers flat elements [b*bs, (b+1)*bs) across the row boundary."""
    N, K, bs = 3, 40, 32
    W = torch.randn(N, K)
    packed, state = qpeft.quantize_4bit(W, blocksize=bs, double_quant=False)
    deq = ref.dequantize_weight_ref(packed, state.absmax, state.code, bs, N, K).reshape(-1)
    flat = W.reshape(-1)
    for b in range(state.absmax.numel()):
        blk = slice(b * bs, (b + 1) * bs)
        assert deq[blk].abs().max() == pytest.approx(flat[blk].abs().max().item(), rel=1e-6)


# --- forward / backward accuracy (2x rule) ------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("quant_type,blocksize,nested", FORMATS)
def test_forward_backward_accuracy(M, N, K, dtype, quant_type, blocksize, nested):
    packed, state, W = make_weight(N, K, quant_type, blocksize, nested)
    x, b, dy, _ = _inputs(M, N, K, dtype)
    x.requires_grad_(True)
    b.requires_grad_(True)
    y = nf4_matmul(x, packed, state, b)
    y.backward(dy)
    assert y.dtype == dtype and y.shape == (M, N)
    ref32 = x.detach().double() @ W.double().t() + b.detach().double()
    same = x.detach() @ W.to(dtype).t() + b.detach()
    assert_close_2x(y, ref32, same, what="forward")
    assert_close_2x(x.grad, dy.double() @ W.double(), dy @ W.to(dtype), what="dx")
    assert_close_2x(b.grad, dy.double().sum(0), dy.sum(0), what="dbias")


def test_leading_dims_and_non_contiguous_x():
    packed, state, W = make_weight(24, 64)
    x = torch.randn(2, 3, 64)
    y = nf4_matmul(x, packed, state)
    assert y.shape == (2, 3, 24)
    torch.testing.assert_close(y, x @ W.t(), rtol=1e-5, atol=1e-5)
    xt = torch.randn(64, 5).t()  # non-contiguous view
    torch.testing.assert_close(nf4_matmul(xt, packed, state), nf4_matmul(xt.contiguous(), packed, state),
                               rtol=0, atol=0)


def test_empty_batch():
    packed, state, _ = make_weight(16, 64)
    x = torch.randn(0, 64, requires_grad=True)
    y = nf4_matmul(x, packed, state, torch.randn(16))
    y.sum().backward()
    assert y.shape == (0, 16) and x.grad.shape == (0, 64)


def test_no_grad_for_weight_and_saved_tensors_are_packed():
    packed, state, _ = make_weight(16, 64)
    x = torch.randn(4, 64, requires_grad=True)
    y = nf4_matmul(x, packed, state)
    node = y.grad_fn
    while type(node).__name__ != "NF4MatmulFunctionBackward":
        node = node.next_functions[0][0]
    saved = [t for t in node.saved_tensors if t is not None]
    assert packed.data_ptr() in {t.data_ptr() for t in saved}
    assert all(t.dtype == torch.uint8 or t.numel() <= 256 for t in saved)  # no dequantized (16, 64) weight
    y.sum().backward()
    assert x.grad is not None and not packed.requires_grad


def test_accepts_bitsandbytes_state_and_storage_view():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    W = torch.randn(32, 128)
    x = torch.randn(3, 128)
    p_bnb, s_bnb = bnbf.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
    p_q, s_q = qpeft.quantize_4bit(W, blocksize=64, double_quant=True)
    assert torch.equal(p_bnb.view(-1), p_q.view(-1))
    ours = nf4_matmul(x, p_q, s_q)
    torch.testing.assert_close(nf4_matmul(x, p_bnb, s_bnb), ours, rtol=0, atol=0)
    as_fp16_storage = p_q.reshape(-1).view(torch.float16).reshape(-1, 1)  # bnb quant_storage=torch.float16
    torch.testing.assert_close(nf4_matmul(x, as_fp16_storage, s_q), ours, rtol=0, atol=0)


# --- LoRA epilogue (the LoRA op family's contract) -----------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nested", [True, False])
def test_lora_epilogue(dtype, nested):
    M, N, K, r, scale = 7, 37, 96, 5, 0.75
    packed, state, W = make_weight(N, K, nested=nested)
    args = weight_args(packed, state)
    x, b, dy, (xa, lB, lA) = _inputs(M, N, K, dtype, r=r)
    nest = args[6:]
    y = torch.ops.qpeft.nf4_matmul(x, args[0], args[1], args[2], args[3], N, *nest, b, xa, lB, scale)
    ref32 = x.double() @ W.double().t() + b.double() + scale * (xa.double() @ lB.double().t())
    same = x @ W.to(dtype).t() + b + scale * (xa @ lB.t())
    assert_close_2x(y, ref32, same, what="forward + lora")
    dx = torch.ops.qpeft.nf4_matmul_dx(dy, args[0], args[1], args[2], args[3], K, *nest, xa, lA, scale)
    assert_close_2x(dx, dy.double() @ W.double() + scale * (xa.double() @ lA.double()),
                    dy @ W.to(dtype) + scale * (xa @ lA),
                    what="dx + lora")


# --- torch.library registration -------------------------------------------------------------------------------
@pytest.mark.parametrize("nested", [True, False])
def test_opcheck(nested):
    M, N, K = 3, 20, 72
    packed, state, _ = make_weight(N, K, nested=nested)
    p, a, c, bs, _, _, na, nc, off = weight_args(packed, state)
    x, b, dy, (xa, lB, lA) = _inputs(M, N, K, torch.float32, r=4)
    torch.library.opcheck(torch.ops.qpeft.nf4_matmul.default, (x, p, a, c, bs, N, na, nc, off, b, xa, lB, 0.5))
    torch.library.opcheck(torch.ops.qpeft.nf4_matmul.default, (x, p, a, c, bs, N, na, nc, off, None, None, None, 0.0))
    torch.library.opcheck(torch.ops.qpeft.nf4_matmul_dx.default, (dy, p, a, c, bs, K, na, nc, off, xa, lA, 0.5))


# --- bad input ----------------------------------------------------------------------------------------------------
def test_bad_inputs_raise_with_shapes_and_dtypes():
    packed, state, _ = make_weight(16, 64)
    with pytest.raises(ValueError, match=r"\(\.\.\., 64\).*\(16, 64\).*\(4, 60\)"):
        nf4_matmul(torch.randn(4, 60), packed, state)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32, got torch.int32"):
        nf4_matmul(torch.ones(4, 64, dtype=torch.int32), packed, state)
    with pytest.raises(ValueError, match="x is on meta but the weight is on cpu"):
        nf4_matmul(torch.empty(4, 64, device="meta"), packed, state)
    with pytest.raises(ValueError, match=r"bias must have shape \(16,\), got \(15,\)"):
        nf4_matmul(torch.randn(4, 64), packed, state, torch.randn(15))
    bad_state = qpeft.QuantState.from_dict(state.as_dict(packed=True))
    bad_state.state2.blocksize = 128
    with pytest.raises(ValueError, match="state2.blocksize must be 256, got 128"):
        nf4_matmul(torch.randn(4, 64), packed, bad_state)


def test_op_level_checks():
    packed, state, _ = make_weight(16, 64, nested=False)
    p, a, c, bs, N, K, *_ = weight_args(packed, state)
    x = torch.randn(4, 64)
    op = torch.ops.qpeft.nf4_matmul
    with pytest.raises(RuntimeError, match=r"absmax must have ceil\(N\*K/blocksize\) = 16 entries"):
        op(x, p, a[:-1].contiguous(), c, bs, N, None, None, None, None, None, None, 0.0)
    with pytest.raises(RuntimeError, match="blocksize must be one of"):
        op(x, p, a, c, 48, N, None, None, None, None, None, None, 0.0)
    with pytest.raises(RuntimeError,
                       match=r"packed must hold \(N\*K\+1\)//2 = 544 bytes for W \(17, 64\), got shape \(512, 1\)"):
        op(x, p, a, c, bs, N + 1, None, None, None, None, None, None, 0.0)
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        op(torch.randn(64, 4).t(), p, a, c, bs, N, None, None, None, None, None, None, 0.0)
    with pytest.raises(RuntimeError, match="bias must have x's dtype torch.float32, got torch.float16"):
        op(x, p, a, c, bs, N, None, None, None, torch.randn(N).half(), None, None, 0.0)
    with pytest.raises(RuntimeError, match=r"lora_B must be \(16, 3\), got \(16, 4\)"):
        op(x, p, a, c, bs, N, None, None, None, None, torch.randn(4, 3), torch.randn(N, 4), 1.0)


# --- Triton kernels (interpreter on CPU: fp16/fp32, small shapes) -------------------------------------------------
# generic loader (K % blocksize != 0, odd K), aligned loader (K % blocksize == 0) and whole tiles (EVEN_NK: N and K
# multiples of the default tiles, no masked loads) shapes
TRITON_SHAPES = [(1, 33, 70), (5, 17, 131), (20, 48, 96), (2, 21, 256), (20, 64, 256)]


@pytest.mark.triton
@requires_triton_runtime
@pytest.mark.parametrize("dtype", triton_dtypes())
@pytest.mark.parametrize("M,N,K", TRITON_SHAPES)
@pytest.mark.parametrize("quant_type,blocksize,nested", [("nf4", 64, True), ("fp4", 32, False)])
def test_triton_forward_dx(M, N, K, dtype, quant_type, blocksize, nested, monkeypatch):
    monkeypatch.setenv("QPEFT_BACKEND", "triton")
    dev = triton_device()
    packed, state, W = make_weight(N, K, quant_type, blocksize, nested, device=dev)
    x, b, dy, _ = _inputs(M, N, K, dtype, device=dev)
    x.requires_grad_(True)
    y = nf4_matmul(x, packed, state, b)
    y.backward(dy)
    assert_close_2x(y, x.detach().double() @ W.double().t() + b.double(), x.detach() @ W.to(dtype).t() + b,
                    what="forward")
    assert_close_2x(x.grad, dy.double() @ W.double(), dy @ W.to(dtype), what="dx")


@pytest.mark.triton
@requires_triton_runtime
@pytest.mark.parametrize("K,aligned", [(160, False), (320, True), (320, False)])
@pytest.mark.parametrize("config,dtype", [
    # split-K adds fp32 partial sums with atomics into the output: float32 only (the refusal is tested below)
    (dict(BLOCK_M=1, BLOCK_N=16, BLOCK_K=32, SPLIT_K=3), torch.float32),    # GEMV multiply-reduce, split-K
    (dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, SPLIT_K=2), torch.float32),  # decode tl.dot, split-K, 2 groups
] + [(cfg, dtype) for dtype in triton_dtypes() for cfg in (
    dict(BLOCK_M=1, BLOCK_N=8, BLOCK_K=256, SPLIT_K=1),    # GEMV multiply-reduce, whole K per program
    dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, SPLIT_K=1),   # tiled GEMM / decode tl.dot without split
    dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=64, SPLIT_K=1, num_warps=2, num_stages=2),  # tuned-table keys
)])
def test_triton_forward_configs_with_lora(config, K, aligned, dtype):
    from qpeft.triton_kernels.nf4_matmul import nf4_matmul_triton

    config = {**config, "ALIGNED": aligned}
    M = 1 if config["BLOCK_M"] == 1 else 9
    N, r, scale = 37, 6, 0.5
    dev = triton_device()
    packed, state, W = make_weight(N, K, "nf4", 64, True, device=dev)
    p, a, c, bs, _, _, na, nc, off = weight_args(packed, state)
    x, b, _, (xa, lB, _) = _inputs(M, N, K, dtype, device=dev, r=r)
    y = nf4_matmul_triton(x, p, a, c, bs, N, na, nc, off, b, xa, lB, scale, config=config)
    assert y.dtype == dtype and y.shape == (M, N)
    ref32 = x.double() @ W.double().t() + b.double() + scale * (xa.double() @ lB.double().t())
    assert_close_2x(y, ref32, x @ W.to(dtype).t() + b + scale * (xa @ lB.t()), what=f"forward {config}")


@pytest.mark.triton
@requires_triton_runtime
@pytest.mark.parametrize("dtype", [d for d in triton_dtypes() if d != torch.float32], ids=str)
@pytest.mark.parametrize("M,K,split", [
    (9, 320, 3),    # 10 K steps of 32 in spans of 4, 4, 2
    (33, 160, 5),   # three M tiles (the last partial), one K step per split
    (20, 64, 3),    # more splits than K steps: the last split's range is empty (it stores its zero partial)
    (17, 352, 2),   # K % blocksize != 0 (the per-element loader)
])
def test_triton_serial_split_k_for_half_activations(dtype, M, K, split, monkeypatch):
    """16-bit activations split K serially: each split stores an fp32 partial tile, and the split that arrives
    last for its tile (per-tile counter) sums all partials in split order and writes the output. The result meets
    the 2x rule with bias and the LoRA epilogue, repeats bit for bit, and the counters are zeroed per call. The
    last split reading its own partial back or taking it from its accumulator (KEEP_OWN_PARTIAL): the same sum,
    bit for bit."""
    import qpeft.triton_kernels.nf4_matmul as tk

    dev = triton_device()
    N, r, scale = 37, 6, 0.5
    packed, state, W = make_weight(N, K, "nf4", 64, True, device=dev)
    p, a, c, bs, _, _, na, nc, off = weight_args(packed, state)
    x, b, _, (xa, lB, _) = _inputs(M, N, K, dtype, device=dev, r=r)
    seen = []
    real_run = tk._nf4_matmul_kernel.run
    monkeypatch.setattr(tk._nf4_matmul_kernel, "run", lambda *args, **kw: seen.append(
        (kw["SERIAL_SPLIT"], kw["SPLIT_K"], kw["grid"], kw.get("KEEP_OWN_PARTIAL", False))) or real_run(*args, **kw))
    cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, SPLIT_K=split, num_warps=4)
    y1 = tk.nf4_matmul_triton(x, p, a, c, bs, N, na, nc, off, b, xa, lB, scale, config=cfg)
    y2 = tk.nf4_matmul_triton(x, p, a, c, bs, N, na, nc, off, b, xa, lB, scale, config=cfg)
    own = tk.nf4_matmul_triton(x, p, a, c, bs, N, na, nc, off, b, xa, lB, scale,
                               config=dict(cfg, KEEP_OWN_PARTIAL=True))
    grid = (-(-M // 16), 3, split)
    assert seen == [(True, split, grid, False)] * 2 + [(True, split, grid, True)]
    assert y1.dtype == dtype and y1.shape == (M, N) and torch.equal(y1, y2) and torch.equal(y1, own)
    ref64 = x.double() @ W.double().t() + b.double() + scale * (xa.double() @ lB.double().t())
    assert_close_2x(y1, ref64, x @ W.to(dtype).t() + b + scale * (xa @ lB.t()), what=f"serial split-K {split}")
    with pytest.raises(ValueError, match="SPLIT_K must be >= 1"):
        tk.nf4_matmul_triton(x, p, a, c, bs, N, na, nc, off, config={**cfg, "SPLIT_K": 0})


@pytest.mark.triton
@requires_triton_runtime
@pytest.mark.parametrize("dtype", triton_dtypes(), ids=str)
@pytest.mark.parametrize("M,N,split", [
    (9, 200, 3),    # 200 rows of W in N steps of 32: spans of 3, 3, 1 steps
    (33, 96, 5),    # three M tiles; more splits than N steps: empty ranges store zero partials
    (1, 37, 2),     # decode-sized, N not a multiple of the step
])
@pytest.mark.parametrize("K", [320, 352])  # K % blocksize != 0 too (the per-element loader)
def test_triton_dx_serial_split_of_n(dtype, M, N, split, K, monkeypatch):
    """dx splits its N reduction across programs (SPLIT_N): fp32 partials, summed in split order by the split that
    arrives last for its tile. Meets the 2x rule with the LoRA epilogue (added once, by split 0) and repeats bit for
    bit, with the own partial read back or taken from the accumulator (KEEP_OWN_PARTIAL)."""
    import qpeft.triton_kernels.nf4_matmul as tk

    dev = triton_device()
    r, scale = 6, 0.5
    packed, state, W = make_weight(N, K, "nf4", 64, True, device=dev)
    p, a, c, bs, _, _, na, nc, off = weight_args(packed, state)
    g = torch.Generator().manual_seed(M * 1000 + N)
    dy = torch.randn(M, N, generator=g).to(dev, dtype)
    dyb = (torch.randn(M, r, generator=g) / 4).to(dev, dtype)
    lA = (torch.randn(r, K, generator=g) / 4).to(dev, dtype)
    seen = []
    real_run = tk._nf4_matmul_dx_kernel.run
    monkeypatch.setattr(tk._nf4_matmul_dx_kernel, "run", lambda *args, **kw: seen.append(
        (kw["SPLIT_N"], kw["grid"], kw.get("KEEP_OWN_PARTIAL", False))) or real_run(*args, **kw))
    cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, SPLIT_N=split, num_warps=4)
    d1 = tk.nf4_matmul_dx_triton(dy, p, a, c, bs, K, na, nc, off, dyb, lA, scale, config=cfg)
    d2 = tk.nf4_matmul_dx_triton(dy, p, a, c, bs, K, na, nc, off, dyb, lA, scale, config=cfg)
    own = tk.nf4_matmul_dx_triton(dy, p, a, c, bs, K, na, nc, off, dyb, lA, scale,
                                  config=dict(cfg, KEEP_OWN_PARTIAL=True))
    grid = (-(-M // 16), -(-K // 32), split)
    assert seen == [(split, grid, False)] * 2 + [(split, grid, True)]
    assert d1.dtype == dtype and d1.shape == (M, K) and torch.equal(d1, d2) and torch.equal(d1, own)
    ref64 = dy.double() @ W.double() + scale * (dyb.double() @ lA.double())
    assert_close_2x(d1, ref64, dy @ W.to(dtype) + scale * (dyb @ lA), what=f"dx serial split {split}")
    with pytest.raises(ValueError, match="SPLIT_N must be >= 1"):
        tk.nf4_matmul_dx_triton(dy, p, a, c, bs, K, na, nc, off, config={**cfg, "SPLIT_N": 0})


@pytest.mark.triton
@requires_triton_runtime
@pytest.mark.parametrize("dtype", triton_dtypes(), ids=str)
def test_column_spans_compute_every_column_once(dtype, monkeypatch):
    """A config's LEAD = (columns, tile) runs the leading output columns (forward) / dx columns as a launch of that
    tile and the rest as a second launch (`_column_spans`, the launchers' plan where the wave rule passes over a
    256-row tile): the same tile for both spans gives bit for bit the one-launch result, a different one the 2x
    rule, with bias, LoRA, double quant, a padded last M tile and a last column tile cut short; the launches start
    on their span (N_TILE_START / K_TILE_START) and cover it."""
    import qpeft.triton_kernels.nf4_matmul as tk

    dev = triton_device()
    M, N, K, r = 37, 80, 192, 4  # N = 80 and K = 192 leave the last 32-wide tile half full
    packed, state, W = make_weight(N, K, "nf4", 64, True, device=dev)
    p, a, c, bs, _, _, na, nc, off = weight_args(packed, state)
    x, b, dy, (xa, lB, lA) = _inputs(M, N, K, dtype, device=dev, r=r)
    dyb = dy @ lB
    starts = []
    for kern, key in ((tk._nf4_matmul_kernel, "N_TILE_START"), (tk._nf4_matmul_dx_kernel, "K_TILE_START")):
        real_run = kern.run
        monkeypatch.setattr(kern, "run", lambda *args, _r=real_run, _k=key, **kw: starts.append(
            (_k, kw[_k], kw["grid"][1], kw["BLOCK_M"])) or _r(*args, **kw))
    tile = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=4)
    small, big = (16, 32, 32, 4, None), (32, 32, 32, 4, None)

    def both(cfg):
        y = tk.nf4_matmul_triton(x, p, a, c, bs, N, na, nc, off, b, xa, lB, 0.5, config=dict(cfg, SPLIT_K=1))
        d = tk.nf4_matmul_dx_triton(dy, p, a, c, bs, K, na, nc, off, dyb, lA, 0.5, config=dict(cfg))
        return y, d

    y1, d1 = both(tile)
    starts.clear()
    y2, d2 = both(dict(tile, LEAD=(32, small)))
    assert starts == [("N_TILE_START", 0, 1, 16), ("N_TILE_START", 1, 2, 16),   # columns [0, 32), [32, 80)
                      ("K_TILE_START", 0, 1, 16), ("K_TILE_START", 1, 5, 16)]   # columns [0, 32), [32, 192)
    assert torch.equal(y1, y2) and torch.equal(d1, d2)
    starts.clear()
    y3, d3 = both(dict(tile, LEAD=(64, big)))
    assert [s[1:] for s in starts] == [(0, 2, 32), (2, 1, 16), (0, 2, 32), (2, 4, 16)]
    assert_close_2x(y3, x.double() @ W.double().t() + b.double() + 0.5 * (xa.double() @ lB.double().t()),
                    x @ W.to(dtype).t() + b + 0.5 * (xa @ lB.t()), what="forward")
    assert_close_2x(d3, dy.double() @ W.double() + 0.5 * (dyb.double() @ lA.double()),
                    dy @ W.to(dtype) + 0.5 * (dyb @ lA), what="dx")
    for lead, match in (((80, small), "LEAD columns must be in"), ((48, small), "multiple of both tiles"),
                        ((0, small), "LEAD columns must be in")):
        with pytest.raises(ValueError, match=match):
            tk.nf4_matmul_triton(x, p, a, c, bs, N, na, nc, off, config=dict(tile, LEAD=lead))
    # the rest split (`_split_tail`): serial splits only (dx always; the forward with 16-bit activations), the
    # same bits on a second call, the counters zero again
    from qpeft.triton_kernels import _split_counters as sc

    starts.clear()
    d4, d5 = (tk.nf4_matmul_dx_triton(dy, p, a, c, bs, K, na, nc, off, dyb, lA, 0.5,
                                      config=dict(tile, LEAD=(64, big), SPLIT_N=2)) for _ in range(2))
    assert [s[1:] for s in starts] == [(0, 2, 32), (2, 4, 16)] * 2 and torch.equal(d4, d5)
    assert_close_2x(d4, dy.double() @ W.double() + 0.5 * (dyb.double() @ lA.double()),
                    dy @ W.to(dtype) + 0.5 * (dyb @ lA), what="dx, split tail")
    assert all(not buf.any() for buf in sc._BUFFERS.values())
    split_fwd = dict(tile, LEAD=(32, big), SPLIT_K=3)
    if dtype == torch.float32:  # its split sums into the fp32 output: not after a leading span
        with pytest.raises(ValueError, match="LEAD needs SPLIT_K=1 here"):
            tk.nf4_matmul_triton(x, p, a, c, bs, N, na, nc, off, config=split_fwd)
    else:
        y4, y5 = (tk.nf4_matmul_triton(x, p, a, c, bs, N, na, nc, off, b, xa, lB, 0.5, config=dict(split_fwd))
                  for _ in range(2))
        assert torch.equal(y4, y5) and all(not buf.any() for buf in sc._BUFFERS.values())
        assert_close_2x(y4, x.double() @ W.double().t() + b.double() + 0.5 * (xa.double() @ lB.double().t()),
                        x @ W.to(dtype).t() + b + 0.5 * (xa @ lB.t()), what="forward, split tail")


@pytest.mark.triton
@requires_triton_runtime
def test_serial_split_launches_leave_the_cached_counters_zero(fake_cuda):
    """On a CUDA device the serial split launches share one cached counter buffer per stream, with no memset
    (triton_kernels/_split_counters.py): the split that sums a tile sets its counter back to zero. Here on the
    pretend GPU's stream, run by the interpreter: after every forward (SPLIT_K) and dx (SPLIT_N) launch the buffer
    is all zero again, and the repeated launches give the same, right results."""
    from qpeft.triton_kernels import _split_counters as sc
    from qpeft.triton_kernels.nf4_matmul import nf4_matmul_dx_triton, nf4_matmul_triton

    if triton_device() != "cpu":
        pytest.skip("the pretend GPU's tensors are CPU tensors: the interpreter runs them")
    sc.clear()
    M, N, K, dtype = 20, 48, 320, torch.float16
    packed, state, W = make_weight(N, K, "nf4", 64, True)
    p, a, c, bs, _, _, na, nc, off = weight_args(packed, state)
    x, b, dy, _ = _inputs(M, N, K, dtype)
    outs = []
    for _ in range(2):
        outs.append(nf4_matmul_triton(x, p, a, c, bs, N, na, nc, off, b, config=dict(
            BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, SPLIT_K=3, num_warps=4)))
        (buf,) = sc._BUFFERS.values()
        assert not buf.any(), "the forward left counters set"
        outs.append(nf4_matmul_dx_triton(dy, p, a, c, bs, K, na, nc, off, config=dict(
            BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, SPLIT_N=2, num_warps=4)))
        assert list(sc._BUFFERS.values()) == [buf] and not buf.any(), "dx left counters set"
    assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[3])
    assert_close_2x(outs[0], x.double() @ W.double().t() + b.double(), x @ W.to(dtype).t() + b, what="forward")
    assert_close_2x(outs[1], dy.double() @ W.double(), dy @ W.to(dtype), what="dx")
    sc.clear()


@requires_cuda
@pytest.mark.triton
@requires_triton_runtime
@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=str)  # fp16: the same code (the tl.dot operand type)
@pytest.mark.parametrize("M", [17, 100, 256])  # 64-row split tiles; 128-row ones (wide launch) up to 256
@pytest.mark.parametrize("K,N,r", [(4096, 1024, 16), (1024, 4096, 8)])  # LoRA rank 16: the wide launch; 8: not
def test_triton_default_split_plans_on_the_gpu(dtype, M, K, N, r, monkeypatch):
    """On a GPU, the launchers' own plans at M = 17..256 (register code book, serial split of the reduction, real
    atomics and memory ordering across SMs): 2x rule with bias and LoRA, bit-identical on a second call (the split
    order is fixed), and the cached counters zero again afterwards."""
    import qpeft.triton_kernels.nf4_matmul as tk
    from qpeft.triton_kernels import _split_counters as sc

    packed, state, W = make_weight(N, K, "nf4", 64, True, device="cuda")
    p, a, c, bs, _, _, na, nc, off = weight_args(packed, state)
    x, b, dy, (xa, lB, lA) = _inputs(M, N, K, dtype, device="cuda", r=r)
    splits = []
    for kern, key in ((tk._nf4_matmul_kernel, "SPLIT_K"), (tk._nf4_matmul_dx_kernel, "SPLIT_N")):
        real_run = kern.run
        monkeypatch.setattr(kern, "run",
                            lambda *args, _r=real_run, _k=key, **kw: splits.append(kw[_k]) or _r(*args, **kw))
    y1, y2 = (tk.nf4_matmul_triton(x, p, a, c, bs, N, na, nc, off, b, xa, lB, 0.5) for _ in range(2))
    d1, d2 = (tk.nf4_matmul_dx_triton(dy, p, a, c, bs, K, na, nc, off, dy @ lB, lA, 0.5) for _ in range(2))
    torch.cuda.synchronize()
    assert max(splits) > 1, splits  # these shapes leave SMs idle unsplit
    assert torch.equal(y1, y2) and torch.equal(d1, d2)
    assert all(not buf.any() for buf in sc._BUFFERS.values())
    ref = x.double() @ W.double().t() + b.double() + 0.5 * (xa.double() @ lB.double().t())
    assert_close_2x(y1, ref, x @ W.to(dtype).t() + b + 0.5 * (xa @ lB.t()), what="forward")
    dyb = dy @ lB
    ref_dx = dy.double() @ W.double() + 0.5 * (dyb.double() @ lA.double())
    assert_close_2x(d1, ref_dx, dy @ W.to(dtype) + 0.5 * (dyb @ lA), what="dx")


@requires_cuda
@pytest.mark.triton
@requires_triton_runtime
@pytest.mark.parametrize("M,N,K", [(1024, 3072, 3072), (1000, 3072, 3072), (256, 18944, 3584), (256, 12288, 4096)])
def test_triton_split_tail_plans_on_the_gpu(M, N, K, monkeypatch):
    """On a GPU, the launchers' `_split_tail` plans (wide launch: LoRA rank 16): whole waves of a 16-warp tile over
    the leading columns, then the rest as 128 x 128 x 128 in serial splits from a later column tile (Llama-3.2-3B's
    (3072, 3072) at M = 1024 forward and dx, M = 1000 padding the last M tile; Qwen2.5-7B's gate/up forward at
    M = 256 behind 256 x 128 tiles; Qwen3-8B's at M = 256). 2x rule with bias and LoRA, the same bits on a second
    call, the split counters zero again. The plan follows the GPU's SM count; the test asks that one exists."""
    import qpeft.triton_kernels.nf4_matmul as tk
    from qpeft.triton_kernels import _split_counters as sc

    dtype = torch.bfloat16
    packed, state, W = make_weight(N, K, "nf4", 64, True, device="cuda")
    p, a, c, bs, _, _, na, nc, off = weight_args(packed, state)
    x, b, dy, (xa, lB, lA) = _inputs(M, N, K, dtype, device="cuda", r=16)
    leads = [f(M, N, K, x.device, register_book=True, wide=True) for f in (tk._fwd_config, tk._dx_config)]
    if not any("LEAD" in cfg for cfg in leads):
        pytest.skip(f"no split-rest plan for ({M}, {N}, {K}) on {tk._num_sms(x.device)} SMs")
    starts = []
    for kern, key, split in ((tk._nf4_matmul_kernel, "N_TILE_START", "SPLIT_K"),
                             (tk._nf4_matmul_dx_kernel, "K_TILE_START", "SPLIT_N")):
        real_run = kern.run
        monkeypatch.setattr(kern, "run", lambda *args, _r=real_run, _k=key, _s=split, **kw: starts.append(
            (kw[_k], kw[_s])) or _r(*args, **kw))
    dyb = dy @ lB
    y1, y2 = (tk.nf4_matmul_triton(x, p, a, c, bs, N, na, nc, off, b, xa, lB, 0.5) for _ in range(2))
    d1, d2 = (tk.nf4_matmul_dx_triton(dy, p, a, c, bs, K, na, nc, off, dyb, lA, 0.5) for _ in range(2))
    torch.cuda.synchronize()
    assert len(starts) == 2 * sum(2 if "LEAD" in cfg else 1 for cfg in leads), starts
    assert any(start > 0 and split > 1 for start, split in starts), starts  # a split rest after a leading span
    assert torch.equal(y1, y2) and torch.equal(d1, d2)
    assert all(not buf.any() for buf in sc._BUFFERS.values())
    assert_close_2x(y1, x.double() @ W.double().t() + b.double() + 0.5 * (xa.double() @ lB.double().t()),
                    x @ W.to(dtype).t() + b + 0.5 * (xa @ lB.t()), what="forward")
    assert_close_2x(d1, dy.double() @ W.double() + 0.5 * (dyb.double() @ lA.double()),
                    dy @ W.to(dtype) + 0.5 * (dyb @ lA), what="dx")


@requires_cuda
@pytest.mark.triton
@requires_triton_runtime
@pytest.mark.parametrize("M,N,K", [(1024, 4096, 4096), (1024, 14336, 4096), (1000, 1024, 4096), (1024, 512, 14336)])
def test_triton_wide_gemm_plans_on_the_gpu(M, N, K, monkeypatch):
    """On a GPU, the launchers' own 16-warp plans above M = 256 (wide launch: LoRA rank 16, 16-divisible strides):
    forward 256 x 128 x 64, by the wave rule 128 x 128 x 128 after whole waves of 256 x 128 x 64 (N = 14336), and
    the serial split of 128 x 128 x 128 where 256 x 128 tiles would not reach a quarter of the SMs (N = 1024, 512);
    dx 256 x 64 x 128 on whole weight tiles (EVEN_NK) and by the wave rule the same two-launch plan (K = 14336).
    M = 1000 pads the last M tile. 2x rule with bias and LoRA."""
    import qpeft.triton_kernels.nf4_matmul as tk

    dtype = torch.bfloat16
    packed, state, W = make_weight(N, K, "nf4", 64, True, device="cuda")
    p, a, c, bs, _, _, na, nc, off = weight_args(packed, state)
    x, b, dy, (xa, lB, lA) = _inputs(M, N, K, dtype, device="cuda", r=16)
    plans = []
    for kern in (tk._nf4_matmul_kernel, tk._nf4_matmul_dx_kernel):
        real_run = kern.run
        monkeypatch.setattr(kern, "run", lambda *args, _r=real_run, **kw: plans.append(
            (kw["BLOCK_M"], kw["num_warps"], kw["REG_BOOK"], kw["EVEN_NK"], kw["NESTED_TABLE"], kw["ABSMAX_WORDS"]))
            or _r(*args, **kw))
    y = tk.nf4_matmul_triton(x, p, a, c, bs, N, na, nc, off, b, xa, lB, 0.5)
    dyb = dy @ lB
    dx = tk.nf4_matmul_dx_triton(dy, p, a, c, bs, K, na, nc, off, dyb, lA, 0.5)
    # where the wave rule passes over the 256-row tile, its whole waves still run it over the leading columns
    # (`_lead_span`): a second launch of the same direction (forward N = 14336, dx K = 14336)
    leads = sum("LEAD" in f(M, N, K, x.device, register_book=True, wide=True) for f in (tk._fwd_config, tk._dx_config))
    assert leads == (N == 14336) + (K == 14336)
    assert [pl[1:] for pl in plans] == [(16, True, True, True, True)] * (2 + leads), plans
    assert_close_2x(y, x.double() @ W.double().t() + b.double() + 0.5 * (xa.double() @ lB.double().t()),
                    x @ W.to(dtype).t() + b + 0.5 * (xa @ lB.t()), what="forward")
    assert_close_2x(dx, dy.double() @ W.double() + 0.5 * (dyb.double() @ lA.double()),
                    dy @ W.to(dtype) + 0.5 * (dyb @ lA), what="dx")


@pytest.mark.triton
@requires_triton_runtime
def test_triton_split_k_deterministic_mode(monkeypatch):
    """Under torch.use_deterministic_algorithms(True) split-K writes one fp32 slice per split and sums them in a
    fixed order (no atomics, whose order varies run to run); the result meets the 2x rule and repeats bit for bit."""
    import qpeft.triton_kernels.nf4_matmul as tk

    dev = triton_device()
    M, N, K, r = 3, 37, 320, 4
    packed, state, W = make_weight(N, K, device=dev)
    p, a, c, bs, _, _, na, nc, off = weight_args(packed, state)
    x, b, _, (xa, lB, _) = _inputs(M, N, K, torch.float32, device=dev, r=r)
    seen = []
    real_run = tk._nf4_matmul_kernel.run
    monkeypatch.setattr(tk._nf4_matmul_kernel, "run",
                        lambda *args, **kw: seen.append(kw["ATOMIC_SPLIT"]) or real_run(*args, **kw))
    cfg = dict(BLOCK_M=1, BLOCK_N=16, BLOCK_K=32, SPLIT_K=3)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        y1 = tk.nf4_matmul_triton(x, p, a, c, bs, N, na, nc, off, b, xa, lB, 0.5, config=cfg)
        y2 = tk.nf4_matmul_triton(x, p, a, c, bs, N, na, nc, off, b, xa, lB, 0.5, config=cfg)
    finally:
        torch.use_deterministic_algorithms(was)
    y3 = tk.nf4_matmul_triton(x, p, a, c, bs, N, na, nc, off, b, xa, lB, 0.5, config=cfg)
    assert seen == [False, False, True]
    assert torch.equal(y1, y2) and y1.shape == (M, N)
    ref32 = x.double() @ W.double().t() + b.double() + 0.5 * (xa.double() @ lB.double().t())
    same = x @ W.t() + b + 0.5 * (xa @ lB.t())
    assert_close_2x(y1, ref32, same, what="deterministic split-K")
    assert_close_2x(y3, ref32, same, what="atomic split-K")


def test_triton_grid_limits():
    """Output column tiles go on grid axis 0 (2^31 - 1 programs: 75,000 tiles of 8 columns are fine, where axis 1
    stopped at 65,535); a problem beyond axis 0 is refused with the sizes; M tiles (axis 1) are launched in
    chunks of at most 65,535."""
    pytest.importorskip("triton")
    from qpeft.triton_kernels.nf4_matmul import MAX_GRID_X, MAX_GRID_Y, _grid_cols, _row_chunks

    assert _grid_cols(600_000, 8) == 75_000
    with pytest.raises(ValueError, match="more than the 2147483647 of CUDA grid axis 0"):
        _grid_cols(2 ** 36, 16)
    assert MAX_GRID_X == 2 ** 31 - 1 and MAX_GRID_Y == 65535
    assert _row_chunks(100, 16) == [(0, 100)]
    assert _row_chunks(65535 * 16 + 5, 16) == [(0, 65535 * 16), (65535 * 16, 65535 * 16 + 5)]


@pytest.mark.triton
@requires_triton_runtime
def test_triton_forward_row_chunks_give_the_same_result(monkeypatch):
    """With grid axes 1 and 2 limited to 2 programs (instead of 65,535): 3 N tiles go on axis 0 and the 5 M tiles
    on axis 1 in three launches on row slices of x, the output and the LoRA rows; the result is bit for bit the
    single launch's. dx keeps M tiles on axis 0 and refuses K tiles beyond axis 1."""
    import qpeft.triton_kernels.nf4_matmul as tk

    dev, dtype = triton_device(), torch.float16
    M, N, K, r = 70, 40, 64, 4
    packed, state, _ = make_weight(N, K, device=dev)
    p, a, c, bs, _, _, na, nc, off = weight_args(packed, state)
    x, b, dy, (xa, lB, lA) = _inputs(M, N, K, dtype, device=dev, r=r)
    cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, SPLIT_K=1)
    whole = tk.nf4_matmul_triton(x, p, a, c, bs, N, na, nc, off, b, xa, lB, 0.5, config=cfg)
    seen = []
    real_run = tk._nf4_matmul_kernel.run
    monkeypatch.setattr(tk._nf4_matmul_kernel, "run",
                        lambda *args, **kw: seen.append((kw["grid"], kw["SWAP_AXES"])) or real_run(*args, **kw))
    monkeypatch.setattr(tk, "MAX_GRID_Y", 2)
    assert torch.equal(tk.nf4_matmul_triton(x, p, a, c, bs, N, na, nc, off, b, xa, lB, 0.5, config=cfg), whole)
    assert seen == [((3, 2, 1), True), ((3, 2, 1), True), ((3, 1, 1), True)]
    with pytest.raises(ValueError, match="K=64 in tiles of 16 is 4 programs on CUDA grid axis 1, more than its 2"):
        tk.nf4_matmul_dx_triton(dy, p, a, c, bs, K, na, nc, off, config=dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16))


@pytest.mark.parametrize("M", [1, 2, 16])
@pytest.mark.parametrize("N", [64, 4096, 28672])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_decode_default_config_fills_the_gpu_without_scratch(M, N, dtype):
    """Default decode tiles: half precision never splits K (no scratch buffer); BLOCK_N gives >= 2 programs
    per SM whenever N allows it (132 SMs, as the interpreter pretends), within tl.dot's minimum of 16."""
    pytest.importorskip("triton")
    from qpeft.triton_kernels.nf4_matmul import _fwd_config

    cfg = _fwd_config(M, N, 4096, torch.device("cpu"), dtype)
    assert cfg["BLOCK_M"] == (1 if M == 1 else 16)
    assert cfg["BLOCK_N"] >= (8 if M == 1 else 16)
    programs = -(-N // cfg["BLOCK_N"])
    if dtype != torch.float32:
        assert cfg["SPLIT_K"] == 1
    if N >= 2 * 132 * 16:
        assert programs >= 2 * 132
    if dtype == torch.float32 and programs < 132:
        assert cfg["SPLIT_K"] > 1


@pytest.mark.triton
@requires_triton_runtime
@pytest.mark.parametrize("dtype", triton_dtypes())
@pytest.mark.parametrize("K", [100, 128])
def test_triton_dx_with_lora(dtype, K):
    from qpeft.triton_kernels.nf4_matmul import nf4_matmul_dx_triton

    M, N, r, scale = 6, 45, 3, 2.0
    dev = triton_device()
    packed, state, W = make_weight(N, K, "fp4", 32, False, device=dev)
    p, a, c, bs, _, _, na, nc, off = weight_args(packed, state)
    _, _, dy, (dyb, _, lA) = _inputs(M, N, K, dtype, device=dev, r=r)
    dx = nf4_matmul_dx_triton(dy, p, a, c, bs, K, na, nc, off, dyb, lA, scale,
                              config=dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32))
    ref32 = dy.double() @ W.double() + scale * (dyb.double() @ lA.double())
    assert_close_2x(dx, ref32, dy @ W.to(dtype) + scale * (dyb @ lA), what="dx + lora")


@pytest.mark.triton
@requires_triton_runtime
@pytest.mark.parametrize("N", [512, 384])  # whole 256-row N steps (EVEN_NK) or not
def test_triton_dx_narrow_unsplit_tiles(N):
    """dx's unsplit 64-row tiles (`_dx_narrow_tile`: 64 x 256 x 128 on whole 256-row N steps, else 64 x 128 x 128)
    as the launcher issues them, with the LoRA epilogue; M = 70 pads the second M tile. 2x rule."""
    from qpeft.triton_kernels import nf4_matmul as tk

    tile = tk._dx_narrow_tile(N)
    assert tile[:3] == ((64, 256, 128) if N == 512 else (64, 128, 128))
    M, K, r = 70, 256, 16
    dtype = next(d for d in triton_dtypes() if d != torch.float32)  # the register code book's 16-bit path
    dev = triton_device()
    packed, state, W = make_weight(N, K, "nf4", 64, True, device=dev)
    p, a, c, bs, _, _, na, nc, off = weight_args(packed, state)
    _, _, dy, (dyb, _, lA) = _inputs(M, N, K, dtype, device=dev, r=r)
    dx = tk.nf4_matmul_dx_triton(dy, p, a, c, bs, K, na, nc, off, dyb, lA, 0.5,
                                 config=dict(tk.tile_config(tile), SPLIT_N=1))
    ref = dy.double() @ W.double() + 0.5 * (dyb.double() @ lA.double())
    assert_close_2x(dx, ref, dy @ W.to(dtype) + 0.5 * (dyb @ lA), what="dx")


# --- CUDA C++ extension (GPU only): the raw qpeft_C ops behind the same L2 op ---------------------------------
@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,K", SHAPES + [(64, 256, 512), (300, 128, 4096)])
@pytest.mark.parametrize("quant_type,blocksize,nested", FORMATS)
def test_cuda_forward_dx_lora(M, N, K, dtype, quant_type, blocksize, nested, monkeypatch):
    monkeypatch.setenv("QPEFT_BACKEND", "cuda")
    packed, state, W = make_weight(N, K, quant_type, blocksize, nested, device="cuda")
    p, a, c, bs, _, _, na, nc, off = weight_args(packed, state)
    x, b, dy, (xa, lB, lA) = _inputs(M, N, K, dtype, device="cuda", r=8)
    y = torch.ops.qpeft.nf4_matmul(x, p, a, c, bs, N, na, nc, off, b, xa, lB, 0.5)
    assert_close_2x(y, x.double() @ W.double().t() + b.double() + 0.5 * (xa.double() @ lB.double().t()),
                    x @ W.to(dtype).t() + b + 0.5 * (xa @ lB.t()), what="cuda forward")
    dx = torch.ops.qpeft.nf4_matmul_dx(dy, p, a, c, bs, K, na, nc, off, xa, lA, 0.5)
    assert_close_2x(dx, dy.double() @ W.double() + 0.5 * (xa.double() @ lA.double()),
                    dy @ W.to(dtype) + 0.5 * (xa @ lA),
                    what="cuda dx")


# decode kernels of csrc/nf4_gemv.cu: tensor cores for fp16 / bf16 with M <= 64, blocksize >= 64 and K % 256 == 0
# (1, 2, 4 or 8 groups of 8 tokens; M = 24 with N = 2056 takes two 8-row tiles per warp on an H100, the last CTA's
# second one half past N), the SIMT kernel at M <= 16 otherwise (blocksize 32 below), the tiled GEMM above.
# Shapes: one warp (K = 256), split-K over 8 warps with 1 and 2 passes each
# (K = 2816 = 11 passes: warps 0-2 take two, the loop's early exit), N not a multiple of 8 (clamped rows),
# blocksizes below, at and above the 256-k pass (a pass inside one block / the block spanning passes), and two
# row groups per CTA where one CTA's x outgrows L1 (M x K x 2 B > 192 KB: (12, 4104, 8448) and (8, 4100, 12544),
# 257 CTAs of 16 rows on a 132-SM GPU, the last one's second group past N, 33 / 49 passes over 4 warps per group)
DECODE_SHAPES = [(1, 37, 256), (3, 64, 2816), (8, 29, 512), (9, 40, 4096), (16, 33, 768), (17, 24, 512),
                 (32, 19, 1280), (24, 2056, 256), (41, 1000, 512), (64, 72, 256), (12, 4104, 8448),
                 (8, 4100, 12544)]


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,N,K", DECODE_SHAPES)
@pytest.mark.parametrize("blocksize,nested", [(64, True), (128, False), (1024, True), (32, True)])
def test_cuda_decode_kernels(M, N, K, dtype, blocksize, nested, monkeypatch):
    """Against the exactly dequantized weight rounded to the activation dtype (what the tensor-core kernel
    multiplies): within 2 ulps of the output dtype of the fp64 product (a single wrong weight moves a K >= 256
    dot product by far more), and the 2x rule against plain PyTorch; bias and the LoRA epilogue included."""
    monkeypatch.setenv("QPEFT_BACKEND", "cuda")
    packed, state, W = make_weight(N, K, "nf4", blocksize, nested, device="cuda")
    p, a, c, bs, _, _, na, nc, off = weight_args(packed, state)
    x, b, _, (xa, lB, _) = _inputs(M, N, K, dtype, device="cuda", r=8)
    y = torch.ops.qpeft.nf4_matmul(x, p, a, c, bs, N, na, nc, off, b, xa, lB, 0.5)
    exact = x.double() @ W.to(dtype).double().t() + b.double() + 0.5 * (xa.double() @ lB.double().t())
    ulp = torch.finfo(dtype).eps * exact.abs().clamp_min(1e-3)
    assert ((y.double() - exact).abs() <= 2 * ulp).all(), (y.double() - exact).abs().max()
    assert_close_2x(y, x.double() @ W.double().t() + b.double() + 0.5 * (xa.double() @ lB.double().t()),
                    x @ W.to(dtype).t() + b + 0.5 * (xa @ lB.t()), what="cuda decode")


@requires_cuda
def test_cuda_decode_misaligned_activation_view_is_exact():
    """A decode call on a view at an odd offset takes the fast kernel on an aligned copy (cuda_forward_input)."""
    packed, state, W = make_weight(64, 512, device="cuda")
    base = torch.randn(1 + 4 * 512, device="cuda", dtype=torch.bfloat16)
    x = base[1:].view(4, 512)
    assert x.data_ptr() % 16
    y = nf4_matmul(x, packed, state)
    torch.testing.assert_close(y, nf4_matmul(x.clone(), packed, state), rtol=0, atol=0)


def test_cuda_forward_input_copies_misaligned_x_and_warns_once_per_slow_path(monkeypatch):
    """The CUDA forward's seam, on CPU tensors: which calls take the decode kernels' fast path, which get one
    warning naming the reason."""
    import warnings

    from qpeft import _backend
    from qpeft.ops.nf4_matmul import cuda_forward_input

    monkeypatch.setattr(_backend, "_warned", set())

    def call(M, K, blocksize=64, dtype=torch.bfloat16, x_offset=0, w_offset=0):
        x = torch.randn(x_offset + M * K).to(dtype)[x_offset:].view(M, K)
        packed = torch.zeros(w_offset + 64 * K // 2, dtype=torch.uint8)[w_offset:]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = cuda_forward_input(x, packed, blocksize)
        return x, out, [str(w.message) for w in caught]

    x, out, warned = call(4, 512)
    assert out is x and not warned                          # the fast path as is
    x, out, warned = call(4, 512, x_offset=1)                # misaligned view: an aligned copy, no warning
    assert x.data_ptr() % 16 and out.data_ptr() % 16 == 0 and torch.equal(out, x) and not warned
    x, out, warned = call(32, 512, x_offset=1)               # M <= 64: the tensor-core kernel too
    assert out.data_ptr() % 16 == 0 and torch.equal(out, x) and not warned
    for M, kwargs, reason, kernel in ((1, dict(K=100), "K=100 is not a multiple of 32", "tiled GEMM"),
                                      (1, dict(K=512, w_offset=8), "packed weight is not 16-byte aligned",
                                       "tiled GEMM"),
                                      (1, dict(K=512, blocksize=32), "blocksize 32 < 64", "SIMT kernel"),
                                      (1, dict(K=288), "K=288 is not a multiple of 256", "SIMT kernel"),
                                      (20, dict(K=512, blocksize=32), "blocksize 32 < 64", "tiled GEMM")):
        _, _, warned = call(M, **kwargs)
        assert len(warned) == 1 and reason in warned[0] and kernel in warned[0], warned
        _, _, again = call(M + 1, **kwargs)
        assert not again  # once per reason
    for M in (1, 20):                                        # fp32: SIMT or tiled GEMM by design, not warned
        _, _, warned = call(M, 288, dtype=torch.float32)
        assert not warned
    x, out, warned = call(70, 512, x_offset=1, blocksize=32)  # M > 64: the tiled GEMM, any alignment
    assert out is x and not warned


# --- auto dispatch: the measured table (built by benchmarks/tune_nf4_matmul.py) and its lookup ---------------
def _synthetic_tuning_rows(seed=0):
    """Rows as the tuner writes them, with random times: two shapes, four M, both directions; one candidate
    always fails (inf) and dense cuBLAS is context only (no backend)."""
    g = torch.Generator().manual_seed(seed)
    cands = [("cuda", "cuda", None), ("triton:a", "triton", dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=128)),
             ("triton:b", "triton", dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_stages=3)),
             ("dense", None, None), ("triton:broken", "triton", dict(BLOCK_M=256, BLOCK_N=256, BLOCK_K=256))]
    rows = []
    for direction in ("fwd", "dx"):
        for K, N in ((4096, 4096), (8192, 28672)):
            for M in (1, 16, 64, 1024):
                for name, backend, cfg in cands:
                    ms = float("inf") if name == "triton:broken" else float(torch.rand((), generator=g)) + 0.01
                    if name == "dense":
                        ms = 1e-6  # fastest of all, but not a candidate
                    rows.append(dict(dir=direction, K=K, N=N, M=M, candidate=name, backend=backend, config=cfg,
                                     ms=ms))
    return rows


def test_dispatch_table_picks_the_measured_winner_and_round_trips_through_source():
    from qpeft.ops.nf4_matmul_dispatch import build_table, lookup_tuned, render_tables

    rows = _synthetic_tuning_rows()
    table = build_table(rows, (9, 0), "synthetic")
    tables = {"GPU A": table}
    namespace: dict = {}
    exec(render_tables(tables), namespace)  # the generated module is valid Python holding the same table
    assert namespace["TABLES"] == tables
    for r in rows:
        if r["backend"] is None:
            continue
        same = [q for q in rows if (q["dir"], q["K"], q["N"], q["M"]) == (r["dir"], r["K"], r["N"], r["M"])
                and q["backend"] is not None]
        winner = min(same, key=lambda q: q["ms"])
        got = lookup_tuned(tables, "GPU A", (9, 0), r["dir"], r["M"], r["N"], r["K"])
        assert (got.backend, got.triton_config) == (winner["backend"], winner["config"]), (r, got)
        assert got.source.startswith("tuned:GPU A")


def test_dispatch_lookup_buckets_nearest_shape_and_device_fallback():
    from qpeft.ops.nf4_matmul_dispatch import build_table, lookup_tuned

    rows = [dict(dir="fwd", K=K, N=N, M=M, candidate=name, backend=backend, config=None, ms=ms)
            for K, N, fast_upto in ((4096, 4096, 16), (8192, 28672, 64))
            for M in (1, 16, 64, 1024)
            for name, backend, ms in (("cuda", "cuda", 1.0 if M <= fast_upto else 3.0),
                                      ("triton:default", "triton", 2.0))]
    tables = {"GPU A": build_table(rows, (9, 0), "synthetic")}
    buckets = tables["GPU A"]["fwd"][(4096, 4096)]
    assert [(b["max_m"], b["backend"]) for b in buckets] == [(16, "cuda"), (1024, "triton")]  # merged runs
    assert set(buckets[0]["ms"]) == {1, 16} and buckets[0]["ms"][16] == {"cuda": 1.0, "triton:default": 2.0}

    def backend(M, N, K, name="GPU A", cap=(9, 0)):
        p = lookup_tuned(tables, name, cap, "fwd", M, N, K)
        return None if p is None else p.backend

    assert [backend(M, 4096, 4096) for M in (1, 7, 16, 17, 64, 5000)] == ["cuda"] * 3 + ["triton"] * 3
    assert backend(40, 14336, 8192) == "cuda"     # nearest measured shape: (8192, 28672), cuda up to M = 64
    assert backend(40, 4096, 3072) == "triton"    # nearest: (4096, 4096)
    # no measured shape within 2x (log distance 1): the default rule, not another shape's tiles and split count
    assert backend(40, 1024, 4096) is None        # k/v (4096 -> 1024): 2 from (4096, 4096)
    assert backend(40, 8192, 8192) is None        # 70b q/o: 2 from (4096, 4096), 1.81 from (8192, 28672)
    assert backend(40, 8192, 4096) == "triton"    # 1 from (4096, 4096): still near
    assert backend(40, 4096, 4096, name="GPU B") == "triton"  # unknown name, same capability: that table
    assert backend(40, 4096, 4096, name="GPU B", cap=(8, 0)) is None  # no table for this arch: default rule
    assert lookup_tuned(tables, "GPU A", (9, 0), "dx", 40, 4096, 4096) is None  # direction not measured


def test_dispatch_default_plan_and_argument_check():
    from qpeft.ops.nf4_matmul_dispatch import plan

    cpu = torch.device("cpu")
    p = plan("fwd", 1, 4096, 4096, torch.bfloat16, cpu)
    assert (p.backend, p.triton_config, p.source) == ("cuda", None, "default")
    with pytest.raises(ValueError, match="direction must be 'fwd' or 'dx'"):
        plan("bwd", 1, 4096, 4096, torch.bfloat16, cpu)


def test_dispatch_default_rule_on_hopper(monkeypatch):
    """On sm_90 (reported by a stand-in): the CUDA decode kernels up to M = 16; Triton (wgmma, serial split-K at
    M = 17..256) above, whatever K, N and dtype, and for every dx. Before sm_90: CUDA C++ at every M."""
    from qpeft.ops import nf4_matmul_dispatch as d

    monkeypatch.setattr(d, "is_hopper_or_newer", lambda device: True)
    dev, bf16 = torch.device("cuda", 0), torch.bfloat16

    def backend(direction, M, K=4096, dtype=bf16, N=4096):
        return d.default_plan(direction, M, dev, K, dtype, N).backend

    assert [backend("fwd", M) for M in (1, 16, 17, 32, 33, 64, 65, 256)] == ["cuda"] * 2 + ["triton"] * 6
    assert [backend("fwd", M, N=N) for M, N in ((17, 1024), (64, 14336), (16, 28672))] == ["triton"] * 2 + ["cuda"]
    assert [backend("fwd", M, 4000) for M in (16, 17)] == ["cuda", "triton"]           # K % 256 != 0
    assert [backend("fwd", M, dtype=torch.float32) for M in (16, 17)] == ["cuda", "triton"]
    assert backend("dx", 1) == "triton"
    assert d.default_plan("fwd", 24, dev).backend == "triton"  # K / dtype / N not given: the same rule
    monkeypatch.setattr(d, "is_hopper_or_newer", lambda device: False)  # e.g. an A100: CUDA C++ throughout
    assert {backend(direction, M) for direction in ("fwd", "dx") for M in (1, 17, 64, 4096)} == {"cuda"}


@pytest.mark.triton
@requires_triton_runtime
@pytest.mark.parametrize("direction", ["fwd", "dx"])
def test_op_runs_triton_with_the_planned_tiles(direction, monkeypatch):
    """The L2 op hands the plan's tiles to the Triton launcher (and the result still meets the 2x rule)."""
    import qpeft.triton_kernels.nf4_matmul as tk
    from qpeft.ops import nf4_matmul_dispatch

    monkeypatch.setenv("QPEFT_BACKEND", "triton")
    cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, num_warps=2)
    if direction == "fwd":
        cfg["SPLIT_K"] = 1
    monkeypatch.setattr(nf4_matmul_dispatch, "plan", lambda *a: nf4_matmul_dispatch.Plan("triton", cfg, "test"))
    seen = []
    launcher = "nf4_matmul_triton" if direction == "fwd" else "nf4_matmul_dx_triton"
    real = getattr(tk, launcher)
    monkeypatch.setattr(tk, launcher, lambda *a, config=None, **k: seen.append(config) or real(*a, config=config,
                                                                                              **k))
    dev, dtype = triton_device(), torch.float16
    M, N, K = 5, 40, 96
    packed, state, W = make_weight(N, K, device=dev)
    p, a, c, bs, _, _, na, nc, off = weight_args(packed, state)
    x, _, dy, _ = _inputs(M, N, K, dtype, device=dev)
    if direction == "fwd":
        got = torch.ops.qpeft.nf4_matmul(x, p, a, c, bs, N, na, nc, off, None, None, None, 0.0)
        assert_close_2x(got, x.float() @ W.t(), x @ W.to(dtype).t(), what="forward")
    else:
        got = torch.ops.qpeft.nf4_matmul_dx(dy, p, a, c, bs, K, na, nc, off, None, None, 0.0)
        assert_close_2x(got, dy.float() @ W, dy @ W.to(dtype), what="dx")
    assert seen == [cfg]


# --- GPU: the op (every backend, fwd and dx) allocates its output (and a split's partials) and captures in a graph
def _op_call(direction, args, a, N, K):
    p, ab, c, bs, _, _, na, nc, off = args
    if direction == "fwd":
        return torch.ops.qpeft.nf4_matmul(a, p, ab, c, bs, N, na, nc, off, None, None, None, 0.0)
    return torch.ops.qpeft.nf4_matmul_dx(a, p, ab, c, bs, K, na, nc, off, None, None, 0.0)


@requires_cuda
@pytest.mark.parametrize("backend", ["auto", "cuda", "triton"])
@pytest.mark.parametrize("direction", ["fwd", "dx"])
@pytest.mark.parametrize("M", [1, 8, 100])
def test_op_allocates_its_output_and_split_partials_and_captures_in_a_cuda_graph(backend, direction, M,
                                                                                 monkeypatch):
    """One allocation per call: the output, plus the fp32 partials when a Triton launch splits its reduction
    (the serial split; its counters are cached per stream from the warm-up on). Captured in a CUDA graph, the
    replay equals the eager call (the split's sum order is fixed)."""
    monkeypatch.setenv("QPEFT_BACKEND", backend)
    N, K = 4096, 1024
    splits = []
    try:
        import qpeft.triton_kernels.nf4_matmul as tk
    except ImportError:  # no Triton: the CUDA C++ kernels never split
        tk = None
    if tk is not None:
        for kern, key in ((tk._nf4_matmul_kernel, "SPLIT_K"), (tk._nf4_matmul_dx_kernel, "SPLIT_N")):
            monkeypatch.setattr(kern, "run", lambda *args, _r=kern.run, _k=key, **kw: splits.append(kw[_k])
                                or _r(*args, **kw))
    packed, state, W = make_weight(N, K, device="cuda")
    args = weight_args(packed, state)
    a = torch.randn(M, K if direction == "fwd" else N, device="cuda", dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _op_call(direction, args, a, N, K)  # warm-up (build, Triton compile) outside the measurement
        torch.cuda.synchronize()
        before = torch.cuda.memory_stats()["allocation.all.allocated"]
        splits.clear()
        eager = _op_call(direction, args, a, N, K)
        torch.cuda.synchronize()
        want = 1 + any(s > 1 for s in splits)  # the output (+ the split's fp32 partials)
        assert torch.cuda.memory_stats()["allocation.all.allocated"] - before == want, (splits, "allocations")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _op_call(direction, args, a, N, K)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)
    a.copy_(torch.randn_like(a))  # replay on new data equals a fresh eager call
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, _op_call(direction, args, a, N, K))


# --- offline sm_90 compile of the default Triton tiles (no GPU needed) -----------------------------------------
def _compile_sm90(direction: str, cfg: dict, has_lora: bool = True, reg_book: bool = False, wide: bool = False,
                  r_pad: int = 16):
    """(shared bytes, cuobjdump resource usage, SASS) of one kernel configuration compiled for sm_90, bf16,
    NF4 blocksize 64 with double quant, the aligned tile loader (every real model shape); LoRA ranks padded to
    r_pad."""
    import os
    import subprocess
    import tempfile

    import triton

    import qpeft.triton_kernels.nf4_matmul as k

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(cuobjdump):
        pytest.skip("cuobjdump not shipped with this Triton")
    cfg = dict(cfg)
    opts = {"num_warps": cfg.pop("num_warps")}
    if "num_stages" in cfg:
        opts["num_stages"] = cfg.pop("num_stages")
    p16, u8, f32, i32 = "*bf16", "*u8", "*fp32", "i32"
    weight = {"packed_ptr": u8, "absmax_ptr": u8, "code_ptr": f32, "nested_absmax_ptr": f32,
              "nested_code_ptr": f32, "offset_ptr": f32}
    if direction == "fwd":
        fn = k._nf4_matmul_kernel
        sig = {"x_ptr": p16, "out_ptr": p16, "M": i32, "N": i32, "K": i32, "stride_xm": i32, "stride_om": i32,
               "stride_split": i32, **weight, "bias_ptr": p16, "xa_ptr": p16, "lb_ptr": p16, "lora_scale": "fp32",
               "R": i32, "stride_xam": i32, "stride_lbn": i32, "ws_ptr": f32, "counter_ptr": "*i32"}
        # EVEN_NK: whole tiles, as the launcher sets it for every real model shape (N, K multiples of the tile);
        # SPLIT_K > 1: the serial split-K of 16-bit activations, as the launcher issues it
        const = dict(HAS_BIAS=True, USE_DOT=cfg["BLOCK_M"] >= 16, ATOMIC_SPLIT=True, SWAP_AXES=False, EVEN_NK=True,
                     SERIAL_SPLIT=cfg.get("SPLIT_K", 1) > 1, **cfg)
    else:
        fn = k._nf4_matmul_dx_kernel
        sig = {"dy_ptr": p16, "dx_ptr": p16, "M": i32, "N": i32, "K": i32, "stride_dym": i32, "stride_dxm": i32,
               **weight, "dyb_ptr": p16, "la_ptr": p16, "lora_scale": "fp32", "R": i32, "stride_dybm": i32,
               "stride_lar": i32, "ws_ptr": f32, "counter_ptr": "*i32", "stride_split": i32}
        # EVEN_NK: the dx launcher sets it for the register code book on whole tiles (nf4_matmul_dx_triton), and
        # leaves it off for the gather loader
        const = dict(EVEN_NK=bool(reg_book), **cfg)
    # the register code book's launches read the double-quantized absmax as the launcher does (`_nested_reads`):
    # the nested code book as a register table, the absmax codes as 32-bit words (K = 4096 / 64: whole words)
    const.update(BLOCKSIZE=64, NESTED=True, HAS_LORA=has_lora, R_PAD=r_pad, DOT_PRECISION="tf32", ALIGNED=True,
                 REG_BOOK=reg_book, NESTED_TABLE=bool(reg_book), ABSMAX_WORDS=bool(reg_book))
    const.setdefault("N_TILE_START" if direction == "fwd" else "K_TILE_START", 0)  # a launch from the first tile
    # as the forward's split config sets it for its tile (dx: never). Named even where False: Triton 3.9's sm_90
    # compile of a source with a constexpr left to its default fails ("NoneType ... _unflatten_ir")
    tile = (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], opts["num_warps"], opts.get("num_stages"))
    const.setdefault("KEEP_OWN_PARTIAL", direction == "fwd" and k._keeps_own_partial(tile))
    # wide: compiled as the launcher issues the register code book's 16-warp tiles (`_wide_launch`): every pointer
    # 16-byte aligned, every stride, N, K and the LoRA rank divisible by 16 (M is not assumed to be)
    hints = [a for a, t in sig.items() if t.startswith("*") or a not in ("M", "lora_scale")] if wide else ()
    compiled = compile_for_sm90(fn, sig, const, options=opts, aligned=hints)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True).stdout
    return compiled.metadata.shared, usage, sass


def _default_gemm_tiles():
    """[(direction, tile, register code book, with the LoRA epilogue too)]: the gather loader's tiles and the
    register code book's; "wide": its 16-warp tiles, compiled with the 16-divisibility the launcher requires for
    them."""
    from qpeft.triton_kernels import nf4_matmul as k

    return ([("fwd", t, False, True) for t in k._FWD_GEMM_TILES] + [("dx", t, False, True) for t in k._DX_GEMM_TILES]
            + [("fwd", t, True, True) for t in k._FWD_GEMM_TILES_BOOK]
            + [("dx", t, True, True) for t in k._DX_GEMM_TILES_BOOK]
            + [("fwd", t, "wide", True) for t in k._FWD_GEMM_TILES_BOOK_WIDE[:2]]
            + [("dx", t, "wide", True) for t in k._DX_GEMM_TILES_BOOK_WIDE[:2]]
            # serial split-K (SPLIT_K appended to the tile): 64 x 64 x 128 with and without the 16-divisibility,
            # 128 x 128 x 128 only with it (`_split_k_config`)
            + [("fwd", k._SPLIT_TILE + (k.MAX_SPLIT_K,), True, True),
               ("fwd", k._SPLIT_TILE + (k.MAX_SPLIT_K,), "wide", True),
               ("fwd", k._SPLIT_TILE_NARROW_N + (k.MAX_SPLIT_K,), True, True),
               ("fwd", k._SPLIT_TILE_NARROW_N + (k.MAX_SPLIT_K,), "wide", True),
               ("fwd", k._SPLIT_TILE_NARROW_N_SMALL_M + (k.MAX_SPLIT_K,), True, True),
               ("fwd", k._SPLIT_TILE_NARROW_N_SMALL_M + (k.MAX_SPLIT_K,), "wide", True),
               ("fwd", k._SPLIT_TILE_WIDE + (k.MAX_SPLIT_K,), "wide", True),
               ("fwd", k._SPLIT_TILE_WIDE_NARROW_N + (k.MAX_SPLIT_K,), "wide", True)]
            # ... and dx's serial split of N (SPLIT_N appended)
            + [("dx", k._DX_SPLIT_TILE_DECODE + (k.MAX_SPLIT_K,), True, True),
               ("dx", k._DX_SPLIT_TILE_DECODE + (k.MAX_SPLIT_K,), "wide", True),
               ("dx", k._DX_SPLIT_TILE + (k.MAX_SPLIT_K,), True, True),
               ("dx", k._DX_SPLIT_TILE + (k.MAX_SPLIT_K,), "wide", True),
               ("dx", k._DX_SPLIT_TILE_WIDE + (k.MAX_SPLIT_K,), "wide", True),
               ("dx", k._DX_SPLIT_TILE_WIDE_NARROW_N, "wide", True),
               ("dx", k._DX_SPLIT_TILE_WIDE_NARROW_N_SHORT, "wide", True)]
            # ... and the tuner's forward split tile (a measured table may dispatch it)
            + [("fwd", t + (k.MAX_SPLIT_K,), "wide", True) for t in _tuner_split_extra()])


def _tuner_split_extra() -> tuple:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from benchmarks.tune_nf4_matmul import _FWD_SPLIT_EXTRA

    return _FWD_SPLIT_EXTRA


@pytest.mark.skipif(TRITON_INTERPRET or not has_triton(), reason="compiles for sm_90 (not under the interpreter)")
@pytest.mark.parametrize("direction,tile,reg_book,lora", _default_gemm_tiles()
                         + [("fwd", "M=1", False, True), ("fwd", "M=8", True, True), ("dx", "M=8", True, True)])
def test_default_triton_tiles_compile_for_sm90_without_register_spills(direction, tile, reg_book, lora):
    """Every default tile (with bias and the LoRA epilogue: the most registers) must not spill to local memory
    and must fit in the 227 KB of shared memory a Hopper block may use; the 64- and 128-row GEMM tiles must
    issue wgmma. The register code book's tiles are compiled with it, and take no code-book loads."""
    from qpeft.triton_kernels.nf4_matmul import _dx_config, _fwd_config, tile_config

    if isinstance(tile, str):  # the decode configs, at the widest BLOCK_N (it grows with N)
        M, N, K = int(tile[2:]), 28672, 8192
        cfg = (_fwd_config(M, N, K, torch.device("cpu"), torch.bfloat16, register_book=reg_book)
               if direction == "fwd" else _dx_config(M, N, K, torch.device("cpu"), register_book=reg_book))
    else:
        cfg = tile_config(tile[:5])
        cfg["SPLIT_K" if direction == "fwd" else "SPLIT_N"] = tile[5] if len(tile) > 5 else 1
    # dx also without the LoRA epilogue (the inference / frozen-adapter case)
    for has_lora in ((True, False) if lora else (False,)) if direction == "dx" else (True,):
        shared, usage, sass = _compile_sm90(direction, cfg, has_lora, bool(reg_book), reg_book == "wide")
        what = f"{cfg}, LoRA epilogue {has_lora}, register code book {reg_book}"
        assert " STACK:0 " in usage and " LOCAL:0 " in usage, f"register spills for {what}: {usage.strip()}"
        assert shared <= 227 * 1024, f"{what} needs {shared} B of shared memory"
        if cfg["BLOCK_M"] >= 64:
            assert "HGMMA" in sass, f"{what}: no wgmma in the sm_90 SASS"
        if reg_book:  # the lookup is PRMTs, and the per-nibble code-book gathers are gone (the whole kernel's
            # narrow loads also count the epilogue's, e.g. 234 -> 118 / 145 for 128 x 128 x 64, Triton 3.9 / 3.6)
            gather = _compile_sm90(direction, cfg, has_lora, False, reg_book == "wide")[2]
            assert "PRMT" in sass and narrow_global_loads(sass) < narrow_global_loads(gather), what


def _wide_tiles_by_rank():
    """[(direction, 16-warp GEMM tile, padded LoRA rank, first column tile)]: each wide tile at every R_PAD the
    launchers give it (`_WIDE_TILE_MAX_R_PAD`; 256 for the 128-row ones, LoRA rank 256 being the largest PEFT users
    commonly set); the 8-warp 64-row tiles of wide launches (forward split 64 x 128 x 128, 164-193 registers; dx
    unsplit 64 x 256 x 128, 169-214, and 64 x 128 x 128, 125-127), as launched; the tuner's forward split
    64 x 256 x 128 (213-249 registers) in 2 and 8 splits; the split rest of a `_split_tail` plan (128 x 128 x 128 in
    2 splits from column tile 16, in 4 from 132); the second launch of a wave-rule plan (`_lead_span`):
    the 128-row 16-warp tile from column tile 99 (N_TILE_START / K_TILE_START, constexprs: the 8b gate/up forward
    and down dx at M = 1024); and the split tiles in 2 splits (`_serial_split_store` adds the other split's partial
    to its accumulator there: a code path of its own; 64 x 128 x 128 takes 2 splits on q/o at M = 128)."""
    from qpeft.triton_kernels import nf4_matmul as k

    wide = (("fwd", k._FWD_GEMM_TILES_BOOK_WIDE), ("dx", k._DX_GEMM_TILES_BOOK_WIDE))
    return [(d, t, r, 0) for d, tiles in wide for t in tiles if t[3] == 16 for r in (32, 64, 128, 256)
            if k._rank_fits(t, r)] \
        + [("fwd", k._SPLIT_TILE_WIDE_NARROW_N + (k.MAX_SPLIT_K,), r, 0) for r in (32, 64, 128, 256)] \
        + [("dx", t, r, 0) for t in (k._DX_SPLIT_TILE_WIDE_NARROW_N, k._DX_SPLIT_TILE_WIDE_NARROW_N_SHORT)
           for r in (32, 64, 128, 256)] \
        + [(d, tiles[1], r, 99) for d, tiles in wide for r in (16, 256)] \
        + [(d, t + (2,), r, 0) for d, t in (("fwd", k._SPLIT_TILE_WIDE), ("dx", k._DX_SPLIT_TILE_WIDE),
                                            ("fwd", k._SPLIT_TILE_WIDE_NARROW_N))
           for r in (16, 32, 64, 128, 256)] \
        + [("fwd", t + (split,), r, 0) for t in _tuner_split_extra() for split in (2, k.MAX_SPLIT_K)
           for r in (16, 32, 64, 128, 256)] \
        + [(d, k._SPLIT_TAIL_TILE + (2,), r, 16) for d in ("fwd", "dx") for r in (16, 256)] \
        + [(d, k._SPLIT_TAIL_TILE + (4,), r, 132) for d in ("fwd", "dx") for r in (16, 256)]


@pytest.mark.skipif(TRITON_INTERPRET or not has_triton(), reason="compiles for sm_90 (not under the interpreter)")
@pytest.mark.parametrize("direction,tile,r_pad,start", _wide_tiles_by_rank())
def test_wide_tiles_compile_for_sm90_without_spills_up_to_their_lora_rank(direction, tile, r_pad, start):
    """The 16-warp tiles sit at the 128-register cap, and the LoRA epilogue's operands grow with the rank: every
    rank a launcher gives a tile (the 256-row tiles stop below the rank where they spill) compiles spill-free, from
    the first column tile and from a later one (a column span's launch)."""
    from qpeft.triton_kernels.nf4_matmul import tile_config

    split = tile[5] if len(tile) > 5 else 1
    cfg = dict(tile_config(tile[:5]), **{"SPLIT_K" if direction == "fwd" else "SPLIT_N": split,
                                         "N_TILE_START" if direction == "fwd" else "K_TILE_START": start})
    shared, usage, _ = _compile_sm90(direction, cfg, True, True, True, r_pad=r_pad)
    assert " STACK:0 " in usage and " LOCAL:0 " in usage, \
        f"register spills for {tile} at R_PAD {r_pad} from column tile {start}: {usage}"
    assert shared <= 227 * 1024


def test_register_book_reads_the_nested_absmax_as_table_and_words_only_where_safe():
    """`_nested_reads`: the nested code book as a register table with the register code book and a 256-entry nested
    code; the absmax codes as 32-bit words only where no word reaches past a row's codes (K // blocksize % 4 == 0)
    and the uint8 absmax is 4-byte aligned, each expert's of a stack included."""
    pytest.importorskip("triton")
    from qpeft.triton_kernels.nf4_matmul import _nested_reads

    absmax, code2 = torch.empty(4096, dtype=torch.uint8), torch.empty(256)
    assert _nested_reads(True, absmax, code2, 64) == dict(NESTED_TABLE=True, ABSMAX_WORDS=True)
    assert _nested_reads(True, absmax, code2, 66) == dict(NESTED_TABLE=True, ABSMAX_WORDS=False)  # K = 66 blocks
    assert _nested_reads(True, absmax[1:], code2, 64) == dict(NESTED_TABLE=True, ABSMAX_WORDS=False)  # 1 B off
    assert _nested_reads(True, absmax, torch.empty(16), 64) == dict(NESTED_TABLE=False, ABSMAX_WORDS=False)
    assert _nested_reads(True, torch.empty(64), None, 64) == dict(NESTED_TABLE=False, ABSMAX_WORDS=False)  # plain
    assert _nested_reads(False, absmax, code2, 64) == dict(NESTED_TABLE=False, ABSMAX_WORDS=False)  # gather loader
    # a stack of experts' absmax (grouped NF4): each expert's codes must start on a word too
    experts = torch.empty(4, 66, dtype=torch.uint8)
    assert _nested_reads(True, experts.view(4, 66)[:, :64], code2, 16)["ABSMAX_WORDS"] is False  # stride 66
    assert _nested_reads(True, torch.empty(4, 64, dtype=torch.uint8), code2, 16)["ABSMAX_WORDS"] is True


@pytest.mark.parametrize("direction,r_pad,tile", [("fwd", 64, (256, 128, 64)), ("fwd", 128, (128, 128, 128)),
                                                  ("dx", 32, (256, 64, 128)), ("dx", 64, (128, 128, 128))])
def test_wide_256_row_tiles_stop_at_their_lora_rank(direction, r_pad, tile):
    """M = 4096 on (4096, 4096), wide launch: the 256-row tile up to its padded LoRA rank, 128 x 128 x 128 above."""
    pytest.importorskip("triton")
    from qpeft.triton_kernels import nf4_matmul as k

    config = k._fwd_config if direction == "fwd" else k._dx_config
    cfg = config(4096, 4096, 4096, torch.device("cpu"), register_book=True, wide=True, r_pad=r_pad)
    assert (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["num_warps"]) == (*tile, 16), cfg
    assert k._r_pad(0) == 16 and k._r_pad(8) == 16 and k._r_pad(64) == 64 and k._r_pad(65) == 128


@pytest.mark.parametrize("M", [17, 40, 64, 65, 128, 256, 1024, 16384])
@pytest.mark.parametrize("N,K", [(4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192)])
def test_default_gemm_tiles_fill_the_gpu_without_padding_m_twice(M, N, K):
    pytest.importorskip("triton")
    from qpeft.triton_kernels.nf4_matmul import _FWD_GEMM_TILES, _DX_GEMM_TILES, _dx_config, _fwd_config

    cpu = torch.device("cpu")  # pretends 132 SMs, as an H100
    for cfg, cols, col_key, tiles in ((_fwd_config(M, N, K, cpu), N, "BLOCK_N", _FWD_GEMM_TILES),
                                      (_dx_config(M, N, K, cpu), K, "BLOCK_K", _DX_GEMM_TILES)):
        programs = -(-M // cfg["BLOCK_M"]) * -(-cols // cfg[col_key])
        smallest = tiles[-1]
        assert programs >= 132 or (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]) == smallest[:3], cfg
        assert cfg["BLOCK_M"] < 2 * M or cfg["BLOCK_M"] == 16, cfg
        if M >= 4096:  # plenty of work: the largest tile
            assert (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]) == tiles[0][:3], cfg


def test_register_book_wide_tiles_only_for_16_divisible_launches():
    """The 16-warp tiles spill without Triton's 16-divisibility (e.g. LoRA rank 8: 8-32 B at 128 registers), so
    the launchers take them only when every pointer is 16-byte aligned and every stride / size / rank divides by 16."""
    pytest.importorskip("triton")
    from qpeft.triton_kernels import nf4_matmul as k

    cpu = torch.device("cpu")
    x = torch.empty(1024, 4096, dtype=torch.bfloat16)
    assert k._wide_launch(x, x.stride(0), 4096, 4096, None, torch.empty(16, 64), 16)
    assert not k._wide_launch(x, x.stride(0), 4096, 4096, None, torch.empty(16, 8), 8)   # LoRA rank 8
    assert not k._wide_launch(x.view(-1)[4:4 + 1000 * 4096].view(1000, 4096), 4096)       # 8 B off
    assert not k._wide_launch(x, 4104)
    for wide in (False, True):
        f = k._fwd_config(1024, 4096, 4096, cpu, register_book=True, wide=wide)
        d = k._dx_config(1024, 4096, 4096, cpu, register_book=True, wide=wide)
        assert (f["num_warps"], d["num_warps"]) == ((16, 16) if wide else (8, 8)), (f, d)
    assert k._fwd_config(1024, 4096, 4096, cpu, wide=True)["num_warps"] == 8  # the gather loader: never wide


@pytest.mark.parametrize("direction,M,N,K,tile", [
    ("fwd", 1024, 4096, 4096, (256, 128, 64)),    # 4 x 32 = 128 tiles: one wave
    ("fwd", 4096, 14336, 4096, (256, 128, 64)),   # 1792 tiles, 13.6 waves: the last one's idle SMs hardly count
    ("fwd", 1024, 14336, 4096, (128, 128, 128)),  # 448 tiles of 256 x 128, 3.4 waves; 896 of 128 x 128, 6.8
    ("fwd", 1024, 28672, 8192, (256, 128, 64)),   # 896 tiles, 6.8 waves
    ("dx", 1024, 4096, 4096, (256, 64, 128)),     # 4 x 32 = 128 tiles
    ("dx", 1024, 4096, 14336, (128, 128, 128)),   # 4 x 112 = 448 tiles of 256 x 128; 896 of 128 x 128
    ("dx", 512, 4096, 4096, (128, 128, 128)),     # 256 rows: 64 tiles, under the 128 that fill the SMs
    ("dx", 4096, 4096, 14336, (256, 64, 128)),    # 1792 tiles
])
def test_register_book_wide_tiles_follow_the_wave_rule(direction, M, N, K, tile):
    """Wide launches take the 256-row 16-warp tile unless the next 16-warp tile (128 x 128 x 128) fills its last wave
    better by more than 10% of the SMs (`_WAVE_FILL_GAIN`): one CTA per SM, so a part-empty last wave idles whole SMs
    (the static sm_90 model: 8b gate/up forward and down dx at M = 1024 0.85x -> 0.94x cuBLAS); then the 256-row
    tile's whole waves still run it, over the leading columns (LEAD: 0.94x -> 0.96x)."""
    pytest.importorskip("triton")
    from qpeft.triton_kernels import nf4_matmul as k

    cpu = torch.device("cpu")  # pretends 132 SMs, as an H100
    config = k._fwd_config if direction == "fwd" else k._dx_config
    cfg = config(M, N, K, cpu, register_book=True, wide=True)
    assert (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["num_warps"]) == (*tile, 16), cfg
    # the rule itself: programs / (waves x SMs) of the 256-row tile against the 128-row one
    tiles = k._FWD_GEMM_TILES_BOOK_WIDE if direction == "fwd" else k._DX_GEMM_TILES_BOOK_WIDE
    cols, axis = (N, 1) if direction == "fwd" else (K, 2)
    fill = [(-(-M // t[0]) * -(-cols // t[axis])) / (-(-(-(-M // t[0]) * -(-cols // t[axis])) // 132) * 132)
            for t in tiles[:2]]
    assert (tile == tiles[1][:3]) == (fill[1] > fill[0] + k._WAVE_FILL_GAIN or -(-M // 256) * -(-cols // tiles[0][axis])
                                      < int(132 * k._BOOK_FILL)), fill
    # where the rule passed over the 256-row tile for its fill: its whole waves still run it, over the leading
    # columns (LEAD), and the 128-row tile takes the rest in at most one wave
    lead = cfg.get("LEAD")
    m_tiles = -(-M // 256)
    if fill[1] > fill[0] + k._WAVE_FILL_GAIN and m_tiles * -(-cols // tiles[0][axis]) >= 132:
        lead_cols, lead_tile = lead
        assert lead_tile == tiles[0] and lead_cols % tiles[0][axis] == 0 and lead_cols % tiles[1][axis] == 0, lead
        assert m_tiles * lead_cols // tiles[0][axis] == 132 * (m_tiles * -(-cols // tiles[0][axis]) // 132), lead
        assert -(-M // 128) * -(-(cols - lead_cols) // tiles[1][axis]) <= 132, lead
    else:
        assert lead is None, cfg


@pytest.mark.parametrize("direction,M,N,K", [("fwd", 1024, 14336, 4096), ("dx", 1024, 4096, 14336)])
def test_wave_rule_plans_launch_whole_waves_of_the_256_row_tile(direction, M, N, K):
    """8b gate/up forward and down dx at M = 1024 (wide launch, LoRA rank 16): 448 tiles of 256 rows would be
    3.39 waves on 132 SMs, so the launcher runs 3 waves of them over the first 12,672 columns and 104 tiles of
    128 x 128 over the last 1,664, each launch starting at its span; recorded, not run."""
    pytest.importorskip("triton")
    from qpeft.triton_kernels import nf4_matmul as k
    from utils import recorded_triton_launches

    packed, state, _ = make_weight(N, K)
    p, a, c, bs, _, _, na, nc, off = weight_args(packed, state)
    x, b, dy, (xa, lB, lA) = _inputs(M, N, K, torch.bfloat16, r=16)
    with recorded_triton_launches() as launches:
        if direction == "fwd":
            k.nf4_matmul_triton(x, p, a, c, bs, N, na, nc, off, b, xa, lB, 0.5)
        else:
            k.nf4_matmul_dx_triton(dy, p, a, c, bs, K, na, nc, off, dy @ lB, lA, 0.5)
    start = "N_TILE_START" if direction == "fwd" else "K_TILE_START"
    got = [(one.grid, one.kwargs["BLOCK_M"], one.kwargs["BLOCK_N"], one.kwargs["BLOCK_K"], one.kwargs[start],
            one.kwargs["REG_BOOK"], one.kwargs["EVEN_NK"]) for one in launches]
    lead = (256, 128, 64) if direction == "fwd" else (256, 64, 128)
    assert got == [((4, 99, 1), *lead, 0, True, True), ((8, 13, 1), 128, 128, 128, 99, True, True)], got


def test_split_tail_splits_a_part_filled_last_wave():
    """`_split_tail`: 128 x 128 tiles at 1.45 waves (192 on 132 SMs: Llama-3.2-3B's (3072, 3072) at M = 1024, 8b
    q/o at M = 768) run one whole wave over the leading columns and the rest (64 tiles) in 2 splits; 256 x 128 tiles
    at 1.12 waves (Qwen2.5-7B's gate/up, 18944 columns, at M = 256: 148 tiles) one wave of them, then the last 2,048
    columns as 32 tiles of 128 x 128 in 4 splits; not where the rest cannot split to fit a wave (224 tiles: 96
    left), where the waves are whole, where no whole wave exists, or with fewer than 2 reduction steps per split."""
    pytest.importorskip("triton")
    from qpeft.triton_kernels import nf4_matmul as k

    t = k._SPLIT_TAIL_TILE
    big = k._FWD_GEMM_TILES_BOOK_WIDE[0]
    assert k._split_tail(big, 256, 18944, 1, 3584 // 128, 132) == ((132 * 128, big), 4)
    assert k._split_tail(big, 256, 28672, 1, 8192 // 128, 132) is None  # 70b gate/up: 92 of 224 left, 184 tiles
    assert k._split_tail(big, 256, 14336, 1, 4096 // 128, 132) is None  # 8b gate/up: 112 tiles, no whole wave
    cfg = k._fwd_config(256, 18944, 3584, torch.device("cpu"), register_book=True, wide=True)
    assert (cfg["LEAD"], cfg["SPLIT_K"], cfg["BLOCK_M"]) == ((16896, big), 4, 128), cfg
    # M = 65..256, where the 128-row split tile has more tiles than SMs unsplit: Qwen3-8B's gate/up forward (192
    # tiles) and the 70b down projection's dx (28672 dx columns: 448 tiles, 3.39 waves)
    cfg = k._fwd_config(256, 12288, 4096, torch.device("cpu"), register_book=True, wide=True)
    assert (cfg["LEAD"], cfg["SPLIT_K"]) == ((66 * 128, t), 2), cfg
    cfg = k._dx_config(256, 8192, 28672, torch.device("cpu"), register_book=True, wide=True)
    assert (cfg["LEAD"], cfg["SPLIT_N"]) == ((198 * 128, t), 2), cfg
    assert k._split_tail(t, 1024, 3072, 1, 3072 // 128, 132) == ((2048, t), 2)   # 8 x 16 tiles, then 8 x 8 split 2
    assert k._split_tail(t, 768, 4096, 1, 4096 // 128, 132) == ((2816, t), 2)    # 6 x 22, then 6 x 10 split 2
    assert k._split_tail(t, 1024, 3584, 1, 28, 132) is None    # 8 x 28: 96 tiles left, no split fits one wave
    assert k._split_tail(t, 1024, 4224, 1, 32, 132) is None    # 8 x 33 = 264: whole waves
    assert k._split_tail(t, 512, 4096, 1, 32, 132) is None     # 128 tiles: under one wave
    assert k._split_tail(t, 1024, 3072, 1, 3, 132) is None     # 3 reduction steps: not 2 per split
    cpu = torch.device("cpu")
    for config, split in ((k._fwd_config, "SPLIT_K"), (k._dx_config, "SPLIT_N")):
        cfg = config(1024, 3072, 3072, cpu, register_book=True, wide=True)
        assert (cfg["LEAD"], cfg[split]) == ((2048, t), 2) and tuple(cfg[n] for n in ("BLOCK_M", "BLOCK_N")) == (
            128, 128), cfg
        # the gather loader, fp32 activations and launches without the 16-divisibility keep one launch
        for kw in (dict(), dict(register_book=True), dict(register_book=True, wide=True, dtype=torch.float32)):
            assert "LEAD" not in config(1024, 3072, 3072, cpu, **kw), kw


def test_split_tail_plans_launch_a_whole_wave_then_the_split_rest():
    """Llama-3.2-3B's (3072, 3072) forward and dx at M = 1024 (wide launch, LoRA rank 16), recorded, not run: 8 x 16
    tiles of 128 x 128 x 128 over the first 2,048 columns, then 8 x 8 in 2 serial splits from column tile 16."""
    pytest.importorskip("triton")
    from qpeft.triton_kernels import nf4_matmul as k
    from utils import recorded_triton_launches

    M, N, K = 1024, 3072, 3072
    packed, state, _ = make_weight(N, K)
    p, a, c, bs, _, _, na, nc, off = weight_args(packed, state)
    x, b, dy, (xa, lB, lA) = _inputs(M, N, K, torch.bfloat16, r=16)
    for direction, start, split in (("fwd", "N_TILE_START", "SPLIT_K"), ("dx", "K_TILE_START", "SPLIT_N")):
        with recorded_triton_launches() as launches:
            if direction == "fwd":
                k.nf4_matmul_triton(x, p, a, c, bs, N, na, nc, off, b, xa, lB, 0.5)
            else:
                k.nf4_matmul_dx_triton(dy, p, a, c, bs, K, na, nc, off, dy @ lB, lA, 0.5)
        got = [(one.grid, one.kwargs["BLOCK_M"], one.kwargs["BLOCK_N"], one.kwargs["BLOCK_K"], one.kwargs[start],
                one.kwargs[split]) for one in launches]
        assert got == [((8, 16, 1), 128, 128, 128, 0, 1), ((8, 8, 2), 128, 128, 128, 16, 2)], (direction, got)


@pytest.mark.parametrize("M", [257, 1024, 4096])
@pytest.mark.parametrize("N,K", [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)])
def test_register_book_tiles_fill_128_of_132_sms_without_padding_m_twice(M, N, K):
    pytest.importorskip("triton")
    from qpeft.triton_kernels import nf4_matmul as k

    cpu = torch.device("cpu")  # pretends 132 SMs, as an H100
    assert M > k.SPLIT_MAX_M  # M <= 256 splits the reduction instead (the split tests below)
    wide_fwd = k._fwd_config(M, N, K, cpu, register_book=True, wide=True)
    for cfg, cols, col_key, tiles in (
            (k._fwd_config(M, N, K, cpu, register_book=True), N, "BLOCK_N", k._FWD_GEMM_TILES_BOOK),
            *(((wide_fwd, N, "BLOCK_N", k._FWD_GEMM_TILES_BOOK_WIDE),) if wide_fwd["SPLIT_K"] == 1 else ()),
            (k._dx_config(M, N, K, cpu, register_book=True), K, "BLOCK_K", k._DX_GEMM_TILES_BOOK),
            (k._dx_config(M, N, K, cpu, register_book=True, wide=True), K, "BLOCK_K", k._DX_GEMM_TILES_BOOK_WIDE)):
        programs = -(-M // cfg["BLOCK_M"]) * -(-cols // cfg[col_key])
        assert (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["num_warps"]) in [t[:4] for t in tiles], cfg
        assert programs >= 128 or (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]) == tiles[-1][:3], cfg
        assert cfg["BLOCK_M"] < 2 * M or cfg["BLOCK_M"] == 16, cfg


@pytest.mark.triton
@requires_triton_runtime
def test_tuner_measures_candidates_and_its_rows_build_a_table(capsys):
    """benchmarks/tune_nf4_matmul.py end to end on one tiny shape (CPU: the interpreter; its times mean
    nothing, the plumbing does): every candidate runs, and the rows give a table the dispatch can read. A second
    shape, due after the time budget is spent (a stand-in clock), is not started."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from benchmarks import tune_nf4_matmul as tune
    from qpeft.ops.nf4_matmul_dispatch import build_table, lookup_tuned

    dtype = torch.bfloat16 if triton_device() == "cuda" else torch.float16
    ticks = iter([0.0, 0.0, 600.0])  # the start, before shape 1, before shape 2
    rows = tune.measure([(128, 96), (256, 64)], [1, 20], dtype, triton_device(), quick=True, budget_s=480,
                        clock=lambda: next(ticks))
    assert {(r["K"], r["N"]) for r in rows} == {(128, 96)}
    assert "shapes [(256, 64)] not measured" in capsys.readouterr().out
    names = {(r["dir"], r["M"], r["candidate"]) for r in rows}
    for direction in ("fwd", "dx"):
        for M in (1, 20):
            assert (direction, M, "triton:default") in names and (direction, M, "dense") in names
    failed = [r["candidate"] for r in rows if r["backend"] == "triton" and not r["ms"] < float("inf")]
    assert not failed, f"candidates failed: {failed}"
    table = build_table(rows, (9, 0), "test")
    for direction in ("fwd", "dx"):
        plan = lookup_tuned({"T": table}, "T", (9, 0), direction, 20, 96, 128)
        assert plan.backend in ("cuda", "triton")


def test_tuner_shapes_and_budget_argument(capsys):
    """The tuner measures the k/v projection too (the dispatch uses a measured shape only within 2x of the
    weight's: no bench shape is near (4096, 1024)); its --budget-s must be a positive number of seconds."""
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from benchmarks import tune_nf4_matmul as tune

    assert (4096, 1024) in tune.TUNE_SHAPES and set(tune.GPU_SHAPES) <= set(tune.TUNE_SHAPES)
    for bad in ("0", "-5", "nan"):
        with pytest.raises(SystemExit):
            tune.main(["--budget-s", bad])
        assert "--budget-s: expected seconds > 0" in capsys.readouterr().err


def test_tuner_candidates_include_the_serial_splits():
    """The tuner measures the launchers' split plans too (M <= 256: each split tile that pads M by less than 2x at
    SPLIT_K / SPLIT_N 2, 4, 8, dx's narrow-reduction tiles unsplit as well), named apart, and no split above
    M = 256."""
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from benchmarks import tune_nf4_matmul as tune

    for direction, key in (("fwd", "SPLIT_K"), ("dx", "SPLIT_N")):
        # the forward's split tiles have 64 / 128 rows (not for M <= 16, the decode range); dx has a 16-row one
        for M, splits in ((16, {1, 2, 4, 8} if direction == "dx" else {1}), (64, {1, 2, 4, 8}),
                          (200, {1, 2, 4, 8}), (1024, {1})):
            cands = tune.triton_candidates(direction, M, quick=False)
            assert {c[key] for c in cands} == splits, (direction, M)
            names = [tune._name(c) for c in cands]
            assert len(names) == len(set(names)), (direction, M)
            # the forward's narrow-N split tiles as launched: the last split keeps its own partial
            keeps = {(c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]) for c in cands if c.get("KEEP_OWN_PARTIAL")}
            assert keeps == ({(64, 128, 128), (64, 64, 256)} if direction == "fwd" and M in (64, 200) else set()), \
                (direction, M, keeps)
            # the forward's 64 x 256 x 128 split (measured, not dispatched), dx's unsplit 64-row narrow tiles
            tiles = {(c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], c[key]) for c in cands}
            if M == 200:
                assert ({(64, 256, 128, s) for s in (2, 4, 8)} if direction == "fwd" else
                        {(64, 256, 128, 1), (64, 128, 128, 1)}) <= tiles, (direction, tiles)
    assert tune._name(dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, num_warps=8, num_stages=3, SPLIT_K=4)) == \
        "triton:64x64x128w8s3k4"


@pytest.mark.parametrize("M", [17, 40, 64, 65, 128, 200, 256, 768, 1024, 4096])
@pytest.mark.parametrize("N,K", [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (8192, 8192),
                                 (28672, 8192), (1024, 320), (1024, 8192)])
@pytest.mark.parametrize("wide", [False, True])
def test_register_book_forward_splits_k_to_fill_the_gpu(M, N, K, wide):
    """M = 17..256 (`_split_k_config`): one tile of 64 rows (or 128 with the wide launch's 16-divisibility above
    M = 64) covers M, and K is split until the programs fill the 132 SMs (x2 where two CTAs fit), with at least two
    K steps per split (wide, where 128-row tiles would reach at most half the SMs split 8 ways, 64 x 128 x 128:
    k/v at M = 65..128; and where 64 x 128 x 128 moves at least 1/8 fewer bytes through L2, `_split_l2_bytes`: 8b
    k/v at M = 256); the 16-warp 256 x 128 tile unsplit where N alone fills 3/4 of the SMs (wide, M > 128). Above
    M = 256 the split only where 256 x 128 tiles would not reach a quarter of the SMs (k/v at M = 1024)."""
    pytest.importorskip("triton")
    from qpeft.triton_kernels import nf4_matmul as k

    cpu = torch.device("cpu")  # pretends 132 SMs, as an H100
    cfg = k._fwd_config(M, N, K, cpu, register_book=True, wide=wide)
    tile = (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["num_warps"], cfg.get("num_stages"))
    split = cfg["SPLIT_K"]
    tiles = -(-M // tile[0]) * -(-N // tile[1])
    few = wide and 4 * -(-M // 256) * -(-N // 128) < 132  # 256 x 128 tiles would not reach a quarter of the SMs
    if M > k.SPLIT_MAX_M and not few:  # the GEMM tile lists (the test above)
        assert tile in k._FWD_GEMM_TILES_BOOK_WIDE + k._FWD_GEMM_TILES_BOOK, cfg
        if split > 1:  # a last part-filled wave's columns split, after whole waves of a 16-warp tile (`_split_tail`)
            lead = cfg["LEAD"][1]
            assert wide and tile == k._SPLIT_TAIL_TILE and lead in k._FWD_GEMM_TILES_BOOK_WIDE, cfg
            assert (cfg["LEAD"], split) == k._split_tail(lead, M, N, 1, K // tile[2], 132), cfg
    elif tile == k._FWD_GEMM_TILES_BOOK_WIDE[0]:
        assert wide and M > 128 and split == 1 and 4 * -(-N // 128) >= 3 * 132, cfg
    elif tile in (k._SPLIT_TILE, k._SPLIT_TILE_WIDE, k._SPLIT_TILE_WIDE_NARROW_N, k._SPLIT_TILE_NARROW_N,
                  k._SPLIT_TILE_NARROW_N_SMALL_M):
        # wide: 128-row tiles, unless split the most they can be they reach at most half the SMs (then 64 x 128)
        half = 2 * -(-M // 128) * -(-N // 128) * k.MAX_SPLIT_K <= 132
        if M > 64 and wide:
            fewer = k._split_l2_bytes(M, N, K, k._SPLIT_TILE_WIDE_NARROW_N, 132) < \
                7 / 8 * k._split_l2_bytes(M, N, K, k._SPLIT_TILE_WIDE, 132)
            assert tile == (k._SPLIT_TILE_WIDE_NARROW_N if half or fewer else k._SPLIT_TILE_WIDE), cfg
        elif M > 64:
            assert tile == k._SPLIT_TILE, cfg
        elif N > 2048:
            assert tile == k._SPLIT_TILE, cfg
        else:
            assert tile == (k._SPLIT_TILE_NARROW_N_SMALL_M if M <= 32 else k._SPLIT_TILE_NARROW_N), cfg
        assert 1 <= split <= k.MAX_SPLIT_K and (split == 1 or K // (split * tile[2]) >= 2), cfg
        target = 132 * (2 if wide and tile == k._SPLIT_TILE else 1)
        # the split brings the programs up to the target and never past it (a program past the SMs is a second
        # wave), unless capped (MAX_SPLIT_K, or too few K steps)
        capped = split in (k.MAX_SPLIT_K, max(1, K // (2 * tile[2])))
        assert capped or tiles * (split + 1) > target, cfg
        assert split == 1 or tiles * split <= target, cfg
        if (M, N, K, wide) == (768, 1024, 4096, True):  # 48 tiles: 96 programs, not 144 (1.09 waves)
            assert (tile, split) == (k._SPLIT_TILE_WIDE, 2), cfg
        # by L2 bytes: 8b k/v at M = 256 takes the 64-row tile (half the split, 13% fewer bytes); q/o at M = 128
        # (3% fewer) and 70b k/v at M = 256 (1%) keep the 128-row one, as q/o at M = 256 (more bytes)
        narrow, big = k._SPLIT_TILE_WIDE_NARROW_N, k._SPLIT_TILE_WIDE
        want = {(256, 1024, 4096): (narrow, 4), (128, 4096, 4096): (big, 4), (256, 4096, 4096): (big, 2),
                (256, 4096, 14336): (big, 2), (256, 1024, 8192): (big, 8)}
        if wide and (M, N, K) in want:
            assert (tile, split) == want[M, N, K], cfg
    else:  # enough tiles without a split, no wide launch: the GEMM tile list
        assert not wide and M > 64 and split == 1 and tile in k._FWD_GEMM_TILES_BOOK, cfg
    for dtype in (torch.float32,):  # fp32 activations never split serially (their split-K is the fp32 output)
        assert k._fwd_config(M, N, K, cpu, dtype, register_book=True, wide=wide)["SPLIT_K"] == 1


def test_split_l2_bytes_counts_rereads_and_partials():
    """`_split_l2_bytes`, by hand on k/v (4096 -> 1024) at M = 256: 128 x 128 x 128 is 16 tiles split 8 (x re-read
    by 8 column tiles, W by 2 row tiles, 16 partial tiles); 64 x 128 x 128 is 32 tiles split 4 (W by 4 row tiles,
    7 partial tiles: it keeps its own). q/o (4096, 4096) at M = 256 on 128 x 128 x 128: 64 tiles split 2, 3 partial
    tiles. Unsplit: no partials."""
    pytest.importorskip("triton")
    from qpeft.triton_kernels import nf4_matmul as k

    M, N, K = 256, 1024, 4096
    x, w, out = M * K * 2, N * K * 0.52, M * N * 4
    assert k._split_l2_bytes(M, N, K, k._SPLIT_TILE_WIDE, 132) == pytest.approx(8 * x + 2 * w + 16 * out)
    assert k._split_l2_bytes(M, N, K, k._SPLIT_TILE_WIDE_NARROW_N, 132) == pytest.approx(8 * x + 4 * w + 7 * out)
    N = 4096
    x, w, out = M * K * 2, N * K * 0.52, M * N * 4
    assert k._split_l2_bytes(M, N, K, k._SPLIT_TILE_WIDE, 132) == pytest.approx(32 * x + 2 * w + 3 * out)
    assert k._split_l2_bytes(M, N, K, k._SPLIT_TILE_WIDE, 8) == pytest.approx(32 * x + 2 * w)  # 64 tiles: unsplit


@pytest.mark.parametrize("M", [1, 9, 16, 17, 48, 64, 65, 96, 128, 256])
@pytest.mark.parametrize("N,K", [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (8192, 8192),
                                 (8192, 28672), (1024, 320), (1024, 8192)])
@pytest.mark.parametrize("wide", [False, True])
def test_register_book_dx_splits_n_to_fill_the_gpu(M, N, K, wide):
    """dx at M <= 256 (`_dx_split_config`): 16-row tiles up to M = 16 (unsplit 16 x 128 x 32 when K alone gives
    3 programs per SM), 64-row ones up to 64 and without the 16-divisibility, 128-row 16-warp ones above with it;
    the N reduction split until the programs are nearest their target, at least two N steps per split, and no
    further than keeps the fp32 partials within 4x the weight's bytes (k/v, N = 1024: M = 64 4 splits, M = 128 2)."""
    pytest.importorskip("triton")
    from qpeft.triton_kernels import nf4_matmul as k

    cpu = torch.device("cpu")  # pretends 132 SMs, as an H100
    cfg = k._dx_config(M, N, K, cpu, register_book=True, wide=wide)
    tile = (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["num_warps"], cfg.get("num_stages"))
    split = cfg["SPLIT_N"]
    if "LEAD" in cfg:  # more 128-row tiles than SMs unsplit: whole waves, then the rest split (`_split_tail`)
        assert wide and tile == k._SPLIT_TAIL_TILE and split > 1, cfg
        assert (cfg["LEAD"], split) == k._split_tail(tile, M, K, 2, N // 128, 132), cfg
        return
    if tile == k._DX_DECODE_TILE_BOOK:
        assert M <= 16 and split == 1 and -(-K // 32) >= 3 * 132, cfg
        return
    if M <= 16:
        want, target = k._DX_SPLIT_TILE_DECODE, 4 * 132
    elif wide and M > 64:
        want, target = k._DX_SPLIT_TILE_WIDE, 132
        if tile[0] == 64:  # 64-row tiles unsplit, where the 128-row split's partials would reach 4x the weight's
            # bytes (8 bytes per element per split against half a byte per weight); 256-row N steps where N is
            # whole steps of them
            assert tile == (k._DX_SPLIT_TILE_WIDE_NARROW_N if N % 256 == 0 else
                            k._DX_SPLIT_TILE_WIDE_NARROW_N_SHORT), cfg
            s128 = min(k._split_count(132, -(-M // 128) * -(-K // 128), N // 128), k._dx_partials_cap(M, N))
            assert split == 1 and s128 > 1 and 8 * s128 * M * K >= 4 * N * K / 2, cfg
            assert -(-M // 64) * -(-K // 128) >= 128, cfg  # ... and the 64-row tiles alone fill the SMs
            return
        assert (N, K, M) != (1024, 8192, 128), cfg  # 70b k/v at M = 128 takes the 64-row tiles
    else:
        want, target = k._DX_SPLIT_TILE, 132 * (2 if M <= 64 else 1)
    assert tile == want, cfg
    tiles = -(-M // tile[0]) * -(-K // tile[2])
    assert 1 <= split <= k.MAX_SPLIT_K and (split == 1 or N // (split * tile[1]) >= 2), cfg
    # the partials' cap: 8 bytes per output element per split within 4x the weight's half byte per weight
    partials_cap = max(2, 1 << (max(1, N // (4 * M)).bit_length() - 1))
    assert split <= partials_cap and (split <= 2 or 8 * split * M * K <= 4 * N * K / 2), cfg
    if (N, K) == (1024, 4096) and M in (64, 128):  # 8b k/v: the fill rule's 8 / 4 splits, capped
        assert split == {64: 4, 128: 2}[M], cfg
    capped = split in (k.MAX_SPLIT_K, max(1, N // (2 * tile[1])), partials_cap)
    assert capped or tiles * (split + 1) > target, cfg
    assert split == 1 or tiles * split <= target, cfg
    assert "SPLIT_N" not in k._dx_config(M, N, K, cpu, torch.float32, register_book=True, wide=wide)

