"""Run a gloo rank's script, then leave the process through os._exit once the script has finished cleanly.

`python tests/distributed/rank_exit.py SCRIPT ARGS...` runs SCRIPT as __main__ with ARGS; accelerate_cpu.py calls
`run_then_exit` the same way. Why: now and then a rank whose work was done, results written and (for our own
workers) process group destroyed aborted in interpreter finalization with 'terminate called without an active
exception' (exit -6, SIGABRT from C++ static destructors, "<no Python frame>" under faulthandler): under torch 2.15
in test_zero3_moe and test_load (stop 28), under torch 2.11 in the DeepSpeed accelerate-launch test (2 of 3 runs in
one CI clone, 0 of 3 elsewhere, stop 30). That is teardown inside torch / gloo, after everything a test reads has
been written, on a CPU-only gloo setup users do not run; the test harness should not fail on it. A script that
raises or calls sys.exit with a non-zero code still ends the normal way (traceback, finalization, its exit code).
"""
from __future__ import annotations

import os
import runpy
import sys


def run_then_exit(script: str) -> None:
    """runpy SCRIPT as __main__ (sys.argv as it is); on a clean end, flush stdio and os._exit(0)."""
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        if e.code not in (None, 0):
            raise
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    run_then_exit(script)
