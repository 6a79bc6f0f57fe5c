"""Failure is not completion: a model that fails at run time (on real ONNX Runtime), a camera whose frames all
fail beside a healthy one, a worker that fails on every frame. Each failure is logged once and counted; a
camera that cannot go on is given up; a pipeline that cannot go on fails (exit 1), it never "finishes"."""
from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from conftest import edgecv_env
from onnx import TensorProto, helper
from onnx_models import save_graph

from edgecv.config import parse
from edgecv.models import load_models
from edgecv.pipeline import Pipeline

pytestmark = pytest.mark.integration

ANCHORS = 3549  # YOLOX at 416x416
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) +\S+: ")


def failing_yolox(path: Path, bright: float = 200.0) -> Path:
    """A YOLOX-shaped model (1x3x416x416 -> 1x3549x85, no detections) that gathers row ``k * 5`` of a 2-row
    tensor, k = (mean of the input > ``bright``): ONNX Runtime raises at run time on bright frames only."""
    nodes = [
        helper.make_node("ReduceMean", ["images"], ["mean"], keepdims=0),
        helper.make_node("Greater", ["mean", "bright"], ["flag"]),
        helper.make_node("Cast", ["flag"], ["k"], to=TensorProto.INT64),
        helper.make_node("Mul", ["k", "five"], ["row"]),  # 0, or 5: out of bounds
        helper.make_node("ConstantOfShape", ["base_shape"], ["ones"],
                         value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
        helper.make_node("Mul", ["mean", "zero"], ["nothing"]),  # 0, but computed from the input:
        helper.make_node("Mul", ["ones", "nothing"], ["zeros"]),  # nothing here can be folded away
        helper.make_node("Gather", ["zeros", "row"], ["output"], axis=0),
    ]
    inits = [
        helper.make_tensor("bright", TensorProto.FLOAT, [], [bright]),
        helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
        helper.make_tensor("five", TensorProto.INT64, [1], [5]),
        helper.make_tensor("base_shape", TensorProto.INT64, [3], [2, ANCHORS, 85]),
    ]
    graph = helper.make_graph(
        nodes, "failing_yolox",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 416, 416])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, ANCHORS, 85])],
        inits)
    return save_graph(graph, path)


def white_video(path: Path, frames: int = 60) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (320, 240))
    for _ in range(frames):
        writer.write(np.full((240, 320, 3), 255, np.uint8))
    writer.release()
    return path


def _config(tmp_path: Path, model: Path, cameras: dict[str, str], limit: int = 10) -> Path:
    data = {"node_id": "fail", "mqtt": {"enabled": False}, "console": {"enabled": False},
            "model": {"path": str(model), "family": "yolox"}, "failure_limit": limit,
            "cameras": {name: {"source": src, "realtime": False} for name, src in cameras.items()}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _run(assets: Path, tmp_path: Path, config: Path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "edgecv.cli", "run", str(config), *args], capture_output=True,
                       text=True, env=edgecv_env(assets, tmp_path), timeout=120)
    return r, time.monotonic() - t0


def test_a_camera_whose_frames_break_the_model_is_given_up_beside_a_healthy_one(assets: Path, vtest: Path,
                                                                                tmp_path: Path) -> None:
    model = failing_yolox(tmp_path / "failing.onnx")
    cfg = _config(tmp_path, model, {"white": str(white_video(tmp_path / "white.avi")), "street": str(vtest)})
    r, _ = _run(assets, tmp_path, cfg, "--max-frames", "80")
    assert "Traceback" not in r.stderr
    assert r.returncode == 0, r.stderr[-3000:]  # the healthy camera ran to its end
    failures = [ln for ln in r.stderr.splitlines() if "camera white: inference failed: " in ln]
    assert len(failures) == 1, r.stderr  # logged once, not once per frame
    assert "Gather" in failures[0] and "out of data bounds" in failures[0]
    assert all(LOG_LINE.match(ln) for ln in r.stderr.splitlines()), r.stderr  # nothing raw from ONNX Runtime
    assert "camera white: giving up: 10 frames in a row could not be processed" in r.stderr
    assert re.search(r"camera street: \d+ frames read, 80 processed, 0 dropped, 0 events", r.stderr)
    assert "pipeline failed" not in r.stderr


def test_when_every_frame_fails_the_daemon_exits_1_promptly(assets: Path, tmp_path: Path) -> None:
    model = failing_yolox(tmp_path / "failing.onnx")
    cfg = _config(tmp_path, model, {"white": str(white_video(tmp_path / "white.avi", frames=200))}, limit=5)
    r, seconds = _run(assets, tmp_path, cfg)
    assert "Traceback" not in r.stderr
    assert r.returncode == 1, r.stderr[-3000:]
    assert "pipeline failed:" in r.stderr and "all sources finished" not in r.stderr
    assert seconds < 60
    # track and eval refuse a run with failed frames instead of writing or scoring a partial one
    r = subprocess.run([sys.executable, "-m", "edgecv.cli", "track", str(tmp_path / "white.avi"), "--model",
                        str(model), "--family", "yolox", "--mot", str(tmp_path / "out.txt")], capture_output=True,
                       text=True, env=edgecv_env(assets, tmp_path), timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    *logged, last = r.stderr.strip().splitlines()
    assert last.startswith("edgecv: error: ") and "inference failed" in last
    assert all(LOG_LINE.match(ln) for ln in logged), r.stderr


def test_a_worker_failing_on_every_frame_fails_the_pipeline_instead_of_finishing(assets: Path, vtest: Path) -> None:
    cfg = parse({"node_id": "w", "mqtt": {"enabled": False}, "console": {"enabled": False}, "failure_limit": 4,
                 "model": {"path": "models/yolox_nano.onnx", "classes": ["person"]},
                 "cameras": {"street": {"source": str(vtest), "realtime": False}}})
    seen = []

    def broken(camera: str, frame, tracks) -> None:  # a defect in what runs per frame
        seen.append(frame.index)
        raise RuntimeError("boom")

    pipeline = Pipeline(cfg, load_models(cfg), sinks=[], on_tracks=broken)
    t0 = time.monotonic()
    pipeline.run()
    assert time.monotonic() - t0 < 30
    assert pipeline.failed and "4 frames in a row could not be processed" in pipeline.failed
    assert not pipeline.done
    worker = pipeline.workers["street"]
    assert worker.frames_failed >= 4 and worker.failed
    assert pipeline.sources["street"].state == "failed"
    assert pipeline.stats()["pipeline"] == "failed"
    assert pipeline.stats()["cameras"]["street"]["frames_failed"] == worker.frames_failed
