"""NF4 matmul: qpeft (CUDA C++ and Triton paths) vs bitsandbytes matmul_4bit vs dense cuBLAS, side by side.

Forward y = x @ W^T and input gradient dx = dy @ W for W (N, K) NF4, blocksize 64, double-quantized absmax
(bnb `compress_statistics=True`, the QLoRA default). Reports the median ms, the ideal time (bandwidth or
tensor-core floor, H100 numbers from ../shared/reference/performance.md) and speed ratios.

- GPU: (K, N) in (4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672); M from 1 to 16384; bf16.
  Weights are rotated over enough copies (>= 150 MB) that they are not served from the 50 MB L2; decode
  sizes (M <= 16) are also timed under CUDA graphs (per-call time of a graph that runs every copy once).
  bitsandbytes' backward is `dy @ dequantize_4bit(W)` (MatMul4Bit.backward), timed as exactly that.
- Providers: `qpeft` is the op as users get it (auto dispatch); `qpeft_cuda` / `qpeft_triton` are the two
  backends alone (default Triton tiles); the speedup columns compare `qpeft` with dense and bnb.
- GPU with quick=True: the same shapes at the headline sizes M = 1, 16, 256, 4096 only (tests/run_gpu.sh quick).
- CPU: tiny shapes, fp32, the PyTorch reference path; only checks that the suite runs.

    python -m benchmarks.bench_nf4_matmul [--quick]
"""
from __future__ import annotations

import math

import torch

from benchmarks.common import bench, on_gpu, suite_main

GPU_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672)]
GPU_M = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096, 16384]
QUICK_GPU_M = [1, 16, 256, 4096]  # decode, the end of the decode kernels' range, a small and a large GEMM
CPU_SHAPES = [(256, 256), (512, 384)]
CPU_M = [1, 16, 64]
# H100 SXM ceilings measured in performance.md: 3.02 TB/s copy bandwidth, 700 TFLOP/s bf16 cuBLAS
BANDWIDTH = 3.02e12
FLOPS = 700e12
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # 4.127 bits per weight with double quant
L2_FLUSH_BYTES = 150e6  # 3x the 50 MB L2


def _ideal_ms(M, N, K, bits_per_weight, elt_bytes):
    moved = N * K * bits_per_weight / 8 + (M * K + M * N) * elt_bytes
    return 1e3 * max(moved / BANDWIDTH, 2 * M * N * K / FLOPS)


