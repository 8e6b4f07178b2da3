"""examples/train_qlora.py (a plain transformers.Trainer script) under `accelerate launch` with the committed
examples/accelerate_fsdp2.yaml and examples/accelerate_deepspeed_zero3.yaml, 2 gloo ranks on CPU, against the
same script in one process: losses, the saved adapter, adapter-only checkpoints, resume, the 4-bit bytes and
their per-rank shards.

CPU-only deviations from the committed configs, each named where it is passed: `--mixed_precision no` (the YAML's
bf16 is tested separately), tests/distributed/accelerate_cpu.py as the launched entry point (accelerate enables
FSDP / DeepSpeed on accelerator devices only; see that file), and for DeepSpeed nothing else. The tiny model is
built in a tmp dir; every launch is bounded by TIMEOUT_S.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .launch import free_port

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("accelerate")

ROOT = Path(__file__).resolve().parents[2]
SHIM = ROOT / "tests" / "distributed" / "accelerate_cpu.py"
SCRIPT = ROOT / "examples" / "train_qlora.py"
FSDP2_YAML = ROOT / "examples" / "accelerate_fsdp2.yaml"
ZERO3_YAML = ROOT / "examples" / "accelerate_deepspeed_zero3.yaml"
TIMEOUT_S = 420  # one 2-rank launch: ~40 s (FSDP2) to ~70 s (DeepSpeed) of imports and setup on 2 busy cores
WORLD = 2
PER_RANK_BATCH = 1  # the single-process reference runs WORLD * PER_RANK_BATCH rows per step: the same global batch
# --lr 1e-2: large enough that every step moves the adapters visibly (lr 2e-4 would hide a dropped rank's
# gradient below the loss's printed digits), small enough that 3 steps stay stable
COMMON = ["--max-steps", "3", "--seq-len", "16", "--samples", "16", "--compute-dtype", "float32", "--lr", "1e-2",
          "--r", "4", "--lora-alpha", "8", "--save-steps", "2"]
# Adapters after 3 AdamW steps against one process. FSDP2: 1e-6 (measured within it: its reduce-scatter only
# reorders the two ranks' sum). ZeRO-3: 1e-4, the bound test_zero3.py sets and explains: DeepSpeed's backward
# differs from torch's by a few ulps in the gradients (measured here 9.6e-6 on one element of 256 whose
# gradient is near zero, where Adam's normalised step amplifies ulps); 1e-4 is 1% of one lr=1e-2 step, while a
# missing or doubled rank's gradient changes a step by its whole size.
ADAPTER_ATOL = {"fsdp2": 1e-6, "zero3": 1e-4}
ADAPTER_FILES = {"adapter_model.safetensors", "adapter_config.json", "README.md", "training_args.bin"}


def _fsdp2_supported() -> bool:
    major, minor = (int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    return (major, minor) >= (2, 12)


requires_fsdp2 = pytest.mark.skipif(
    not _fsdp2_supported(), reason="FSDP2 shards uint8 Parameters from torch 2.12 (the refusal on older torch is "
                                   "tested in test_fsdp2.py)")


def _run(cmd: list[str], out: Path, report: Path) -> None:
    report.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", QPEFT_ACCEL_REPORT=str(report),
               PYTHONPATH=os.pathsep.join([str(ROOT / "python"), os.environ.get("PYTHONPATH", "")]))
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"{cmd} timed out after {TIMEOUT_S} s\n{(e.stdout or '')[-3000:]}") from e
    (report / "launch.log").write_text(p.stdout + p.stderr)
    if p.returncode != 0:
        errors = [line for line in (p.stdout + p.stderr).splitlines() if "Error" in line and "rank1" not in line]
        raise AssertionError(f"{cmd} failed ({p.returncode}); errors: {errors[-8:]}\n{(p.stdout + p.stderr)[-4000:]}")


def single(model: Path, out: Path, *extra: str) -> dict:
    _run([sys.executable, str(SHIM), str(SCRIPT), "--model", str(model), "--output-dir", str(out), "--cpu",
          "--batch-size", str(WORLD * PER_RANK_BATCH), *COMMON, *extra], out, out / "report")
    return result(out, 1)


def launch(config: Path, model: Path, out: Path, *extra: str, launcher_args: tuple = ()) -> dict:
    _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
          "--num_processes", str(WORLD), "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()),
          *launcher_args, str(SHIM), str(SCRIPT), "--model", str(model), "--output-dir", str(out),
          "--batch-size", str(PER_RANK_BATCH), *COMMON, *extra], out, out / "report")
    return result(out, WORLD)


def result(out: Path, world: int) -> dict:
    from safetensors.torch import load_file

    reports = [json.loads((out / "report" / f"report{r}.json").read_text()) for r in range(world)]
    return dict(losses={int(k): v for k, v in json.loads((out / "losses.json").read_text()).items()},
                adapter=load_file(str(out / "adapter" / "adapter_model.safetensors")), reports=reports, out=out)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from utils import tiny_llama

    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(0, intermediate_size=128).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory) -> dict:
    return single(tiny, tmp_path_factory.mktemp("single"))


def check_against_reference(run: dict, ref: dict, engine: str) -> None:
    # losses: steps 1-3 logged (Trainer averages the ranks' losses; each rank's is normalised by the global token
    # count, so the mean is the single process's batch loss)
    assert sorted(run["losses"]) == [1, 2, 3] and all(math.isfinite(v) for v in run["losses"].values())
    # Step 1 is bit-exact (same bytes, same kernels, same adapters from set_seed). Later steps differ by fp32
    # reordering only: the engines average the two ranks' gradients (a sum of two half-batch gradients /2) where
    # one process sums the whole batch; measured 4.8e-7 on a loss of 4.88 at step 3 (1e-7 relative, 1 ulp).
    # Bound: 1e-6 relative, 10 ulps; a dropped or doubled rank's gradient changes step 2's loss by ~1e-2.
    assert run["losses"][1] == ref["losses"][1]
    for step, v in ref["losses"].items():
        assert run["losses"][step] == pytest.approx(v, rel=1e-6, abs=0), (step, run["losses"], ref["losses"])
    # the saved adapter: PEFT's keys, only LoRA tensors, equal to one process's after 3 AdamW steps up to the
    # reordering above (ADAPTER_ATOL)
    a, b = run["adapter"], ref["adapter"]
    assert sorted(a) == sorted(b) and len(a) == 2 * 14 and all(".lora_A." in k or ".lora_B." in k for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=ADAPTER_ATOL[engine], rtol=0)
    assert {p.name for p in (run["out"] / "adapter").iterdir()} <= ADAPTER_FILES
    # the 4-bit storage: sharded by the engine, each rank holding half of every uint8 Parameter (+ at most one row
    # of padding each), the gathered bytes identical to one process's before and after training
    ref_report = ref["reports"][0]
    for r in run["reports"]:
        assert r["world_size"] == WORLD and r["engines"] == [engine] and r["n_quantized"] == ref_report["n_quantized"]
        assert r["full_bytes"] == ref_report["full_bytes"]
        assert r["local_bytes"] <= r["full_bytes"] / WORLD + r["row_bytes_sum"], r
        assert r["digest_begin"] == r["digest_end"] == ref_report["digest_begin"] == ref_report["digest_end"]
    total = run["reports"][0]
    assert sum(r["local_bytes"] for r in run["reports"]) <= total["full_bytes"] + WORLD * total["row_bytes_sum"]


def check_checkpoint(ckpt: Path, engine_files: set[str]) -> None:
    """Adapter-only: PEFT's two files, the Trainer's state, the engine's own (adapter-only) resume state."""
    files = {p.name for p in ckpt.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "trainer_state.json"} <= files, files
    assert not any(f.startswith(("model", "pytorch_model.bin")) for f in files), files
    allowed = ADAPTER_FILES | {"trainer_state.json", "scheduler.pt", "rng_state_0.pth", "rng_state_1.pth"}
    assert files <= allowed | engine_files, files - allowed - engine_files


