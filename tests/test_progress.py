"""Progress of the long commands (edgecv.progress): `edgecv bench model` and `edgecv bench soak` as plain periodic
lines when stderr is not a terminal, a bar when it is; the tables and sample rows on stdout stay clean; the TensorRT
build's phases as bars on a terminal (the monitor's side, TensorRT itself cannot run here)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, edgecv_env, on_a_terminal, progress_lines

from edgecv.engine.trt_build import BuildProgress

pytestmark = pytest.mark.integration

EDGECV = Path(sys.executable).parent / "edgecv"
BENCH_MODEL = [str(EDGECV), "bench", "model", "--frames", "20"]  # 10 warm-up + 3 x 20 timed runs


def test_bench_model_progress_is_log_lines_when_stderr_is_not_a_terminal(assets, tmp_path):
    done = subprocess.run(BENCH_MODEL, capture_output=True, text=True, timeout=120, env=edgecv_env(assets, tmp_path))
    assert done.returncode == 0, done.stderr
    lines = progress_lines(done.stderr, "bench model: ")
    assert len(lines) >= 5, done.stderr  # every 10 % of the 70 runs
    assert re.fullmatch(r"bench model: \d+/70 runs \(\d+ %\), \d+\.\d\d runs/s", lines[0]), lines
    assert re.fullmatch(r"bench model: 70/70 runs \(100 %\), \d+\.\d\d runs/s, done in \d+\.\d s", lines[-1]), lines
    assert "\r" not in done.stderr and "\x1b" not in done.stderr
    assert "inference (model only)" in done.stdout and "bench model:" not in done.stdout  # the table, alone


def test_bench_model_progress_is_a_bar_on_a_terminal(assets, tmp_path):
    code, term, stdout = on_a_terminal(BENCH_MODEL, edgecv_env(assets, tmp_path))
    assert code == 0, term
    assert "\rbench model:" in term and "70/70" in term and "100%|" in term, repr(term)
    assert not re.search(r"^bench model: \d+/70 runs", term, re.M), repr(term)  # no log lines on a terminal
    assert "inference (model only)" in stdout and "\r" not in stdout


def soak_cmd(assets: Path, broker_port: int, tmp_path: Path) -> tuple[list[str], dict]:
    cmd = [str(EDGECV), "bench", "soak", str(REPO / "configs" / "demo.yaml"), "--duration", "4", "--interval", "1",
           "--warmup", "1"]
    return cmd, edgecv_env(assets, tmp_path, MQTT_HOST="127.0.0.1", MQTT_PORT=str(broker_port))


@pytest.mark.timeout(150)
def test_soak_progress_over_its_duration(assets, broker, tmp_path):
    cmd, env = soak_cmd(assets, broker.port, tmp_path)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert "soak verdict: " in done.stdout, done.stdout + done.stderr  # PASS or FAIL: this short a run can be either
    lines = progress_lines(done.stderr, "soak: ")
    assert len(lines) >= 3, done.stderr  # each second is a quarter of the run
    assert all(re.fullmatch(r"soak: \d/4 s \(\d+ %\)(, done in \d+\.\d s)?", line) for line in lines), lines
    assert re.fullmatch(r"soak: 4/4 s \(100 %\), done in \d+\.\d s", lines[-1]), lines
    assert "\r" not in done.stderr + done.stdout and "\x1b" not in done.stderr + done.stdout
    rows = [line for line in done.stdout.splitlines() if re.match(r"^ +\d+\.\d +\d", line)]
    assert len(rows) >= 3, done.stdout  # a sample row every second, on stdout

    code, term, stdout = on_a_terminal(cmd, env)
    assert "soak verdict: " in stdout, stdout + term
    assert "\rsoak:" in term and "100%|" in term, repr(term)
    assert not re.search(r"^soak: \d", term, re.M), repr(term)
    assert len([line for line in stdout.splitlines() if re.match(r"^ +\d+\.\d +\d", line)]) >= 3, stdout
    assert "\r" not in stdout  # the rows are written around the bar, never into it


def test_build_phases_are_bars_on_a_terminal_and_lines_elsewhere(capsys):
    lines: list[str] = []
    bars = BuildProgress(lines.append, bars=True)
    bars.phase_start("Building engine", None, 3)
    bars.phase_start("Tactic timing", "Building engine", 50)
    for step in range(50):
        assert bars.step_complete("Tactic timing", step) is True
    bars.phase_finish("Tactic timing")
    for step in range(3):
        bars.step_complete("Building engine", step)
    bars.phase_finish("Building engine")
    err = capsys.readouterr().err
    assert lines == []  # no lines: the bars say it
    assert "\rBuilding engine:" in err and "| 3/3 [" in err, repr(err)  # the top phase's bar, left when done
    assert "\r  Tactic timing:" in err and "0/50" in err, repr(err)  # a nested phase's bar, indented (then cleared)

    plain = BuildProgress(lines.append)
    plain.phase_start("Building engine", None, 3)
    plain.phase_finish("Building engine")
    assert lines[0] == "  Building engine ..." and lines[-1].startswith("  Building engine done (")
    assert capsys.readouterr().err == ""
