"""`pytest -m gpu` (tests/run_gpu.sh quick) selects the tests that need a CUDA device, and only those: the marker
comes from each test's own skip condition (tests/conftest.py), so it cannot drift from what actually skips here."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _collected(*files: str, marker: str) -> set[str]:
    p = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", marker,
                        *files], cwd=TESTS.parent, capture_output=True, text=True, timeout=300)
    assert p.returncode in (0, 5), p.stdout[-2000:] + p.stderr[-2000:]
    return {line.split("[")[0] for line in p.stdout.splitlines() if "::" in line}


def _decorated_with(path: Path, name: str) -> set[str]:
    tree = ast.parse(path.read_text())
    return {f"{path.relative_to(TESTS.parent)}::{f.name}" for f in tree.body
            if isinstance(f, ast.FunctionDef) and f.name.startswith("test_")
            and any(getattr(d, "id", None) == name for d in f.decorator_list)}


def test_gpu_marker_selects_the_cuda_only_tests_and_nothing_else():
    qk = "tests/ops/test_quantize_kernels.py"
    gpu = _collected(qk, "tests/ops/test_cuda_ops.py", "tests/optim/test_optim_8bit_cuda.py", marker="gpu")
    not_gpu = _collected(qk, "tests/ops/test_cuda_ops.py", marker="not gpu")
    requires_cuda = _decorated_with(TESTS / "ops" / "test_quantize_kernels.py", "requires_cuda")
    assert len(requires_cuda) >= 5 and requires_cuda <= gpu
    assert any(t.startswith("tests/ops/test_cuda_ops.py::") for t in gpu)  # a module-level pytestmark
    assert any(t.startswith("tests/optim/test_optim_8bit_cuda.py::") for t in gpu)  # an explicit gpu mark
    assert not any(t.startswith("tests/ops/test_cuda_ops.py::") for t in not_gpu)
    # the CPU tests of the same file stay out: e.g. the CPU dispatch rule, skipped *with* a GPU
    assert f"{qk}::test_cpu_tensors_use_the_reference_without_the_interpreter" in not_gpu
    assert not (gpu & not_gpu)


def test_an_offline_sm90_compile_is_not_a_gpu_test():
    """A test that compiles for sm_90 (nvcc or Triton offline) runs on the CPU: the marker leaves it in CI's run."""
    f = "tests/ops/test_nf4_matmul_sm90.py"
    gpu, not_gpu = _collected(f, marker="gpu"), _collected(f, marker="not gpu")
    assert any("compile" in t or "sass" in t.lower() for t in not_gpu), sorted(not_gpu)
    assert not (gpu & not_gpu)


def _requires_interpreter(test: ast.expr) -> bool:
    """Whether an assert's condition is false without TRITON_INTERPRET: the name (or the variable's string) occurs
    outside every `or` (an `or` with HAS_CUDA lets a GPU run pass)."""
    def walk(node, in_or):
        if isinstance(node, ast.BoolOp) and isinstance(node.op, ast.Or):
            in_or = True
        if not in_or and ((isinstance(node, ast.Name) and node.id == "TRITON_INTERPRET")
                          or (isinstance(node, ast.Constant) and node.value == "TRITON_INTERPRET")):
            return True
        return any(walk(child, in_or) for child in ast.iter_child_nodes(node))

    return walk(test, False)


def test_no_test_asserts_the_triton_interpreter():
    """On the GPU the `triton` tests run compiled, without TRITON_INTERPRET (tests/run_gpu.sh: QPEFT_BACKEND=triton
    pytest -m triton): a test asserting the interpreter fails there whatever its kernel does (the rehearsal of
    issue 25 found test_grouped_nf4.py::test_triton_experts_block_forward_backward doing it)."""
    assert _requires_interpreter(ast.parse("assert backend == 'triton' and TRITON_INTERPRET").body[0].test)
    assert not _requires_interpreter(ast.parse("assert b and (HAS_CUDA or TRITON_INTERPRET)").body[0].test)
    offenders = [f"{path.relative_to(TESTS.parent)}:{node.lineno}" for path in sorted(TESTS.rglob("*.py"))
                 for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Assert)
                 and _requires_interpreter(node.test)]
    assert not offenders, offenders
