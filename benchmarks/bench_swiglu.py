"""SwiGLU / GeGLU: qpeft.glu_activation vs eager ACT2FN[act](gate) * up (what the transformers MLPs compute) and
Liger-Kernel's LigerSiLUMulFunction / LigerGELUMulFunction (when installed): forward, backward, forward +
backward, peak memory (GPU).

    python -m benchmarks.bench_swiglu [--quick]

GPU: bf16, gate/up (M, I) in {(2048, 14336), (8192, 14336)} (Llama-3-8B, Gemma-2-9B) and (8192, 9216)
(Gemma-2-2B); activations silu, gelu_pytorch_tanh, gelu. CPU: fp32, small shapes.
Writes benchmarks/results/<device>/swiglu.csv.
"""
from __future__ import annotations

import torch

from benchmarks.common import on_gpu, suite_main
from benchmarks.fused_kernels import COLUMNS_TAIL, liger_missing, run_providers

LIGER = {"silu": ("liger_kernel.ops.swiglu", "LigerSiLUMulFunction"),
         "gelu_pytorch_tanh": ("liger_kernel.ops.geglu", "LigerGELUMulFunction")}  # Liger's GeGLU is tanh only


def shapes(quick: bool) -> list[tuple[int, int]]:
    if not on_gpu():
        return [(256, 512)]
    full = [(2048, 14336), (8192, 14336), (8192, 9216)]
    return full[:2] if quick else full


def run(quick: bool = False) -> list[dict]:
    import importlib

    import qpeft
    from transformers.activations import ACT2FN

    dev = "cuda" if on_gpu() else "cpu"
    dtype = torch.bfloat16 if on_gpu() else torch.float32
    rows = []
    for act in ("silu", "gelu_pytorch_tanh", "gelu"):
        for M, I in shapes(quick):
            torch.manual_seed(0)
            gate = torch.randn(M, I, device=dev, dtype=dtype, requires_grad=True)
            up = torch.randn(M, I, device=dev, dtype=dtype, requires_grad=True)
            dh = torch.randn(M, I, device=dev, dtype=dtype)
            act_fn = ACT2FN[act]

            def make(name, gate=gate, up=up, dh=dh, act=act, act_fn=act_fn):
                if name == "hf_eager":
                    fn = lambda: act_fn(gate) * up  # noqa: E731
                elif name == "qpeft":
                    fn = lambda: qpeft.glu_activation(gate, up, act)  # noqa: E731
                elif name == "liger":
                    mod, cls = LIGER[act]
                    f = getattr(importlib.import_module(mod), cls)
                    fn = lambda: f.apply(gate, up)  # noqa: E731
                else:
                    raise ValueError(name)
                return fn, (dh,), (gate, up)

            liger = liger_missing() or (None if act in LIGER else f"Liger has no {act} GLU")
            rows += run_providers({"activation": act, "M": M, "I": I, "dtype": str(dtype).split(".")[-1]},
                                  {"hf_eager": None, "qpeft": None, "liger": liger}, make)
    return rows


COLUMNS = ["activation", "M", "I", "dtype", *COLUMNS_TAIL]


def main() -> None:
    suite_main("swiglu", run, COLUMNS, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    main()
