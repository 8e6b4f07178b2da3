"""NF4 quantize (with double quant) and dequantize throughput, side by side in one process:

  qpeft_cuda     qpeft on the CUDA C++ backend (QPEFT_BACKEND=cuda)
  qpeft_triton   qpeft on the Triton backend (QPEFT_BACKEND=triton)
  qpeft_torch    qpeft's PyTorch reference (the CPU path)
  torch_compile  the reference under torch.compile (GPU only: the bar a kernel has to beat)
  bnb            bitsandbytes 0.50 (its CUDA kernels on a GPU, its CPU backend on the CPU)

Ops (blocksize 64, NF4, as QLoRA):
  quantize_dq        the op chain of quantize with double quant: qpeft::quantize_4bit, mean, qpeft::
                     quantize_blockwise (no host sync) / bnb quantize_4bit(compress_statistics=True):
                     bytes = input read (2 per bf16 value) + packed write (0.5 per value)
  quantize_dq_api    public qpeft.quantize_4bit(double_quant=True): adds the argument checks and the
                     NaN/Inf check (one host sync on the absmax), so Python overhead shows on small shapes
  dequantize         the 4-bit dequantize kernel given fp32 absmax (qpeft::dequantize_4bit / bnb on a plain
                     state): bytes = packed read (0.5) + output write (2 per bf16 value)
  dequantize_dq_api  public dequantize_4bit on a double-quantized state (absmax decode included)
TB/s = those bytes / median time (the convention of ../shared/reference/performance.md).
GPU: bf16 on the LLaMA weight shapes 4096x4096, 4096x14336, 14336x4096, 8192x28672 (targets on an H100:
dequantize >= 2.7 TB/s, quantize_dq >= 1.5 TB/s on 4096x14336 and larger; bnb: ~1.9 and ~0.2).
CPU: fp32, small shapes, so the suite always runs (CPU times say nothing about the kernels).
Writes benchmarks/results/<device>/quantize.csv and prints a table.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import bench, env_info, on_gpu, print_table, write_csv  # noqa: E402
from benchmarks.common import backend as _backend  # noqa: E402

GPU_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672)]
CPU_SHAPES = [(256, 512), (1024, 1024)]
BLOCKSIZE = 64
OPS = ("quantize_dq", "quantize_dq_api", "dequantize", "dequantize_dq_api")


def providers() -> list[str]:
    if on_gpu():
        return ["qpeft_cuda", "qpeft_triton", "torch_compile", "bnb"]
    return ["qpeft_torch", "bnb"]


def _qpeft_fns(W: torch.Tensor):
    import qpeft
    from qpeft.formats import codes

    packed, state = qpeft.quantize_4bit(W, BLOCKSIZE, "nf4", double_quant=True)
    absmax = state.decoded_absmax().contiguous()
    raw = packed.reshape(-1)
    shape = list(W.shape)
    dynamic = codes.dynamic_map(device=W.device)

    def quantize_dq_ops():
        p, a = torch.ops.qpeft.quantize_4bit(W, BLOCKSIZE, "nf4")
        offset = a.mean()
        return p, torch.ops.qpeft.quantize_blockwise(a - offset, dynamic, 256), offset

    return {
        "quantize_dq": quantize_dq_ops,
        "quantize_dq_api": lambda: qpeft.quantize_4bit(W, BLOCKSIZE, "nf4", double_quant=True),
        "dequantize": lambda: torch.ops.qpeft.dequantize_4bit(raw, absmax, state.code, BLOCKSIZE, shape, W.dtype),
        "dequantize_dq_api": lambda: qpeft.dequantize_4bit(packed, state),
    }


def _compiled_reference_fns(W: torch.Tensor):
    from qpeft.formats import codes
    from qpeft.reference import quantize as ref

    code = codes.nf4(W.device)
    dynamic = codes.dynamic_map(device=W.device)

    def quantize_dq(A):
        packed, absmax = ref.quantize_4bit_ref(A, BLOCKSIZE, "nf4")
        offset = absmax.mean()
        q, absmax2 = ref.quantize_blockwise_ref(absmax - offset, dynamic, 256)
        return packed, q, absmax2, offset

    packed, absmax = ref.quantize_4bit_ref(W, BLOCKSIZE, "nf4")
    _, q, absmax2, offset = quantize_dq(W)
    shape = list(W.shape)
    cq = torch.compile(quantize_dq, dynamic=False)
    cdq = torch.compile(lambda p, a: ref.dequantize_4bit_ref(p, a, code, BLOCKSIZE, shape, W.dtype), dynamic=False)
    cdq_dq = torch.compile(lambda p: ref.dequantize_4bit_ref(
        p, ref.decode_absmax_ref(q, absmax2, dynamic, 256, offset), code, BLOCKSIZE, shape, W.dtype), dynamic=False)
    return {"quantize_dq": lambda: cq(W), "dequantize": lambda: cdq(packed, absmax),
            "dequantize_dq_api": lambda: cdq_dq(packed)}


def _bnb_fns(W: torch.Tensor):
    import bitsandbytes.functional as F

    packed, plain = F.quantize_4bit(W, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=False)
    packed_dq, nested = F.quantize_4bit(W, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True)
    def quantize_dq():
        return F.quantize_4bit(W, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True)

    return {
        "quantize_dq": quantize_dq,
        "quantize_dq_api": quantize_dq,
        "dequantize": lambda: F.dequantize_4bit(packed, plain),
        "dequantize_dq_api": lambda: F.dequantize_4bit(packed_dq, nested),
    }


def _fns(provider: str, W: torch.Tensor):
    if provider == "bnb":
        return _bnb_fns(W)
    if provider == "torch_compile":
        return _compiled_reference_fns(W)
    return _qpeft_fns(W)


def _bytes(op: str, n: int, itemsize: int) -> int:
    return n * itemsize + (n + 1) // 2


def run(quick: bool = False) -> list[dict]:
    device = "cuda" if on_gpu() else "cpu"
    dtype = torch.bfloat16 if on_gpu() else torch.float32
    shapes = (GPU_SHAPES[:2] if quick else GPU_SHAPES) if on_gpu() else (CPU_SHAPES[:1] if quick else CPU_SHAPES)
    reps = 5 if quick else 20
    rows = []
    for N, K in shapes:
        W = torch.randn(N, K, device=device, dtype=dtype) * 0.02
        for provider in providers():
            backend = {"qpeft_cuda": "cuda", "qpeft_triton": "triton", "qpeft_torch": "torch"}.get(provider)
            with _backend(backend):
                try:
                    fns = _fns(provider, W)
                    error = None
                except Exception as e:  # e.g. the CUDA extension does not build, bnb missing
                    fns, error = {}, f"{type(e).__name__}: {e}"[:200]
                for op in OPS:
                    if error is None and op not in fns:
                        continue
                    row = {"op": op, "provider": provider, "shape": f"{N}x{K}", "dtype": str(dtype).split(".")[-1],
                           "blocksize": BLOCKSIZE}
                    if error is None:
                        try:
                            t = bench(fns[op], warmup=2, reps=reps)
                            row.update(ms=t["ms"], p20_ms=t["p20"], p80_ms=t["p80"],
                                       tb_s=_bytes(op, N * K, W.element_size()) / (t["ms"] * 1e-3) / 1e12)
                        except Exception as e:
                            row["error"] = f"{type(e).__name__}: {e}"[:200]
                    else:
                        row["error"] = error
                    rows.append(row)
        del W
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    args = parser.parse_args(argv)
    rows = run(args.quick)
    path = write_csv("quantize", rows)
    print(env_info())
    print_table(rows, ["op", "shape", "provider", "ms", "tb_s", "error"])
    # side by side: each provider's speed relative to bitsandbytes on the same op and shape
    by_key = {(r["op"], r["shape"], r["provider"]): r for r in rows if "ms" in r}
    for r in rows:
        base = by_key.get((r["op"], r["shape"], "bnb"))
        if base and "ms" in r:
            r["x_vs_bnb"] = base["ms"] / r["ms"]
    print()
    print_table([r for r in rows if "x_vs_bnb" in r], ["op", "shape", "provider", "tb_s", "x_vs_bnb"])
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
