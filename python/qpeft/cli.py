"""The `qpeft` console command.

    qpeft demo [...]    QLoRA demo on a real model (see `qpeft demo --help`)
    qpeft bench [...]   the benchmark suites, `python -m benchmarks` (needs a source checkout)
    qpeft info          backends available here (CUDA extension, Triton) and why not
"""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

from qpeft._backend import backend_info

__all__ = ["main"]

USAGE = __doc__.split("\n\n", 1)[1].rstrip()


def _find_benchmarks():
    """Import the `benchmarks` package of the source checkout (cwd, or the repo of an editable install)."""
    candidates = [Path.cwd(), Path(__file__).resolve().parents[2]]
    for root in candidates:
        if (root / "benchmarks" / "__main__.py").is_file():
            if str(root) not in sys.path:
                sys.path.insert(0, str(root))
            return importlib.import_module("benchmarks.__main__")
    return None


def _bench(argv: list[str]) -> int:
    mod = _find_benchmarks()
    if mod is None:
        print("qpeft bench: the benchmarks/ folder of a qpeft source checkout was not found; run it from the "
              "repository root (git clone the qpeft repository, then `pip install -e .[bench]`)", file=sys.stderr)
        return 2
    return mod.main(argv, prog="qpeft bench") or 0


def _info(argv: list[str]) -> int:
    if argv:
        print(f"qpeft info: takes no arguments, got {argv}", file=sys.stderr)
        return 2

    print(json.dumps(backend_info(), indent=2, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: qpeft {{demo,bench,info}} [options]\n\n{USAGE}")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "demo":
        from qpeft.demo.main import main as demo_main

        return demo_main(rest, prog="qpeft demo")
    if command == "bench":
        return _bench(rest)
    if command == "info":
        return _info(rest)
    print(f"qpeft: unknown command {command!r}; expected one of demo, bench, info", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
