"""L2 ops of the grouped NF4 experts path (mixture-of-experts with 4-bit fused expert weights).

  qpeft::grouped_nf4_route(top_k_index, num_experts) -> (perm, token, seg_start)        all int32
  qpeft::grouped_nf4_matmul(a, a_index, packed, absmax, code, blocksize, N, transposed, nested_absmax,
        nested_code, offset, seg_start, out_index, bias, lora_xa, lora_B, lora_scale) -> (S, N)
  qpeft::grouped_nf4_matmul_dx(dy, dy_index, packed, absmax, code, blocksize, K, transposed, nested_absmax,
        nested_code, offset, seg_start, out_index, lora_dyb, lora_A, lora_scale) -> (S, K)
  qpeft::grouped_lora_shrink(a, a_index, A, seg_start) -> (S, r) fp32
  qpeft::grouped_lora_grad(u, u_index, v, v_index, seg_start, scale) -> (E, P, Q) fp32

Math and the on-device layout: reference/grouped_nf4.py. Shapes (E experts, S slots = sorted (token, expert)
pairs; `*_index` gather input rows per slot, `out_index` scatters output rows and must be a permutation of
range(S)): packed uint8 (E, (R*C+1)//2), absmax fp32 (E, blocks) or uint8 with nested_absmax fp32
(E, ceil(blocks/256)), nested_code fp32 (256,), offset fp32 (E,); code fp32 (16,); the slice (R, C) is (N, K)
or, `transposed`, (K, N); seg_start int32 (E+1,); bias (E, N); lora_xa (S, r), lora_B (E, N, r),
lora_dyb (S, r), lora_A (E, r, K) (LoRA and bias tensors in any strides, any float dtype: products run in the
activations' dtype with fp32 accumulation).

Backends: Triton on CUDA tensors (there is no CUDA C++ kernel for these ops yet: Triton's wgmma tiles are the
first target on Hopper), else the reference; CPU tensors use the reference unless QPEFT_BACKEND=triton with
TRITON_INTERPRET=1. Nothing is read back to the host on CUDA and grids depend on shapes only.

Expert ids are data. An id outside [0, num_experts) (a custom router's bug) is rejected by the route op:
on CPU exactly (ValueError naming top_k_index, the range and the offending values); on CUDA reading the ids
would be a host sync per MoE layer, so it is a device-side assert (torch._assert_async, the mechanism torch
itself uses for out-of-range embedding / gather indices) carrying the same message; the kernels never read
out of bounds whatever the ids (an id outside the range falls outside every segment). The other ops check
their segment table and indices the same way (exact on CPU, device asserts on CUDA).
"""
from __future__ import annotations

import torch
from torch.library import custom_op, register_fake

from .._backend import select as _select_backend  # not `from .. import _backend`: qpeft.__getattr__
from ..reference import grouped_nf4 as ref
from ..reference.nf4_matmul import NESTED_BLOCKSIZE

__all__: list[str] = []  # ops are reached as torch.ops.qpeft.grouped_*

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_INDEX = (torch.int32, torch.int64)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


# ------------------------------------------------------------------------------------------------ checks
def _check_index(where: str, name: str, t: torch.Tensor | None, rows: int | None, device) -> None:
    if t is None:
        return
    torch._check(t.dim() == 1 and (rows is None or t.shape[0] == rows),
                 lambda: f"{where}: {name} must be 1-D ({rows},) (one entry per slot), got {tuple(t.shape)}")
    torch._check(t.dtype in _INDEX, lambda: f"{where}: {name} must be int32 or int64, got {t.dtype}")
    torch._check(t.device == device, lambda: f"{where}: {name} is on {t.device}, expected {device}")


def _check_segments(where: str, seg_start: torch.Tensor, E: int, device) -> None:
    torch._check(seg_start.dim() == 1 and seg_start.shape[0] == E + 1,
                 lambda: f"{where}: seg_start must be ({E + 1},) (num_experts + 1), got {tuple(seg_start.shape)}")
    torch._check(seg_start.dtype == torch.int32, lambda: f"{where}: seg_start must be int32, got {seg_start.dtype}")
    torch._check(seg_start.device == device,
                 lambda: f"{where}: seg_start is on {seg_start.device}, expected {device}")


