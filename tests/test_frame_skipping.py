"""A camera's `detect` section: the detector on one frame in N (`every_n`), a motion gate that skips still
frames, or no detector at all; the tracker predicts (or holds) the frames the detector skips, and the rules see
every frame. Real model, real videos; the clip with a long still stretch is made here from the street clip."""
from __future__ import annotations

import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Optional

import cv2
import numpy as np
import pytest
import yaml
from conftest import REPO, edgecv_env

from edgecv import UsageError
from edgecv.config import ConfigError, DetectConfig, parse
from edgecv.models import MAX_WAITING_SKIPS, Prepared, load_models, merge_skipped
from edgecv.pipeline import Pipeline
from edgecv.sources.base import FrameSlot
from edgecv.sources.gate import (
    DEFER_WAIT_MS,
    MOVING_PX,
    SKIP_DEFERRED,
    SKIP_DISABLED,
    SKIP_INTERVAL,
    SKIP_STATIC,
    FrameGate,
    MotionDetector,
)
from edgecv.track import OfflineRun, run_offline, with_detect
from edgecv.tracking.bytetrack import ByteTracker, TrackerConfig
from edgecv.types import Detections, Event, Frame

STREET = {  # the demo's zone and line across the walkway of media/vtest.avi
    "zones": {"plaza": {"polygon": [[440, 190], [680, 190], [740, 330], [440, 330]]}},
    "lines": {"crossing": {"points": [[300, 150], [300, 420]]}},
}


def config(source: str, detect: Optional[dict] = None, **camera: Any) -> dict:
    cam = {"source": source, "realtime": False, **STREET, **camera}
    if detect is not None:
        cam["detect"] = detect
    return {"node_id": "skip", "mqtt": {"enabled": False}, "console": {"enabled": False},
            "model": {"path": "models/yolox_nano.onnx", "family": "yolox", "classes": ["person"]},
            "cameras": {"street": cam}}


