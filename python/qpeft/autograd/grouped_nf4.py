"""Mixture-of-experts with 4-bit experts: the weight container, autograd and the public functionals.

    w_gu = GroupedNF4Weight(...)          # a fused-experts parameter as E stacked Linear4bit quantizations
    out = grouped_nf4_experts(hidden_states, top_k_index, top_k_weights, w_gu, w_down,
                              apply_gate="swiglu", gate_up_lora=ExpertsLoRA(A, B, scale))

`grouped_nf4_experts` computes a transformers 5 experts block (the `forward(hidden_states, top_k_index,
top_k_weights)` of Qwen2/3-MoE, Mixtral, OLMoE, DeepSeek-V3, gpt-oss, ...; transformers/integrations/moe.py
`grouped_mm_experts_forward`) on 4-bit experts:
    route          (token, expert) pairs sorted by expert, segments built on the device (qpeft::grouped_nf4_route)
    gate_up        h[s] = x[token(s)] @ W_gu,e^T + b_gu,e + s_gu (x A_gu,e^T) B_gu,e^T     (grouped NF4 GEMM)
    activation     apply_gate(h)        (transformers' `_apply_gate`: SwiGLU, gpt-oss' clamped SwiGLU, ...)
    down           y[pair(s)] = g[s] @ W_d,e^T + b_d,e + s_d (g A_d,e^T) B_d,e^T           (output in (token, k) order)
    combine        out[t] = sum_j top_k_weights[t, j] * y[t, j]       (a batched GEMV, deterministic)
No Python loop over experts and no host sync anywhere (the ops' contract); torch.compile(fullgraph=True)
traces it (every op has a fake kernel).

Autograd: the 4-bit weights are frozen. Gradients flow to hidden_states (dX through the same grouped kernel,
reading the 4-bit weight transposed; never a dequantized copy), to top_k_weights (so the router trains), to
LoRA A/B (dA_e = s (dy B_e)_e^T x_e, dB_e = s dy_e^T (x A_e^T)_e, per expert segment) and to biases.
Saved for backward per projection: its input (only with LoRA: for dA), the (S, r) fp32 x A^T (LoRA only)
and the int32 routing (3 x S + E + 1 entries); the activation's input is saved by torch's autograd of
apply_gate, as in transformers' grouped_mm path.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Protocol

import torch

from ..ops import grouped_nf4 as _ops  # noqa: F401  (registers qpeft::grouped_*)
from ..reference import grouped_nf4 as ref

__all__ = ["FourBitExperts", "ExpertsLoRA", "ExpertRouting", "route_experts", "grouped_nf4_linear",
           "grouped_nf4_experts", "peft_expert_lora", "gpt_oss_swiglu"]

swiglu = ref.swiglu
gpt_oss_swiglu = ref.gpt_oss_swiglu
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_GATES = {"swiglu": ref.swiglu, "gpt_oss": ref.gpt_oss_swiglu}


# ------------------------------------------------------------------------------------------------ weights
class FourBitExperts(Protocol):
    """What the grouped kernels need of a 4-bit experts weight (qpeft.quant.experts.GroupedNF4Weight, the format
    container, lives above the op stack): its op arguments and its logical shape."""

    shape: tuple
    transposed: bool

    def op_args(self) -> tuple: ...


class ExpertsLoRA(NamedTuple):
    """A LoRA on a fused-experts parameter: A (E, r, in), B (E, out, r) (any strides: views of PEFT's flat
    weights work, see `peft_expert_lora`), scale (PEFT's `scaling`, lora_alpha / r). Expert e's update is
    scale * B[e] @ A[e] in (out, in) orientation, whatever the parameter's storage orientation."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float


def peft_expert_lora(lora_A_weight: torch.Tensor, lora_B_weight: torch.Tensor, num_experts: int,
                     scale: float) -> ExpertsLoRA:
    """PEFT's `ParamWrapper` layout (peft 0.18+ `target_parameters`) as per-expert views: lora_A.weight
    (r*E, in) holds expert e's A in rows e*r .. e*r + r - 1 (blocked); lora_B.weight (out, r*E) its B in
    columns j*E + e (interleaved), exactly as ParamWrapper.get_delta_weight reads them. Views: gradients of the
    returned A / B land in PEFT's parameters."""
    E = int(num_experts)
    if lora_A_weight.dim() != 2 or lora_B_weight.dim() != 2:
        raise ValueError(f"lora_A_weight / lora_B_weight must be 2-D (r*E, in) / (out, r*E), got "
                         f"{tuple(lora_A_weight.shape)} / {tuple(lora_B_weight.shape)}")
    if E < 1 or lora_A_weight.shape[0] % E or lora_A_weight.shape[0] != lora_B_weight.shape[1]:
        raise ValueError(f"lora_A_weight (r*E, in) and lora_B_weight (out, r*E) must share r*E with E = "
                         f"num_experts = {E}, got {tuple(lora_A_weight.shape)} and {tuple(lora_B_weight.shape)}")
    r = lora_A_weight.shape[0] // E
    A = lora_A_weight.view(E, r, lora_A_weight.shape[1])
    B = lora_B_weight.view(lora_B_weight.shape[0], r, E).permute(2, 0, 1)
    return ExpertsLoRA(A, B, float(scale))


# ------------------------------------------------------------------------------------------------ routing
class ExpertRouting(NamedTuple):
    """(token, expert) pairs sorted by expert: sorted slot s is pair perm[s] = token[s] * top_k + j, expert e owns
    slots seg_start[e] : seg_start[e+1]. All int32 device tensors."""

    perm: torch.Tensor
    token: torch.Tensor
    seg_start: torch.Tensor
    top_k: int


def route_experts(top_k_index: torch.Tensor, num_experts: int) -> ExpertRouting:
    """Sort the router's (tokens, top_k) expert ids by expert on the device (no host sync). An id outside
    [0, num_experts) raises ValueError on CPU and trips a device-side assert on CUDA (see ops/grouped_nf4.py)."""
    perm, token, seg_start = torch.ops.qpeft.grouped_nf4_route(top_k_index, num_experts)
    return ExpertRouting(perm, token, seg_start, top_k_index.shape[-1] if top_k_index.dim() == 2 else 1)


# ------------------------------------------------------------------------------------------------ autograd
class GroupedNF4LinearFunction(torch.autograd.Function):
    """One grouped projection over routed slots. forward(x, bias, lora_A, lora_B, x_index, out_index,
    x_grad_index, seg_start, packed, absmax, code, nested_absmax, nested_code, offset, blocksize, N, transposed,
    lora_scale, top_k) -> (S, N):
        row out_index[s] (or s) = x[x_index[s]] @ W_e^T + bias[e] + lora_scale (x A_e^T) B_e^T
    When x_index gathers tokens (x is (T, K) and slot s reads token perm[s] // top_k), dX is written at row
    x_grad_index[s] = perm[s] of an (S, K) buffer and summed over the top_k pairs of each token (a reshape and
    sum: deterministic, no atomics)."""

    @staticmethod
    def forward(ctx, x, bias, lora_A, lora_B, x_index, out_index, x_grad_index, seg_start, packed, absmax, code,
                nested_absmax, nested_code, offset, blocksize, N, transposed, lora_scale, top_k):
        ops = torch.ops.qpeft
        xa = ops.grouped_lora_shrink(x, x_index, lora_A, seg_start) if lora_A is not None else None
        y = ops.grouped_nf4_matmul(x, x_index, packed, absmax, code, blocksize, N, transposed, nested_absmax,
                                   nested_code, offset, seg_start, out_index, bias, xa, lora_B, lora_scale)
        ctx.meta = (blocksize, transposed, lora_scale, top_k, x.shape[1], bias is not None, lora_A is not None)
        ctx.save_for_backward(x if lora_A is not None else None, xa, lora_A, lora_B, x_index, out_index,
                              x_grad_index, seg_start, packed, absmax, code, nested_absmax, nested_code, offset)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    def backward(ctx, dy):
        (x, xa, lora_A, lora_B, x_index, out_index, x_grad_index, seg_start, packed, absmax, code, nested_absmax,
         nested_code, offset) = ctx.saved_tensors
        blocksize, transposed, scale, top_k, K, has_bias, has_lora = ctx.meta
        ops = torch.ops.qpeft
        dy = dy.contiguous()
        dx = dbias = dA = dB = None
        dyb = None
        if has_lora and (ctx.needs_input_grad[0] or ctx.needs_input_grad[2]):
            dyb = ops.grouped_lora_shrink(dy, out_index, lora_B.transpose(1, 2), seg_start)  # (S, r) = dy B_e
        if ctx.needs_input_grad[0]:
            dx = ops.grouped_nf4_matmul_dx(dy, out_index, packed, absmax, code, blocksize, K, transposed,
                                           nested_absmax, nested_code, offset, seg_start,
                                           x_grad_index if x_index is not None else None, dyb,
                                           lora_A if has_lora else None, scale)
            if x_index is not None:  # rows in (token, k) order: sum each token's top_k pairs
                dx = dx.view(-1, top_k, K).sum(1)
        if has_lora and ctx.needs_input_grad[2]:
            dA = ops.grouped_lora_grad(dyb, None, x, x_index, seg_start, scale).to(lora_A.dtype)
        if has_lora and ctx.needs_input_grad[3]:
            dB = ops.grouped_lora_grad(dy, out_index, xa, None, seg_start, scale).to(lora_B.dtype)
        if has_bias and ctx.needs_input_grad[1]:
            ones = torch.ones((dy.shape[0], 1), dtype=torch.float32, device=dy.device)  # S slots
            dbias = ops.grouped_lora_grad(ones, None, dy, out_index, seg_start, 1.0)[:, 0].to(ctx.bias_dtype)
        return (dx, dbias, dA, dB) + (None,) * 15


def _check_lora(name: str, lora, E: int, in_f: int, out_f: int, device) -> None:
    if lora is None:
        return
    if not isinstance(lora, tuple) or len(lora) != 3:
        raise TypeError(f"{name} must be an ExpertsLoRA (A, B, scale), got {type(lora).__name__}")
    A, B, _ = lora
    if A.dim() != 3 or B.dim() != 3 or A.shape[0] != E or B.shape[0] != E or A.shape[2] != in_f or \
            B.shape[1] != out_f or A.shape[1] != B.shape[2] or A.shape[1] < 1:
        raise ValueError(f"{name}: A must be ({E}, r, {in_f}) and B ({E}, {out_f}, r), got {tuple(A.shape)} and "
                         f"{tuple(B.shape)}")
    for t, what in ((A, "A"), (B, "B")):
        if t.dtype not in _FLOATS:
            raise TypeError(f"{name}.{what} must be a float tensor, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name}.{what} is on {t.device} but the hidden states are on {device}")


def _check_bias(name: str, bias, E: int, out_f: int, device) -> None:
    if bias is None:
        return
    if tuple(bias.shape) != (E, out_f):
        raise ValueError(f"{name} must have shape ({E}, {out_f}) (one row per expert), got {tuple(bias.shape)}")
    if bias.dtype not in _FLOATS or bias.device != device:
        raise ValueError(f"{name} must be a float tensor on {device}, got {bias.dtype} on {bias.device}")


def _project(x, weight: FourBitExperts, routing: ExpertRouting, gather: bool, scatter: bool, bias, lora):
    packed, absmax, code, blocksize, transposed, nested_absmax, nested_code, offset = weight.op_args()
    A, B, scale = lora if lora is not None else (None, None, 0.0)
    x_index = routing.token if gather else None
    out_index = routing.perm if scatter else None
    return GroupedNF4LinearFunction.apply(
        x, bias, A, B, x_index, out_index, routing.perm if gather else None, routing.seg_start, packed, absmax,
        code, nested_absmax, nested_code, offset, blocksize, weight.out_features, transposed, float(scale),
        routing.top_k)


def grouped_nf4_linear(x: torch.Tensor, weight: FourBitExperts, routing: ExpertRouting, *, gather: bool = True,
                       scatter: bool = False, bias: torch.Tensor | None = None,
                       lora: ExpertsLoRA | None = None) -> torch.Tensor:
    """One grouped 4-bit projection over routed slots, (S, out_features) in x's dtype.

    gather=True: x is (tokens, in_features) and slot s reads row routing.token[s]; else x is (S, in_features)
    in sorted-slot order. scatter=True: slot s is written to row routing.perm[s] ((token, k) order); else to
    row s (sorted order). Differentiable in x, bias and the LoRA A / B."""
    if x.dtype not in _FLOATS:
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() != 2 or x.shape[1] != weight.in_features:
        raise ValueError(f"x must be (rows, {weight.in_features}) (the weight's in_features), got {tuple(x.shape)}")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but the weight is on {weight.device}")
    _check_bias("bias", bias, weight.num_experts, weight.out_features, x.device)
    _check_lora("lora", lora, weight.num_experts, weight.in_features, weight.out_features, x.device)
    return _project(x, weight, routing, gather, scatter, bias, lora)


def grouped_nf4_experts(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                        gate_up: FourBitExperts, down: FourBitExperts, *,
                        gate_up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None,
                        apply_gate: str | Callable = "swiglu", gate_up_lora: ExpertsLoRA | None = None,
                        down_lora: ExpertsLoRA | None = None,
                        post_expert_norm: Callable | None = None) -> torch.Tensor:
    """A transformers 5 fused-experts forward on 4-bit experts: (tokens, hidden) in hidden_states' dtype.

    hidden_states (T, H) float16 / bfloat16 / float32 (the compute dtype); top_k_index (T, k) int (the router's
    expert ids, each in [0, E)); top_k_weights (T, k) float (any float dtype; rounded to the compute dtype).
    gate_up: slices (2I, H) or, transposed, (H, 2I) (a non-gated family's up_proj works too: its width is
    whatever apply_gate consumes); down: (H, I) or (I, H). Biases (E, 2I) / (E, H) (gpt-oss).
    apply_gate maps the gate_up output (S, 2I) to (S, I): "swiglu" (silu(gate) * up on the concatenated
    [gate; up] halves: transformers' default `_apply_gate` with hidden_act "silu"), "gpt_oss" (interleaved,
    clamped, alpha 1.702 / limit 7.0: GptOssExperts._apply_gate), or any callable (an experts module's own
    `_apply_gate`, or `act_fn` for has_gate=False). post_expert_norm: applied per row to the down output before
    the routing weights (transformers' has_post_expert_norm). LoRA: per-expert A/B (`ExpertsLoRA`), applied
    inside the grouped kernels per expert segment."""
    if not callable(getattr(gate_up, "op_args", None)) or not callable(getattr(down, "op_args", None)):
        raise TypeError(f"gate_up and down must be GroupedNF4Weight, got {type(gate_up).__name__} and "
                        f"{type(down).__name__}")
    if hidden_states.dtype not in _FLOATS:
        raise TypeError(f"hidden_states must be float16, bfloat16 or float32, got {hidden_states.dtype}")
    E, H = gate_up.num_experts, gate_up.in_features
    if hidden_states.dim() != 2 or hidden_states.shape[1] != H:
        raise ValueError(f"hidden_states must be (tokens, {H}) (gate_up's in_features), got "
                         f"{tuple(hidden_states.shape)}")
    if down.num_experts != E or down.out_features != H:
        raise ValueError(f"down must have {E} experts and out_features {H} like gate_up's, got shape {down.shape} "
                         f"(transposed={down.transposed})")
    T = hidden_states.shape[0]
    if top_k_index.dim() != 2 or top_k_index.shape[0] != T or top_k_index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"top_k_index must be int32/int64 ({T}, top_k), got {top_k_index.dtype} "
                         f"{tuple(top_k_index.shape)}")
    if tuple(top_k_weights.shape) != tuple(top_k_index.shape) or not top_k_weights.is_floating_point():
        raise ValueError(f"top_k_weights must be a float tensor of top_k_index's shape {tuple(top_k_index.shape)}, "
                         f"got {top_k_weights.dtype} {tuple(top_k_weights.shape)}")
    dev = hidden_states.device
    for name, t in (("top_k_index", top_k_index), ("top_k_weights", top_k_weights), ("gate_up", gate_up),
                    ("down", down)):
        if t.device != dev:
            raise ValueError(f"{name} is on {t.device} but hidden_states is on {dev}")
    _check_bias("gate_up_bias", gate_up_bias, E, gate_up.out_features, dev)
    _check_bias("down_bias", down_bias, E, H, dev)
    _check_lora("gate_up_lora", gate_up_lora, E, H, gate_up.out_features, dev)
    _check_lora("down_lora", down_lora, E, down.in_features, H, dev)
    if isinstance(apply_gate, str):
        if apply_gate not in _GATES:
            raise ValueError(f"apply_gate must be one of {sorted(_GATES)} or a callable, got {apply_gate!r}")
        apply_gate = _GATES[apply_gate]
    elif not callable(apply_gate):
        raise TypeError(f"apply_gate must be a string or a callable, got {type(apply_gate).__name__}")

    k = top_k_index.shape[1]
    routing = route_experts(top_k_index, E)
    h = _project(hidden_states, gate_up, routing, True, False, gate_up_bias, gate_up_lora)   # (S, 2I) sorted
    g = apply_gate(h)
    if g.dim() != 2 or g.shape[1] != down.in_features:
        raise ValueError(f"apply_gate must return (slots, {down.in_features}) (down's in_features), got "
                         f"{tuple(g.shape)}")
    y = _project(g.to(hidden_states.dtype), down, routing, False, True, down_bias, down_lora)  # (S, H), (t, k) order
    if post_expert_norm is not None:
        y = post_expert_norm(y)
    # out[t] = sum_j w[t, j] y[t, j]: a batched GEMV, fp32 accumulation, no (S, H) temporary
    out = torch.bmm(top_k_weights.to(y.dtype).unsqueeze(1), y.view(T, k, H)).squeeze(1)
    return out.to(hidden_states.dtype)
