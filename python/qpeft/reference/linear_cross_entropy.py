"""Pure-PyTorch fused linear + cross-entropy: the CPU path, the fallback and the oracle of the Triton kernels.

For rows x_i (N, H) of hidden states, a head W (V, H) (dense, or 4-bit NF4/FP4 in bitsandbytes' layout) with an
optional bias b (V,), and class ids y_i:

    u = x W^T + b,   z = c tanh(u / c) with a final-logit softcap c (Gemma 2), else z = u
    lse_i = log sum_j exp(z_ij)
    loss_i = lse_i - (1 - eps) z_i[y_i] - (eps / V) sum_j z_ij + z_loss lse_i^2      (0 where y_i == ignore_index)

which is torch's cross_entropy with label_smoothing=eps ((1 - eps) nll + eps * mean_j(-log p_ij)) plus PaLM's
auxiliary z-loss (z_loss * lse^2 per token, as Liger's `lse_square_scale`). The gradient of loss_i is

    d loss_i / d z_ij = p_ij (1 + 2 z_loss lse_i) - (1 - eps) [j == y_i] - eps / V,   p = exp(z - lse)
    d z / d u = 1 - (z / c)^2                                                          (softcap only)

and the per-row factor g_i (from the reduction and the upstream gradient; 0 for ignored rows) scales it.

Memory: the [N, V] logits are never held. The vocabulary is walked in blocks of VOCAB_BLOCK rows of W (a 4-bit
head is decoded one block at a time) and the tokens in chunks of TOKEN_CHUNK rows, so the largest temporaries are
a few (TOKEN_CHUNK, VOCAB_BLOCK) blocks, one decoded (VOCAB_BLOCK, H) block of W, an fp32 (N, H) input-gradient
accumulator and, for a trainable head, one fp32 (VOCAB_BLOCK, H) weight-gradient block. The forward keeps an online
log-sum-exp per row (running max m and sum s of exp(z - m)), in fp32 (fp64 for fp64 inputs, which only the tests
use). The backward recomputes each logits block. All products and sums accumulate in fp32; the gradients are
rounded to the input / weight / bias dtypes once, at the end.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from . import quantize as quantize_ref
from .nf4_matmul import decode_absmax_ref

__all__ = ["Head", "row_loss_ref", "dlogits_ref", "linear_cross_entropy_fwd_ref", "linear_cross_entropy_bwd_ref",
           "linear_cross_entropy_fwd_bwd_ref"]

# Block sizes of the reference (module attributes read at call time, so tests can shrink them to exercise the
# multi-block paths on tiny shapes). 512 x 4096 fp32 = 8 MiB per logits-sized temporary: forward + backward at
# V = 128,256, 4,096 tokens, H = 2,048 (fp32, frozen head) peaked 77 MiB above the inputs, eager 6,022 MiB
# (benchmarks/bench_linear_cross_entropy.py --cpu-memory).
TOKEN_CHUNK = 512
VOCAB_BLOCK = 4096


class Head(NamedTuple):
    """The (V, H) classifier weight: dense `weight`, or the 4-bit pieces (packed uint8 over the flattened
    row-major W, absmax fp32 [blocks] or uint8 codes with nested_absmax / nested_code / offset, 16-entry code)."""
    weight: torch.Tensor | None
    packed: torch.Tensor | None
    absmax: torch.Tensor | None
    code: torch.Tensor | None
    nested_absmax: torch.Tensor | None
    nested_code: torch.Tensor | None
    offset: torch.Tensor | None
    blocksize: int
    vocab: int
    hidden: int

    @property
    def is_4bit(self) -> bool:
        return self.weight is None

    def row_step(self) -> int:
        """Vocabulary blocks start on multiples of this many rows, so a block of a 4-bit head starts on a
        quantization block (and byte) boundary: v0 * H % blocksize == 0."""
        if not self.is_4bit:
            return 1
        return self.blocksize // math.gcd(self.hidden, self.blocksize)

    def blocks(self, size: int):
        """(v0, v1) vocabulary ranges of about `size` rows, aligned to row_step()."""
        step = self.row_step()
        size = max(step, size // step * step)
        for v0 in range(0, self.vocab, size):
            yield v0, min(v0 + size, self.vocab)


def _head_rows(head: Head, absmax32: torch.Tensor | None, v0: int, v1: int, dtype: torch.dtype) -> torch.Tensor:
    """W[v0:v1] in `dtype` (fp32 or fp64); a 4-bit head is decoded for these rows only."""
    if not head.is_4bit:
        return head.weight[v0:v1].to(dtype)
    H, bs = head.hidden, head.blocksize
    e0, e1 = v0 * H, v1 * H  # e0 is a multiple of blocksize (row_step), hence even
    packed = head.packed.reshape(-1)[e0 // 2:(e1 + 1) // 2]
    absmax = absmax32[e0 // bs:-(-e1 // bs)]
    w = quantize_ref.dequantize_4bit_ref(packed, absmax, head.code, bs, [v1 - v0, H], torch.float32)
    return w.to(dtype)


def _decoded_absmax(head: Head) -> torch.Tensor | None:
    if not head.is_4bit:
        return None
    return decode_absmax_ref(head.absmax, head.nested_absmax, head.nested_code, head.offset)


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _logits(xc: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, softcap: float) -> torch.Tensor:
    """Capped logits z of one (token chunk, vocabulary block), in w's dtype."""
    z = xc @ w.t()
    if b is not None:
        z += b
    if softcap:
        z = torch.tanh(z / softcap) * softcap
    return z


