"""Pipeline.health(): what systemd's watchdog and /healthz read. A capture thread that blocks in opening its
source (a named pipe nobody writes to: open(2) waits for a writer) is reported after stuck_after_s past the
camera's open timeout, and no longer once the open returns."""
from __future__ import annotations

import os
import time

import pytest

from edgecv.config import parse
from edgecv.models import load_models
from edgecv.pipeline import Pipeline

pytestmark = pytest.mark.integration


def test_a_capture_blocked_in_its_open_is_reported(assets, tmp_path):
    fifo = tmp_path / "camera.mjpeg"
    os.mkfifo(fifo)
    cfg = parse({"node_id": "n1", "mqtt": {"enabled": False}, "console": {"enabled": False}, "stuck_after_s": 0.5,
                 "model": {"path": str(assets / "models" / "yolox_nano.onnx"), "classes": ["person"]},
                 "cameras": {"pipe": {"source": str(fifo), "type": "stream", "open_timeout_s": 0.5,
                                      "reconnect": {"initial_s": 30, "max_s": 30}}}})
    pipeline = Pipeline(cfg, load_models(cfg), sinks=[])
    assert pipeline.health() == []
    pipeline.start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not pipeline.health():
            time.sleep(0.1)
        problems = pipeline.health()
        assert problems and "camera pipe: capture blocked opening the source" in problems[0], problems
        assert time.monotonic() - pipeline.started_at >= 1.0  # not before stuck_after_s + open_timeout_s
    finally:
        pipeline.stop(timeout=0.5)
        with open(fifo, "wb"):  # a writer that closes at once: the open returns (nothing to read), the thread ends
            pass
        pipeline.sources["pipe"].join(10)
    assert not any("opening" in p for p in pipeline.health())