class Recorder:
    """Events, the track ids and boxes reported on every frame, and the frames the detector ran on."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.tracks: dict[int, dict[int, tuple[float, ...]]] = {}
        self.inferred: list[int] = []

    def emit(self, event: Event) -> None:
        self.events.append(event)

    def on_tracks(self, frame: Frame, tracks: Detections) -> None:
        self.tracks[frame.index] = dict(zip(tracks.track_id.tolist(), map(tuple, tracks.xyxy.tolist())))

    def on_detections(self, frame: Frame, dets: Detections) -> None:
        self.inferred.append(frame.index)

    def keys(self, kinds: tuple[str, ...] = ("zone.", "line.", "object.")) -> Counter:
        return Counter((e.type, e.rule, str(e.fields.get("direction", ""))) for e in self.events
                       if e.type.startswith(kinds))


def run(raw: dict, max_frames: Optional[int] = None) -> tuple[Recorder, OfflineRun, dict]:
    cfg = parse(raw, base_dir=REPO)
    rec = Recorder()
    result = run_offline(cfg, load_models(cfg), "street", sinks=[rec], on_tracks=rec.on_tracks,
                         on_detections=rec.on_detections, max_frames=max_frames)
    return rec, result, result.pipeline.stats()["cameras"]["street"]


# ---- config

def test_defaults_infer_every_frame_as_before(assets: Path) -> None:
    cfg = parse(config(str(assets / "media" / "vtest.avi")), base_dir=REPO)
    detect = cfg.cameras["street"].detect
    assert detect == DetectConfig() and not detect.gated
    assert (detect.enabled, detect.every_n, detect.motion_gate.enabled) == (True, 1, False)
    pipe = Pipeline(cfg, load_models(cfg), [])
    src = pipe.sources["street"]
    assert src.prepare == pipe.models.prepare and src.on_open is None and src.slot.merge is None  # no gate at all


BAD = [
    ({"every_n": 0}, "cameras.street.detect.every_n: ", "greater than or equal to 1"),
    ({"every_n": 2.5}, "cameras.street.detect.every_n: ", "integer"),
    ({"motion_gate": {"sensitivity": 1.5}}, "cameras.street.detect.motion_gate.sensitivity: ", "less than or equal to 1"),
    ({"motion_gate": {"sensitivity": -0.1}}, "cameras.street.detect.motion_gate.sensitivity: ", "greater than or equal to 0"),
    ({"motion_gate": {"min_area": -1}}, "cameras.street.detect.motion_gate.min_area: ", "greater than or equal to 0"),
    ({"motion_gate": {"mask": [[[0, 0], [10, 0], [10, 10]], [[0, 0], [10, 10]]]}},
     "cameras.street.detect.motion_gate.mask[1]: ", "needs at least 3 points, got 2"),
    ({"motion_gate": {"mask": []}}, "cameras.street.detect.motion_gate.mask: ", "at least 1 item"),
    ({"every_m": 2}, "cameras.street.detect.every_m: ", "did you mean 'every_n'"),
]


@pytest.mark.parametrize("detect, field, text", BAD, ids=[b[1].split(".", 3)[-1] + b[2][:12] for b in BAD])
def test_bad_detect_values_are_one_line_naming_the_field(detect: dict, field: str, text: str, assets: Path) -> None:
    with pytest.raises(ConfigError) as e:
        parse(config(str(assets / "media" / "vtest.avi"), detect), base_dir=REPO)
    assert len(e.value.problems) == 1, e.value.problems
    line = e.value.problems[0]
    assert line.startswith(field) and text in line and "\n" not in line, line


def test_bad_detect_values_through_the_cli(assets: Path, tmp_path: Path) -> None:
    raw = config(str(assets / "media" / "vtest.avi"), {"every_n": 0, "motion_gate": {"mask": [[[1, 1], [5, 5]]]}})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "edgecv.cli", "check", "--no-model", str(path)],
                          env=edgecv_env(assets, tmp_path), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        "cameras.street.detect.every_n: Input should be greater than or equal to 1 (got 0)",
        "cameras.street.detect.motion_gate.mask[0]: needs at least 3 points, got 2",
    ]


def test_eval_detect_overrides(assets: Path) -> None:
    cfg = parse(config(str(assets / "media" / "vtest.avi")), base_dir=REPO)
    changed = with_detect(cfg, ["every_n=3", "motion_gate.enabled=true", "motion_gate.sensitivity=0.8"])
    detect = changed.cameras["street"].detect
    assert (detect.every_n, detect.motion_gate.enabled, detect.motion_gate.sensitivity) == (3, True, 0.8)
    assert changed.cameras["street"].zones == cfg.cameras["street"].zones
    with pytest.raises(UsageError, match=r"^--detect: cameras.street.detect.every_n: .*greater than or equal to 1"):
        with_detect(cfg, ["every_n=0"])
    with pytest.raises(UsageError, match="--detect: expected KEY=VALUE"):
        with_detect(cfg, ["every_n"])
    with pytest.raises(UsageError, match="--detect: every_n.x: every_n is not a section"):
        with_detect(cfg, ["every_n.x=1"])


# ---- the pieces: tracker coasting, the gate, the slot

def box(x: float) -> Detections:
    return Detections(np.array([[x, 100.0, x + 40.0, 200.0]]), np.array([0.9]), np.array([0]))


def test_coast_predicts_keeps_ids_and_ages_tracks_out() -> None:
    tracker = ByteTracker(TrackerConfig(frame_rate=10.0))  # lost buffer: 15 frames
    for f in range(10):
        out = tracker.update(box(100.0 + 3.0 * f))
    assert out.track_id.tolist() == [1] and tracker.max_speed() > MOVING_PX
    coasted = tracker.coast()
    assert coasted.track_id.tolist() == [1] and coasted.data["det_index"].tolist() == [-1]
    assert 128.0 < coasted.xyxy[0, 0] < 131.0  # moved on by about 3 px from the last detection at x = 127
    assert tracker.events == []
    after = tracker.update(box(133.0))  # the next detection matches the same track: no new id
    assert after.track_id.tolist() == [1] and [e.kind for e in tracker.events] == []
    kinds = []
    for _ in range(20):
        out = tracker.coast()
        kinds += [e.kind.value for e in tracker.events]
    assert kinds == ["lost", "removed"] and len(out) == 0  # nothing detected for longer than the buffer


def test_coast_with_hold_keeps_a_still_scene_past_the_lost_buffer() -> None:
    tracker = ByteTracker(TrackerConfig(frame_rate=10.0))
    for _ in range(10):
        tracker.update(box(100.0))
    for _ in range(60):  # 4 lost buffers of held frames
        held = tracker.coast(hold=True)
        assert held.track_id.tolist() == [1] and tracker.events == []
    assert held.xyxy[0].tolist() == pytest.approx([100.0, 100.0, 140.0, 200.0], abs=0.5)
    assert tracker.update(box(100.0)).track_id.tolist() == [1]


def test_coast_confirms_nothing_and_a_tentative_track_waits_for_the_next_detection() -> None:
    tracker = ByteTracker(TrackerConfig(frame_rate=10.0))
    tracker.update(Detections.empty())
    tracker.update(box(100.0))  # tentative: not reported
    assert len(tracker.coast()) == 0 and len(tracker.coast()) == 0
    assert tracker.update(box(100.0)).track_id.tolist() == [1]  # its second match, across the skipped frames


def still(value: int = 90) -> np.ndarray:
    return np.full((240, 320, 3), value, np.uint8)


def test_gate_every_n_and_disabled() -> None:
    gate = FrameGate(DetectConfig(every_n=3))
    image = still()
    assert [gate.decide(image) for _ in range(7)] == [None, SKIP_INTERVAL, SKIP_INTERVAL, None, SKIP_INTERVAL,
                                                       SKIP_INTERVAL, None]
    assert gate.decide(image) == SKIP_INTERVAL
    gate.reset()  # the source reopened (a reconnect): the next frame is inferred
    assert gate.decide(image) is None and gate.decide(image) == SKIP_INTERVAL
    off = FrameGate(DetectConfig(enabled=False))
    off.reset()
    assert {off.decide(image) for _ in range(5)} == {SKIP_DISABLED}


def test_every_n_keeps_the_detector_at_min_fps(caplog: pytest.LogCaptureFixture) -> None:
    gate = FrameGate(DetectConfig(every_n=4), name="cam")  # min_fps 3 by default
    assert gate.every_n == 4  # the frame rate is not known yet: as set
    caplog.set_level("WARNING", logger="edgecv.sources.gate")
    gate.reset(30.0)
    assert gate.every_n == 4 and not caplog.records  # 7.5 detections a second: as set, nothing said
    gate.reset(7.0)
    assert gate.every_n == 2  # 7 / 4 = 1.75 a second would be too few: one in 2 (3.5 a second)
    assert [r.getMessage() for r in caplog.records] == [
        "cam: detect.every_n 4 at 7 fps would run the detector 1.75 times a second, below detect.min_fps 3: "
        "running it on one frame in 2"]
    gate.reset(7.0)  # the same stream reopened: said once
    assert len(caplog.records) == 1
    gate.reset(2.0)
    assert gate.every_n == 1 and [gate.decide(still()) for _ in range(3)] == [None, None, None]
    gate.reset(0.0)  # a source that does not say its rate: the last one known stays
    assert gate.every_n == 1
    free = FrameGate(DetectConfig(every_n=4, min_fps=0))
    free.reset(2.0)
    assert free.every_n == 4  # 0: every_n as set, however slow the camera


def test_a_due_frame_is_deferred_while_other_cameras_wait_for_the_detector() -> None:
    waiting = [0.0]
    gate = FrameGate(DetectConfig(every_n=2), wait_ms=lambda: waiting[0])
    gate.reset(10.0)
    image = still()
    assert [gate.decide(image) for _ in range(3)] == [None, SKIP_INTERVAL, None]
    waiting[0] = DEFER_WAIT_MS  # other cameras' frames would keep it waiting that long: deferred, once (every_n - 1)
    assert [gate.decide(image) for _ in range(4)] == [SKIP_INTERVAL, SKIP_DEFERRED, None, SKIP_INTERVAL]
    waiting[0] = DEFER_WAIT_MS - 1  # a shorter wait is no queue
    assert gate.decide(image) is None
    slow = FrameGate(DetectConfig(every_n=2), wait_ms=lambda: 500.0)
    slow.reset(6.0)  # at 6 fps a gap of 3 frames would be 2 detections a second, below min_fps 3: no deferral
    assert [slow.decide(image) for _ in range(5)] == [None, SKIP_INTERVAL, None, SKIP_INTERVAL, None]
    never = FrameGate(DetectConfig(every_n=2, defer_when_busy=False), wait_ms=lambda: 500.0)
    never.reset(10.0)
    assert [never.decide(image) for _ in range(5)] == [None, SKIP_INTERVAL, None, SKIP_INTERVAL, None]
    first = FrameGate(DetectConfig(every_n=2), wait_ms=lambda: 500.0)
    assert first.decide(image) is None  # a stream's first frame is inferred, busy or not


def test_motion_gate_skips_still_frames_unless_something_moves() -> None:
    speed = [0.0]
    gate = FrameGate(DetectConfig.model_validate({"motion_gate": {"enabled": True, "mask": [[[0, 0], [100, 0],
                                                                                            [100, 100]]]}}),
                     track_speed=lambda: speed[0])
    image = still()
    assert gate.decide(image) is None  # the first frame
    assert [gate.decide(image) for _ in range(3)] == [SKIP_STATIC] * 3
    moved = image.copy()
    moved[150:200, 200:240] = 200  # an object appears (50 x 40 px) and stays: motion until the background has it
    decisions = [gate.decide(moved) for _ in range(10)]
    assert decisions[0] is None and decisions[-1] == SKIP_STATIC, decisions
    decisions = [gate.decide(image) for _ in range(10)]  # it leaves: motion until its ghost fades
    assert decisions[0] is None and decisions[-1] == SKIP_STATIC, decisions
    masked = image.copy()
    masked[5:40, 60:95] = 255  # inside the ignored triangle
    assert gate.decide(masked) == SKIP_STATIC
    speed[0] = MOVING_PX + 0.5  # a tracked object still moves
    assert gate.decide(image) is None


def test_motion_detector_counts_changed_area_in_source_pixels() -> None:
    detector = MotionDetector(sensitivity=0.5, min_area=1000.0)
    big = np.full((576, 768, 3), 90, np.uint8)
    assert detector.moved(big)
    changed = big.copy()
    changed[300:330, 300:330] = 250  # 900 px²: below min_area
    assert not detector.moved(changed)
    assert 600 <= detector.changed_area <= 1200
    changed[300:360, 300:360] = 250  # 3600 px²
    assert detector.moved(changed)


def test_slot_passes_on_every_skipped_frame_in_order_and_keeps_the_newest_to_infer() -> None:
    """A gated camera's slot: a frame the detector skips never replaces, and is never replaced by, one that waits;
    it rides along (before or after it) to the camera worker. An inferred frame still replaces an older one."""
    def item(index: int, infer: bool) -> Prepared:
        return Prepared(Frame("c", index, 0.0, 0.0, np.zeros((2, 2, 3), np.uint8)), (),
                        skip=None if infer else SKIP_INTERVAL)

    slot = FrameSlot(block=False)
    slot.merge = merge_skipped
    stop = threading.Event()
    for i, infer in ((1, False), (2, True), (3, False), (4, False)):
        slot.put(item(i, infer), stop)
    got = slot.take()
    assert [p.frame.index for p in got.before] == [1] and got.frame.index == 2
    assert [p.frame.index for p in got.after] == [3, 4] and slot.dropped == 0
    for i, infer in ((5, True), (6, False), (7, True), (8, False)):
        slot.put(item(i, infer), stop)
    got = slot.take()  # 7 replaced 5 (dropped, counted); 6 and 8 are still passed on, in order
    assert [p.frame.index for p in got.before] == [6] and got.frame.index == 7
    assert [p.frame.index for p in got.after] == [8] and slot.dropped == 1
    slot.put(item(9, True), stop)
    for i in range(10, 10 + MAX_WAITING_SKIPS + 2):  # inference stuck: the skipped frames are bounded
        slot.put(item(i, False), stop)
    got = slot.take()
    assert len(got.after) == MAX_WAITING_SKIPS and got.after[-1].frame.index == 11 + MAX_WAITING_SKIPS
    assert slot.dropped == 3


# ---- end to end on the street clip

@pytest.mark.integration
def test_every_third_frame_keeps_ids_and_events(vtest: Path) -> None:
    frames = 150
    rec, result, stats = run(config(str(vtest), {"every_n": 3}), max_frames=frames)
    assert stats["frames_processed"] == frames and result.frames == frames
    assert stats["frames_inferred"] == frames // 3 and stats["frames_skipped_interval"] == frames - frames // 3
    assert rec.inferred == list(range(1, frames + 1, 3))
    assert sorted(rec.tracks) == list(range(1, frames + 1))  # tracks reported on every frame, skipped or not
    checked = 0
    for k in rec.inferred:
        if k + 3 > frames:
            continue
        both = set(rec.tracks[k]) & set(rec.tracks[k + 3])
        for j in (k + 1, k + 2):
            assert both <= set(rec.tracks[j]), (k, j, both, rec.tracks[j])
            for tid in both:  # the predicted box is near the two detections (within half a box width)
                (a1, _, a2, _), (b1, _, b2, _) = rec.tracks[k][tid], rec.tracks[k + 3][tid]
                x1, _, x2, _ = rec.tracks[j][tid]
                lo, hi = sorted(((a1 + a2) / 2, (b1 + b2) / 2))
                margin = max(a2 - a1, b2 - b1) / 2
                assert lo - margin <= (x1 + x2) / 2 <= hi + margin, (tid, j, rec.tracks[j][tid], lo, hi)
        checked += len(both)
    assert checked > 50
    kinds = rec.keys()
    assert kinds[("zone.enter", "plaza", "")] >= 3 and kinds[("zone.exit", "plaza", "")] >= 3, kinds
    assert sum(n for (t, _, _), n in kinds.items() if t == "line.cross") >= 1, kinds
    on_skipped = [e for e in rec.events if e.frame not in set(rec.inferred)]
    assert on_skipped, "rules run on the predicted frames too: some events happen on them"
    for e in on_skipped:  # an event carries the frame it happened on, and its track's box on that frame
        if e.type != "object.lost" and e.fields.get("reason") != "lost":  # (a removed track is not reported)
            assert e.object.bbox == pytest.approx(rec.tracks[e.frame][e.object.track_id], abs=1e-3), e


def write_clip(vtest: Path, path: Path, fps: float, order: Callable[[list[np.ndarray]], list[np.ndarray]],
               frames: int) -> Path:
    """An MJPEG clip at ``fps`` of vtest's first ``frames`` frames, arranged by ``order`` (MJPEG: every repeat of a
    frame decodes to the very same pixels)."""
    cap = cv2.VideoCapture(str(vtest))
    images = [cap.read()[1] for _ in range(frames)]
    cap.release()
    h, w = images[0].shape[:2]
    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    for image in order(images):
        out.write(image)
    out.release()
    return path


@pytest.fixture(scope="module")
def slow_clip(vtest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """vtest's first 40 frames as a 4 fps clip (a slow camera)."""
    return write_clip(vtest, tmp_path_factory.mktemp("slow") / "slow.avi", 4.0, list, 40)


