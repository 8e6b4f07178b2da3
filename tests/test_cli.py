"""The `qpeft` console command (demo / bench / info dispatch, one-line errors) and the benchmark entry point's
argument handling and plots (`python -m benchmarks`), without running any suite."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from qpeft import cli

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def test_usage_and_unknown_command(capsys):
    assert cli.main(["--help"]) == 0
    assert "demo" in capsys.readouterr().out
    assert cli.main([]) == 2
    assert "usage: qpeft" in capsys.readouterr().out
    assert cli.main(["frobnicate"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown command 'frobnicate'" in err


def test_demo_dispatch_reports_setup_errors_in_one_line(tmp_path, capsys):
    assert cli.main(["demo", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qpeft demo: --model") and err.count("\n") == 1


def test_demo_argument_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--steps", "-3"])
    assert e.value.code == 2
    assert "--steps" in capsys.readouterr().err


def test_console_command_has_no_traceback(tmp_path):
    """As a user runs it: a missing model is one line on stderr, exit code 2."""
    r = subprocess.run([sys.executable, "-m", "qpeft.cli", "demo", "--model", str(tmp_path / "missing")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0 and "no config.json" in r.stderr


def test_info_prints_backends(capsys):
    assert cli.main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["requested"] in ("auto", "cuda", "triton", "torch") and "torch" in info
    assert cli.main(["info", "x"]) == 2


def test_bench_list_and_bad_suite(capsys):
    assert cli.main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    for suite in ("quantize", "nf4_matmul", "lora", "e2e_training", "decode"):
        assert suite in out
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--suites", "quantize,nope"])
    assert e.value.code == 2
    assert "unknown suite(s) ['nope']" in capsys.readouterr().err


def test_bench_without_checkout_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_find_benchmarks", lambda: None)
    assert cli.main(["bench"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "source checkout" in err


def test_plots_wide_and_long_rows(tmp_path):
    pytest.importorskip("matplotlib")
    from benchmarks.plots import plot_speed_vs_m, provider_columns, roofline_ms

    wide = [{"K": 64, "N": 32, "M": m, "dir": "fwd", "dtype": "float32", "dense": 0.1 * m, "qpeft_ref": 0.2 * m,
             "speedup_vs_dense": 0.5} for m in (1, 4, 16)]
    assert provider_columns(wide) == ["dense", "qpeft_ref"]
    ceil = {"bandwidth_Bps": 1e10, "matmul_flops": 1e11}
    paths = plot_speed_vs_m(wide, "nf4_matmul", tmp_path, ceil)
    assert len(paths) == 1 and paths[0].stat().st_size > 1000
    long = [{"K": 64, "N": 32, "M": m, "r": 8, "provider": p, "ms": t * m}
            for m in (64, 256) for p, t in (("frozen", 1.0), ("qpeft_qlora", 1.5))]
    long.append({"K": 64, "N": 32, "M": 64, "r": 8, "provider": "bnb", "error": "unsupported"})
    assert len(plot_speed_vs_m(long, "lora", tmp_path, ceil)) == 1
    assert plot_speed_vs_m([{"op": "q", "ms": 1.0}], "quantize", tmp_path) == []  # no M sweep: nothing
    # bandwidth bound at M=1 (weights dominate), compute bound at large M
    assert roofline_ms(1, 4096, 4096, 4.127, 2, 3.02e12, 700e12) == pytest.approx(
        1e3 * (4096 * 4096 * 4.127 / 8 + 2 * 4096 * 2) / 3.02e12)
    assert roofline_ms(16384, 4096, 4096, 4.127, 2, 3.02e12, 700e12) == pytest.approx(
        1e3 * 2 * 16384 * 4096 * 4096 / 700e12)
