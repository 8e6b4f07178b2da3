"""4-bit mixture-of-experts: quantize a fused-experts parameter one expert at a time, run the experts block.

    gate_up = qpeft.quantize_experts(experts.gate_up_proj)                  # (E, 2I, H) -> GroupedNF4Weight
    down = qpeft.quantize_experts(experts.down_proj)
    out = qpeft.grouped_nf4_experts(hidden_states, top_k_index, top_k_weights, gate_up, down)

gpt-oss stores its experts transposed ((E, H, 2I) / (E, I, H), i.e. (in, out) slices): pass transposed=True.
Each expert's slice is quantized on its own with `qpeft.quantize_4bit` (NF4/FP4, blockwise absmax, double
quant by default), so packed[e] / absmax[e] / ... are byte for byte bitsandbytes' Linear4bit quantization of
that (d1, d2) weight and only one expert's slice is ever converted at a time. The math, the layout and the
ops: qpeft.autograd.grouped_nf4, qpeft.reference.grouped_nf4, qpeft.ops.grouped_nf4.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..autograd.grouped_nf4 import (ExpertRouting, ExpertsLoRA, gpt_oss_swiglu, grouped_nf4_experts,
                                    grouped_nf4_linear, peft_expert_lora, route_experts)
from ..ops import grouped_nf4 as _ops
from ..reference import grouped_nf4 as ref
from ..reference.nf4_matmul import NESTED_BLOCKSIZE
from .functional import quantize_4bit
from .state import QuantState

__all__ = ["quantize_experts", "GroupedNF4Weight", "ExpertsLoRA", "ExpertRouting", "route_experts",
           "grouped_nf4_linear", "grouped_nf4_experts", "peft_expert_lora", "gpt_oss_swiglu"]


_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_QUANT_TYPES = ("nf4", "fp4")


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
        from ..formats import codes

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


def quantize_experts(weight: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4", double_quant: bool = True,
                     transposed: bool = False) -> GroupedNF4Weight:
    """Quantize a fused-experts parameter (E, d1, d2) expert by expert into a GroupedNF4Weight on its device.

    transposed: False when a slice is (out, in) (Qwen/Mixtral/DeepSeek), True when (in, out) (gpt-oss).
    Each expert is converted and written into the preallocated stack before the next one is read, so the
    extra memory is one expert's slice plus its 4-bit form. A non-finite value raises ValueError naming the
    expert, and nothing is returned."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 3 or min(weight.shape) <= 0:
        raise ValueError(f"weight must be a non-empty (num_experts, d1, d2) fused-experts tensor, got shape "
                         f"{tuple(weight.shape)}")
    if weight.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"weight must be float32, float16 or bfloat16, got {weight.dtype}")
    out = GroupedNF4Weight.empty(weight.shape, blocksize, quant_type, double_quant, transposed, weight.dtype,
                                 weight.device)
    for e in range(weight.shape[0]):
        try:
            packed, state = quantize_4bit(weight[e], blocksize=blocksize, quant_type=quant_type,
                                          double_quant=double_quant)
        except ValueError as err:
            raise ValueError(f"quantize_experts: expert {e}: {err}") from None
        out.set_expert(e, packed, state)
    return out
