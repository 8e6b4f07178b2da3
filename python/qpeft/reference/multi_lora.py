"""Pure-PyTorch reference of the multi-LoRA ops (many adapters in one batch; CPU path, fallback, test oracle).

Adapter pool of one layer (no padding anywhere in storage or math): L adapters with ranks r_0..r_{L-1}
    A_cat (R, K)  = [A_0; A_1; ...]            rows rank_start[a] : rank_start[a+1] are adapter a's A (r_a, K)
    B_cat (N, R)  = [B_0, B_1, ...]            columns rank_start[a] : rank_start[a+1] are adapter a's B (N, r_a)
    rank_start (L+1,) int32, scale (L,) fp32 (PEFT's lora_alpha / r, or / sqrt(r) with rsLoRA)
Per row i of the batch an adapter slot index[i] in [-1, L) (-1: no adapter, PEFT's "__base__").

    shrink:  xa[i, :r_a] = x[i] A_a^T  (fp32; xa[i, r_a:] = 0)             xa (M, max_rank)
    expand:  out[i] = y[i] + scale[a] * xa[i, :r_a] B_a^T  (fp32, rounded once to y's dtype)

Bit-exactness: CPU BLAS results depend on the batch shape (a 1-row GEMV and an M-row GEMM round differently),
so the reference computes each adapter's product over the *whole* batch, in exactly the shapes and ops of the
single-adapter reference (reference.lora: x.float() @ A^T, then addmm(acc, xa, B^T, alpha=scale)), and keeps the
rows that use that adapter. A row of a mixed batch is therefore bit for bit the same row of that batch run with
only its adapter active. That costs L full-batch rank-r products: fine for an oracle, not for serving (the
Triton / CUDA kernels touch each row's own adapter only).
The reference reads rank_start / scale on the host (.tolist()): free on CPU, one sync on CUDA (it is reached
there only under QPEFT_BACKEND=torch).
"""
from __future__ import annotations

import torch

__all__ = ["lora_shrink_gathered_ref", "lora_expand_gathered_ref", "sort_rows_by_adapter_ref", "ROWS_MAX_M"]

# Decode / prefill boundary of the GPU kernels: batches of at most this many rows take the per-row (BGMV) kernels
# (Triton and CUDA C++), larger ones Triton's segmented tensor-core kernels. Reasoned, not measured (no GPU
# here): below 64 rows a 16-row segment tile is mostly empty whenever adapters differ per row, while the row
# kernels' extra weight reads (each row re-reads its adapter's r x (K + N) values) stay in L2 at decode sizes;
# above it those re-reads grow with M (4096 rows x r 64 x K 4096 x 4 B = 4 GiB of L2 traffic per shrink).
ROWS_MAX_M = 64


def lora_shrink_gathered_ref(x: torch.Tensor, A_cat: torch.Tensor, rank_start: torch.Tensor, index: torch.Tensor,
                             max_rank: int) -> torch.Tensor:
    """xa (M, max_rank) fp32: xa[i, :r_a] = x[i] @ A_a^T for a = index[i] >= 0, zeros elsewhere."""
    starts = rank_start.tolist()
    xf = x.float()
    xa = torch.zeros((x.shape[0], max_rank), dtype=torch.float32, device=x.device)
    for a in range(len(starts) - 1):
        lo, hi = starts[a], starts[a + 1]
        rows = (index == a)[:, None]
        part = xf @ A_cat[lo:hi].float().t()  # (M, r_a): the single-adapter shapes
        xa[:, : hi - lo] = torch.where(rows, part, xa[:, : hi - lo])
    return xa


def lora_expand_gathered_ref(y: torch.Tensor, xa: torch.Tensor, B_cat: torch.Tensor, rank_start: torch.Tensor,
                             scale: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """out (M, N) in y's dtype: y[i] + scale[a] * xa[i, :r_a] @ B_a^T for a = index[i] >= 0, y[i] elsewhere."""
    starts = rank_start.tolist()
    scales = scale.tolist()
    acc = y.float()
    out = acc
    for a in range(len(starts) - 1):
        lo, hi = starts[a], starts[a + 1]
        rows = (index == a)[:, None]
        full = torch.addmm(acc, xa[:, : hi - lo].contiguous(), B_cat[:, lo:hi].float().contiguous().t(),
                           alpha=scales[a])
        out = torch.where(rows, full, out)
    return out.to(y.dtype)


def sort_rows_by_adapter_ref(index: torch.Tensor, num_adapters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order (M,) int32, seg_start (L+2,) int32): rows sorted by slot, base rows (-1) first.

    Segment s (s = 0: the base rows, s = a + 1: adapter a) is order[seg_start[s] : seg_start[s+1]]. Built with
    device ops only (stable sort + searchsorted: no bincount, whose CUDA kernel reads the max on the host), so
    a CUDA graph can capture it for a fixed batch size.
    """
    sorted_idx, order = torch.sort(index.to(torch.int64), stable=True)
    bounds = torch.arange(-1, num_adapters + 1, device=index.device, dtype=torch.int64)
    seg_start = torch.searchsorted(sorted_idx, bounds)
    return order.to(torch.int32), seg_start.to(torch.int32)
