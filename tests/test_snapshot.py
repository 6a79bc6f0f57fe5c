"""Snapshots: the annotated JPEG and its rate limit (the real-broker check is in test_e2e_driving.py)."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from edgecv.config import parse
from edgecv.publish.snapshot import SnapshotPublisher, encode_jpeg, render, track_color
from edgecv.publish.topics import Topics
from edgecv.types import Detections, Event, Frame, ObjectInfo, SemanticMasks

W, H = 320, 240


def scene() -> tuple[Frame, Detections, SemanticMasks, list[Event]]:
    image = np.full((H, W, 3), 90, np.uint8)
    mask = np.zeros((2, H, W), bool)
    mask[0, 120:180, 40:100] = True
    tracks = Detections(np.array([[40, 120, 100, 180], [200, 100, 260, 160]], np.float32), [0.9, 0.8], [2, 0],
                        track_id=[4, 9], mask=mask)
    drivable = np.zeros((H, W), bool)
    drivable[200:, :] = True
    semantic = SemanticMasks({"drivable": drivable, "lane": np.zeros((H, W), bool)})
    obj = ObjectInfo(4, "car", 2, 0.9, (40, 120, 100, 180), (W, H))
    events = [Event("collision.warning", "n", "front", 7, 1_700_000_000.0, obj, {"ttc_s": 1.4})]
    return Frame("front", 7, 0.0, 1_700_000_000.0, image), tracks, semantic, events


def cfg(assets: Path, **snap):
    return parse({"node_id": "n", "mqtt": {"snapshots": {"enabled": True, **snap}},
                  "model": {"path": "models/yolox_nano.onnx"},
                  "cameras": {"front": {"source": "media/driving/bdd_clip1.gif",
                                        "zones": {"z": {"polygon": [[10, 10], [100, 10], [100, 60]]}},
                                        "driving": {"collision": {"ego_corridor": [[120, 140], [200, 140],
                                                                                   [300, 239], [20, 239]]}}}}},
                 base_dir=assets)


def test_render_draws_masks_boxes_and_keeps_the_size(assets: Path) -> None:
    frame, tracks, semantic, events = scene()
    names = ["person", "bicycle", "car"]
    out = render(frame.image, tracks, names, semantic, cfg(assets).cameras["front"], events)
    assert out.shape == frame.image.shape and out.dtype == np.uint8
    assert (frame.image == 90).all(), "the frame itself is not drawn on"
    assert not np.array_equal(out[230, 160], frame.image[230, 160])  # drivable area tinted
    inner = out[150, 70].astype(int)  # inside the instance mask, away from the box outline
    expected = (np.array([90, 90, 90]) * 0.6 + np.array(track_color(4)) * 0.4).astype(int)
    assert np.abs(inner - expected).max() <= 1
    assert np.array_equal(out[5, 300], frame.image[5, 300])  # untouched corner
    plain = render(frame.image, tracks, names, semantic, None, events, draw_masks=False)
    assert np.array_equal(plain[230, 160], frame.image[230, 160])
    jpeg = encode_jpeg(out, 80)
    decoded = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape == (H, W, 3)


class FakePublisher:
    def __init__(self) -> None:
        self.topics = Topics("edgecv", "n")
        self.sent: list[tuple[str, bytes]] = []

    def publish_raw(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        self.sent.append((topic, payload))


def test_snapshots_only_for_frames_with_events_and_rate_limited(assets: Path) -> None:
    frame, tracks, semantic, events = scene()
    now = [100.0]
    pub = FakePublisher()
    snap = SnapshotPublisher(pub, cfg(assets, max_hz=2, quality=60), ["person", "bicycle", "car"],
                             clock=lambda: now[0])
    snap("front", frame, tracks, semantic, [])  # no event: nothing
    assert pub.sent == []
    for step in range(10):  # 10 frames with events over 1 s at 2 Hz: 2 snapshots
        snap("front", frame, tracks, semantic, events)
        now[0] += 0.1
    assert len(pub.sent) == 2 and snap.skipped == 8
    snap("rear", frame, tracks, None, events)  # per camera
    assert [t for t, _ in pub.sent] == ["edgecv/n/front/snapshot"] * 2 + ["edgecv/n/rear/snapshot"]
    image = cv2.imdecode(np.frombuffer(pub.sent[0][1], np.uint8), cv2.IMREAD_COLOR)
    assert image is not None and image.shape == (H, W, 3)


@pytest.mark.parametrize("quality", [30, 95])
def test_quality_changes_the_size(quality: int) -> None:
    frame, tracks, semantic, events = scene()
    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
    sizes = {q: len(encode_jpeg(noisy, q)) for q in (quality, 60)}
    assert (sizes[quality] < sizes[60]) == (quality < 60)
