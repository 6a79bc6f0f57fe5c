"""The daemon and CLI as a user runs them: RTSP retries and shutdown, offline tracking, bad sources."""
from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from broker import Subscriber, free_port
from conftest import edgecv_env

pytestmark = pytest.mark.integration


def write_config(path: Path, cameras: dict, mqtt: dict | None = None, **extra) -> Path:
    cfg = {
        "node_id": "t1",
        "mqtt": mqtt or {"enabled": False},
        "model": {"path": "models/yolox_nano.onnx", "classes": ["person"]},
        "cameras": cameras,
        **extra,
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def start(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edgecv.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_rtsp_source_with_nothing_listening_retries_with_growing_delays_and_stops_on_sigterm(
        assets, broker, tmp_path):
    port = free_port()  # nothing listens here
    url = f"rtsp://admin:s3cr3tpass@127.0.0.1:{port}/stream1"
    cfg = write_config(tmp_path / "rtsp.yaml", {
        "door": {"source": url, "open_timeout_s": 2, "reconnect": {"initial_s": 0.2, "max_s": 1.6}},
    }, mqtt={"host": "127.0.0.1", "port": broker.port})
    sub = Subscriber(broker.port, ["edgecv/t1/status"])
    proc = start(["run", str(cfg)], edgecv_env(assets, tmp_path))
    delays: list[float] = []
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 30
        while len(delays) < 5 and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"camera door: connecting \(.*retry in ([0-9.]+)s\)", line)
            if m:
                delays.append(float(m.group(1)))
        assert delays[:5] == [0.2, 0.4, 0.8, 1.6, 1.6], lines  # exponential, capped at max_s
        assert sub.wait_for(lambda ms: [m.payload for m in ms] == [b"online"])  # the daemon itself is up
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert proc.returncode == 0, err
    assert elapsed < 5.0, f"shutdown took {elapsed:.1f}s"
    everything = "".join(lines) + err + out
    assert "Traceback" not in everything
    assert "s3cr3tpass" not in everything, "RTSP credentials must never be logged"
    assert "admin:***@" in everything
    assert sub.wait_for(lambda ms: ms[-1].payload == b"offline")
    sub.close()


def test_track_writes_mot_rows_for_every_frame(assets, tmp_path):
    out = tmp_path / "out.txt"
    proc = subprocess.run(
        [sys.executable, "-m", "edgecv.cli", "track", "media/vtest.avi", "--model", "models/yolox_nano.onnx",
         "--classes", "person", "--mot", str(out)],
        cwd=assets, env=edgecv_env(assets, tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^795 frames processed in [0-9.]+ s: [0-9.]+ fps", proc.stdout, re.M), proc.stdout
    rows = [line.split(",") for line in out.read_text().splitlines()]
    frames = {int(r[0]) for r in rows}
    assert frames == set(range(1, 796))
    for r in rows:
        assert len(r) == 10 and r[7:] == ["-1", "-1", "-1"]
        tid, x, y, w, h, score = int(r[1]), *map(float, r[2:7])
        assert tid >= 1 and w > 0 and h > 0 and 0 < score <= 1
        assert x >= 0 and y >= 0 and x + w <= 768.01 and y + h <= 576.01
    # one id per object per frame
    per_frame: dict[int, list[int]] = {}
    for r in rows:
        per_frame.setdefault(int(r[0]), []).append(int(r[1]))
    assert all(len(ids) == len(set(ids)) for ids in per_frame.values())
    # a real tracker: ids persist (far fewer ids than rows)
    assert len({int(r[1]) for r in rows}) < len(rows) / 20


@pytest.mark.parametrize("content, expected", [
    (b"this is not a video at all\n" * 100, "cannot open video file"),
    (b"", "cannot open video file"),
])
def test_unreadable_video_fails_the_camera_with_one_line(assets, tmp_path, content, expected):
    bad = tmp_path / "broken.avi"
    bad.write_bytes(content)
    cfg = write_config(tmp_path / "bad.yaml", {"cam": {"source": str(bad), "realtime": False}})
    proc = subprocess.run([sys.executable, "-m", "edgecv.cli", "run", str(cfg)], env=edgecv_env(assets, tmp_path),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    failed = [line for line in proc.stderr.splitlines() if "camera cam: failed" in line]
    assert failed and expected in failed[0] and str(bad) in failed[0]


def test_track_reports_missing_model_in_one_line(assets, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "edgecv.cli", "track", str(assets / "media" / "vtest.avi"),
                           "--model", "nope.onnx", "--mot", str(tmp_path / "o.txt")],
                          env=edgecv_env(assets, tmp_path), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2  # a value given on the command line that cannot be used, like an invalid config
    assert proc.stderr.strip().count("\n") == 0 and "--model: file not found: nope.onnx" in proc.stderr
