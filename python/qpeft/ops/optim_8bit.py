"""L2 op of qpeft.optim: one multi-tensor optimizer update (semantics in qpeft/reference/optim_8bit.py).

    qpeft::optim_8bit_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] state1, Tensor(c!)[] state2,
                           Tensor(d!)[] absmax1, Tensor(e!)[] absmax2, Tensor qmap1, Tensor qmap2, Tensor hyper,
                           float beta1, float beta2, str optimizer) -> ()

- T = len(params) tensors of one parameter group (any mix of fp32/fp16/bf16, contiguous), their gradients
  (same dtype and shape), and per tensor state1 (m) and, for "adam", state2 (v; empty for "lion").
- 8-bit states: uint8 codes of the parameter's shape, absmax1/absmax2 fp32 [ceil(n/256)] per tensor, qmap1 the
  signed and qmap2 the unsigned 256-entry dynamic map. fp32 states: fp32 of the parameter's shape and empty
  absmax lists. qmap1/qmap2 are always passed (unused with fp32 states).
- hyper: (T, 4) fp32 per-tensor scalars (reference.hyper_table; adam_hyper / lion_hyper are its formulas): the
  learning rate lives here, so a scheduler or LoRA+'s per-tensor lr never recompiles a torch.compile'd step, and
  the optimizer classes build it on the device from device steps and lr (capturable=True: CUDA-graph replays
  read fresh values; the kernels' pointer tables are pinned host memory allocated during capture, which torch's
  host allocator keeps alive for the graph, so a replay copies the same pointers).

Unlike the other L2 ops this one mutates its arguments (`mutates_args` lists exactly what it writes): an
optimizer updates its parameters and states in place, as torch's own `_fused_adamw_` op does; the fake therefore
returns nothing and only checks. One call = one kernel launch per parameter dtype on CUDA/Triton.
"""
from __future__ import annotations

import torch
from torch.library import custom_op, register_fake

from .. import _backend, _cuda
from ..reference import optim_8bit as ref

__all__ = ["optim_8bit_step"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _check(params, grads, state1, state2, absmax1, absmax2, qmap1, qmap2, hyper, beta1, beta2, optimizer) -> None:
    T = len(params)
    torch._check(optimizer in ref.OPTIMIZERS, lambda: f"optimizer must be one of {ref.OPTIMIZERS}, got {optimizer!r}")
    torch._check(T > 0, lambda: "params must not be empty")
    two = optimizer == "adam"
    quantized = len(absmax1) > 0
    torch._check(len(grads) == T, lambda: f"grads must have len(params) = {T} entries, got {len(grads)}")
    torch._check(len(state1) == T, lambda: f"state1 must have {T} entries, got {len(state1)}")
    torch._check(len(state2) == (T if two else 0),
                 lambda: f"state2 must have {T if two else 0} entries for optimizer={optimizer!r}, got {len(state2)}")
    torch._check(len(absmax1) in (0, T),
                 lambda: f"absmax1 must have 0 (fp32 states) or {T} entries, got {len(absmax1)}")
    torch._check(len(absmax2) == (T if (two and quantized) else 0),
                 lambda: f"absmax2 must have {T if (two and quantized) else 0} entries, got {len(absmax2)}")
    torch._check(0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0,
                 lambda: f"beta1 and beta2 must be in [0, 1), got {beta1}, {beta2}")
    dev = params[0].device
    for name, q in (("qmap1", qmap1), ("qmap2", qmap2)):
        torch._check(q.dtype == torch.float32 and q.shape == (256,) and q.is_contiguous(),
                     lambda: f"{name} must be a contiguous fp32 (256,) code book, got {q.dtype} {tuple(q.shape)}")
        torch._check(q.device == dev, lambda: f"{name} is on {q.device}, expected {dev}")
    torch._check(hyper.dtype == torch.float32 and hyper.shape == (T, 4) and hyper.is_contiguous(),
                 lambda: f"hyper must be contiguous fp32 ({T}, 4), got {hyper.dtype} {tuple(hyper.shape)}")
    torch._check(hyper.device == dev, lambda: f"hyper is on {hyper.device}, expected {dev}")
    sdtype = torch.uint8 if quantized else torch.float32
    for i in range(T):
        p, g = params[i], grads[i]
        torch._check(p.dtype in _FLOATS, lambda: f"params[{i}] must be float32, float16 or bfloat16, got {p.dtype}")
        torch._check(p.is_contiguous() and p.numel() > 0, lambda: f"params[{i}] must be contiguous and non-empty")
        torch._check(p.device == dev, lambda: f"params[{i}] is on {p.device}, expected {dev}")
        torch._check(g.dtype == p.dtype and g.shape == p.shape and g.is_contiguous() and g.device == dev,
                     lambda: f"grads[{i}] must be contiguous {p.dtype} {tuple(p.shape)} on {dev}, "
                             f"got {g.dtype} {tuple(g.shape)} on {g.device}")
        blocks = -(-p.numel() // ref.BLOCKSIZE)
        for name, s in (("state1", state1), ("state2", state2)):
            if name == "state2" and not two:
                continue
            torch._check(s[i].dtype == sdtype and s[i].numel() == p.numel() and s[i].is_contiguous()
                         and s[i].device == dev,
                         lambda: f"{name}[{i}] must be contiguous {sdtype} with {p.numel()} elements on {dev}, "
                                 f"got {s[i].dtype} {tuple(s[i].shape)} on {s[i].device}")
        if quantized:
            for name, a in (("absmax1", absmax1), ("absmax2", absmax2)):
                if name == "absmax2" and not two:
                    continue
                torch._check(a[i].dtype == torch.float32 and a[i].numel() == blocks and a[i].is_contiguous()
                             and a[i].device == dev,
                             lambda: f"{name}[{i}] must be contiguous fp32 with ceil(n/256) = {blocks} entries on "
                                     f"{dev}, got {a[i].dtype} {tuple(a[i].shape)} on {a[i].device}")


@custom_op("qpeft::optim_8bit_step", mutates_args=("params", "state1", "state2", "absmax1", "absmax2"))
def optim_8bit_step(params: list[torch.Tensor], grads: list[torch.Tensor], state1: list[torch.Tensor],
                    state2: list[torch.Tensor], absmax1: list[torch.Tensor], absmax2: list[torch.Tensor],
                    qmap1: torch.Tensor, qmap2: torch.Tensor, hyper: torch.Tensor, beta1: float, beta2: float,
                    optimizer: str) -> None:
    _check(params, grads, state1, state2, absmax1, absmax2, qmap1, qmap2, hyper, beta1, beta2, optimizer)
    impl = _backend.select("optim_8bit_step", params[0].device)
    if impl == "cuda":
        _cuda.rt.ext.optim_8bit_step_out(params, grads, state1, state2, absmax1, absmax2, qmap1, qmap2, hyper,
                                         beta1, beta2, optimizer)
        return
    if impl == "triton":
        from qpeft.triton_kernels.optim_8bit import optim_8bit_step_triton

        optim_8bit_step_triton(params, grads, state1, state2, absmax1, absmax2, qmap1, qmap2, hyper, beta1, beta2,
                               optimizer)
        return
    ref.optim_8bit_step_ref(params, grads, state1, state2, absmax1, absmax2, qmap1, qmap2, hyper, beta1, beta2,
                            optimizer)


@register_fake("qpeft::optim_8bit_step")
def _(params, grads, state1, state2, absmax1, absmax2, qmap1, qmap2, hyper, beta1, beta2, optimizer):
    _check(params, grads, state1, state2, absmax1, absmax2, qmap1, qmap2, hyper, beta1, beta2, optimizer)
