"""L2 ops of the fused linear + cross-entropy (+ fakes). Semantics: reference/linear_cross_entropy.py.

Every op takes the head W (V, H) as either a dense `weight` or the 4-bit pieces of one (packed, absmax, code,
nested_absmax, nested_code, offset, blocksize; weight None), an optional bias (V,), x (N, H) contiguous and
target (N,) int64, plus ignore_index, softcap (0.0: none), label_smoothing and z_loss:

  qpeft::linear_cross_entropy_fwd(x, <head>, bias, target, <options>) -> (loss (N,) fp32, lse (N,) fp32)
  qpeft::linear_cross_entropy_bwd(x, <head>, bias, target, lse, grad_rows, <options>, bool need_weight_grad,
        bool need_bias_grad) -> (dx (N, H), dweight (V, H) or (0,), dbias (V,) or (0,))
        the gradients of sum_i grad_rows[i] * loss_i, recomputing the logits blockwise
  qpeft::linear_cross_entropy_fwd_bwd(x, <head>, bias, target, grad_rows, <options>, bool need_bias_grad)
        -> (loss, lse, dx, dbias (V,) or (0,))
        the forward and the input (and bias) gradient in one pass over the logits, for a frozen head

Implementations: Triton (triton_kernels/linear_cross_entropy.py) or the chunked PyTorch reference; no CUDA C++
(cuda=False in `_backend.select`: nothing measured says it would beat Triton here).

Target ids are data. A target outside [0, V) that is not ignore_index must raise, never be clamped or read out
of bounds. On the CPU the ops check it exactly (ValueError). On CUDA, reading the verdict back would be a host
sync on every training step, so it is a device-side assert (torch._assert_async), which is what
torch.nn.functional.cross_entropy itself does on CUDA (CUDA_KERNEL_ASSERT "Assertion `t >= 0 && t < n_classes`
failed"): the error surfaces at the next synchronization and leaves the CUDA context unusable. The kernels never
read W or the logits at a target's address (the target logit is picked by comparing ids within each vocabulary
block), so a bad id cannot read out of bounds before the assert fires.
"""
from __future__ import annotations

import torch
from torch.library import custom_op, register_fake

from .. import _cuda
from .._backend import select as _select_backend  # not `from .. import _backend`: qpeft.__getattr__
from ..reference import linear_cross_entropy as ref
from .nf4_matmul import FLOAT_DTYPES, check_weight_args

__all__: list[str] = []  # ops register on import; the functional is qpeft.autograd.linear_cross_entropy


def head_of(weight, packed, absmax, code, nested_absmax, nested_code, offset, blocksize: int, vocab: int,
            hidden: int) -> ref.Head:
    return ref.Head(weight, packed, absmax, code, nested_absmax, nested_code, offset, int(blocksize), int(vocab),
                    int(hidden))


def _check(x, weight, packed, absmax, code, nested_absmax, nested_code, offset, blocksize, vocab, bias, target,
           softcap, label_smoothing, z_loss) -> None:
    """Shapes, dtypes and devices (torch._check: traceable, shared by the fakes)."""
    torch._check(x.dim() == 2 and x.is_contiguous(), lambda: f"x must be 2-D (N, H) contiguous, got {tuple(x.shape)}")
    torch._check(x.dtype in FLOAT_DTYPES, lambda: f"x must be float16, bfloat16 or float32, got {x.dtype}")
    N, H = x.shape
    torch._check(vocab >= 1, lambda: f"vocab must be positive, got {vocab}")
    if weight is not None:
        torch._check(packed is None, lambda: "pass either a dense weight or the packed 4-bit head, not both")
        torch._check(tuple(weight.shape) == (vocab, H) and weight.is_contiguous(),
                     lambda: f"weight must be ({vocab}, {H}) contiguous, got {tuple(weight.shape)}")
        torch._check(weight.dtype == x.dtype, lambda: f"weight dtype {weight.dtype} must equal x's {x.dtype}")
        torch._check(weight.device == x.device, lambda: f"weight is on {weight.device}, x on {x.device}")
    else:
        torch._check(packed is not None and absmax is not None and code is not None,
                     lambda: "the head needs a dense weight or packed, absmax and code")
        check_weight_args(x, "x", packed, absmax, code, blocksize, vocab, H, nested_absmax, nested_code, offset)
    if bias is not None:
        torch._check(tuple(bias.shape) == (vocab,), lambda: f"bias must be ({vocab},), got {tuple(bias.shape)}")
        torch._check(bias.dtype == x.dtype, lambda: f"bias dtype {bias.dtype} must equal x's {x.dtype}")
    torch._check(tuple(target.shape) == (N,) and target.dtype == torch.int64,
                 lambda: f"target must be int64 ({N},), got {target.dtype} {tuple(target.shape)}")
    torch._check(target.device == x.device, lambda: f"target is on {target.device}, x on {x.device}")
    torch._check(softcap >= 0.0, lambda: f"softcap must be >= 0 (0: none), got {softcap}")
    torch._check(0.0 <= label_smoothing <= 1.0, lambda: f"label_smoothing must be in [0, 1], got {label_smoothing}")
    torch._check(z_loss >= 0.0, lambda: f"z_loss must be >= 0, got {z_loss}")


