"""Pure-PyTorch RMSNorm, forward and backward: the CPU path, the fallback and the oracle of the Triton kernel.

    rstd = 1 / sqrt(mean(x^2) + eps)        over the last dimension, in fp32 (every HF family upcasts first)
    n    = x * rstd                          fp32
    casting="llama":  y = (offset + w) * n.to(x.dtype)     in promote(x.dtype, w.dtype)
                      LlamaRMSNorm / MistralRMSNorm / Qwen2RMSNorm / Qwen3RMSNorm: the normalised value is rounded
                      to the input dtype *before* the weight multiplies it, and the product takes torch's type
                      promotion (fp32 norm weights, as prepare_model_for_kbit_training leaves them, give fp32 out)
    casting="gemma":  y = (n * (offset + w.float())).to(x.dtype)
                      GemmaRMSNorm / Gemma2RMSNorm / Gemma3RMSNorm with offset=1.0: the product is taken in fp32 and
                      rounded once, to the input dtype (transformers PR 29402)
x (M, H) row-major, weight (H,). rstd (M,) fp32 is returned for the backward. The backward is the exact
derivative of the fp32 math (the roundings to x.dtype count as identities, as autograd treats .to()):
    dw = sum_rows dy * n_used      (n_used = n.to(x.dtype) under "llama", n under "gemma"), fp32, cast to w.dtype
    dn = dy * (offset + w);   dx = rstd * (dn - n * mean(dn * n))      fp32, cast to x.dtype
"""
from __future__ import annotations

import torch

__all__ = ["CASTINGS", "rms_norm_out_dtype", "rms_norm_ref", "rms_norm_backward_ref"]

CASTINGS = ("llama", "gemma")


def rms_norm_out_dtype(x_dtype: torch.dtype, w_dtype: torch.dtype, casting: str) -> torch.dtype:
    """y's dtype: torch's promotion of x and w under "llama" (HF's `weight * x`), x's dtype under "gemma"."""
    return torch.promote_types(x_dtype, w_dtype) if casting == "llama" else x_dtype


def _acc(t: torch.Tensor) -> torch.dtype:
    """fp32 math (fp64 inputs stay fp64: the reference then checks its own formulas against autograd)."""
    return torch.promote_types(t.dtype, torch.float32)


def _weight(weight: torch.Tensor, offset: float, acc: torch.dtype) -> torch.Tensor:
    w = weight.to(acc)
    return w + offset if offset != 0.0 else w


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float, casting: str
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(y (M, H) in rms_norm_out_dtype, rstd (M,) fp32)."""
    acc = _acc(x)
    xf = x.to(acc)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    n = xf * rstd
    w = _weight(weight, offset, acc)
    out_dtype = rms_norm_out_dtype(x.dtype, weight.dtype, casting)
    if casting == "llama":
        y = (n.to(x.dtype).to(acc) * w).to(out_dtype)
    else:
        y = (n * w).to(out_dtype)
    return y, rstd.squeeze(-1)


def rms_norm_backward_ref(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                          offset: float, casting: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx (M, H) in x.dtype, dw (H,) in weight.dtype)."""
    acc = _acc(x)
    xf = x.to(acc)
    r = rstd.to(acc).unsqueeze(-1)
    n = xf * r
    dyf = dy.to(acc)
    n_used = n.to(x.dtype).to(acc) if casting == "llama" else n
    dw = (dyf * n_used).sum(0)
    dn = dyf * _weight(weight, offset, acc)
    dx = r * (dn - n * (dn * n).mean(-1, keepdim=True))
    return dx.to(x.dtype), dw.to(weight.dtype)
