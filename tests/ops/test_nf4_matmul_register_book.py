"""The register code book of the Triton NF4 GEMM (triton_kernels/_nf4_register_book.py), checked on the CPU.

Its two inline-PTX snippets (the scaled code-book planes and the per-word lookup) are run by an emulator of their
instructions (tests/ptx_emulator.py) on every byte value, both 4-bit code books, both 16-bit dtypes and random
scales, and must give exactly the reference's dequantized weight T(fp32(code[q] * absmax)). The tile assembly
(`tile_of_words`) runs under the Triton interpreter. The kernels themselves run on a GPU only (tests/run_gpu.sh
quick: tests/ops/test_nf4_matmul.py with the register book on); test_triton_sm90.py compiles them for sm_90.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import qpeft
from ptx_emulator import run_ptx
from utils import TRITON_INTERPRET, has_triton

pytestmark = pytest.mark.skipif(not has_triton(), reason="needs triton")

BOOKS = {"nf4": qpeft.formats.codes.nf4, "fp4": qpeft.formats.codes.fp4}


def _scales(n: int, seed: int) -> np.ndarray:
    """absmax-like fp32 scales over 12 binades, plus 1 (values = the code book itself) and a bitsandbytes
    double-quant style value (code2[q] * absmax2 + offset)."""
    g = np.random.default_rng(seed)
    s = (2.0 ** g.uniform(-8, 4, n) * g.uniform(1, 2, n)).astype(np.float32)
    s[:2] = [1.0, np.float32(np.float32(0.7134) * np.float32(0.0312)) + np.float32(0.0421)]
    return s


def _bits(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)


def _planes(book: np.ndarray, scales: np.ndarray, dtype: torch.dtype) -> list[np.ndarray]:
    from qpeft.triton_kernels import _nf4_register_book as rb

    asm = (rb.PLANES_BF16_PTX if dtype == torch.bfloat16 else rb.PLANES_F16_PTX).value
    return run_ptx(asm, {8: _bits(scales), **{9 + j: _bits(book[j]) for j in range(16)}}, 8)


def _reference_bits(book: np.ndarray, codes: np.ndarray, scales: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    w = torch.from_numpy(book[codes]) * torch.from_numpy(scales)  # one fp32 product, as the reference
    return w.to(dtype).view(torch.int16).numpy().astype(np.int64) & 0xFFFF


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("quant_type", sorted(BOOKS))
def test_planes_and_lookup_ptx_give_the_reference_weights(quant_type, dtype):
    from qpeft.triton_kernels import _nf4_register_book as rb

    book = BOOKS[quant_type]().numpy().astype(np.float32)
    g = np.random.default_rng(7)
    n = 4096
    scales = _scales(n, seed=1)
    words = g.integers(0, 2 ** 32, n, dtype=np.uint64)
    words[:64] = np.arange(256, dtype=np.uint64).reshape(64, 4) @ (np.uint64(1) << np.arange(0, 32, 8, dtype=np.uint64))
    planes = _planes(book, scales, dtype)
    values = run_ptx(rb.LOOKUP_WORD_PTX.value, {8: words, **{9 + i: p for i, p in enumerate(planes)}}, 8)
    for k in range(8):
        byte = (words >> np.uint64(8 * (k // 2))) & np.uint64(0xFF)
        codes = (byte >> np.uint64(4) if k % 2 == 0 else byte & np.uint64(0xF)).astype(np.int64)
        ref = _reference_bits(book, codes, scales, dtype)
        bad = np.flatnonzero(values[k].astype(np.int64) != ref)
        assert bad.size == 0, (f"value {k} of word {int(words[bad[0]]):#010x} (scale {scales[bad[0]]!r}): "
                               f"{int(values[k][bad[0]]):#06x}, reference {int(ref[bad[0]]):#06x}")


def test_every_selector_nibble_of_the_lookup_is_a_plain_byte_pick():
    """The lookup's PRMT selectors never set bit 3 of a nibble (sign replication): idx is code & 7, pick is
    i + 4 * bit3 <= 7. Words of all-ones and all-eights codes hit the extremes."""
    from qpeft.triton_kernels import _nf4_register_book as rb

    book = BOOKS["nf4"]().numpy().astype(np.float32)
    scales = np.full(4, 0.5, np.float32)
    planes = _planes(book, scales, torch.bfloat16)
    words = np.array([0xFFFFFFFF, 0x88888888, 0x77777777, 0x0], dtype=np.uint64)
    values = run_ptx(rb.LOOKUP_WORD_PTX.value, {8: words, **{9 + i: p for i, p in enumerate(planes)}}, 8)
    for code, row in zip((15, 8, 7, 0), range(4)):
        ref = _reference_bits(book, np.array([code]), scales[:1], torch.bfloat16)[0]
        assert all(int(values[k][row]) == ref for k in range(8)), code


if has_triton():
    import triton
    import triton.language as tl

    from qpeft.triton_kernels._nf4_register_book import tile_of_words

    @triton.jit
    def _tile_probe(out_ptr, ROWS: tl.constexpr, WORDS: tl.constexpr):
        r = tl.arange(0, ROWS)[:, None]
        u = tl.arange(0, WORDS)[None, :]
        base = (r * WORDS + u) * 8
        w = tile_of_words(base, base + 1, base + 2, base + 3, base + 4, base + 5, base + 6, base + 7, ROWS, WORDS)
        tl.store(out_ptr + tl.arange(0, ROWS)[:, None] * (8 * WORDS) + tl.arange(0, 8 * WORDS)[None, :], w)


@pytest.mark.triton
@pytest.mark.skipif(not TRITON_INTERPRET, reason="runs tile_of_words in the Triton interpreter")
def test_tile_of_words_puts_value_k_of_word_u_at_column_8u_plus_k():
    for rows, words in ((4, 2), (16, 8)):
        out = torch.empty(rows, 8 * words, dtype=torch.int32)
        _tile_probe[(1,)](out, ROWS=rows, WORDS=words)
        assert torch.equal(out.flatten(), torch.arange(rows * 8 * words, dtype=torch.int32))
