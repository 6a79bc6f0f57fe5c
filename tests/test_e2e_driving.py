"""configs/driving.yaml end to end on both dash-cam clips: YOLOX-Nano (tracked) and TwinLiteNet (drivable
area, lanes) on every frame, driving rules, snapshots; a real Mosquitto and a real paho subscriber."""
from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import cv2
import jsonschema
import numpy as np
import pytest
from broker import Subscriber
from conftest import REPO, edgecv_env

from edgecv.schema import EVENT_JSON_SCHEMA

pytestmark = pytest.mark.integration

FRAMES = 72  # each clip: 320x240, 72 frames at 8.33 fps


def test_gif_clips_decode_through_opencv_ffmpeg(assets: Path) -> None:
    for clip in ("bdd_clip1.gif", "bdd_clip2.gif"):
        cap = cv2.VideoCapture(str(assets / "media" / "driving" / clip), cv2.CAP_FFMPEG)
        assert cap.isOpened()
        assert cap.get(cv2.CAP_PROP_FPS) == pytest.approx(8.33, abs=0.01)
        n = 0
        while True:
            ok, image = cap.read()
            if not ok:
                break
            assert image.shape == (240, 320, 3)
            n += 1
        cap.release()
        assert n == FRAMES


@pytest.mark.parametrize("clip", ["bdd_clip1.gif", "bdd_clip2.gif"])
def test_driving_config_on_both_clips(assets: Path, broker, tmp_path: Path, clip: str) -> None:
    text = (REPO / "configs" / "driving.yaml").read_text()
    assert "source: media/driving/bdd_clip1.gif" in text
    config = tmp_path / "driving.yaml"
    config.write_text(text.replace("media/driving/bdd_clip1.gif", f"media/driving/{clip}"))
    sub = Subscriber(broker.port, ["edgecv/vehicle-01/#"])
    proc = subprocess.run([sys.executable, "-m", "edgecv.cli", "run", str(config), "--fast"],
                          env=edgecv_env(assets, tmp_path, MQTT_PORT=str(broker.port)), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and " ERROR " not in proc.stderr, proc.stderr[-2000:]
    assert f"{FRAMES} frames read, {FRAMES} processed" in proc.stderr
    assert "yolox_nano.onnx (yolox, onnxruntime), twinlitenet.onnx (semseg, onnxruntime)" in proc.stderr
    assert sub.wait_for(lambda ms: any(m.topic.endswith("/status") and m.payload == b"offline" for m in ms))
    sub.close()
    msgs = sub.snapshot()

    # both models ran on every frame
    stats = [m.json() for m in msgs if m.topic == "edgecv/vehicle-01/stats"]
    final = stats[-1]
    cam = final["cameras"]["front"]
    assert cam["frames_processed"] == FRAMES and cam["frames_dropped"] == 0
    assert cam["models"] == {"detector": FRAMES, "lanes": FRAMES}
    assert set(final["inference_ms_by_model"]) == {"detector", "lanes"}
    assert all(final["inference_ms_by_model"][n]["p50"] > 0 for n in ("detector", "lanes"))
    assert set(cam["stage_ms"]) == {"preprocess", "decode", "track_rules"}

    # events: well-formed, unique ids, the console printed each
    events = [m.json() for m in msgs if m.topic == "edgecv/vehicle-01/front/events"]
    for ev in events:
        jsonschema.validate(ev, EVENT_JSON_SCHEMA)
        assert ev["node"] == "vehicle-01" and ev["camera"] == "front" and 1 <= ev["frame"] <= FRAMES
        x1, y1, x2, y2 = ev["object"]["bbox"]
        assert 0 <= x1 < x2 <= 320 and 0 <= y1 < y2 <= 240 and ev["object"]["frame_size"] == [320, 240]
        assert ev["object"]["label"] in ("person", "bicycle", "car", "motorcycle", "bus", "truck")
        if ev["type"] == "collision.warning":
            assert 0 <= ev["ttc_s"] <= 2.0
        if ev["type"].startswith("zone."):
            assert ev["zone"] == "drivable"
    assert len({ev["id"] for ev in events}) == len(events)
    kinds = Counter(ev["type"] for ev in events)
    assert kinds["object.new"] >= 1, kinds
    assert set(kinds) <= {"object.new", "object.lost", "zone.enter", "zone.exit", "collision.warning"}, kinds
    console = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(console) == len(events)

    # snapshots: JPEGs of the source size, only for frames with events, at most max_hz (1) a second
    snaps = [m for m in msgs if m.topic == "edgecv/vehicle-01/front/snapshot"]
    assert 1 <= len(snaps) <= len({ev["frame"] for ev in events})
    if len(snaps) > 1:
        span = snaps[-1].t - snaps[0].t
        assert len(snaps) - 1 <= span * 1.0 + 1.5, (len(snaps), span)
    for m in snaps:
        image = cv2.imdecode(np.frombuffer(m.payload, np.uint8), cv2.IMREAD_COLOR)
        assert image is not None and image.shape == (240, 320, 3)
