"""Spawn a worker script on N gloo ranks (torchrun's environment: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT on a free 127.0.0.1 port) with a bounded timeout; return rank 0's JSON report."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

TIMEOUT_S = 300  # one spawn of 2-3 ranks takes ~20 s of CPU (mostly imports); 300 s bounds a hung collective
HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(script: str, world_size: int, out_dir: Path, *args: str, env: dict | None = None) -> dict:
    """Run tests/distributed/<script> on `world_size` ranks; every rank must exit 0 within TIMEOUT_S. Returns the
    JSON rank 0 wrote to out_dir/report.json."""
    port = free_port()
    procs = []
    logs = []
    for rank in range(world_size):
        e = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                 LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                 OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(HERE.parent.parent), str(HERE.parent),
                                                                  os.environ.get("PYTHONPATH", "")]),
                 **(env or {}))
        log = open(out_dir / f"rank{rank}.log", "w+")
        logs.append(log)
        # -X faulthandler: a rank that aborts (SIGABRT) prints every thread's Python stack into its log, which the
        # failure message below shows. rank_exit.py runs the worker and leaves through os._exit after a clean end:
        # the rare 'terminate called without an active exception' came from finalization (see there)
        procs.append(subprocess.Popen([sys.executable, "-X", "faulthandler", str(HERE / "rank_exit.py"),
                                       str(HERE / script), str(out_dir), *args],
                                      env=e, stdout=log, stderr=subprocess.STDOUT))
    failed = []
    try:
        for rank, p in enumerate(procs):
            try:
                rc = p.wait(timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                failed.append((rank, "timeout"))
                break
            if rc != 0:
                failed.append((rank, rc))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if failed:
        tails = []
        for rank, log in enumerate(logs):
            log.seek(0)
            tails.append(f"--- rank {rank} ---\n" + log.read()[-4000:])
        raise AssertionError(f"{script} on {world_size} ranks failed: {failed}\n" + "\n".join(tails))
    for log in logs:
        log.close()
    return json.loads((out_dir / "report.json").read_text())
