"""The helpers of benchmarks/bench_e2e_training.py that decide what is measured (no timing here): the packed
batch is transformers' DataCollatorWithFlattening's layout, the longest-context bisection finds the boundary,
and bad arguments raise naming them."""
from __future__ import annotations

import pytest
import torch

from benchmarks.bench_e2e_training import PROVIDERS, longest_fitting, make_provider, training_batch


def test_packed_batch_is_data_collator_with_flattening():
    transformers = pytest.importorskip("transformers")
    got = training_batch(1, 12, 50, "cpu", packed=3, seed=4)
    seqs = got["input_ids"][0].view(3, 4)
    want = transformers.DataCollatorWithFlattening()([{"input_ids": s.tolist(), "labels": s.tolist()}
                                                      for s in seqs])
    for key in ("input_ids", "labels", "position_ids"):
        assert got[key].tolist() == want[key].tolist(), key
    plain = training_batch(2, 8, 50, "cpu")
    assert set(plain) == {"input_ids", "labels"} and torch.equal(plain["input_ids"], plain["labels"])
    with pytest.raises(ValueError, match="packed must be a divisor of seq=10"):
        training_batch(1, 10, 50, "cpu", packed=3)


@pytest.mark.parametrize("limit", [1024, 3072, 7168, 8192, 500_000])
def test_longest_fitting_finds_the_boundary(limit):
    tried = []

    def fits(n):
        tried.append(n)
        return n <= limit

    want = min(limit, 262144) // 1024 * 1024
    assert longest_fitting(fits, 1024, 262144, 1024) == want
    assert len(tried) <= 10  # bisection: log2(256) + 2 attempts
    assert all(n % 1024 == 0 for n in tried)


def test_longest_fitting_none_and_bad_bounds():
    assert longest_fitting(lambda n: False, 1024, 4096, 1024) is None
    with pytest.raises(ValueError, match="multiples of step=1024"):
        longest_fitting(lambda n: True, 1000, 4096, 1024)


def test_unknown_provider_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown provider 'liger'; expected one of .*qpeft_fused"):
        make_provider("liger", {}, torch.float32, "cpu")
    assert "qpeft_fused" in PROVIDERS and "peft_bnb_fused" in PROVIDERS