def _check_rows(where: str, name: str, t: torch.Tensor, cols: int | None, device, dtypes=_FLOATS) -> None:
    torch._check(t.dim() == 2, lambda: f"{where}: {name} must be 2-D, got shape {tuple(t.shape)}")
    torch._check(cols is None or t.shape[1] == cols,
                 lambda: f"{where}: {name} must have {cols} columns, got shape {tuple(t.shape)}")
    torch._check(t.dtype in dtypes, lambda: f"{where}: {name} must be float32/float16/bfloat16, got {t.dtype}")
    torch._check(t.device == device, lambda: f"{where}: {name} is on {t.device}, expected {device}")


def check_expert_weight(where: str, device, packed, absmax, code, blocksize: int, rows: int, cols: int,
                        nested_absmax, nested_code, offset) -> int:
    """Validate a 4-bit expert stack whose slices are (rows, cols); returns E. torch._check: traceable."""
    torch._check(blocksize in BLOCKSIZES, lambda: f"{where}: blocksize must be one of {BLOCKSIZES}, got {blocksize}")
    torch._check(rows > 0 and cols > 0, lambda: f"{where}: expert slices must be non-empty, got ({rows}, {cols})")
    torch._check(packed.dim() == 2 and packed.dtype == torch.uint8,
                 lambda: f"{where}: packed must be uint8 (num_experts, bytes), got {packed.dtype} "
                         f"{tuple(packed.shape)}")
    E = packed.shape[0]
    nbytes = (rows * cols + 1) // 2
    torch._check(E >= 1 and packed.shape[1] == nbytes,
                 lambda: f"{where}: packed must be (num_experts, {nbytes}) ((rows*cols+1)//2 bytes per expert for "
                         f"slices ({rows}, {cols})), got {tuple(packed.shape)}")
    torch._check(packed.is_contiguous(), lambda: f"{where}: packed must be contiguous")
    blocks = (rows * cols + blocksize - 1) // blocksize
    torch._check(absmax.dim() == 2 and tuple(absmax.shape) == (E, blocks) and absmax.stride(1) == 1,
                 lambda: f"{where}: absmax must be ({E}, {blocks}) (ceil(rows*cols/blocksize) per expert, "
                         f"row-contiguous), got {tuple(absmax.shape)}")
    torch._check(code.dtype == torch.float32 and code.numel() == 16 and code.is_contiguous(),
                 lambda: f"{where}: code must be a contiguous float32 tensor of 16 entries, got {code.dtype} "
                         f"{tuple(code.shape)}")
    nested = nested_absmax is not None
    torch._check(nested == (nested_code is not None) == (offset is not None),
                 lambda: f"{where}: nested_absmax, nested_code and offset must be given together (double quant)")
    if nested:
        torch._check(absmax.dtype == torch.uint8,
                     lambda: f"{where}: absmax must be uint8 codes with double quant, got {absmax.dtype}")
        nb = (blocks + NESTED_BLOCKSIZE - 1) // NESTED_BLOCKSIZE
        torch._check(nested_absmax.dtype == torch.float32 and tuple(nested_absmax.shape) == (E, nb)
                     and nested_absmax.stride(1) == 1,
                     lambda: f"{where}: nested_absmax must be float32 ({E}, {nb}), got {nested_absmax.dtype} "
                             f"{tuple(nested_absmax.shape)}")
        torch._check(nested_code.dtype == torch.float32 and nested_code.numel() == 256 and nested_code.is_contiguous(),
                     lambda: f"{where}: nested_code must be a contiguous float32 tensor of 256 entries, got "
                             f"{nested_code.dtype} {tuple(nested_code.shape)}")
        torch._check(offset.dtype == torch.float32 and offset.dim() == 1 and offset.shape[0] == E
                     and offset.is_contiguous(),
                     lambda: f"{where}: offset must be float32 ({E},) (one per expert), got {offset.dtype} "
                             f"{tuple(offset.shape)}")
    else:
        torch._check(absmax.dtype == torch.float32, lambda: f"{where}: absmax must be float32, got {absmax.dtype}")
    for name, t in (("packed", packed), ("absmax", absmax), ("code", code), ("nested_absmax", nested_absmax),
                    ("nested_code", nested_code), ("offset", offset)):
        if t is not None:
            torch._check(t.device == device, lambda: f"{where}: {name} is on {t.device}, expected {device}")
    return E


