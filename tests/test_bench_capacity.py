"""`edgecv bench capacity` and `edgecv bench latency` run end to end at a tiny size (a real Mosquitto, the real
model and clip) and print their tables; the speed figures themselves are printed, never asserted."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import edgecv_env

from edgecv.capacity import BUDGET_STAGES, CAPACITY_COLUMNS, Setup, Window, capacity_row
from edgecv.cli import build_parser
from edgecv.config import CameraConfig, parse


def _bench(assets: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgecv.cli", "bench", *args, "--frames", "20"],
                          env=edgecv_env(assets, tmp_path), capture_output=True, text=True, timeout=120)


@pytest.mark.integration
@pytest.mark.timeout(150)
def test_capacity_prints_a_row_per_camera_count_and_the_verdict(assets, tmp_path):
    proc = _bench(assets, tmp_path, "capacity", "--cameras", "2", "--duration", "3", "--warmup", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.startswith("model only: ") and "L = model-only fps / 10" in line for line in lines), proc.stdout
    header = next(i for i, line in enumerate(lines) if line.startswith("cameras "))
    assert lines[header].split("  ")[0] == "cameras"
    for column in CAPACITY_COLUMNS:
        assert column in lines[header], (column, lines[header])
    row = lines[header + 2].split()
    assert row[0] == "2" and row[-1] in ("yes", "NO") and len(row) == len(CAPACITY_COLUMNS), lines[header + 2]
    assert float(row[1]) > 0  # the worst camera processed frames
    assert lines[-1].startswith("largest camera count that holds: "), proc.stdout
    cpu = re.fullmatch(r"  2 cameras: (.*); total (\d+\.\d\d)", lines[-2])
    assert cpu and lines[-3].startswith("CPU ms per processed frame, by stage"), proc.stdout
    stages = dict(part.rsplit(" ", 1) for part in cpu.group(1).split(", "))
    assert {"inference", "capture", "workers"} <= stages.keys() and float(stages["inference"]) > 0, proc.stdout
    assert float(cpu.group(2)) == pytest.approx(sum(map(float, stages.values())), abs=0.05), proc.stdout
    assert "2 cameras: " in proc.stderr  # progress on stderr


@pytest.mark.integration
@pytest.mark.timeout(150)
def test_latency_prints_the_budget_of_every_stage_and_the_ratios(assets, tmp_path):
    proc = _bench(assets, tmp_path, "latency", "--duration", "3", "--warmup", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for label in ("one inference: model only (median, back to back)", "one inference: in the pipeline (p50 / p99)",
                  "event: capture -> subscriber (p50 / p99)", "event p50 / one inference (model only, pipeline)",
                  "event p99 / one inference (model only, pipeline)"):
        assert label in out, out
    stages = {line.split()[0] for line in out.split("stage (ms)", 1)[1].splitlines()[2:] if line.strip()}
    assert stages == set(BUDGET_STAGES), out  # the stats' latency_budget_ms has every stage, the events' part included


def test_a_camera_count_holds_only_at_its_rate_without_drops_within_the_latency_bound():
    def window(processed: int, dropped: int, p99: float, events: list[float]) -> Window:
        cam = {"read": 100 + dropped, "processed": processed, "dropped": dropped,
               "stats": {"latency_ms": {"p50": p99 / 2, "p99": p99}}}
        return Window(10.0, {"a": cam, "b": {**cam, "processed": 100, "dropped": 0}}, {}, np.asarray(events), 5.0)

    assert capacity_row(2, 10.0, window(100, 0, 90.0, [40.0, 60.0]), True).holds
    assert not capacity_row(2, 10.0, window(90, 0, 90.0, [40.0]), True).holds  # one camera below its rate
    assert not capacity_row(2, 10.0, window(100, 5, 90.0, [40.0]), True).holds  # drops
    assert not capacity_row(2, 10.0, window(100, 0, 250.0, [40.0]), True).holds  # frame p99
    assert not capacity_row(2, 10.0, window(100, 0, 90.0, [40.0, 900.0]), True).holds  # event p99
    assert capacity_row(2, 10.0, window(100, 0, 90.0, []), False).holds  # no broker: frames only
    assert capacity_row(2, 10.0, window(100, 0, 90.0, []), True).cpu_pct > 0
    skipping = window(100, 0, 90.0, [40.0])
    skipping.cameras["a"]["inferred"], skipping.cameras["b"]["inferred"] = 50, 30  # every_n, deferrals
    assert capacity_row(2, 10.0, skipping, True).inferred_pct == pytest.approx(40.0)


def test_every_n_and_motion_gate_are_passed_as_detect_settings(assets, vtest, tmp_path):
    args = build_parser().parse_args(["bench", "capacity", "--cameras", "4,8", "--every-n", "3", "--motion-gate"])
    assert (args.what, args.cameras, args.every_n, args.motion_gate) == ("capacity", "4,8", 3, True)
    setup = Setup(assets / "models" / "yolox_nano.onnx", vtest, 10.0, (768, 576), every_n=3, motion_gate=True,
                  workdir=tmp_path)
    section = setup.config("n", 2)["cameras"]["cam1"]
    assert section["detect"] == {"every_n": 3, "motion_gate": {"enabled": True}}
    if "detect" not in CameraConfig.model_fields:
        pytest.skip("the config has no cameras.<n>.detect section yet")
    cfg = parse(setup.config("n", 2), "capacity config")
    detect = cfg.cameras["cam2"].detect
    assert detect.every_n == 3 and detect.motion_gate.enabled and detect.defer_when_busy
    args = build_parser().parse_args(["bench", "capacity", "--every-n", "2", "--no-defer"])
    assert args.no_defer
    never = Setup(assets / "models" / "yolox_nano.onnx", vtest, 10.0, (768, 576), every_n=2, defer=False,
                  workdir=tmp_path)
    assert not parse(never.config("n", 1), "capacity config").cameras["cam1"].detect.defer_when_busy
