"""The threaded pipeline with several models: an instance-segmentation detector (tracked, mask areas on the
events) and a semantic segmenter (masks handed to the rules), on a small video written here."""
from __future__ import annotations

import time
from pathlib import Path

import cv2
import jsonschema
import numpy as np
from test_segmentation import SIZE, constant_model, seg_scene

from edgecv.config import parse
from edgecv.models import load_models
from edgecv.pipeline import Pipeline
from edgecv.schema import EVENT_JSON_SCHEMA
from edgecv.types import Event

W = H = 128
FRAMES = 12


class Collect:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def emit(self, event: Event) -> None:
        self.events.append(event)


def write_video(path: Path) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (W, H))
    assert writer.isOpened()
    for i in range(FRAMES):
        writer.write(np.full((H, W, 3), 40 + i, np.uint8))
    writer.release()
    return path


def test_detector_and_segmenter_run_on_every_frame(tmp_path: Path) -> None:
    raw, protos, scene = seg_scene(W, H)
    seg = constant_model(tmp_path / "seg.onnx", {"output0": raw, "output1": protos})
    da = np.zeros((1, 2, SIZE, SIZE), np.float32)
    da[0, 1, SIZE // 2:] = 1.0  # the lower half is "drivable"
    sem = constant_model(tmp_path / "sem.onnx", {"da": da})
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\nc\n")
    cfg = parse({
        "node_id": "n", "mqtt": {"enabled": False}, "console": {"enabled": False},
        "models": [{"name": "inst", "path": str(seg), "family": "yolov8-seg", "conf": 0.5, "labels": str(labels)},
                   {"name": "road", "path": str(sem)}],
        "tracker": {"min_hits": 1},
        "cameras": {"cam": {"source": str(write_video(tmp_path / "v.avi")), "realtime": False,
                            "driving": {"drivable_zone": {"min_frames": 2}}}},
    }, base_dir=tmp_path)
    models = load_models(cfg)
    assert models.names == ["inst", "road"] and models.detector.family == "yolov8-seg"
    assert models.segmenters[0].family == "semseg"  # family auto, from the output shapes
    seen = []
    sink = Collect()
    pipe = Pipeline(cfg, models, [sink], on_events=lambda cam, f, t, s, e: seen.append((f.index, t, s, e)))
    pipe.start()
    deadline = time.monotonic() + 60
    while not pipe.done and time.monotonic() < deadline:
        time.sleep(0.01)
    pipe.stop()
    stats = pipe.stats()
    cam = stats["cameras"]["cam"]
    assert cam["frames_processed"] == FRAMES and cam["models"] == {"inst": FRAMES, "road": FRAMES}
    assert set(stats["inference_ms_by_model"]) == {"inst", "road"}

    news = [e for e in sink.events if e.type == "object.new"]
    assert len(news) == len(scene)
    for ev in news:
        payload = ev.to_payload(time.time())
        jsonschema.validate(payload, EVENT_JSON_SCHEMA)
        assert payload["object"]["mask_area"] > 100
    # the drivable zone saw the semantic mask: objects whose strip under the box is in the lower half
    zone = [e for e in sink.events if e.type == "zone.enter"]
    assert zone and all(e.fields["zone"] == "drivable" for e in zone)
    # the hook got the frame's tracks (with masks at source size) and the merged semantic masks
    index, tracks, semantic, events = seen[0]
    assert tracks.mask is not None and tracks.mask.shape[1:] == (H, W)
    assert semantic is not None and semantic.names == ["drivable"] and semantic.size == (W, H)
    assert semantic["drivable"][H // 2:].all() and not semantic["drivable"][: H // 2].any()