def _check_expert_tensor(where: str, name: str, t: torch.Tensor | None, shape: tuple, device) -> None:
    if t is None:
        return
    torch._check(t.dim() == len(shape) and tuple(t.shape) == shape,
                 lambda: f"{where}: {name} must have shape {shape}, got {tuple(t.shape)}")
    torch._check(t.dtype in _FLOATS, lambda: f"{where}: {name} must be a float tensor, got {t.dtype}")
    torch._check(t.device == device, lambda: f"{where}: {name} is on {t.device}, expected {device}")


def _host_checks(device: torch.device) -> bool:
    """Whether data checks may read values on the host (CPU tensors). Elsewhere they are device-side asserts;
    tests replace this to run that branch on the CPU (torch._assert_async raises there at once)."""
    return device.type == "cpu"


def _check_values(where: str, seg_start: torch.Tensor, S: int, indices: tuple) -> None:
    """Data checks: exact on CPU (ValueError); device-side asserts on CUDA (no host sync).
    indices: ((name, tensor or None, exclusive upper bound), ...)."""
    mono = (seg_start[1:] >= seg_start[:-1]).all()
    seg_ok = mono & (seg_start[0] == 0) & (seg_start[-1] == S)
    checks = [(seg_ok, f"seg_start must rise from 0 to the slot count {S}")]
    for name, t, bound in indices:
        if t is not None and t.numel():
            checks.append((((t >= 0) & (t < bound)).all(), f"{name} values must be in [0, {bound})"))
            if name == "out_index":  # every output row written exactly once (else rows stay uninitialized)
                ok = (torch.sort(t.to(torch.int64)).values == torch.arange(S, device=t.device)).all()
                checks.append((ok, f"out_index must be a permutation of range({S})"))
    if _host_checks(seg_start.device):
        for ok, msg in checks:
            if not bool(ok):
                raise ValueError(f"{where}: {msg}")
    else:
        for ok, msg in checks:
            torch._assert_async(ok, f"{where}: {msg}")


def _impl(op: str, device: torch.device) -> str:
    return _select_backend(op, device, cuda=False, triton=True)


# ------------------------------------------------------------------------------------------------ routing
def _check_route(top_k_index: torch.Tensor, num_experts: int) -> None:
    w = "grouped_nf4_route"
    torch._check(top_k_index.dim() in (1, 2),
                 lambda: f"{w}: top_k_index must be (tokens, top_k) (or 1-D), got {tuple(top_k_index.shape)}")
    torch._check(top_k_index.dtype in _INDEX,
                 lambda: f"{w}: top_k_index must be int32 or int64, got {top_k_index.dtype}")
    torch._check(num_experts >= 1, lambda: f"{w}: num_experts must be >= 1, got {num_experts}")


def _route_empty(top_k_index: torch.Tensor, num_experts: int):
    S = top_k_index.numel()
    return (top_k_index.new_empty((S,), dtype=torch.int32), top_k_index.new_empty((S,), dtype=torch.int32),
            top_k_index.new_empty((num_experts + 1,), dtype=torch.int32))