def check_loads_in_peft(tiny: Path, adapter_dir: Path, saved: dict) -> None:
    """The adapter loads onto a qpeft 4-bit base with PEFT's own PeftModel.from_pretrained (the custom-module
    registration passed in through config=, as PEFT does not save it), tensors equal to the file."""
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM

    import qpeft
    from qpeft.integrations.peft import QPeftLoraLinear, register

    base = AutoModelForCausalLM.from_pretrained(tiny, quantization_config=qpeft.QPeftConfig(compute_dtype="float32"),
                                                dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir, config=register(LoraConfig.from_pretrained(adapter_dir)))
    assert sum(isinstance(m, QPeftLoraLinear) for m in model.modules()) == 14
    params = {n.replace(".default.weight", ".weight"): p for n, p in model.named_parameters() if ".lora_" in n}
    assert sorted(params) == sorted(saved) and all(torch.equal(params[k].detach(), saved[k]) for k in saved)
    ids = torch.arange(3, 19).reshape(1, -1)
    assert torch.isfinite(model(input_ids=ids).logits).all()


def check_resume(run: dict, resumed: dict) -> None:
    # steps 1-2 come from the checkpoint's log history; step 3 is recomputed from the restored adapter, optimizer
    # (the engine's sharded state), scheduler, RNG and data position: the same ops in the same order as the
    # uninterrupted run, so bit-identical
    assert resumed["losses"] == run["losses"]
    assert sorted(resumed["adapter"]) == sorted(run["adapter"])
    assert all(torch.equal(resumed["adapter"][k], run["adapter"][k]) for k in run["adapter"])


