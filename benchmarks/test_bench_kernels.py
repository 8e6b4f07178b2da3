"""pytest-benchmark: quantize, NF4 matmul and LoRA layer, qpeft vs bitsandbytes / PEFT / dense."""
import math

import pytest
import torch

from benchmarks.conftest import DEVICE, DTYPE, GPU, run_synced

K, N = (4096, 4096) if GPU else (256, 512)


def _bnb_ok() -> bool:
    try:
        import bitsandbytes  # noqa: F401
        return True
    except Exception:
        return False


@pytest.mark.parametrize("provider", ["qpeft", "bnb"])
def test_quantize_nf4(benchmark, provider):
    import qpeft

    W = torch.randn(N, K, device=DEVICE, dtype=DTYPE)
    if provider == "bnb":
        if not _bnb_ok():
            pytest.skip("bitsandbytes not installed")
        import bitsandbytes.functional as F

        fn = lambda: F.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)  # noqa: E731
    else:
        fn = lambda: qpeft.quantize_4bit(W, blocksize=64, quant_type="nf4", double_quant=True)  # noqa: E731
    packed, _ = benchmark(run_synced(fn))
    assert packed.numel() == N * K // 2


@pytest.mark.parametrize("M", [1, 16, 256] if GPU else [1, 16])
@pytest.mark.parametrize("provider", ["qpeft", "dense", "bnb"])
def test_nf4_matmul(benchmark, provider, M):
    import qpeft
    from qpeft.autograd.nf4_matmul import weight_args

    W = torch.randn(N, K, device=DEVICE, dtype=DTYPE) / math.sqrt(K)
    x = torch.randn(M, K, device=DEVICE, dtype=DTYPE)
    if provider == "dense":
        fn = lambda: x @ W.t()  # noqa: E731
    elif provider == "bnb":
        if not _bnb_ok():
            pytest.skip("bitsandbytes not installed")
        import bitsandbytes as bnb
        import bitsandbytes.functional as F

        packed, state = F.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
        fn = lambda: bnb.matmul_4bit(x, packed.t(), quant_state=state)  # noqa: E731
    else:
        packed, state = qpeft.quantize_4bit(W, blocksize=64, quant_type="nf4", double_quant=True)
        p, a, c, bs, n, _, na, nc, off = weight_args(packed, state)
        fn = lambda: torch.ops.qpeft.nf4_matmul(x, p, a, c, bs, n, na, nc, off, None, None, None, 0.0)  # noqa: E731
    y = benchmark(run_synced(fn))
    assert y.shape == (M, N)


@pytest.mark.parametrize("provider", ["qpeft_qlora", "peft_qlora", "frozen"])
def test_lora_layer_fwd_bwd(benchmark, provider):
    from benchmarks.bench_lora import _step, build

    if provider == "peft_qlora" and not _bnb_ok():
        pytest.skip("bitsandbytes not installed")
    M = 4096 if GPU else 64
    linear = torch.nn.Linear(K, N, bias=False, device=DEVICE, dtype=DTYPE)
    layer = build(provider, linear, 16, DTYPE, DEVICE)
    x = torch.randn(M, K, device=DEVICE, dtype=DTYPE, requires_grad=True)
    dy = torch.randn(M, N, device=DEVICE, dtype=DTYPE)
    benchmark(run_synced(_step(layer, x, dy)))
    assert x.grad is not None and x.grad.shape == x.shape
