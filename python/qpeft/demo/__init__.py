"""qpeft demo: QLoRA on a real model (SmolLM2-135M-Instruct) in one command, `qpeft demo`.

Pieces (each importable and tested on its own): `model` (GGUF loading and cache), `evaltext` (stdlib
docstrings, perplexity), `task` (generated exact-match task), `train` (training loop, generation), `main`
(CLI and the run). Importing this package imports no transformers and compiles nothing.
"""
from .main import DEFAULTS, main, parse_args, run
from .model import DemoSetupError

__all__ = ["main", "run", "parse_args", "DEFAULTS", "DemoSetupError"]