@requires_fsdp2
def test_fsdp2_config_trains_like_one_process_saves_adapters_and_resumes(tiny, reference, tmp_path):
    # --mixed_precision no: the YAML's bf16 would not compare with an fp32 run (bf16 is the next test)
    run = launch(FSDP2_YAML, tiny, tmp_path / "fsdp2", launcher_args=("--mixed_precision", "no"))
    check_against_reference(run, reference, "fsdp2")
    # one FSDP group per decoder layer (qpeft's policy in place of PEFT's FSDP1 one), the embedding, the tail
    # (norm + head) and the root: the base is gathered one layer at a time, never whole
    groups = run["reports"][0]["fsdp_groups"]
    assert groups.count("LlamaDecoderLayer") == 2 and "PeftModelForCausalLM" in groups, groups
    # FSDP2's resume state is accelerate's sharded DCP checkpoint of the adapter (adapter_only=True)
    check_checkpoint(tmp_path / "fsdp2" / "checkpoint-2", {"optimizer_0", "pytorch_model_fsdp_0"})
    check_loads_in_peft(tiny, tmp_path / "fsdp2" / "adapter", run["adapter"])
    resumed = launch(FSDP2_YAML, tiny, tmp_path / "fsdp2-resumed", "--resume-from-checkpoint",
                     str(tmp_path / "fsdp2" / "checkpoint-2"), launcher_args=("--mixed_precision", "no"))
    check_resume(run, resumed)


@requires_fsdp2
def test_fsdp2_config_with_its_bf16_mixed_precision_keeps_every_quantized_byte(tiny, reference, tmp_path):
    # The committed YAML as is: mixed_precision: bf16 reaches TrainingArguments through the launcher's
    # ACCELERATE_MIXED_PRECISION, and accelerate turns it into MixedPrecisionPolicy(param_dtype=bf16) plus bf16
    # autocast. (The script's --bf16 is for one-process GPU runs; TrainingArguments refuses it on a CPU-only
    # machine without use_cpu, which would turn FSDP off here.) The LoRA, norms and embeddings are all-gathered
    # in bf16; the uint8 storage must arrive and stay byte for byte.
    run = launch(FSDP2_YAML, tiny, tmp_path / "bf16")
    assert sorted(run["losses"]) == [1, 2, 3] and all(math.isfinite(v) for v in run["losses"].values())
    # bf16 rounding only: at step 1 (B = 0) the loss is the base model's in bf16 vs fp32, measured within 1e-2
    # relative (bf16 has 8 bits of mantissa: 4e-3 per rounding); a corrupted 4-bit byte would move it by far more
    # than the fp32 run's own spread (the logits of a random model are near uniform, loss ~ln(128) = 4.85)
    assert run["losses"][1] == pytest.approx(reference["losses"][1], rel=1e-2)
    for r in run["reports"]:
        assert r["mixed_precision"] == "bf16" and r["fsdp_param_dtype"] == "torch.bfloat16", r
        assert r["engines"] == ["fsdp2"] and r["local_bytes"] <= r["full_bytes"] / WORLD + r["row_bytes_sum"]
        assert r["digest_begin"] == r["digest_end"] == reference["reports"][0]["digest_begin"]


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed")
def test_deepspeed_zero3_config_trains_like_one_process_saves_adapters_and_resumes(tiny, reference, tmp_path):
    run = launch(ZERO3_YAML, tiny, tmp_path / "zero3")
    check_against_reference(run, reference, "zero3")
    # DeepSpeed's resume state: global_step2/ (exclude_frozen_parameters=True: the adapter's partitions and the
    # optimizer's, no base), its `latest` tag and the two conversion scripts it always copies
    check_checkpoint(tmp_path / "zero3" / "checkpoint-2", {"global_step2", "latest", "zero_to_fp32.py",
                                                            "zero_to_torch.py"})
    check_loads_in_peft(tiny, tmp_path / "zero3" / "adapter", run["adapter"])
    resumed = launch(ZERO3_YAML, tiny, tmp_path / "zero3-resumed", "--resume-from-checkpoint",
                     str(tmp_path / "zero3" / "checkpoint-2"))
    check_resume(run, resumed)