def _providers(K, N, dtype, device, copies):
    """name -> (fwd(i, x), dx(i, dy)) closures over `copies` independent weights."""
    import qpeft
    from qpeft.autograd.nf4_matmul import weight_args

    dense, q_args = [], []
    for _ in range(copies):
        W = torch.randn(N, K, device=device, dtype=dtype) / math.sqrt(K)
        packed, state = qpeft.quantize_4bit(W, blocksize=64, quant_type="nf4", double_quant=True)
        dense.append(W)
        q_args.append(weight_args(packed, state))

    def q_fwd(i, x):
        p, a, c, bs, n, _, na, nc, off = q_args[i]
        return torch.ops.qpeft.nf4_matmul(x, p, a, c, bs, n, na, nc, off, None, None, None, 0.0)

    def q_dx(i, dy):
        p, a, c, bs, _, k, na, nc, off = q_args[i]
        return torch.ops.qpeft.nf4_matmul_dx(dy, p, a, c, bs, k, na, nc, off, None, None, 0.0)

    # "qpeft": the op as users get it (auto dispatch: tuned table or default rule); the two backends also alone
    out = {"dense": (lambda i, x: x @ dense[i].t(), lambda i, dy: dy @ dense[i]), "qpeft": (q_fwd, q_dx)}
    if on_gpu():
        from qpeft import _backend

        if _backend.cuda_ext_status()[0]:
            out["qpeft_cuda"] = (lambda i, x: raw_cuda_fwd(q_args[i], x), lambda i, dy: raw_cuda_dx(q_args[i], dy))
        try:
            from qpeft.triton_kernels.nf4_matmul import nf4_matmul_dx_triton, nf4_matmul_triton

            out["qpeft_triton"] = (lambda i, x: nf4_matmul_triton(x, *_fwd_args(q_args[i])),
                                   lambda i, dy: nf4_matmul_dx_triton(dy, *_dx_args(q_args[i])))
        except Exception as e:  # noqa: BLE001  (report, keep benchmarking the others)
            print(f"triton provider unavailable: {e}")
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf

        b_args = [bnbf.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4") for W in dense]
        out["bnb"] = (lambda i, x: bnb.matmul_4bit(x, b_args[i][0].t(), quant_state=b_args[i][1]),
                      lambda i, dy: dy @ bnbf.dequantize_4bit(*b_args[i]).to(dy.dtype))
    except Exception as e:  # noqa: BLE001
        print(f"bitsandbytes provider unavailable: {e}")
    return out


def raw_cuda_fwd(args, x):
    """The raw CUDA C++ forward kernel alone (no dispatch), output allocated as the op does.
    args: `weight_args(packed, state)`."""
    p, a, c, bs, n, _, na, nc, off = args
    out = torch.empty((x.shape[0], n), dtype=x.dtype, device=x.device)
    torch.ops.qpeft_C.nf4_matmul_out(x, p, a, c, bs, na, nc, off, None, None, None, 0.0, out)
    return out


def raw_cuda_dx(args, dy):
    p, a, c, bs, _, k, na, nc, off = args
    dx = torch.empty((dy.shape[0], k), dtype=dy.dtype, device=dy.device)
    torch.ops.qpeft_C.nf4_matmul_dx_out(dy, p, a, c, bs, na, nc, off, None, None, 0.0, dx)
    return dx


def _fwd_args(a):
    p, ab, c, bs, n, _, na, nc, off = a
    return (p, ab, c, bs, n, na, nc, off)


def _dx_args(a):
    p, ab, c, bs, _, k, na, nc, off = a
    return (p, ab, c, bs, k, na, nc, off)


def run(quick: bool = False) -> list[dict]:
    gpu = on_gpu()
    device = "cuda" if gpu else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shapes, ms_list = (GPU_SHAPES, QUICK_GPU_M if quick else GPU_M) if gpu else (CPU_SHAPES, CPU_M)
    rows = []
    for K, N in shapes:
        copies = max(1, math.ceil(L2_FLUSH_BYTES / (N * K * 2))) if gpu else 1  # sized for the dense copies
        providers = _providers(K, N, dtype, device, copies)
        for M in ms_list:
            x = torch.randn(M, K, device=device, dtype=dtype)
            dy = torch.randn(M, N, device=device, dtype=dtype)
            for direction, arg in (("fwd", x), ("dx", dy)):
                times = {}
                for name, fns in providers.items():
                    fn = fns[0] if direction == "fwd" else fns[1]
                    state = {"i": 0}

                    def step(fn=fn, state=state, arg=arg):
                        state["i"] = (state["i"] + 1) % copies
                        return fn(state["i"], arg)

                    try:
                        times[name] = bench(step)["ms"]
                        if gpu and M <= 16:  # launch overhead matters at this size: CUDA graph, all copies
                            times[name + "_graph"] = bench(
                                lambda fn=fn, arg=arg: [fn(i, arg) for i in range(copies)], cuda_graph=True
                            )["ms"] / copies
                    except Exception as e:  # noqa: BLE001  (a provider that cannot run this size)
                        print(f"{name} {direction} M={M} K={K} N={N}: {type(e).__name__}: {e}")
                row = {"K": K, "N": N, "M": M, "dir": direction, "dtype": str(dtype).split(".")[-1], **times}
                if gpu:
                    row["ideal_nf4_ms"] = _ideal_ms(M, N, K, NF4_BITS, 2)
                    row["ideal_dense_ms"] = _ideal_ms(M, N, K, 16, 2)
                    for name in [n for n in times if n.startswith("qpeft")]:
                        row[f"{name}_floor_frac"] = row["ideal_nf4_ms"] / times[name]
                # ratios are for the op users get (auto dispatch), not the best of our backends
                for suffix in ("", "_graph"):
                    ours = times.get("qpeft" + suffix)
                    for base in ("dense", "bnb"):
                        if ours and base + suffix in times:
                            row[f"speedup_vs_{base}{suffix}"] = times[base + suffix] / ours
                rows.append(row)
    return rows


def main() -> None:
    suite_main("nf4_matmul", run, None, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    main()
