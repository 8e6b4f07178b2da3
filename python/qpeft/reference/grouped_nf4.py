"""Pure-PyTorch reference of the grouped NF4 expert ops (CPU path, fallback, test oracle).

Mixture-of-experts layers in transformers 5 hold their experts as fused 3-D parameters (E experts):
Qwen2/3-MoE, Mixtral, OLMoE, DeepSeek-V3, ... store gate_up_proj (E, 2I, H) and down_proj (E, H, I), each
expert's slice in nn.Linear's (out, in) orientation; gpt-oss stores them transposed, (E, H, 2I) and (E, I, H),
i.e. (in, out), with biases (E, 2I) / (E, H).

4-bit layout of one such parameter (`GroupedNF4Weight` in qpeft.autograd.grouped_nf4 holds these tensors):
a stack of E independent bitsandbytes Linear4bit quantizations, expert e of the slice param[e] (R, C) as
stored (any orientation), flattened row-major:
    packed          uint8 (E, (R*C+1)//2)    expert e's bytes; element 2i in the HIGH nibble (bitsandbytes)
    absmax          fp32 (E, ceil(R*C/bs))   one per `blocksize` elements of one expert: blocks never cross
                                             an expert boundary (each expert is quantized on its own)
  double quant (bitsandbytes' compress_statistics, per expert):
    absmax          uint8 (E, blocks)        codes into nested_code
    nested_absmax   fp32 (E, ceil(blocks/256))
    nested_code     fp32 (256,)              the dynamic map (the same for every expert)
    offset          fp32 (E,)                each expert's mean absmax
    code            fp32 (16,)               NF4 or FP4 code book
so packed[e], absmax[e], (nested_absmax[e], offset[e]) are byte for byte what `quantize_4bit(param[e])`
returns for that expert alone. `transposed` says which orientation the slice has: False (out, in), True (in, out).

Routing (transformers' experts forward: hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k)):
the S = T*k (token, expert) pairs are sorted by expert (stable), `perm[s]` is the flat pair index t*k + j of
sorted slot s, `token[s] = perm[s] // k`, and expert e owns slots seg_start[e] : seg_start[e+1]
(seg_start (E+1,) int32, built with searchsorted on the device: no host read).

Ops (each product is per slot s of expert e; `a_index` gathers input rows, `out_index` scatters output rows):
    grouped_nf4_matmul:     out[o(s)] = a[i(s)] @ W_e^T + bias[e] + lora_scale * lora_xa[s] @ lora_B[e]^T
    grouped_nf4_matmul_dx:  out[o(s)] = dy[i(s)] @ W_e + lora_scale * lora_dyb[s] @ lora_A[e]
    grouped_lora_shrink:    xa[s] = a[i(s)] @ A[e]^T                            (fp32)
    grouped_lora_grad:      C[e] = scale * sum_{s in e} u[i(s)]^T v[j(s)]     (fp32; the LoRA weight grads)
W_e is expert e's (out, in) weight (the stored slice, or its transpose when `transposed`), lora_A (E, r, in),
lora_B (E, out, r). The reference loops over the experts (reading seg_start on the host: one sync on CUDA,
where it runs only under QPEFT_BACKEND=torch); the kernels do not.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .nf4_matmul import decode_absmax_ref, dequantize_weight_ref

__all__ = ["route_ref", "expert_weight_ref", "dequantize_experts_ref", "grouped_nf4_matmul_ref",
           "grouped_nf4_matmul_dx_ref", "grouped_lora_shrink_ref", "grouped_lora_grad_ref", "swiglu",
           "gpt_oss_swiglu", "grouped_experts_ref"]


# ------------------------------------------------------------------------------------------------ routing
def route_ref(top_k_index: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(perm, token, seg_start), all int32: the (token, expert) pairs sorted by expert.

    Device ops only (stable sort + searchsorted; no bincount, whose CUDA kernel reads its maximum on the host),
    so nothing syncs. Values outside [0, num_experts) fall before seg_start[0] or after seg_start[E]: the op
    (ops/grouped_nf4.py) rejects them before this runs."""
    k = top_k_index.shape[1] if top_k_index.dim() == 2 else 1  # 1-D: one expert per token
    ids = top_k_index.reshape(-1).to(torch.int64)
    sorted_ids, perm = torch.sort(ids, stable=True)
    bounds = torch.arange(num_experts + 1, device=ids.device, dtype=torch.int64)
    seg_start = torch.searchsorted(sorted_ids, bounds)
    return perm.to(torch.int32), (perm // max(k, 1)).to(torch.int32), seg_start.to(torch.int32)


# ------------------------------------------------------------------------------------------------ weights
def expert_weight_ref(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                      rows: int, cols: int, e: int, nested_absmax: torch.Tensor | None = None,
                      nested_code: torch.Tensor | None = None, offset: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 (rows, cols): expert e's stored slice, dequantized exactly (code[q] * absmax in fp32)."""
    if nested_absmax is not None:
        scale = decode_absmax_ref(absmax[e], nested_absmax[e], nested_code, offset[e])
    else:
        scale = absmax[e].float()
    return dequantize_weight_ref(packed[e], scale, code, blocksize, rows, cols)


def dequantize_experts_ref(packed, absmax, code, blocksize, rows, cols, nested_absmax=None, nested_code=None,
                           offset=None) -> torch.Tensor:
    """fp32 (E, rows, cols): every expert's stored slice."""
    return torch.stack([expert_weight_ref(packed, absmax, code, blocksize, rows, cols, e, nested_absmax,
                                          nested_code, offset) for e in range(packed.shape[0])])


def _out_in(w: torch.Tensor, transposed: bool) -> torch.Tensor:
    """An expert's stored slice as (out, in)."""
    return w.t() if transposed else w


def _rows(t: torch.Tensor, index: torch.Tensor | None, lo: int, hi: int) -> torch.Tensor:
    return t[index[lo:hi].long()] if index is not None else t[lo:hi]


def _place(sorted_rows: torch.Tensor, out_index: torch.Tensor | None) -> torch.Tensor:
    if out_index is None:
        return sorted_rows
    out = torch.empty_like(sorted_rows)
    out[out_index.long()] = sorted_rows
    return out


# ------------------------------------------------------------------------------------------------ products
def grouped_nf4_matmul_ref(a, a_index, packed, absmax, code, blocksize, N, transposed, nested_absmax,
                           nested_code, offset, seg_start, out_index, bias, lora_xa, lora_B,
                           lora_scale) -> torch.Tensor:
    """(S, N) in a's dtype: slot s of expert e = a[a_index[s]] @ W_e^T + bias[e] + scale xa[s] @ B_e^T, fp32
    math rounded once, stored at row out_index[s] (or s)."""
    K = a.shape[1]
    S = a_index.shape[0] if a_index is not None else a.shape[0]
    starts = seg_start.tolist()
    rows, cols = (K, N) if transposed else (N, K)
    out = torch.zeros((S, N), dtype=torch.float32, device=a.device)
    for e in range(len(starts) - 1):
        lo, hi = starts[e], starts[e + 1]
        if hi <= lo:
            continue
        w = _out_in(expert_weight_ref(packed, absmax, code, blocksize, rows, cols, e, nested_absmax, nested_code,
                                      offset), transposed)
        y = _rows(a, a_index, lo, hi).float() @ w.t()
        if bias is not None:
            y = y + bias[e].float()
        if lora_xa is not None:
            y = torch.addmm(y, lora_xa[lo:hi].float(), lora_B[e].float().t(), alpha=lora_scale)
        out[lo:hi] = y
    return _place(out, out_index).to(a.dtype)


def grouped_nf4_matmul_dx_ref(dy, dy_index, packed, absmax, code, blocksize, K, transposed, nested_absmax,
                              nested_code, offset, seg_start, out_index, lora_dyb, lora_A,
                              lora_scale) -> torch.Tensor:
    """(S, K) in dy's dtype: slot s of expert e = dy[dy_index[s]] @ W_e + scale dyb[s] @ A_e, stored at row
    out_index[s] (or s)."""
    N = dy.shape[1]
    S = dy_index.shape[0] if dy_index is not None else dy.shape[0]
    starts = seg_start.tolist()
    rows, cols = (K, N) if transposed else (N, K)
    out = torch.zeros((S, K), dtype=torch.float32, device=dy.device)
    for e in range(len(starts) - 1):
        lo, hi = starts[e], starts[e + 1]
        if hi <= lo:
            continue
        w = _out_in(expert_weight_ref(packed, absmax, code, blocksize, rows, cols, e, nested_absmax, nested_code,
                                      offset), transposed)
        dx = _rows(dy, dy_index, lo, hi).float() @ w
        if lora_dyb is not None:
            dx = torch.addmm(dx, lora_dyb[lo:hi].float(), lora_A[e].float(), alpha=lora_scale)
        out[lo:hi] = dx
    return _place(out, out_index).to(dy.dtype)


def grouped_lora_shrink_ref(a, a_index, A, seg_start) -> torch.Tensor:
    """(S, r) fp32: slot s of expert e = a[a_index[s]] @ A[e]^T (A (E, r, K), any strides)."""
    S = a_index.shape[0] if a_index is not None else a.shape[0]
    starts = seg_start.tolist()
    xa = torch.zeros((S, A.shape[1]), dtype=torch.float32, device=a.device)
    for e in range(len(starts) - 1):
        lo, hi = starts[e], starts[e + 1]
        if hi > lo:
            xa[lo:hi] = _rows(a, a_index, lo, hi).float() @ A[e].float().t()
    return xa


def grouped_lora_grad_ref(u, u_index, v, v_index, seg_start, scale) -> torch.Tensor:
    """(E, P, Q) fp32: C[e] = scale * U_e^T V_e over expert e's slots (zeros for an expert without slots)."""
    starts = seg_start.tolist()
    E = len(starts) - 1
    out = torch.zeros((E, u.shape[1], v.shape[1]), dtype=torch.float32, device=u.device)
    for e in range(E):
        lo, hi = starts[e], starts[e + 1]
        if hi > lo:
            out[e] = scale * (_rows(u, u_index, lo, hi).float().t() @ _rows(v, v_index, lo, hi).float())
    return out


# ------------------------------------------------------------------------------------------------ activations
def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """transformers' default `_apply_gate` with hidden_act "silu": gate, up = chunk(2); silu(gate) * up."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def gpt_oss_swiglu(gate_up: torch.Tensor, alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """GptOssExperts._apply_gate (transformers 5.17 .. 5.25): gate / up interleaved in even / odd columns,
    gate clamped above at `limit`, up to [-limit, limit]; (up + 1) * gate * sigmoid(alpha * gate)."""
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    gate = gate.clamp(min=None, max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


# ------------------------------------------------------------------------------------------------ whole block
def _linear(x, w, transposed, bias, e, lora):
    y = x @ _out_in(w[e], transposed).t()
    if bias is not None:
        y = y + bias[e]
    if lora is not None:
        A, B, scale = lora
        y = y + scale * ((x @ A[e].t()) @ B[e].t())
    return y


def grouped_experts_ref(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                        gate_up: torch.Tensor, down: torch.Tensor, transposed: bool = False,
                        gate_up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None,
                        apply_gate: Callable = swiglu, gate_up_lora: tuple | None = None,
                        down_lora: tuple | None = None) -> torch.Tensor:
    """The dense experts block as transformers' eager forward computes it, a loop over the experts hit, in the
    dtype of the inputs (fp64 for an oracle): per (token, expert e) pair
        h = apply_gate(x W_gu,e^T + b_gu,e + s A/B term);  y = h W_d,e^T + b_d,e + s A/B term
    out[token] = sum over its k pairs of top_k_weight * y. gate_up / down are the dense (E, ., .) parameters in
    their stored orientation; a LoRA is (A (E, r, in), B (E, out, r), scale)."""
    T, H = hidden_states.shape
    out = torch.zeros((T, H), dtype=hidden_states.dtype, device=hidden_states.device)
    for e in range(gate_up.shape[0]):
        token, slot = torch.where(top_k_index == e)
        if token.numel() == 0:
            continue
        x = hidden_states[token]
        h = apply_gate(_linear(x, gate_up, transposed, gate_up_bias, e, gate_up_lora))
        y = _linear(h, down, transposed, down_bias, e, down_lora)
        out.index_add_(0, token, y * top_k_weights[token, slot, None].to(y.dtype))
    return out
