"""ByteTracker, its Kalman filter and its association, on seeded synthetic scenes."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pytest

from edgecv.tracking import (
    BoxKalmanFilter,
    ByteTracker,
    TrackerConfig,
    TrackEvent,
    TrackEventKind,
    box_iou,
    xyah_to_xyxy,
    xyxy_to_xyah,
)
from edgecv.types import Detections

HIGH, LOW = 0.9, 0.3


@dataclass(frozen=True)
class Target:
    """A ground-truth object moving at constant velocity; detected on `frames` except `hidden`."""

    gt: int
    start: tuple[float, float]  # centre at frame 0
    velocity: tuple[float, float] = (0.0, 0.0)
    size: tuple[float, float] = (40.0, 100.0)
    class_id: int = 0
    frames: range = range(10_000)
    hidden: frozenset[int] = frozenset()
    scores: dict[int, float] = field(default_factory=dict)  # per-frame score, HIGH otherwise

    def centre(self, frame: int) -> np.ndarray:
        return np.add(self.start, np.multiply(self.velocity, frame))

    def box(self, frame: int) -> np.ndarray:
        half = np.divide(self.size, 2)
        c = self.centre(frame)
        return np.concatenate([c - half, c + half])

    def detected(self, frame: int) -> bool:
        return frame in self.frames and frame not in self.hidden


@dataclass
class Trace:
    """What the tracker reported, frame by frame."""

    ids: list[dict[int, int]] = field(default_factory=list)  # gt -> track id
    events: list[list[TrackEvent]] = field(default_factory=list)
    outputs: list[Detections] = field(default_factory=list)

    def kinds(self, frame: int) -> list[str]:
        return [e.kind for e in self.events[frame]]


def frame_detections(
    targets: list[Target], frame: int, rng: np.random.Generator, noise: float
) -> tuple[Detections, np.ndarray]:
    """Noisy detections of the visible targets in shuffled order, and the gt id of each row."""
    visible = [t for t in targets if t.detected(frame)]
    rng.shuffle(visible)
    if not visible:
        return Detections.empty(), np.zeros(0, np.int64)
    xyxy = np.array([t.box(frame) for t in visible]) + rng.normal(0.0, noise, (len(visible), 4))
    score = [t.scores.get(frame, HIGH) for t in visible]
    return Detections(xyxy, score, [t.class_id for t in visible]), np.array([t.gt for t in visible])


def run(
    tracker: ByteTracker,
    targets: list[Target],
    n_frames: int,
    seed: int = 0,
    noise: float = 1.5,
    first_frame: int = 0,
    trace: Optional[Trace] = None,
) -> Trace:
    """Feed `n_frames` frames of `targets` (from `first_frame`) and record what comes back."""
    rng = np.random.default_rng(seed)
    trace = trace if trace is not None else Trace()
    for frame in range(first_frame, first_frame + n_frames):
        dets, gt = frame_detections(targets, frame, rng, noise)
        out = tracker.update(dets)
        assert out.track_id is not None
        trace.ids.append({int(gt[d]): int(tid) for d, tid in zip(out.data["det_index"], out.track_id)})
        trace.events.append(list(tracker.events))
        trace.outputs.append(out)
    return trace


def id_switches(ids: list[dict[int, int]]) -> int:
    """Times a gt object changed track id, plus frames a track id covered another gt object."""
    last: dict[int, int] = {}
    owner: dict[int, int] = {}
    switches = 0
    for frame in ids:
        for gt, tid in frame.items():
            switches += gt in last and last[gt] != tid
            switches += owner.setdefault(tid, gt) != gt
            last[gt] = tid
    return switches


def box_detections(boxes: list[list[float]], score: float = HIGH, class_id: int = 0) -> Detections:
    return Detections(np.array(boxes, np.float32), [score] * len(boxes), [class_id] * len(boxes))


# --- geometry and Kalman filter ---------------------------------------------------


def test_box_iou_known_values() -> None:
    a = np.array([[0, 0, 10, 10]], np.float64)
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 5, 5]], np.float64)
    np.testing.assert_allclose(box_iou(a, b), [[1.0, 1 / 3, 0.0, 0.25]])
    assert box_iou(a, np.zeros((0, 4))).shape == (1, 0)


def test_xyah_round_trip() -> None:
    xyxy = np.array([[10, 20, 50, 120], [0, 0, 1, 3]], np.float64)
    xyah = xyxy_to_xyah(xyxy)
    np.testing.assert_allclose(xyah[0], [30, 70, 0.4, 100])
    np.testing.assert_allclose(xyah_to_xyxy(xyah), xyxy)


def test_kalman_multi_step_predict_equals_repeated_single_steps() -> None:
    kf = BoxKalmanFilter()
    mean, cov = kf.initiate(np.array([[100.0, 200.0, 0.5, 80.0], [300.0, 50.0, 0.4, 40.0]]))
    mean, cov = kf.update(*kf.predict(mean, cov), np.array([[104.0, 201.0, 0.5, 80.0], [297.0, 52.0, 0.4, 40.0]]))
    mean[:, 7] = 0.0  # constant height: the closed-form noise sum is then exact
    stepped_mean, stepped_cov = mean, cov
    for _ in range(5):
        stepped_mean, stepped_cov = kf.predict(stepped_mean, stepped_cov)
    jump_mean, jump_cov = kf.predict(mean, cov, steps=5)
    np.testing.assert_allclose(jump_mean, stepped_mean)
    np.testing.assert_allclose(jump_cov, stepped_cov, rtol=1e-10)
    np.testing.assert_allclose(jump_mean[:, :2], mean[:, :2] + 5 * mean[:, 4:6])


def test_kalman_matches_the_textbook_equations() -> None:
    """predict and update (cached transition and noise, K S K^T folded into K H P) equal the plain matrix
    equations, written out here per track: x' = F x, P' = F P F^T + Q; K = P H^T S^-1, S = H P H^T + R."""
    kf = BoxKalmanFilter(std_weight_position=1.0 / 40, std_weight_velocity=1.0 / 160)
    rng = np.random.default_rng(3)
    mean, cov = kf.initiate(np.array([[100.0, 200.0, 0.5, 80.0], [300.0, 50.0, 0.4, 40.0], [30.0, 60.0, 0.7, 20.0]]))
    mean[:, 4:] = rng.normal(0.0, 2.0, (3, 4))
    h_sel = np.hstack([np.eye(4), np.zeros((4, 4))])
    for steps in (1, 1, 3):
        f = np.eye(8)
        f[:4, 4:] = steps * np.eye(4)
        got_mean, got_cov = kf.predict(mean, cov, steps)
        for i in range(3):
            h = mean[i, 3]
            q_pos = np.array([h / 40, h / 40, 1e-2, h / 40]) ** 2
            q_vel = np.array([h / 160, h / 160, 1e-5, h / 160]) ** 2
            # the noise of k frames: each frame's Q1, carried by the frames after it: sum over j < k of F1^j Q1 F1^j^T
            q1 = np.diag(np.concatenate([q_pos, q_vel]))
            f1 = np.eye(8)
            f1[:4, 4:] = np.eye(4)
            q = sum(np.linalg.matrix_power(f1, j) @ q1 @ np.linalg.matrix_power(f1, j).T for j in range(steps))
            np.testing.assert_allclose(got_mean[i], f @ mean[i], rtol=1e-12)
            np.testing.assert_allclose(got_cov[i], f @ cov[i] @ f.T + q, rtol=1e-10, atol=1e-12)
        mean, cov = got_mean, got_cov
        z = mean[:, :4] + rng.normal(0.0, 3.0, (3, 4))
        got_mean, got_cov = kf.update(mean, cov, z)
        for i in range(3):
            h = mean[i, 3]
            r = np.diag(np.array([h / 40, h / 40, 1e-1, h / 40]) ** 2)
            s = h_sel @ cov[i] @ h_sel.T + r
            k = cov[i] @ h_sel.T @ np.linalg.inv(s)
            np.testing.assert_allclose(got_mean[i], mean[i] + k @ (z[i] - h_sel @ mean[i]), rtol=1e-10)
            np.testing.assert_allclose(got_cov[i], cov[i] - k @ s @ k.T, rtol=1e-8, atol=1e-9)
        mean, cov = got_mean, got_cov


def test_kalman_learns_velocity_and_shrinks_uncertainty() -> None:
    kf = BoxKalmanFilter()
    rng = np.random.default_rng(1)
    mean, cov = kf.initiate(np.array([[100.0, 300.0, 0.4, 100.0]]))
    start_var = cov[0, 4, 4]
    for frame in range(1, 40):
        z = np.array([[100.0 + 7.0 * frame, 300.0 - 2.0 * frame, 0.4, 100.0]]) + rng.normal(0, [1, 1, 0, 1])
        mean, cov = kf.update(*kf.predict(mean, cov), z)
    assert abs(mean[0, 4] - 7.0) < 0.5 and abs(mean[0, 5] + 2.0) < 0.5
    assert cov[0, 4, 4] < start_var / 10
    np.testing.assert_allclose(cov, cov.transpose(0, 2, 1), atol=1e-9)


# --- identity through crossings and occlusion -------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_pedestrians_crossing_keep_ids(seed: int) -> None:
    walkers = [
        Target(gt=0, start=(100.0, 300.0), velocity=(6.0, 0.0)),
        Target(gt=1, start=(700.0, 312.0), velocity=(-6.0, 0.0)),
    ]
    # They meet around frame 50; at the crossing their boxes overlap with IoU ~0.8.
    assert box_iou(walkers[0].box(50)[None], walkers[1].box(50)[None])[0, 0] > 0.75
    trace = run(ByteTracker(), walkers, 100, seed=seed)
    assert id_switches(trace.ids) == 0
    assert all(set(frame) == {0, 1} for frame in trace.ids[2:])  # reported from the third frame on
    assert {tid for frame in trace.ids for tid in frame.values()} == {1, 2}


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_crossing_with_occlusion_keeps_ids(seed: int) -> None:
    front = Target(gt=0, start=(100.0, 300.0), velocity=(5.0, 0.0))
    # The farther walker is smaller and higher in the image; while the near one covers
    # it its detection first weakens (low score), then disappears for 9 frames.
    behind = Target(gt=1, start=(600.0, 290.0), velocity=(-5.0, 0.0), size=(35.0, 88.0))
    gap = {f: abs(front.centre(f)[0] - behind.centre(f)[0]) for f in range(100)}
    hidden = frozenset(f for f, d in gap.items() if d < 45)
    weak = {f: LOW for f, d in gap.items() if 45 <= d < 75}
    behind = Target(gt=1, start=behind.start, velocity=behind.velocity, size=behind.size, hidden=hidden, scores=weak)
    assert len(hidden) == 9 and len(weak) == 6

    trace = run(ByteTracker(), [front, behind], 100, seed=seed)
    assert id_switches(trace.ids) == 0
    ids = trace.ids[10]
    assert sorted(ids.values()) == [1, 2]
    first_hidden, last_hidden = min(hidden), max(hidden)
    approaching_weak = [f for f in weak if f < first_hidden]
    leaving_weak = [f for f in weak if f > last_hidden]
    # The weak detections before the occlusion keep the track (second association) ...
    assert all(trace.ids[f] == ids for f in approaching_weak)
    assert "lost" in trace.kinds(first_hidden)
    # ... the weak ones after it cannot revive a lost track; the first strong one does.
    assert all(trace.ids[f] == {0: ids[0]} for f in range(first_hidden, max(leaving_weak) + 1))
    assert trace.ids[max(leaving_weak) + 1] == ids
    assert trace.ids[-1] == ids


# --- re-identification after a gap, new objects ----------------------------------


def test_moving_target_missing_within_buffer_keeps_id() -> None:
    walker = Target(gt=0, start=(100.0, 300.0), velocity=(6.0, 0.0), hidden=frozenset(range(30, 40)))
    trace = run(ByteTracker(), [walker], 60)
    # The gap is longer than the box is wide: only the predicted motion can re-match it.
    last_seen = trace.outputs[29].xyxy
    assert box_iou(last_seen, walker.box(40)[None])[0, 0] == 0.0
    assert all(trace.ids[f] == {} for f in range(30, 40))
    assert trace.kinds(30) == ["lost"]
    assert trace.ids[40] == {0: 1} and trace.ids[59] == {0: 1}
    assert not any("removed" in trace.kinds(f) for f in range(60))


@pytest.mark.parametrize(
    ("gap", "same_id"),
    [(10, True), (11, False)],  # the buffer is 10 frames: 1.0 s at 10 fps
)
def test_target_missing_for_the_buffer_boundary(gap: int, same_id: bool) -> None:
    config = TrackerConfig(lost_buffer_s=1.0, frame_rate=10.0)
    assert config.lost_buffer == 10
    person = Target(gt=0, start=(200.0, 200.0), hidden=frozenset(range(20, 20 + gap)))
    back = 20 + gap
    trace = run(ByteTracker(config), [person], back + 10)
    assert trace.ids[19] == {0: 1}
    if same_id:
        assert trace.ids[back] == {0: 1}
        assert not any("removed" in trace.kinds(f) for f in range(back + 10))
    else:
        assert trace.kinds(back - 1) == ["removed"]  # 11th missed frame
        assert trace.events[back - 1][0].track_id == 1
        assert trace.ids[back] == {}  # tentative again
        assert trace.ids[back + 1] == {0: 2}  # confirmed on its second frame (min_hits 2)
        assert [e.kind for e in trace.events[back + 1]] == ["new"]


def test_new_target_gets_next_id() -> None:
    targets = [
        Target(gt=0, start=(100.0, 100.0), velocity=(2.0, 0.0)),
        Target(gt=1, start=(400.0, 100.0), velocity=(0.0, 2.0)),
        Target(gt=2, start=(700.0, 400.0), velocity=(-3.0, 0.0), frames=range(20, 10_000)),
    ]
    trace = run(ByteTracker(), targets, 40)
    first = trace.ids[20]
    assert sorted(first.values()) == [1, 2]
    assert trace.ids[21] == {**first, 2: 3}
    assert trace.ids[39] == {**first, 2: 3}
    assert id_switches(trace.ids) == 0


# --- low-score detections -----------------------------------------------------------


def test_low_score_detections_keep_a_track_alive() -> None:
    fading = Target(gt=0, start=(100.0, 300.0), velocity=(4.0, 0.0), scores={f: LOW for f in range(10, 25)})
    everything = ByteTracker(TrackerConfig(report_thresh=0.0))
    trace = run(everything, [fading], 30)
    assert all(trace.ids[f] == {0: 1} for f in range(1, 30))
    assert all(trace.events[f] == [] for f in range(2, 30))
    np.testing.assert_allclose(trace.outputs[15].score, [LOW])
    # by default a track carried by weak detections alone goes quiet after a while (its smoothed score falls
    # under report_thresh), keeps its id and no lifecycle event, and is back on the first strong detection
    trace = run(ByteTracker(), [fading], 30)
    reported = [f for f in range(30) if trace.ids[f]]
    assert all(trace.ids[f] == {0: 1} for f in reported)
    assert set(range(1, 14)) <= set(reported) and not set(range(18, 25)) & set(reported)
    assert set(range(25, 30)) <= set(reported)
    assert all(trace.events[f] == [] for f in range(2, 30))


@pytest.mark.parametrize("score", [0.05, LOW, 0.55])  # below low_thresh, low, high but < new_track_thresh
def test_weak_detections_never_start_a_track(score: float) -> None:
    ghost = Target(gt=0, start=(300.0, 300.0), scores={f: score for f in range(40)})
    tracker = ByteTracker()
    trace = run(tracker, [ghost], 40)
    assert all(frame == {} for frame in trace.ids)
    assert all(events == [] for events in trace.events)
    assert tracker.active_count == 0


def test_low_score_detection_does_not_revive_a_lost_track() -> None:
    person = Target(gt=0, start=(100.0, 300.0), hidden=frozenset({10}), scores={f: LOW for f in range(11, 15)})
    trace = run(ByteTracker(), [person], 20)
    assert trace.kinds(10) == ["lost"]
    assert all(trace.ids[f] == {} for f in range(10, 15))
    assert trace.ids[15] == {0: 1}


# --- ids, reset, lifecycle ------------------------------------------------------------


def test_each_tracker_instance_counts_ids_from_one_and_reset_restarts() -> None:
    scene = [Target(gt=0, start=(100.0, 100.0)), Target(gt=1, start=(300.0, 100.0))]
    gate, yard = ByteTracker(), ByteTracker()
    run(gate, scene, 5)
    yard_trace = run(yard, scene[1:], 5)
    assert yard_trace.ids[4] == {1: 1}

    gate.reset()
    assert gate.active_count == 0 and gate.events == []
    trace = run(gate, [Target(gt=2, start=(600.0, 400.0))], 5)
    assert trace.ids[2] == {2: 1}


def test_lifecycle_events() -> None:
    config = TrackerConfig(lost_buffer_s=0.5, frame_rate=10.0, confirm_first_frame=False)  # 5 frames
    walker = Target(gt=0, start=(100.0, 200.0), velocity=(3.0, 1.0), class_id=4, frames=range(10))
    tracker = ByteTracker(config)
    trace = run(tracker, [walker], 20)

    with_events = {f: trace.kinds(f) for f in range(20) if trace.events[f]}
    assert with_events == {1: ["new"], 10: ["lost"], 15: ["removed"]}
    new, lost, removed = trace.events[1][0], trace.events[10][0], trace.events[15][0]
    assert (new.kind, lost.kind, removed.kind) == (TrackEventKind.NEW, TrackEventKind.LOST, TrackEventKind.REMOVED)
    assert all(isinstance(e.kind, TrackEventKind) for e in (new, lost, removed))
    assert (new.track_id, new.class_id, new.frames_tracked) == (1, 4, 2)
    assert new.xyxy == pytest.approx(tuple(trace.outputs[1].xyxy[0]), abs=1e-3)
    assert lost.track_id == removed.track_id == 1 and lost.frames_tracked == removed.frames_tracked == 10
    assert lost.xyxy == pytest.approx(tuple(trace.outputs[9].xyxy[0]), abs=1e-3)
    assert lost.score == pytest.approx(HIGH)
    assert tracker.active_count == 0


@pytest.mark.parametrize(
    ("skipped", "present", "kinds", "ids"),
    [
        # buffer 5, last match on call 10: 4 skipped frames, then unmatched on the 5th
        (4, False, ["lost"], {}),
        # 5 skipped frames and unmatched: 6 frames missed, past the buffer at once
        (5, False, ["lost", "removed"], {}),
        # back after missing exactly the buffer: recovered
        (5, True, [], {0: 1}),
        # back after missing more than the buffer: the old track is gone
        (6, True, ["lost", "removed"], {}),
    ],
)
def test_frames_skipped_ages_tracks(skipped: int, present: bool, kinds: list[str], ids: dict[int, int]) -> None:
    tracker = ByteTracker(TrackerConfig(lost_buffer_s=0.5, frame_rate=10.0))
    box = [[100.0, 100.0, 140.0, 200.0]]
    for _ in range(10):
        tracker.update(box_detections(box))
    out = tracker.update(box_detections(box) if present else Detections.empty(), frames_skipped=skipped)
    assert [e.kind for e in tracker.events] == kinds
    assert {0: int(t) for t in out.track_id} == ids
    if kinds == ["lost"]:
        tracker.update(Detections.empty())
        assert [e.kind for e in tracker.events] == ["removed"]


def test_frames_skipped_steps_the_prediction() -> None:
    runner = Target(gt=0, start=(100.0, 300.0), velocity=(10.0, 0.0))
    tracker = ByteTracker()
    trace = run(tracker, [runner], 20)
    rng = np.random.default_rng(5)
    boxes = []
    for frame in range(24, 75, 5):  # the caller now feeds every 5th frame: 50 px per call
        dets, gt = frame_detections([runner], frame, rng, 1.5)
        out = tracker.update(dets, frames_skipped=4)
        trace.ids.append({int(gt[d]): int(t) for d, t in zip(out.data["det_index"], out.track_id)})
        boxes.append(out.xyxy)
    assert all(ids == {0: 1} for ids in trace.ids[2:])
    # consecutive calls do not overlap: only the 5-step prediction can match them
    assert box_iou(boxes[0], boxes[1])[0, 0] == 0.0


def test_tentative_tracks_are_never_returned() -> None:
    blip = Target(gt=0, start=(100.0, 100.0), frames=range(0, 1))
    flicker = Target(gt=1, start=(400.0, 100.0), frames=range(0, 30, 2))
    real = Target(gt=2, start=(700.0, 100.0), frames=range(10, 30))
    tracker = ByteTracker(TrackerConfig(confirm_first_frame=False))
    trace = run(tracker, [blip, flicker, real], 30)
    reported = {gt for frame in trace.ids for gt in frame}
    assert reported == {2}
    assert trace.ids[10] == {} and trace.ids[11] == {2: 1}  # ids are handed out at confirmation only
    assert [e.kind for events in trace.events for e in events] == ["new"]


def test_first_frame_of_a_stream_confirms_at_once() -> None:
    still = Target(gt=0, start=(100.0, 100.0), frames=range(0, 10))
    late = Target(gt=1, start=(500.0, 100.0), frames=range(3, 10))
    trace = run(ByteTracker(), [still, late], 10)
    assert trace.ids[0] == {0: 1}  # born on the first call: reported at once, as ByteTrack does
    assert 1 not in trace.ids[3]  # later births wait for min_hits
    assert trace.ids[4] == {0: 1, 1: 2}
    tracker = ByteTracker(TrackerConfig(confirm_first_frame=False))
    assert not run(tracker, [still], 2).ids[0]
    # on the first call too, only a detection scoring confirm_thresh is believed at once
    doubtful = Target(gt=0, start=(100.0, 100.0), scores={0: 0.55})
    assert run(ByteTracker(), [doubtful], 3).ids[:2] == [{}, {0: 1}]


def test_a_half_believed_static_object_never_becomes_a_track() -> None:
    """A sign the detector scores 0.45-0.6 on every frame: strong enough to start a tentative track now and then,
    never confident enough (mean below confirm_thresh) to be confirmed; a person scoring 0.7 is."""
    rng = np.random.default_rng(3)
    sign = Target(gt=0, start=(100.0, 100.0), size=(20.0, 35.0),
                  scores={f: float(rng.uniform(0.45, 0.6)) for f in range(300)})
    person = Target(gt=1, start=(500.0, 300.0), velocity=(2.0, 0.0), scores={f: 0.7 for f in range(300)})
    trace = run(ByteTracker(), [sign, person], 300)
    assert all(0 not in ids for ids in trace.ids)
    assert all(ids == {1: 1} for ids in trace.ids[1:])
    assert run(ByteTracker(TrackerConfig(confirm_thresh=0.5, report_thresh=0.0)), [sign], 10).ids[-1] == {0: 1}


def test_a_doubtful_track_confirmed_by_chance_is_not_reported() -> None:
    """Two lucky frames (0.7, 0.66) confirm the sign, then it scores 0.5: the smoothed score decides."""
    scores = {0: 0.7, 1: 0.66, **{f: 0.5 for f in range(2, 60)}}
    sign = Target(gt=0, start=(100.0, 100.0), size=(20.0, 35.0), scores=scores)
    trace = run(ByteTracker(), [sign], 60)
    assert trace.ids[1] == {0: 1}  # confirmed, and its score then was strong
    assert not any(trace.ids[f] for f in range(10, 60))
    assert all(trace.events[f] == [] for f in range(2, 60))  # still tracked, not lost


def test_min_hits_one_reports_a_track_on_its_first_frame() -> None:
    tracker = ByteTracker(TrackerConfig(min_hits=1))
    out = tracker.update(box_detections([[10.0, 10.0, 50.0, 110.0]]))
    assert out.track_id.tolist() == [1]
    assert [e.kind for e in tracker.events] == ["new"]


# --- classes ------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_objects_of_different_classes_at_the_same_place_do_not_swap(seed: int) -> None:
    rider = Target(gt=0, start=(200.0, 300.0), velocity=(4.0, 0.5), class_id=0)
    bicycle = Target(gt=1, start=(200.0, 300.0), velocity=(4.0, 0.5), class_id=1)
    trace = run(ByteTracker(), [rider, bicycle], 60, seed=seed, noise=3.0)
    assert id_switches(trace.ids) == 0
    assert all(len(frame) == 2 for frame in trace.ids[2:])
    for out, ids in zip(trace.outputs[2:], trace.ids[2:]):
        by_track = dict(zip(out.track_id.tolist(), out.class_id.tolist()))
        assert {gt: by_track[tid] for gt, tid in ids.items()} == {0: 0, 1: 1}


def test_class_agnostic_tracks_keep_the_majority_class() -> None:
    confused = Target(gt=0, start=(200.0, 300.0), velocity=(3.0, 0.0), class_id=0)
    tracker = ByteTracker(TrackerConfig(class_agnostic=True))
    rng = np.random.default_rng(0)
    classes = []
    for frame in range(40):
        dets, _ = frame_detections([confused], frame, rng, 1.5)
        dets.class_id[:] = 2 if frame % 4 == 3 else 0  # the detector says "class 2" every 4th frame
        out = tracker.update(dets)
        classes.append((out.track_id.tolist(), out.class_id.tolist()))
    assert all(c == ([1], [0]) for c in classes[2:])


def test_class_aware_tracker_does_not_match_another_class() -> None:
    tracker = ByteTracker()
    box = [[100.0, 100.0, 140.0, 200.0]]
    for _ in range(5):
        tracker.update(box_detections(box, class_id=0))
    out = tracker.update(box_detections(box, class_id=1))
    assert len(out) == 0
    assert [e.kind for e in tracker.events] == ["lost"]


# --- the output contract ---------------------------------------------------------


def test_output_maps_back_to_input_rows() -> None:
    tracker = ByteTracker()
    rng = np.random.default_rng(3)
    objects = np.array([[10, 10, 50, 110], [200, 10, 240, 110], [400, 10, 440, 110]], np.float64)
    clutter = np.array([[600, 600, 640, 700]], np.float64)  # below low_thresh: never tracked
    ids_of_object: dict[int, set[int]] = {0: set(), 1: set(), 2: set()}
    for frame in range(6):
        order = rng.permutation(4)  # rows 0..2 are the objects, row 3 the clutter
        xyxy = np.concatenate([objects + frame * 2.0, clutter])[order]
        score = np.array([0.9, 0.8, 0.7, 0.05])[order]
        mask = np.zeros((4, 8, 8), bool)
        mask[np.arange(4), order, 0] = True  # each row's mask encodes which object it is
        dets = Detections(xyxy, score, np.zeros(4), mask=mask, data={"obj": order}, metadata={"camera": "gate"})
        out = tracker.update(dets)
        for obj, tid in zip(out.data["obj"].tolist(), out.track_id.tolist()):
            ids_of_object[obj].add(tid)

    idx = out.data["det_index"]
    assert out.metadata == {"camera": "gate"}
    assert out.xyxy.dtype == np.float32 and out.track_id.dtype == np.int64 and idx.dtype == np.int64
    assert idx.tolist() == sorted(np.flatnonzero(order < 3).tolist())  # the three objects, in input order
    np.testing.assert_array_equal(out.data["obj"], order[idx])
    np.testing.assert_array_equal(out.mask, mask[idx])
    np.testing.assert_allclose(out.score, score[idx])
    np.testing.assert_allclose(out.xyxy, xyxy[idx], atol=2.0)
    assert sorted(len(ids) for ids in ids_of_object.values()) == [1, 1, 1]  # one id each, all along
    assert set().union(*ids_of_object.values()) == {1, 2, 3}


def test_empty_input_returns_empty_tracks() -> None:
    tracker = ByteTracker()
    out = tracker.update(Detections.empty(metadata={"camera": "yard"}))
    assert len(out) == 0 and out.track_id is not None
    assert out.data["det_index"].shape == (0,)
    assert out.metadata == {"camera": "yard"}


def test_track_state_is_bounded() -> None:
    config = TrackerConfig(lost_buffer_s=1.0, frame_rate=10.0)
    tracker = ByteTracker(config)
    rng = np.random.default_rng(7)
    for _ in range(200):  # clutter: 15 objects at random places every frame
        xy = rng.uniform(0, 1000, (15, 2))
        tracker.update(Detections(np.concatenate([xy, xy + 30], axis=1), np.full(15, 0.9), np.zeros(15)))
        # this frame's births, the previous frame's tentative survivors, and confirmed tracks matched within the
        # lost buffer: bounded by the input rate, whatever the number of frames
        assert len(tracker._tracks) <= 15 * (2 + config.lost_buffer)
    for _ in range(config.lost_buffer + 1):
        tracker.update(Detections.empty())
    assert tracker.active_count == 0 and len(tracker._tracks) == 0


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"low_thresh": 0.6}, "TrackerConfig.low_thresh: expected 0 <= low_thresh <= track_thresh (0.5), got 0.6"),
        ({"track_thresh": 1.5, "new_track_thresh": 1.6}, "TrackerConfig.track_thresh: expected 0 <= track_thresh <= 1"),
        ({"new_track_thresh": 0.4}, "TrackerConfig.new_track_thresh: expected track_thresh (0.5) <= new_track_thresh"),
        ({"match_thresh": 0.0}, "TrackerConfig.match_thresh: expected 0 < match_thresh <= 1, got 0.0"),
        ({"low_match_thresh": 1.2}, "TrackerConfig.low_match_thresh: expected 0 < low_match_thresh <= 1"),
        ({"min_hits": 0}, "TrackerConfig.min_hits: expected min_hits >= 1, got 0"),
        ({"lost_buffer_s": -1.0}, "TrackerConfig.lost_buffer_s: expected lost_buffer_s >= 0"),
        ({"frame_rate": 0.0}, "TrackerConfig.frame_rate: expected frame_rate > 0"),
    ],
)
def test_config_errors_name_the_field(kwargs: dict[str, float], error: str) -> None:
    with pytest.raises(ValueError, match=error.replace("(", r"\(").replace(")", r"\)")):
        TrackerConfig(**kwargs)


def test_negative_frames_skipped_is_an_error() -> None:
    with pytest.raises(ValueError, match="frames_skipped: expected >= 0, got -1"):
        ByteTracker().update(Detections.empty(), frames_skipped=-1)