def row_loss_ref(lse: torch.Tensor, target_logit: torch.Tensor, sum_logits: torch.Tensor, valid: torch.Tensor,
                 vocab: int, label_smoothing: float, z_loss: float) -> torch.Tensor:
    """loss_i from the per-row lse, z_i[y_i] and sum_j z_ij (fp32 [N]); 0 for ignored rows."""
    loss = lse - (1.0 - label_smoothing) * target_logit
    if label_smoothing:
        loss = loss - (label_smoothing / vocab) * sum_logits
    if z_loss:
        loss = loss + z_loss * lse * lse
    return torch.where(valid, loss, torch.zeros_like(loss))


def dlogits_ref(z: torch.Tensor, lse: torch.Tensor, local_target: torch.Tensor, g: torch.Tensor, vocab: int,
                softcap: float, label_smoothing: float, z_loss: float) -> torch.Tensor:
    """d loss / d u for one block: z (R, Vb) capped logits, lse / g (R,), local_target (R,) = y - v0 (a row whose
    target is outside this block has no one-hot term)."""
    d = torch.exp(z - lse[:, None])
    if z_loss:
        d = d * (1.0 + 2.0 * z_loss * lse)[:, None]
    if label_smoothing:
        d = d - label_smoothing / vocab
    hit = (local_target >= 0) & (local_target < z.shape[1])
    rows = hit.nonzero().squeeze(1)
    d[rows, local_target[rows]] -= 1.0 - label_smoothing
    if softcap:
        t = z / softcap
        d = d * (1.0 - t * t)
    return d * g[:, None]