def test_every_n_on_a_slow_camera_runs_the_detector_min_fps_times_a_second(
        slow_clip: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("WARNING", logger="edgecv.sources.gate")
    _, _, stats = run(config(str(slow_clip), {"every_n": 2}))
    assert stats["frames_processed"] == 40 and stats["frames_inferred"] == 40  # 4 fps / 2 = 2 < 3: every frame
    assert any("below detect.min_fps 3: running it on every frame" in r.getMessage() for r in caplog.records)
    _, _, stats = run(config(str(slow_clip), {"every_n": 2, "min_fps": 2}))
    assert stats["frames_inferred"] == 20  # 2 a second is allowed now: one frame in two


@pytest.mark.integration
def test_detector_disabled_streams_without_inference(vtest: Path) -> None:
    rec, _, stats = run(config(str(vtest), {"enabled": False}), max_frames=20)
    assert stats["frames_processed"] == 20 and stats["frames_inferred"] == 0
    assert stats["frames_skipped_disabled"] == 20 and rec.inferred == [] and rec.events == []
    assert all(not ids for ids in rec.tracks.values())


MOVE, STILL = 30, 60  # frames of street, then its last frame held, then the street again


@pytest.fixture(scope="module")
def still_clip(vtest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """vtest's first MOVE frames, its MOVE-th frame STILL times more, then the next MOVE frames."""
    return write_clip(vtest, tmp_path_factory.mktemp("still") / "still.avi", 10.0,
                      lambda f: f[:MOVE] + [f[MOVE - 1]] * STILL + f[MOVE:], 2 * MOVE)


@pytest.mark.integration
def test_motion_gate_skips_the_still_stretch_and_loses_no_event(still_clip: Path) -> None:
    total, still_frames = 2 * MOVE + STILL, range(MOVE + 1, MOVE + STILL + 1)
    plain, _, plain_stats = run(config(str(still_clip)))
    gated, _, stats = run(config(str(still_clip), {"motion_gate": {"enabled": True}}))
    assert plain_stats["frames_inferred"] == total and plain_stats["frames_skipped_static"] == 0
    assert stats["frames_processed"] == total
    skipped = sorted(set(range(1, total + 1)) - set(gated.inferred))
    assert stats["frames_skipped_static"] == len(skipped) and stats["frames_inferred"] == total - len(skipped)
    # skipped only while still, and most of it: the first few still frames wait for the tracks to stop and the
    # background to settle; the first frame that moves again is inferred, and every one after it
    assert set(skipped) <= set(still_frames), skipped
    assert len(skipped) >= STILL - 20, skipped
    assert set(range(MOVE + STILL + 1, total + 1)) <= set(gated.inferred)
    # no event lost or added: the same events, of the same tracks, on the same frames give or take one
    assert plain.keys() == gated.keys(), (plain.keys(), gated.keys())
    assert plain.keys()[("zone.enter", "plaza", "")] >= 2
    found = list(gated.events)
    for e in plain.events:
        match = next((g for g in found if (g.type, g.rule, g.fields.get("direction")) ==
                      (e.type, e.rule, e.fields.get("direction")) and g.object.track_id == e.object.track_id
                      and abs(g.frame - e.frame) <= 1), None)
        assert match is not None, f"{e.type} {e.rule} track {e.object.track_id} frame {e.frame} lost"
        found.remove(match)
    # the tracks held through the still stretch are those the detector kept finding there
    for f in still_frames:
        assert set(gated.tracks[f]) == set(plain.tracks[f]), (f, gated.tracks[f], plain.tracks[f])
