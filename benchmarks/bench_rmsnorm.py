"""RMSNorm: qpeft.rms_norm vs the eager transformers modules (LlamaRMSNorm, Gemma2RMSNorm) and Liger-Kernel's
LigerRMSNormFunction (when installed): forward, backward, forward + backward, peak memory (GPU).

    python -m benchmarks.bench_rmsnorm [--quick]

GPU: bf16, (tokens M, hidden H) in {(2048, 4096) (Liger's published point), (8192, 4096), (8192, 8192),
(262144, 128) (Qwen3's q_norm: 8192 tokens x 32 heads over head_dim 128)}, both castings; weight and x require grad.
CPU: fp32, small shapes, so the suite runs anywhere (CPU times say nothing about the kernels).
Writes benchmarks/results/<device>/rmsnorm.csv.
"""
from __future__ import annotations

import torch

from benchmarks.common import on_gpu, suite_main
from benchmarks.fused_kernels import COLUMNS_TAIL, liger_missing, run_providers


def shapes(quick: bool) -> list[tuple[int, int]]:
    if not on_gpu():
        return [(256, 512)] if quick else [(256, 512), (1024, 128)]
    full = [(2048, 4096), (8192, 4096), (8192, 8192), (262144, 128)]
    return full[:2] if quick else full


def run(quick: bool = False) -> list[dict]:
    import qpeft
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    dev = "cuda" if on_gpu() else "cpu"
    dtype = torch.bfloat16 if on_gpu() else torch.float32
    rows = []
    for casting, cls, offset in (("llama", LlamaRMSNorm, 0.0), ("gemma", Gemma2RMSNorm, 1.0)):
        for M, H in shapes(quick):
            torch.manual_seed(0)
            mod = cls(H, eps=1e-6).to(dev, dtype)
            with torch.no_grad():
                mod.weight.normal_(1.0 if offset == 0.0 else 0.0, 0.1)
            x = torch.randn(M, H, device=dev, dtype=dtype, requires_grad=True)
            dy = torch.randn(M, H, device=dev, dtype=dtype)

            def make(name, mod=mod, x=x, dy=dy, casting=casting, offset=offset):
                w = mod.weight
                if name == "hf_eager":
                    return (lambda: mod(x)), (dy,), (x, w)
                if name == "qpeft":
                    return (lambda: qpeft.rms_norm(x, w, 1e-6, offset, casting)), (dy,), (x, w)
                if name == "liger":
                    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

                    return (lambda: LigerRMSNormFunction.apply(x, w, 1e-6, offset, casting)), (dy,), (x, w)
                if name == "hf_compile":
                    comp = torch.compile(mod)
                    return (lambda: comp(x)), (dy,), (x, w)
                raise ValueError(name)

            providers = {"hf_eager": None, "qpeft": None, "liger": liger_missing(),
                         "hf_compile": None if on_gpu() else "GPU only (Inductor's C++ build on the CPU)"}
            rows += run_providers({"casting": casting, "M": M, "H": H, "dtype": str(dtype).split(".")[-1]},
                                  providers, make)
    return rows


COLUMNS = ["casting", "M", "H", "dtype", *COLUMNS_TAIL]


def main() -> None:
    suite_main("rmsnorm", run, COLUMNS, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    main()