def linear_cross_entropy_fwd_ref(x: torch.Tensor, head: Head, bias: torch.Tensor | None, target: torch.Tensor,
                                 ignore_index: int, softcap: float, label_smoothing: float, z_loss: float
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss (N,), lse (N,)), fp32 (fp64 for fp64 x), for x (N, H) and target (N,) integer ids."""
    acc = _acc_dtype(x)
    N = x.shape[0]
    m = torch.full((N,), -math.inf, dtype=acc, device=x.device)
    s = torch.zeros(N, dtype=acc, device=x.device)
    target_logit = torch.zeros(N, dtype=acc, device=x.device)
    sum_logits = torch.zeros(N, dtype=acc, device=x.device)
    tgt = target.long()
    absmax32 = _decoded_absmax(head)
    for v0, v1 in head.blocks(VOCAB_BLOCK):
        w = _head_rows(head, absmax32, v0, v1, acc)
        b = bias[v0:v1].to(acc) if bias is not None else None
        for r0 in range(0, N, TOKEN_CHUNK):
            r1 = min(N, r0 + TOKEN_CHUNK)
            z = _logits(x[r0:r1].to(acc), w, b, softcap)
            m_old = m[r0:r1]
            m_new = torch.maximum(m_old, z.amax(1))
            s[r0:r1] = s[r0:r1] * torch.exp(m_old - m_new) + torch.exp(z - m_new[:, None]).sum(1)
            m[r0:r1] = m_new
            local = tgt[r0:r1] - v0
            hit = (local >= 0) & (local < v1 - v0)
            picked = z.gather(1, local.clamp(0, v1 - v0 - 1)[:, None]).squeeze(1)
            target_logit[r0:r1] += torch.where(hit, picked, torch.zeros_like(picked))
            if label_smoothing:
                sum_logits[r0:r1] += z.sum(1)
            del z
    lse = m + torch.log(s)
    loss = row_loss_ref(lse, target_logit, sum_logits, tgt != ignore_index, head.vocab, label_smoothing, z_loss)
    return loss, lse


def linear_cross_entropy_bwd_ref(x: torch.Tensor, head: Head, bias: torch.Tensor | None, target: torch.Tensor,
                                 lse: torch.Tensor, grad_rows: torch.Tensor, ignore_index: int, softcap: float,
                                 label_smoothing: float, z_loss: float, need_weight_grad: bool,
                                 need_bias_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx (N, H) in x's dtype, dweight (V, H) in the weight's dtype or empty (0,), dbias (V,) in the bias' dtype
    or empty (0,)) for per-row gradient factors grad_rows (N,) (ignored rows get 0 whatever grad_rows says)."""
    acc = _acc_dtype(x)
    N, H = x.shape
    tgt = target.long()
    g = torch.where(tgt != ignore_index, grad_rows.to(acc), torch.zeros((), dtype=acc, device=x.device))
    lse = lse.to(acc)
    dx = torch.zeros(N, H, dtype=acc, device=x.device)
    dw = (torch.empty(head.vocab, H, dtype=head.weight.dtype, device=x.device) if need_weight_grad
          else x.new_empty(0))
    db = torch.zeros(head.vocab, dtype=acc, device=x.device) if need_bias_grad else None
    absmax32 = _decoded_absmax(head)
    for v0, v1 in head.blocks(VOCAB_BLOCK):
        w = _head_rows(head, absmax32, v0, v1, acc)
        b = bias[v0:v1].to(acc) if bias is not None else None
        dw_block = torch.zeros(v1 - v0, H, dtype=acc, device=x.device) if need_weight_grad else None
        for r0 in range(0, N, TOKEN_CHUNK):
            r1 = min(N, r0 + TOKEN_CHUNK)
            xc = x[r0:r1].to(acc)
            z = _logits(xc, w, b, softcap)
            d = dlogits_ref(z, lse[r0:r1], tgt[r0:r1] - v0, g[r0:r1], head.vocab, softcap, label_smoothing, z_loss)
            del z
            dx[r0:r1].addmm_(d, w)
            if need_weight_grad:
                dw_block.addmm_(d.t(), xc)
            if need_bias_grad:
                db[v0:v1] += d.sum(0)
        if need_weight_grad:
            dw[v0:v1] = dw_block.to(dw.dtype)
    db = db.to(bias.dtype) if need_bias_grad else x.new_empty(0)
    return dx.to(x.dtype), dw, db


def linear_cross_entropy_fwd_bwd_ref(x: torch.Tensor, head: Head, bias: torch.Tensor | None, target: torch.Tensor,
                                     grad_rows: torch.Tensor, ignore_index: int, softcap: float,
                                     label_smoothing: float, z_loss: float, need_bias_grad: bool
                                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss and the input (and bias) gradient in one call, for a frozen head: (loss, lse, dx, dbias). On the CPU
    this is the forward then the backward (the same blocks twice); the saving of one logits pass is the GPU
    kernels' (see triton_kernels/linear_cross_entropy.py)."""
    loss, lse = linear_cross_entropy_fwd_ref(x, head, bias, target, ignore_index, softcap, label_smoothing, z_loss)
    dx, _, db = linear_cross_entropy_bwd_ref(x, head, bias, target, lse, grad_rows, ignore_index, softcap,
                                             label_smoothing, z_loss, False, need_bias_grad)
    return loss, lse, dx, db
