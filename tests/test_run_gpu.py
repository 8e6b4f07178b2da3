"""tests/run_gpu.sh quick, rehearsed on the CPU (issue 25): its one ~10-minute GPU call cannot be rerun, so what
can fail on the script rather than on the GPU is checked here: the names and flags it passes, the benchmark timing
knob its time bounds rely on, and that a step stopped by its bound still leaves results behind."""
from __future__ import annotations

import csv
import re
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SCRIPT = (ROOT / "tests" / "run_gpu.sh").read_text()


def _quick_stage() -> str:
    return SCRIPT.split('if [ "$STAGE" = quick ]; then', 1)[1].split("\nfi\n", 1)[0]


def test_quick_stage_names_existing_suites_and_flags():
    from benchmarks.__main__ import SUITES, build_parser

    quick = _quick_stage()
    suites = re.search(r"--suites (\S+)", quick).group(1).split(",")
    assert suites and not set(suites) - set(SUITES), set(suites) - set(SUITES)
    build_parser("x").parse_args(["--quick", "--no-plots", "--suites", ",".join(suites)])
    for module in re.findall(r"-m (benchmarks\.\w+)", quick):  # every module the stage runs exists
        assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), module


def test_gpu_bench_repeats_for_the_time_the_environment_sets(monkeypatch):
    """benchmarks.common.bench on a GPU (stand-in triton.testing): 100 ms per measurement by default, what
    QPEFT_BENCH_REP_MS says when set (the quick stage sets 20), a clear error for a bad value."""
    import benchmarks.common as common

    calls = []
    fake = types.ModuleType("triton.testing")
    fake.do_bench = lambda fn, quantiles, warmup, rep: calls.append(("do_bench", warmup, rep)) or [1.0, 0.9, 1.1]
    fake.do_bench_cudagraph = lambda fn, rep: calls.append(("cudagraph", rep)) or 1.0
    monkeypatch.setitem(sys.modules, "triton.testing", fake)
    monkeypatch.setattr(sys.modules.get("triton") or types.ModuleType("triton"), "testing", fake, raising=False)
    monkeypatch.setattr(common, "on_gpu", lambda: True)
    monkeypatch.delenv("QPEFT_BENCH_REP_MS", raising=False)
    common.bench(lambda: None)
    common.bench(lambda: None, cuda_graph=True)
    monkeypatch.setenv("QPEFT_BENCH_REP_MS", "20")
    common.bench(lambda: None)
    common.bench(lambda: None, cuda_graph=True)
    assert calls == [("do_bench", 25.0, 100.0), ("cudagraph", 100.0), ("do_bench", 5.0, 20.0), ("cudagraph", 20.0)]
    assert "export QPEFT_BENCH_REP_MS=${QPEFT_BENCH_REP_MS:-20}" in _quick_stage()
    monkeypatch.setenv("QPEFT_BENCH_REP_MS", "0")
    with pytest.raises(ValueError, match="QPEFT_BENCH_REP_MS must be a positive number"):
        common.bench(lambda: None)


def test_measure_static_cases_keeps_the_shapes_done_when_stopped(monkeypatch, tmp_path):
    """A run stopped after its first layer shape (the step's time bound) has already written that shape's rows,
    which `static_sm90 --calibrate` then reads; the last write holds every row."""
    import benchmarks.common as common
    import benchmarks.measure_static_cases as msc

    monkeypatch.setattr(common, "RESULTS_ROOT", tmp_path)
    monkeypatch.setattr(common, "device_name", lambda: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(msc, "on_gpu", lambda: True)
    done = []

    def case(K, N, ms, directions):
        if len(done) == 1:
            raise KeyboardInterrupt  # stands in for the SIGTERM of `timeout`
        done.append((K, N))
        return [{"K": K, "N": N, "M": m, "direction": d, "backend": "cuda", "qpeft_ms": 0.5, "cublas_ms": 1.0}
                for m in ms for d in directions]

    monkeypatch.setattr(msc, "_case", case)
    with pytest.raises(KeyboardInterrupt):
        msc.main(["--shapes", "8b", "--ms", "1,256"])
    rows = list(csv.DictReader(open(tmp_path / "NVIDIA_H100_80GB_HBM3" / "static_cases.csv")))
    assert [(r["layer"], r["M"], r["direction"]) for r in rows] == [
        ("q/o", "1", "fwd"), ("q/o", "1", "dx"), ("q/o", "256", "fwd"), ("q/o", "256", "dx")]


def test_linear_cross_entropy_bench_exits_nonzero_when_nothing_of_ours_ran(monkeypatch, tmp_path):
    """The quick stage's step status comes from the benchmark's exit code: a sweep whose every row (or every qpeft
    row) is an error used to exit 0 and look like a result."""
    from benchmarks import bench_linear_cross_entropy as lce

    monkeypatch.setattr(lce, "write_csv", lambda suite, rows: str(tmp_path / f"{suite}.csv"))
    cases = {
        "all rows failed": [{"provider": "qpeft", "error": "RuntimeError: boom"},
                            {"provider": "eager", "error": "out of memory"}],
        "qpeft failed": [{"provider": "qpeft", "error": "RuntimeError: boom"}, {"provider": "eager", "ms": 1.0}],
        "fine": [{"provider": "qpeft", "ms": 1.0}, {"provider": "liger", "error": "not installed"}],
    }
    for name, rows in cases.items():
        monkeypatch.setattr(lce, "run", lambda *a, rows=rows, **k: rows)
        if name == "fine":
            lce.main(["--tokens", "8"])
        else:
            with pytest.raises(SystemExit, match="failed"):
                lce.main(["--tokens", "8"])


def test_quick_stage_step_bounds_fit_the_issues_eight_minutes():
    """Issue 25: `quick` fits one call of 8 minutes with the extension build (~90 s) and the installs (~15 s), so a
    failed first call leaves device time for a second. Every step runs under one of the QUICK_* bounds."""
    quick = _quick_stage()
    bounds = {k: int(v) for k, v in re.findall(r"(QUICK_[A-Z_]+)=\$\{QUICK_[A-Z_]+:-(\d+)\}", quick)}
    assert set(bounds) == {"QUICK_GPU_TESTS", "QUICK_TRITON_TESTS", "QUICK_BENCH", "QUICK_LCE", "QUICK_STATIC"}
    assert sum(bounds.values()) + 90 + 15 <= 8 * 60, bounds
    # every step but the calibration (CPU arithmetic over the measured CSV: 1.4 s in the rehearsal)
    steps = [line for line in quick.splitlines() if re.search(r"\$PY -m (pytest|benchmarks)", line)
             and "--calibrate" not in line]
    assert steps and all(re.search(r'timeout "\$QUICK_[A-Z_]+"', s) for s in steps), steps