@custom_op("qpeft::grouped_nf4_route", mutates_args=())
def grouped_nf4_route(top_k_index: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(perm, token, seg_start) int32: the S = tokens * top_k (token, expert) pairs sorted (stably) by expert id;
    sorted slot s is pair perm[s] = token[s] * top_k + j, expert e owns slots seg_start[e] : seg_start[e+1]."""
    _check_route(top_k_index, num_experts)
    ok = ((top_k_index >= 0) & (top_k_index < num_experts)).all()
    msg = (f"grouped_nf4_route: top_k_index (the router's expert ids) must be in [0, {num_experts}) "
           f"(num_experts = {num_experts})")
    if _host_checks(top_k_index.device):
        if not bool(ok):
            bad = top_k_index[(top_k_index < 0) | (top_k_index >= num_experts)]
            raise ValueError(f"{msg}, got {bad.numel()} out-of-range ids, e.g. {bad[:8].tolist()}")
    else:
        torch._assert_async(ok, msg)
    return ref.route_ref(top_k_index, num_experts)


@register_fake("qpeft::grouped_nf4_route")
def _(top_k_index, num_experts):
    _check_route(top_k_index, num_experts)
    return _route_empty(top_k_index, num_experts)


# ------------------------------------------------------------------------------------------------ forward GEMM
def _check_fwd(a, a_index, packed, absmax, code, blocksize, N, transposed, nested_absmax, nested_code, offset,
               seg_start, out_index, bias, lora_xa, lora_B):
    w = "grouped_nf4_matmul"
    _check_rows(w, "a", a, None, a.device)
    K = a.shape[1]
    E = check_expert_weight(w, a.device, packed, absmax, code, blocksize, K if transposed else N,
                            N if transposed else K, nested_absmax, nested_code, offset)
    S = a_index.shape[0] if a_index is not None else a.shape[0]
    _check_index(w, "a_index", a_index, None, a.device)
    _check_index(w, "out_index", out_index, S, a.device)
    _check_segments(w, seg_start, E, a.device)
    _check_expert_tensor(w, "bias", bias, (E, N), a.device)
    torch._check((lora_xa is None) == (lora_B is None), lambda: f"{w}: lora_xa and lora_B must be given together")
    if lora_xa is not None:
        _check_rows(w, "lora_xa", lora_xa, None, a.device)
        torch._check(lora_xa.shape[0] == S, lambda: f"{w}: lora_xa must be ({S}, r), got {tuple(lora_xa.shape)}")
        _check_expert_tensor(w, "lora_B", lora_B, (E, N, lora_xa.shape[1]), a.device)
    return S, E


@custom_op("qpeft::grouped_nf4_matmul", mutates_args=())
def grouped_nf4_matmul(a: torch.Tensor, a_index: torch.Tensor | None, packed: torch.Tensor, absmax: torch.Tensor,
                       code: torch.Tensor, blocksize: int, N: int, transposed: bool,
                       nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None,
                       offset: torch.Tensor | None, seg_start: torch.Tensor, out_index: torch.Tensor | None,
                       bias: torch.Tensor | None, lora_xa: torch.Tensor | None, lora_B: torch.Tensor | None,
                       lora_scale: float) -> torch.Tensor:
    """(S, N) in a's dtype: row out_index[s] (or s) = a[a_index[s]] @ W_e^T + bias[e] + lora_scale xa[s] B_e^T."""
    S, _ = _check_fwd(a, a_index, packed, absmax, code, blocksize, N, transposed, nested_absmax, nested_code,
                      offset, seg_start, out_index, bias, lora_xa, lora_B)
    _check_values("grouped_nf4_matmul", seg_start, S, (("a_index", a_index, a.shape[0]), ("out_index", out_index, S)))
    a = a.contiguous()
    if _impl("grouped_nf4_matmul", a.device) == "triton":
        from qpeft.triton_kernels.grouped_nf4 import grouped_nf4_matmul_triton

        return grouped_nf4_matmul_triton(a, a_index, packed, absmax, code, blocksize, N, transposed, nested_absmax,
                                         nested_code, offset, seg_start, out_index, bias,
                                         None if lora_xa is None else lora_xa.contiguous(), lora_B, lora_scale)
    return ref.grouped_nf4_matmul_ref(a, a_index, packed, absmax, code, blocksize, N, transposed, nested_absmax,
                                      nested_code, offset, seg_start, out_index, bias, lora_xa, lora_B, lora_scale)


@register_fake("qpeft::grouped_nf4_matmul")
def _(a, a_index, packed, absmax, code, blocksize, N, transposed, nested_absmax, nested_code, offset, seg_start,
      out_index, bias, lora_xa, lora_B, lora_scale):
    S, _ = _check_fwd(a, a_index, packed, absmax, code, blocksize, N, transposed, nested_absmax, nested_code,
                      offset, seg_start, out_index, bias, lora_xa, lora_B)
    return a.new_empty((S, N))


# ------------------------------------------------------------------------------------------------ dX GEMM
def _check_dx(dy, dy_index, packed, absmax, code, blocksize, K, transposed, nested_absmax, nested_code, offset,
              seg_start, out_index, lora_dyb, lora_A):
    w = "grouped_nf4_matmul_dx"
    _check_rows(w, "dy", dy, None, dy.device)
    N = dy.shape[1]
    E = check_expert_weight(w, dy.device, packed, absmax, code, blocksize, K if transposed else N,
                            N if transposed else K, nested_absmax, nested_code, offset)
    S = dy_index.shape[0] if dy_index is not None else dy.shape[0]
    _check_index(w, "dy_index", dy_index, None, dy.device)
    _check_index(w, "out_index", out_index, S, dy.device)
    _check_segments(w, seg_start, E, dy.device)
    torch._check((lora_dyb is None) == (lora_A is None), lambda: f"{w}: lora_dyb and lora_A must be given together")
    if lora_dyb is not None:
        _check_rows(w, "lora_dyb", lora_dyb, None, dy.device)
        torch._check(lora_dyb.shape[0] == S, lambda: f"{w}: lora_dyb must be ({S}, r), got {tuple(lora_dyb.shape)}")
        _check_expert_tensor(w, "lora_A", lora_A, (E, lora_dyb.shape[1], K), dy.device)
    return S, E


@custom_op("qpeft::grouped_nf4_matmul_dx", mutates_args=())
def grouped_nf4_matmul_dx(dy: torch.Tensor, dy_index: torch.Tensor | None, packed: torch.Tensor,
                          absmax: torch.Tensor, code: torch.Tensor, blocksize: int, K: int, transposed: bool,
                          nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None,
                          offset: torch.Tensor | None, seg_start: torch.Tensor, out_index: torch.Tensor | None,
                          lora_dyb: torch.Tensor | None, lora_A: torch.Tensor | None,
                          lora_scale: float) -> torch.Tensor:
    """(S, K) in dy's dtype: row out_index[s] (or s) = dy[dy_index[s]] @ W_e + lora_scale dyb[s] A_e."""
    S, _ = _check_dx(dy, dy_index, packed, absmax, code, blocksize, K, transposed, nested_absmax, nested_code,
                     offset, seg_start, out_index, lora_dyb, lora_A)
    _check_values("grouped_nf4_matmul_dx", seg_start, S,
                  (("dy_index", dy_index, dy.shape[0]), ("out_index", out_index, S)))
    dy = dy.contiguous()
    if _impl("grouped_nf4_matmul_dx", dy.device) == "triton":
        from qpeft.triton_kernels.grouped_nf4 import grouped_nf4_matmul_dx_triton

        return grouped_nf4_matmul_dx_triton(dy, dy_index, packed, absmax, code, blocksize, K, transposed,
                                            nested_absmax, nested_code, offset, seg_start, out_index,
                                            None if lora_dyb is None else lora_dyb.contiguous(), lora_A, lora_scale)
    return ref.grouped_nf4_matmul_dx_ref(dy, dy_index, packed, absmax, code, blocksize, K, transposed, nested_absmax,
                                         nested_code, offset, seg_start, out_index, lora_dyb, lora_A, lora_scale)


@register_fake("qpeft::grouped_nf4_matmul_dx")
def _(dy, dy_index, packed, absmax, code, blocksize, K, transposed, nested_absmax, nested_code, offset, seg_start,
      out_index, lora_dyb, lora_A, lora_scale):
    S, _ = _check_dx(dy, dy_index, packed, absmax, code, blocksize, K, transposed, nested_absmax, nested_code,
                     offset, seg_start, out_index, lora_dyb, lora_A)
    return dy.new_empty((S, K))


# ------------------------------------------------------------------------------------------------ LoRA shrink
def _check_shrink(a, a_index, A, seg_start):
    w = "grouped_lora_shrink"
    _check_rows(w, "a", a, None, a.device)
    torch._check(A.dim() == 3 and A.shape[2] == a.shape[1] and A.shape[1] >= 1,
                 lambda: f"{w}: A must be (num_experts, r, {a.shape[1]}), got {tuple(A.shape)}")
    torch._check(A.dtype in _FLOATS, lambda: f"{w}: A must be a float tensor, got {A.dtype}")
    torch._check(A.device == a.device, lambda: f"{w}: A is on {A.device}, expected {a.device}")
    _check_index(w, "a_index", a_index, None, a.device)
    _check_segments(w, seg_start, A.shape[0], a.device)
    return a_index.shape[0] if a_index is not None else a.shape[0]


@custom_op("qpeft::grouped_lora_shrink", mutates_args=())
def grouped_lora_shrink(a: torch.Tensor, a_index: torch.Tensor | None, A: torch.Tensor,
                        seg_start: torch.Tensor) -> torch.Tensor:
    """(S, r) fp32: xa[s] = a[a_index[s]] @ A[e]^T for the expert e owning slot s."""
    S = _check_shrink(a, a_index, A, seg_start)
    _check_values("grouped_lora_shrink", seg_start, S, (("a_index", a_index, a.shape[0]),))
    a = a.contiguous()
    if _impl("grouped_lora_shrink", a.device) == "triton":
        from qpeft.triton_kernels.grouped_nf4 import grouped_lora_shrink_triton

        return grouped_lora_shrink_triton(a, a_index, A, seg_start)
    return ref.grouped_lora_shrink_ref(a, a_index, A, seg_start)


@register_fake("qpeft::grouped_lora_shrink")
def _(a, a_index, A, seg_start):
    S = _check_shrink(a, a_index, A, seg_start)
    return a.new_empty((S, A.shape[1]), dtype=torch.float32)


# ------------------------------------------------------------------------------------------------ LoRA grads
def _check_grad(u, u_index, v, v_index, seg_start):
    w = "grouped_lora_grad"
    _check_rows(w, "u", u, None, u.device)
    _check_rows(w, "v", v, None, u.device)
    _check_index(w, "u_index", u_index, None, u.device)
    S = u_index.shape[0] if u_index is not None else u.shape[0]
    Sv = v_index.shape[0] if v_index is not None else v.shape[0]
    torch._check(S == Sv, lambda: f"{w}: u and v must cover the same {S} slots, got {Sv} for v")
    _check_index(w, "v_index", v_index, S, u.device)
    torch._check(seg_start.dim() == 1 and seg_start.shape[0] >= 2,
                 lambda: f"{w}: seg_start must be (num_experts + 1,), got {tuple(seg_start.shape)}")
    _check_segments(w, seg_start, seg_start.shape[0] - 1, u.device)
    return S, seg_start.shape[0] - 1


@custom_op("qpeft::grouped_lora_grad", mutates_args=())
def grouped_lora_grad(u: torch.Tensor, u_index: torch.Tensor | None, v: torch.Tensor, v_index: torch.Tensor | None,
                      seg_start: torch.Tensor, scale: float) -> torch.Tensor:
    """(E, P, Q) fp32: C[e] = scale * sum over expert e's slots s of u[u_index[s]]^T v[v_index[s]]."""
    S, _ = _check_grad(u, u_index, v, v_index, seg_start)
    _check_values("grouped_lora_grad", seg_start, S,
                  (("u_index", u_index, u.shape[0]), ("v_index", v_index, v.shape[0])))
    u, v = u.contiguous(), v.contiguous()
    if _impl("grouped_lora_grad", u.device) == "triton":
        from qpeft.triton_kernels.grouped_nf4 import grouped_lora_grad_triton

        return grouped_lora_grad_triton(u, u_index, v, v_index, seg_start, scale)
    return ref.grouped_lora_grad_ref(u, u_index, v, v_index, seg_start, scale)


@register_fake("qpeft::grouped_lora_grad")
def _(u, u_index, v, v_index, seg_start, scale):
    _, E = _check_grad(u, u_index, v, v_index, seg_start)
    return u.new_empty((E, u.shape[1], v.shape[1]), dtype=torch.float32)
