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

from dataclasses import dataclass, replace
from typing import Callable, NamedTuple

import torch

from ..ops import grouped_nf4 as _ops  # noqa: F401  (registers qpeft::grouped_*)
from ..quant_state import QuantState
from ..reference import grouped_nf4 as ref
from ..reference.nf4_matmul import NESTED_BLOCKSIZE

__all__ = ["GroupedNF4Weight", "ExpertsLoRA", "ExpertRouting", "route_experts", "grouped_nf4_linear",
           "grouped_nf4_experts", "peft_expert_lora", "swiglu", "gpt_oss_swiglu"]

swiglu = ref.swiglu
gpt_oss_swiglu = ref.gpt_oss_swiglu
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_QUANT_TYPES = ("nf4", "fp4")
_GATES = {"swiglu": ref.swiglu, "gpt_oss": ref.gpt_oss_swiglu}


# ------------------------------------------------------------------------------------------------ weights
@dataclass
class GroupedNF4Weight:
    """One fused-experts parameter of shape (E, d1, d2), 4-bit: expert e's slice param[e] (d1, d2) quantized on
    its own exactly as bitsandbytes' Linear4bit would quantize that 2-D weight (blocks never cross an expert).

    packed uint8 (E, (d1*d2+1)//2) (or those bytes viewed as another dtype, bitsandbytes' quant_storage: viewed
    back as uint8); absmax fp32 (E, blocks), or uint8 with double quant plus nested_absmax
    fp32 (E, ceil(blocks/256)), nested_code fp32 (256,) and offset fp32 (E,); code fp32 (16,).
    transposed: False when a slice is (out, in), nn.Linear's orientation (Qwen/Mixtral/DeepSeek: gate_up_proj
    (E, 2I, H), down_proj (E, H, I)); True when it is (in, out) (gpt-oss: (E, H, 2I), (E, I, H)).
    dtype: the original parameter's dtype (what `dequantize` returns by default)."""

    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    blocksize: int
    shape: tuple
    transposed: bool = False
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    quant_type: str = "nf4"
    dtype: torch.dtype = torch.bfloat16

    def __post_init__(self):
        self.shape = tuple(int(s) for s in self.shape)
        if isinstance(self.packed, torch.Tensor) and self.packed.dtype != torch.uint8 and self.packed.dim() == 2:
            # bitsandbytes' quant_storage (e.g. bf16 for FSDP): the same bytes viewed as another dtype
            self.packed = self.packed.view(torch.uint8)
        self.validate()

    # --- shape ----------------------------------------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1] if self.transposed else self.shape[2]

    @property
    def out_features(self) -> int:
        return self.shape[2] if self.transposed else self.shape[1]

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def blocks(self) -> int:
        return -(-self.shape[1] * self.shape[2] // self.blocksize)

    def validate(self) -> "GroupedNF4Weight":
        """Raise ValueError naming the field when the fields disagree with each other."""
        def bad(msg):
            raise ValueError(f"GroupedNF4Weight: {msg}")

        if len(self.shape) != 3 or min(self.shape) <= 0:
            bad(f"shape must be (num_experts, d1, d2) with positive sizes, got {self.shape}")
        if self.blocksize not in _ops.BLOCKSIZES:
            bad(f"blocksize must be one of {_ops.BLOCKSIZES}, got {self.blocksize!r}")
        if self.quant_type not in _QUANT_TYPES:
            bad(f"quant_type must be 'nf4' or 'fp4', got {self.quant_type!r}")
        if self.dtype not in _FLOATS:
            bad(f"dtype must be float16, bfloat16 or float32, got {self.dtype}")
        E, n = self.shape[0], self.shape[1] * self.shape[2]
        if self.packed.dtype != torch.uint8 or tuple(self.packed.shape) != (E, (n + 1) // 2):
            bad(f"packed must be uint8 ({E}, {(n + 1) // 2}), got {self.packed.dtype} {tuple(self.packed.shape)}")
        want = torch.uint8 if self.double_quant else torch.float32
        if self.absmax.dtype != want or tuple(self.absmax.shape) != (E, self.blocks):
            bad(f"absmax must be {want} ({E}, {self.blocks}), got {self.absmax.dtype} {tuple(self.absmax.shape)}")
        if self.code.dtype != torch.float32 or self.code.numel() != 16:
            bad(f"code must be a float32 tensor of 16 entries, got {self.code.dtype} {tuple(self.code.shape)}")
        parts = (self.nested_absmax, self.nested_code, self.offset)
        if any(p is not None for p in parts) and not all(p is not None for p in parts):
            bad("nested_absmax, nested_code and offset must be given together (double quant)")
        if self.double_quant:
            nb = -(-self.blocks // NESTED_BLOCKSIZE)
            if self.nested_absmax.dtype != torch.float32 or tuple(self.nested_absmax.shape) != (E, nb):
                bad(f"nested_absmax must be float32 ({E}, {nb}), got {self.nested_absmax.dtype} "
                    f"{tuple(self.nested_absmax.shape)}")
            if self.nested_code.dtype != torch.float32 or self.nested_code.numel() != 256:
                bad(f"nested_code must be a float32 tensor of 256 entries, got {self.nested_code.dtype} "
                    f"{tuple(self.nested_code.shape)}")
            if self.offset.dtype != torch.float32 or tuple(self.offset.shape) != (E,):
                bad(f"offset must be float32 ({E},), got {self.offset.dtype} {tuple(self.offset.shape)}")
        for name, t in (("absmax", self.absmax), ("code", self.code), ("nested_absmax", self.nested_absmax),
                        ("nested_code", self.nested_code), ("offset", self.offset)):
            if t is not None and t.device != self.packed.device:
                bad(f"{name} is on {t.device} but packed is on {self.packed.device}")
        return self

    def op_args(self) -> tuple:
        """(packed, absmax, code, blocksize, transposed, nested_absmax, nested_code, offset), each tensor
        contiguous, as the qpeft::grouped_nf4_* ops take them."""
        c = lambda t: None if t is None else t.contiguous()  # noqa: E731
        return (c(self.packed), c(self.absmax), c(self.code), self.blocksize, self.transposed,
                c(self.nested_absmax), c(self.nested_code), c(self.offset))

    # --- one expert at a time (what a checkpoint loader / saver works with) ----------------------------------
    @classmethod
    def empty(cls, shape, blocksize: int = 64, quant_type: str = "nf4", double_quant: bool = True,
              transposed: bool = False, dtype: torch.dtype = torch.bfloat16, device=None) -> "GroupedNF4Weight":
        """A zero-filled stack to be written expert by expert with `set_expert` (a loader quantizing one expert
        at a time writes each into its place without holding a list of them)."""
        from .. import codes

        if quant_type not in _QUANT_TYPES:
            raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
        if blocksize not in _ops.BLOCKSIZES:
            raise ValueError(f"blocksize must be one of {_ops.BLOCKSIZES}, got {blocksize!r}")
        E, d1, d2 = (int(s) for s in shape)
        n = d1 * d2
        blocks = -(-n // blocksize)
        code = (codes.nf4 if quant_type == "nf4" else codes.fp4)(device)
        nested = (torch.zeros((E, -(-blocks // NESTED_BLOCKSIZE)), dtype=torch.float32, device=device),
                  codes.dynamic_map(device=device), torch.zeros((E,), dtype=torch.float32, device=device)) \
            if double_quant else (None, None, None)
        return cls(torch.zeros((E, (n + 1) // 2), dtype=torch.uint8, device=device),
                   torch.zeros((E, blocks), dtype=torch.uint8 if double_quant else torch.float32, device=device),
                   code, blocksize, (E, d1, d2), transposed, *nested, quant_type=quant_type, dtype=dtype)

    def set_expert(self, e: int, packed: torch.Tensor, state: QuantState) -> None:
        """Write expert e from a (packed, QuantState) pair of its 2-D slice (qpeft.quantize_4bit's or
        bitsandbytes' output, any quant_storage). Everything is checked before anything is written."""
        if not 0 <= e < self.num_experts:
            raise ValueError(f"set_expert: expert index e must be in [0, {self.num_experts}), got {e}")
        if tuple(state.shape) != self.shape[1:]:
            raise ValueError(f"set_expert: the expert's state.shape must be {self.shape[1:]} (one slice of "
                             f"{self.shape}), got {tuple(state.shape)}")
        for name, got, want in (("blocksize", state.blocksize, self.blocksize),
                                ("quant_type", state.quant_type, self.quant_type),
                                ("double quant (state2)", state.nested, self.double_quant)):
            if got != want:
                raise ValueError(f"set_expert: state {name} must be {want!r} like the other experts, got {got!r}")
        state.validate(packed)
        raw = packed.reshape(-1).view(torch.uint8) if packed.dtype != torch.uint8 else packed.reshape(-1)
        if not torch.equal(state.code.to(self.code.device), self.code):
            raise ValueError("set_expert: state.code (quant_map) differs from the stack's code book")
        if self.double_quant:
            if state.state2.blocksize != NESTED_BLOCKSIZE:
                raise ValueError(f"set_expert: nested blocksize must be {NESTED_BLOCKSIZE}, got "
                                 f"{state.state2.blocksize}")
            if not torch.equal(state.state2.code.to(self.nested_code.device), self.nested_code):
                raise ValueError("set_expert: nested_quant_map differs from the stack's (the dynamic map)")
        with torch.no_grad():
            self.packed[e].copy_(raw)
            self.absmax[e].copy_(state.absmax.reshape(-1))
            if self.double_quant:
                self.nested_absmax[e].copy_(state.state2.absmax.reshape(-1))
                self.offset[e].copy_(state.offset.reshape(()))

    @classmethod
    def from_expert_states(cls, experts, transposed: bool = False) -> "GroupedNF4Weight":
        """Stack [(packed_e, QuantState_e), ...] (one per expert, same shape and settings) into one weight."""
        experts = list(experts)
        if not experts:
            raise ValueError("from_expert_states: experts must hold at least one (packed, QuantState) pair")
        p0, s0 = experts[0]
        if s0.quant_type not in _QUANT_TYPES or len(s0.shape) != 2:
            raise ValueError(f"from_expert_states: each state must be a 2-D nf4/fp4 state, got quant_type "
                             f"{s0.quant_type!r} shape {tuple(s0.shape)}")
        w = cls.empty((len(experts), *s0.shape), s0.blocksize, s0.quant_type, s0.nested, transposed, s0.dtype,
                      p0.device)
        w.code = s0.code.clone()
        if s0.nested:
            w.nested_code = s0.state2.code.clone()
        for e, (p, s) in enumerate(experts):
            w.set_expert(e, p, s)
        return w

    def expert_state(self, e: int) -> tuple[torch.Tensor, QuantState]:
        """(packed [(n+1)//2, 1] uint8, QuantState) of expert e: bitsandbytes' Linear4bit form of the 2-D slice
        (a view of the stack's bytes; the state's tensors are views too)."""
        if not 0 <= e < self.num_experts:
            raise ValueError(f"expert_state: expert index e must be in [0, {self.num_experts}), got {e}")
        state2 = offset = None
        if self.double_quant:
            state2 = QuantState(absmax=self.nested_absmax[e], shape=(self.blocks,), dtype=torch.float32,
                                blocksize=NESTED_BLOCKSIZE, quant_type="blockwise8", code=self.nested_code)
            offset = self.offset[e]
        state = QuantState(absmax=self.absmax[e], shape=self.shape[1:], dtype=self.dtype, blocksize=self.blocksize,
                           quant_type=self.quant_type, code=self.code, offset=offset, state2=state2)
        return self.packed[e].reshape(-1, 1), state

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(E, d1, d2) in `dtype` (default self.dtype): code[q] * absmax per expert, rounded once."""
        w = ref.dequantize_experts_ref(self.packed, self.absmax, self.code, self.blocksize, self.shape[1],
                                       self.shape[2], self.nested_absmax, self.nested_code, self.offset)
        return w.to(dtype or self.dtype)

    def to(self, device) -> "GroupedNF4Weight":
        """A copy on `device` (the tensors moved, nothing re-quantized)."""
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, packed=mv(self.packed), absmax=mv(self.absmax), code=mv(self.code),
                       nested_absmax=mv(self.nested_absmax), nested_code=mv(self.nested_code),
                       offset=mv(self.offset))


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


def _project(x, weight: GroupedNF4Weight, routing: ExpertRouting, gather: bool, scatter: bool, bias, lora):
    packed, absmax, code, blocksize, transposed, nested_absmax, nested_code, offset = weight.op_args()
    A, B, scale = lora if lora is not None else (None, None, 0.0)
    x_index = routing.token if gather else None
    out_index = routing.perm if scatter else None
    return GroupedNF4LinearFunction.apply(
        x, bias, A, B, x_index, out_index, routing.perm if gather else None, routing.seg_start, packed, absmax,
        code, nested_absmax, nested_code, offset, blocksize, weight.out_features, transposed, float(scale),
        routing.top_k)


def grouped_nf4_linear(x: torch.Tensor, weight: GroupedNF4Weight, routing: ExpertRouting, *, gather: bool = True,
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
                        gate_up: GroupedNF4Weight, down: GroupedNF4Weight, *,
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
    if not isinstance(gate_up, GroupedNF4Weight) or not isinstance(down, GroupedNF4Weight):
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