def check_targets(target: torch.Tensor, vocab: int, ignore_index: int, sync: bool | None = None) -> None:
    """Every target is in [0, vocab) or equals ignore_index. sync (default: on the CPU only) raises ValueError
    with the first bad id; otherwise a device-side assert, no host sync (see the module docstring). The
    argument is the seam that lets a CPU test run the CUDA branch."""
    if sync is None:
        sync = not _cuda.rt.is_cuda(target.device)
    bad = ((target < 0) | (target >= vocab)) & (target != ignore_index)
    if sync:
        if bool(bad.any()):
            first = int(target[bad][0])
            raise ValueError(f"target contains class id {first}, outside [0, {vocab}) (the head's vocabulary: "
                             f"linear_weight has {vocab} rows) and not ignore_index ({ignore_index})")
    else:
        torch._assert_async(~bad.any(), f"target contains a class id outside [0, {vocab}) (linear_weight has "
                                         f"{vocab} rows) that is not ignore_index ({ignore_index})")


def _use_triton(x: torch.Tensor) -> bool:
    return _select_backend("linear_cross_entropy", x.device, cuda=False) == "triton"


# ------------------------------------------------------------------------------------------ forward
@custom_op("qpeft::linear_cross_entropy_fwd", mutates_args=())
def _fwd(x: torch.Tensor, weight: torch.Tensor | None, packed: torch.Tensor | None, absmax: torch.Tensor | None,
         code: torch.Tensor | None, nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None,
         offset: torch.Tensor | None, blocksize: int, vocab: int, bias: torch.Tensor | None, target: torch.Tensor,
         ignore_index: int, softcap: float, label_smoothing: float, z_loss: float
         ) -> tuple[torch.Tensor, torch.Tensor]:
    _check(x, weight, packed, absmax, code, nested_absmax, nested_code, offset, blocksize, vocab, bias, target,
           softcap, label_smoothing, z_loss)
    check_targets(target, vocab, ignore_index)
    head = head_of(weight, packed, absmax, code, nested_absmax, nested_code, offset, blocksize, vocab, x.shape[1])
    if _use_triton(x):
        from qpeft.triton_kernels.linear_cross_entropy import lce_forward_triton

        return lce_forward_triton(x, head, bias, target, ignore_index, softcap, label_smoothing, z_loss)
    return ref.linear_cross_entropy_fwd_ref(x, head, bias, target, ignore_index, softcap, label_smoothing, z_loss)


@register_fake("qpeft::linear_cross_entropy_fwd")
def _(x, weight, packed, absmax, code, nested_absmax, nested_code, offset, blocksize, vocab, bias, target,
      ignore_index, softcap, label_smoothing, z_loss):
    _check(x, weight, packed, absmax, code, nested_absmax, nested_code, offset, blocksize, vocab, bias, target,
           softcap, label_smoothing, z_loss)
    N = x.shape[0]
    return x.new_empty(N, dtype=torch.float32), x.new_empty(N, dtype=torch.float32)


