"""The op stack's kernels (triton_kernels/, installed as qpeft.triton_kernels from its own folder, which
`lint-imports` cannot see) import only what sits below them: the references, the formats and each other."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

KERNELS = Path(__file__).resolve().parents[2] / "triton_kernels"
ALLOWED = ("qpeft.reference", "qpeft.formats", "qpeft.triton_kernels", "qpeft._cuda", "qpeft._versions")


def _qpeft_imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                yield node.lineno, "qpeft.triton_kernels" + ("." + node.module if node.module else "")
            elif node.module == "qpeft":  # from qpeft import _cuda
                yield from ((node.lineno, f"qpeft.{a.name}") for a in node.names)
            elif (node.module or "").split(".")[0] == "qpeft":
                yield node.lineno, node.module
        elif isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "qpeft")


@pytest.mark.parametrize("path", sorted(KERNELS.glob("*.py")), ids=lambda p: p.name)
def test_triton_kernels_import_only_below_them(path):
    bad = [(line, mod) for line, mod in _qpeft_imports(path)
           if not any(mod == a or mod.startswith(a + ".") for a in ALLOWED)]
    assert not bad, f"{path.name} imports above the op stack's kernels: {bad}"
