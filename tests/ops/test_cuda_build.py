"""The CUDA extension `qpeft_C` (csrc/) registers exactly the raw-op schemas of docs/ARCHITECTURE.md.

Needs nvcc, not a GPU: loading the shared library registers the ops (TORCH_LIBRARY) on any machine.
Building takes minutes on 2 cores, so this test does not start a build by itself: it uses the cached
build of `python -m qpeft.build` (TORCH_CUDA_ARCH_LIST=9.0 without a GPU), which `_jit.load()` finds
as a cache hit, and skips when there is none. QPEFT_TEST_BUILD=1 makes it build when needed.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from qpeft import _jit

ARCH_DOC = Path(__file__).resolve().parents[2] / "docs" / "ARCHITECTURE.md"

pytestmark = pytest.mark.skipif(_jit.find_nvcc() is None, reason="nvcc not found: the CUDA extension cannot be built")


def documented_raw_schemas() -> dict[str, str]:
    """{op name: schema} from the 'Raw CUDA ops' code block of ARCHITECTURE.md (comments dropped)."""
    text = ARCH_DOC.read_text()
    block = text.split("Raw CUDA ops", 1)[1].split("```", 2)[1]
    lines = [ln.split("#", 1)[0].rstrip() for ln in block.splitlines()]
    schemas, cur = {}, ""
    for ln in lines:
        if not ln.strip():
            continue
        cur = f"{cur} {ln.strip()}" if cur else ln.strip()
        if cur.count("(") == cur.count(")") and "->" in cur:
            name = cur.split("(", 1)[0]
            schemas[name] = re.sub(r"\s+", " ", cur).replace("( ", "(")
            cur = ""
    assert not cur, f"unterminated schema in ARCHITECTURE.md: {cur!r}"
    return schemas


@pytest.fixture(scope="module")
def loaded_extension():
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    lib = _jit.build_dir() / "qpeft_C.so"
    if not lib.exists() and os.environ.get("QPEFT_TEST_BUILD") != "1":
        pytest.skip(f"qpeft_C not built in {lib.parent}: run `python -m qpeft.build` (or set QPEFT_TEST_BUILD=1)")
    _jit.load()  # cache hit when the sources did not change since the build
    return lib


def test_architecture_lists_the_raw_ops():
    names = set(documented_raw_schemas())
    assert names == {"quantize_4bit_out", "dequantize_4bit_out", "quantize_blockwise_out",
                     "dequantize_blockwise_out", "nf4_matmul_out", "nf4_matmul_dx_out", "dense_lora_matmul_out",
                     "lora_shrink_gathered_out", "lora_expand_gathered_out", "optim_8bit_step_out",
                     "managed_prefetch"}


def test_every_documented_schema_is_registered_exactly(loaded_extension):
    for name, schema in documented_raw_schemas().items():
        op = getattr(torch.ops.qpeft_C, name)
        assert str(op.default._schema) == f"qpeft_C::{schema}", name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"qpeft_C::{name}", "CUDA"), name


def test_raw_ops_have_no_cpu_kernel(loaded_extension):
    # CPU tensors go through the Python reference (L2 ops); the raw ops must refuse them, not crash.
    A = torch.randn(64)
    with pytest.raises(NotImplementedError):
        torch.ops.qpeft_C.quantize_4bit_out(A, 64, "nf4", torch.empty(32, dtype=torch.uint8), torch.empty(1))