# ------------------------------------------------------------------------------------------ backward (recompute)
@custom_op("qpeft::linear_cross_entropy_bwd", mutates_args=())
def _bwd(x: torch.Tensor, weight: torch.Tensor | None, packed: torch.Tensor | None, absmax: torch.Tensor | None,
         code: torch.Tensor | None, nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None,
         offset: torch.Tensor | None, blocksize: int, vocab: int, bias: torch.Tensor | None, target: torch.Tensor,
         lse: torch.Tensor, grad_rows: torch.Tensor, ignore_index: int, softcap: float, label_smoothing: float,
         z_loss: float, need_weight_grad: bool, need_bias_grad: bool
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_bwd(x, weight, packed, absmax, code, nested_absmax, nested_code, offset, blocksize, vocab, bias, target,
               lse, grad_rows, softcap, label_smoothing, z_loss, need_weight_grad, need_bias_grad)
    head = head_of(weight, packed, absmax, code, nested_absmax, nested_code, offset, blocksize, vocab, x.shape[1])
    if _use_triton(x):
        from qpeft.triton_kernels.linear_cross_entropy import lce_backward_triton

        return lce_backward_triton(x, head, bias, target, lse, grad_rows, ignore_index, softcap, label_smoothing,
                                   z_loss, need_weight_grad, need_bias_grad)
    return ref.linear_cross_entropy_bwd_ref(x, head, bias, target, lse, grad_rows, ignore_index, softcap,
                                            label_smoothing, z_loss, need_weight_grad, need_bias_grad)


def _check_bwd(x, weight, packed, absmax, code, nested_absmax, nested_code, offset, blocksize, vocab, bias, target,
               lse, grad_rows, softcap, label_smoothing, z_loss, need_weight_grad, need_bias_grad) -> None:
    _check(x, weight, packed, absmax, code, nested_absmax, nested_code, offset, blocksize, vocab, bias, target,
           softcap, label_smoothing, z_loss)
    N = x.shape[0]
    for name, t in (("lse", lse), ("grad_rows", grad_rows)):
        torch._check(tuple(t.shape) == (N,) and t.dtype == torch.float32,
                     lambda: f"{name} must be float32 ({N},), got {t.dtype} {tuple(t.shape)}")
    torch._check(not need_weight_grad or weight is not None,
                 lambda: "need_weight_grad: a 4-bit head is frozen (no weight gradient)")
    torch._check(not need_bias_grad or bias is not None, lambda: "need_bias_grad without a bias")


@register_fake("qpeft::linear_cross_entropy_bwd")
def _(x, weight, packed, absmax, code, nested_absmax, nested_code, offset, blocksize, vocab, bias, target, lse,
      grad_rows, ignore_index, softcap, label_smoothing, z_loss, need_weight_grad, need_bias_grad):
    _check_bwd(x, weight, packed, absmax, code, nested_absmax, nested_code, offset, blocksize, vocab, bias, target,
               lse, grad_rows, softcap, label_smoothing, z_loss, need_weight_grad, need_bias_grad)
    dw = weight.new_empty(weight.shape) if need_weight_grad else x.new_empty(0)
    db = bias.new_empty(bias.shape) if need_bias_grad else x.new_empty(0)
    return torch.empty_like(x), dw, db


# ------------------------------------------------------------------------------------------ forward + input gradient
@custom_op("qpeft::linear_cross_entropy_fwd_bwd", mutates_args=())
def _fwd_bwd(x: torch.Tensor, weight: torch.Tensor | None, packed: torch.Tensor | None,
             absmax: torch.Tensor | None, code: torch.Tensor | None, nested_absmax: torch.Tensor | None,
             nested_code: torch.Tensor | None, offset: torch.Tensor | None, blocksize: int, vocab: int,
             bias: torch.Tensor | None, target: torch.Tensor, grad_rows: torch.Tensor, ignore_index: int,
             softcap: float, label_smoothing: float, z_loss: float, need_bias_grad: bool
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_fwd_bwd(x, weight, packed, absmax, code, nested_absmax, nested_code, offset, blocksize, vocab, bias,
                   target, grad_rows, softcap, label_smoothing, z_loss, need_bias_grad)
    check_targets(target, vocab, ignore_index)
    head = head_of(weight, packed, absmax, code, nested_absmax, nested_code, offset, blocksize, vocab, x.shape[1])
    if _use_triton(x):
        from qpeft.triton_kernels.linear_cross_entropy import lce_forward_backward_triton

        return lce_forward_backward_triton(x, head, bias, target, grad_rows, ignore_index, softcap,
                                           label_smoothing, z_loss, need_bias_grad)
    return ref.linear_cross_entropy_fwd_bwd_ref(x, head, bias, target, grad_rows, ignore_index, softcap,
                                                label_smoothing, z_loss, need_bias_grad)


def _check_fwd_bwd(x, weight, packed, absmax, code, nested_absmax, nested_code, offset, blocksize, vocab, bias,
                   target, grad_rows, softcap, label_smoothing, z_loss, need_bias_grad) -> None:
    _check(x, weight, packed, absmax, code, nested_absmax, nested_code, offset, blocksize, vocab, bias, target,
           softcap, label_smoothing, z_loss)
    N = x.shape[0]
    torch._check(tuple(grad_rows.shape) == (N,) and grad_rows.dtype == torch.float32,
                 lambda: f"grad_rows must be float32 ({N},), got {grad_rows.dtype} {tuple(grad_rows.shape)}")
    torch._check(not need_bias_grad or bias is not None, lambda: "need_bias_grad without a bias")


@register_fake("qpeft::linear_cross_entropy_fwd_bwd")
def _(x, weight, packed, absmax, code, nested_absmax, nested_code, offset, blocksize, vocab, bias, target,
      grad_rows, ignore_index, softcap, label_smoothing, z_loss, need_bias_grad):
    _check_fwd_bwd(x, weight, packed, absmax, code, nested_absmax, nested_code, offset, blocksize, vocab, bias,
                   target, grad_rows, softcap, label_smoothing, z_loss, need_bias_grad)
    N = x.shape[0]
    db = bias.new_empty(bias.shape) if need_bias_grad else x.new_empty(0)
    return x.new_empty(N, dtype=torch.float32), x.new_empty(N, dtype=torch.float32), torch.empty_like(x), db
