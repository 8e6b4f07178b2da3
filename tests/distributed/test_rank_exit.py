"""rank_exit.py, the runner of the gloo ranks: a clean end leaves through os._exit(0) (no interpreter
finalization), a failing script still fails with its traceback and exit code."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

RUNNER = Path(__file__).resolve().parent / "rank_exit.py"


def _run(tmp_path: Path, body: str, *args: str) -> subprocess.CompletedProcess:
    script = tmp_path / "script.py"
    script.write_text(body)
    return subprocess.run([sys.executable, str(RUNNER), str(script), *args], capture_output=True, text=True,
                          timeout=60)


def test_a_clean_end_skips_finalization_and_exits_0(tmp_path):
    # an atexit handler runs in finalization: os._exit skips it; argv reaches the script, stdout is flushed
    p = _run(tmp_path, "import atexit, sys\natexit.register(lambda: print('finalized'))\n"
                       "print('args', sys.argv[1:], end='')\n", "a", "b")
    assert p.returncode == 0 and p.stdout == "args ['a', 'b']", p


@pytest.mark.parametrize("body,code", [("raise ValueError('boom')\n", 1), ("import sys\nsys.exit(3)\n", 3)])
def test_a_failing_script_keeps_its_exit_code(tmp_path, body, code):
    p = _run(tmp_path, body)
    assert p.returncode == code, p
    if code == 1:
        assert "ValueError: boom" in p.stderr
