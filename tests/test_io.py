"""Atomic saves (qpeft._io): a failed save leaves the previous files byte for byte and no temporary file behind;
save_adapter, the method savers and the benchmark results all go through it."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn as nn

import qpeft
from qpeft._io import atomic_paths, atomic_write_text
from qpeft.tuners.lora.model import _configs
from utils import tiny_llama


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def _failing_save_file(tensors, filename, metadata=None):
    """A weights write that dies half way (a full disk): some bytes written, then the error."""
    with open(filename, "wb") as f:
        f.write(b"\0" * 10)
    raise OSError(errno.ENOSPC, "No space left on device")


def test_atomic_paths_replaces_only_after_every_writer_succeeded(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("old a")
    b.write_text("old b")
    with pytest.raises(RuntimeError, match="second writer"):
        with atomic_paths(a, b) as (ta, tb):
            assert Path(ta).parent == tmp_path and Path(tb).parent == tmp_path  # same directory: os.replace
            Path(ta).write_text("new a")
            raise RuntimeError("second writer")
    assert _files(tmp_path) == {"a.txt": b"old a", "b.txt": b"old b"}
    with atomic_paths(a, b) as (ta, tb):
        Path(ta).write_text("new a")
        Path(tb).write_text("new b")
    assert _files(tmp_path) == {"a.txt": b"new a", "b.txt": b"new b"}
    with pytest.raises(KeyboardInterrupt):  # an interrupt too
        with atomic_paths(a) as (ta,):
            Path(ta).write_text("half")
            raise KeyboardInterrupt
    assert _files(tmp_path) == {"a.txt": b"new a", "b.txt": b"new b"}
    with pytest.raises(ValueError, match="distinct"):
        with atomic_paths(a, tmp_path / "." / "a.txt"):
            pass


def test_atomic_write_keeps_open_permissions_and_a_failed_replace_leaves_no_temp(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "r.json", "{}")
        with open(tmp_path / "plain.json", "w") as f:
            f.write("{}")
    finally:
        os.umask(old)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == (tmp_path / "plain.json").stat().st_mode & 0o777 == 0o644
    (tmp_path / "d").mkdir()
    with pytest.raises(OSError):  # the second target is a directory: the first is replaced, no temp remains
        with atomic_paths(tmp_path / "r.json", tmp_path / "d") as (t1, t2):
            Path(t1).write_text("new")
            Path(t2).write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "plain.json", "r.json"]


def _lora_model():
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    return qpeft.add_lora(model, ["0", "2"], r=2, init="random")


@pytest.mark.parametrize("failure", ["config_json", "weights_write"])
def test_failed_save_adapter_leaves_the_previous_adapter_byte_for_byte(tmp_path, monkeypatch, failure):
    model = _lora_model()
    qpeft.save_adapter(model, tmp_path)
    before = _files(tmp_path)
    assert set(before) == {"adapter_config.json", "adapter_model.safetensors"}
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    if failure == "config_json":  # json cannot serialize a Path: the error comes after the weights are ready
        _configs(model)["default"]["base_model_name_or_path"] = Path("/models/base")
        error = TypeError
    else:
        monkeypatch.setattr(safetensors.torch, "save_file", _failing_save_file)
        error = OSError
    with pytest.raises(error):
        qpeft.save_adapter(model, tmp_path)
    assert _files(tmp_path) == before  # byte for byte, and no temporary file left
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before)
    monkeypatch.undo()
    _configs(model)["default"]["base_model_name_or_path"] = "/models/base"
    qpeft.save_adapter(model, tmp_path)  # a good save then replaces both
    after = _files(tmp_path)
    assert set(after) == set(before) and all(after[k] != before[k] for k in before)


def _bitfit(tmp_path):
    from qpeft.tuners.bitfit import apply_bitfit, save_bitfit

    model = apply_bitfit(tiny_llama(), bias_names=["v_proj"], add_missing_biases=True)
    return model, lambda: save_bitfit(model, tmp_path)


def _bottleneck(tmp_path):
    from qpeft.tuners.bottleneck import add_bottleneck_adapters, save_bottleneck_adapters

    model = add_bottleneck_adapters(tiny_llama(), "pfeiffer", init="bert")
    return model, lambda: save_bottleneck_adapters(model, tmp_path)


def _unipelt(tmp_path):
    from qpeft.tuners.unipelt import add_unipelt, save_unipelt
    from utils import tiny_bert

    model = add_unipelt(tiny_bert(num_labels=2), modules_to_save=["classifier"])
    return model, lambda: save_unipelt(model, tmp_path)


@pytest.mark.parametrize("method", [_bitfit, _bottleneck, _unipelt])
def test_failed_method_save_leaves_the_previous_files(tmp_path, monkeypatch, method):
    model, save = method(tmp_path)
    save()
    before = _files(tmp_path)
    assert len(before) == 2
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    monkeypatch.setattr(safetensors.torch, "save_file", _failing_save_file)
    with pytest.raises(OSError):
        save()
    assert _files(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == sorted(before)


def test_benchmark_results_are_written_atomically(tmp_path, monkeypatch):
    import csv

    from benchmarks import common

    monkeypatch.setattr(common, "RESULTS_ROOT", tmp_path)
    monkeypatch.setattr(common, "env_info", lambda: {"device": "cpu"})
    path = common.write_csv("suite", [{"M": 1, "ms": 0.5}])
    assert list(csv.DictReader(path.open())) == [{"M": "1", "ms": "0.5", "device": "cpu"}]
    good = path.read_bytes()

    class Unprintable:
        def __str__(self):
            raise RuntimeError("a row that cannot be written")

    with pytest.raises(RuntimeError, match="cannot be written"):
        common.write_csv("suite", [{"M": 2, "ms": 0.25}, {"M": Unprintable(), "ms": 0.1}])
    assert path.read_bytes() == good and [p.name for p in path.parent.iterdir()] == [path.name]


def test_a_pickled_adapter_is_refused_not_unpickled(tmp_path, monkeypatch):
    """Files load only from safetensors/JSON: an adapter directory holding only the legacy adapter_model.bin (a
    pickle) is refused with the way to convert it, torch.load is never called, and the model is left as it was."""
    model = tiny_llama()
    qpeft.add_lora(model, target_modules=["q_proj"], r=2)
    qpeft.save_adapter(model, tmp_path)
    tensors = safetensors.torch.load_file(tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_model.safetensors").unlink()
    torch.save(tensors, tmp_path / "adapter_model.bin")

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    target = tiny_llama()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=r"adapter_model\.bin, a pickle.*save_pretrained"):
        qpeft.load_adapter(target, tmp_path)
    after = target.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
