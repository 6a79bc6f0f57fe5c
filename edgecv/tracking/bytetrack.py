"""ByteTrack-class multi-object tracker: Kalman-predicted boxes, two-stage association,
camera-motion compensation.

One ``ByteTracker`` per camera. Each ``update(detections)`` call:

0. with camera-motion compensation on (``motion_compensation``, see ``tracking.motion``), moves
   every track by the camera's motion since the previous call (estimated from the frame, or given);
1. predicts every track ``1 + frames_skipped`` frames ahead (one batched Kalman call);
2. matches high-score detections (``score >= track_thresh``) to confirmed tracks,
   tracked and lost, on IoU cost (``1 - IoU``, or ``1 - IoU * score`` with
   ``fuse_score``), gated by ``match_thresh``; among the pairs the gate lets through,
   ``appearance_weight`` times the appearance distance (``tracking.appearance``: the
   colour layout of the box, 0..1, when the frame is given) is added to the cost, so
   of two objects whose boxes overlap each keeps its own track;
3. matches low-score detections (``low_thresh <= score < track_thresh``) to the
   confirmed tracks that were tracked on the previous frame and are still unmatched,
   on plain IoU cost gated by the stricter ``low_match_thresh``: an occluded or
   blurred object keeps its track, but a low score never starts or revives one;
4. matches tentative tracks to the remaining high-score detections (same cost and
   gate as step 2, appearance included);
5. starts a tentative track from each remaining high-score detection with
   ``score >= new_track_thresh``.

Every assignment is a globally optimal one (``scipy.optimize.linear_sum_assignment``)
in which a pair matches only when its cost is below the gate. Unless
``class_agnostic``, a track only matches detections of its own class.

Lifecycle (events are listed in ``ByteTracker.events`` after the call that made them):

- tentative: born from a detection; confirmed once it has been matched on
  ``min_hits`` consecutive ``update`` calls (its birth call counts) *and* the mean
  score of its detections is at least ``confirm_thresh``: a single good detection
  starts a track cheaply, but only an object seen with confidence is reported (a
  static object the detector half-believes, scoring 0.5 frame after frame, never
  becomes a track). As in ByteTrack, tracks born on the first call of a stream are
  confirmed at once when ``confirm_first_frame`` and their score reaches
  ``confirm_thresh`` (there is no history yet to confirm them against).
  Confirmation assigns the next id of this tracker instance (1, 2, 3...) and emits
  ``"new"``. A tentative track that misses one call is dropped silently: neither it
  nor an id is ever reported.
- tracked: confirmed and matched on this call; the only tracks ``update`` returns, and
  only while the moving average of their detections' scores (about the last ten) is
  at least ``report_thresh``: a track kept alive by weak detections alone (the
  low-score association exists to carry a real object through a partial occlusion)
  goes quiet instead of reporting a doubtful object for minutes. It keeps its id and
  is reported again once the detector believes it again.
- lost: a confirmed track that went unmatched; ``"lost"`` is emitted on the first
  such call. It keeps being predicted (at constant velocity, height frozen) and
  can be matched again by a high-score detection, keeping its id (no event).
- removed: a lost track that has missed more than ``lost_buffer`` frames (skipped
  frames count) is deleted and ``"removed"`` is emitted. So an object may be absent
  for up to ``lost_buffer`` frames and still get its old id back. When a caller
  skips more frames than that at once, the tracks it held emit ``"lost"`` (if they
  were tracked) and ``"removed"`` in the same call.

A track's appearance is the descriptor of its first detection, then a running average
(``appearance.ALPHA``) of its clear, confident views: matched with a high score and
overlapping no other detection by more than ``appearance.OVERLAP`` IoU (a box shared with
a neighbour would teach it the neighbour's colours). The low-score association (step 3)
ignores appearance: a weak box is most often a partly hidden one.

A track's reported box is the box of the detection it matched on this call (the
Kalman state decides which detection that is, and predicts through misses): on the
tuning suite this scored higher MOTA and IDF1 than reporting the filtered box, which
lags a walking person's changing shape.

``coast(image=None, hold=False)`` stands in for ``update`` on a frame the detector
skipped (a camera's ``detect.every_n``, its motion gate): the tracker advances one
frame (camera-motion compensation when given the image, one Kalman step) without
association, so no track is matched, missed, confirmed or marked lost; a track
unmatched for longer than the lost buffer is removed as on ``update``. It returns
the tracks the last ``update`` reported, with their ids, at their predicted place:
the matched detection's box moved by the Kalman state's motion since that match.
With ``hold`` (a motion gate saw nothing move) nothing is predicted and the tracks
not lost are taken as matched to their last detections again, as on a repeat of the
last frame, so a still scene never ages them out.
``max_speed()`` says whether a reported track is still moving (a motion gate does
not skip while one is).

The defaults were chosen with ``edgecv eval`` on the tuning sequences and their
moving-camera, low-fps and half-size variants, for YOLOX-Nano and YOLOv8n detections
alike (README, "How good is the tracking").
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from time import perf_counter
from typing import NamedTuple, Optional

import numpy as np
from scipy.optimize import linear_sum_assignment

from edgecv.tracking import appearance
from edgecv.tracking.kalman import BoxKalmanFilter, xyah_to_xyxy, xyxy_to_xyah
from edgecv.progress import Progress
from edgecv.tracking.motion import METHODS, CameraMotion
from edgecv.types import Detections


def _require(name: str, ok: bool, expected: str, value: object) -> None:
    if not ok:
        raise ValueError(f"TrackerConfig.{name}: expected {expected}, got {value!r}")


@dataclass(frozen=True)
class TrackerConfig:
    """Thresholds and timing of a ``ByteTracker``; validated on construction."""

    track_thresh: float = 0.5  # detections at or above take part in the first association
    low_thresh: float = 0.1  # detections below are ignored
    new_track_thresh: float = 0.5  # an unmatched detection at or above starts a (tentative) track
    confirm_thresh: float = 0.65  # mean score of a tentative track's detections needed to confirm it
    report_thresh: float = 0.6  # a confirmed track is reported only while its smoothed score is at least this
    match_thresh: float = 0.9  # max cost (1 - IoU, or 1 - IoU * score with fuse_score) of the first association
    low_match_thresh: float = 0.6  # max cost (1 - IoU) of the second (low-score) association
    min_hits: int = 2  # consecutive matched calls before a track is confirmed
    lost_buffer_s: float = 1.5  # how long a lost track can be recovered
    frame_rate: float = 10.0  # frames per second the tracker is fed (skipped ones included)
    class_agnostic: bool = False  # match detections of any class to any track
    fuse_score: bool = True  # first and tentative associations use 1 - IoU * score
    confirm_first_frame: bool = True  # tracks born on the stream's first call are confirmed at once
    motion_compensation: str = "off"  # off | sparse_flow | ecc | auto (see tracking.motion)
    appearance_weight: float = 0.7  # weight of the appearance distance (0..1) added to the association cost; 0: off

    def __post_init__(self) -> None:
        t = self.track_thresh
        _require("track_thresh", 0.0 <= t <= 1.0, "0 <= track_thresh <= 1", t)
        _require("low_thresh", 0.0 <= self.low_thresh <= t, f"0 <= low_thresh <= track_thresh ({t})", self.low_thresh)
        _require(
            "new_track_thresh",
            t <= self.new_track_thresh <= 1.0,
            f"track_thresh ({t}) <= new_track_thresh <= 1",
            self.new_track_thresh,
        )
        _require("match_thresh", 0.0 < self.match_thresh <= 1.0, "0 < match_thresh <= 1", self.match_thresh)
        _require(
            "low_match_thresh", 0.0 < self.low_match_thresh <= 1.0, "0 < low_match_thresh <= 1", self.low_match_thresh
        )
        _require("confirm_thresh", 0.0 <= self.confirm_thresh <= 1.0, "0 <= confirm_thresh <= 1",
                 self.confirm_thresh)
        _require("report_thresh", 0.0 <= self.report_thresh <= 1.0, "0 <= report_thresh <= 1", self.report_thresh)
        _require("min_hits", self.min_hits >= 1, "min_hits >= 1", self.min_hits)
        _require("lost_buffer_s", self.lost_buffer_s >= 0.0, "lost_buffer_s >= 0", self.lost_buffer_s)
        _require("frame_rate", self.frame_rate > 0.0, "frame_rate > 0", self.frame_rate)
        _require("appearance_weight", self.appearance_weight >= 0.0, "appearance_weight >= 0", self.appearance_weight)
        _require("motion_compensation", self.motion_compensation in METHODS, f"one of {', '.join(METHODS)}",
                 self.motion_compensation)

    @property
    def lost_buffer(self) -> int:
        """Frames a lost track may miss and still be matched: ``lost_buffer_s * frame_rate``."""
        return int(round(self.lost_buffer_s * self.frame_rate))


class TrackEventKind(str, enum.Enum):
    """A lifecycle change of a confirmed track; compares equal to its value (``TrackEventKind.LOST == "lost"``).

    A tracker ``LOST`` track may still come back; only ``REMOVED`` ends it (the rules' ``object.lost``).
    """

    NEW = "new"  # track confirmed
    LOST = "lost"  # first call unmatched
    REMOVED = "removed"  # lost for longer than the buffer: deleted


@dataclass(frozen=True)
class TrackEvent:
    """A lifecycle change of one confirmed track."""

    kind: TrackEventKind
    track_id: int
    class_id: int
    score: float  # last matched detection score
    xyxy: tuple[float, float, float, float]  # last box
    frames_tracked: int  # calls on which the track was matched, its tentative ones included


class _State(enum.Enum):
    TENTATIVE = "tentative"
    TRACKED = "tracked"
    LOST = "lost"


SCORE_EMA = 0.1  # weight of the newest detection in a track's smoothed score (about the last ten frames)


@dataclass(eq=False, slots=True)
class _Track:
    """Bookkeeping of one track (its Kalman state lives in the tracker's arrays)."""

    xyxy: np.ndarray  # (4,) box of the detection matched last
    state: _State = _State.TENTATIVE
    track_id: int = 0  # 0 until confirmed
    hits: int = 0  # matched calls
    last_frame: int = 0  # frame number of the last match
    det_index: int = -1  # index of the matched detection in the last matched call
    score: float = 0.0  # score of the last matched detection
    class_id: int = -1  # class with the largest summed detection score
    class_votes: dict[int, float] = field(default_factory=dict)  # class -> summed score
    score_sum: float = 0.0  # summed score of the matched detections
    score_ema: float = 0.0  # exponential moving average of the matched scores (weight SCORE_EMA of the newest)
    centre: np.ndarray = field(default_factory=lambda: np.zeros(2))  # Kalman centre just after the last match

    @property
    def mean_score(self) -> float:
        return self.score_sum / self.hits if self.hits else 0.0

    def observe(self, frame: int, det_index: int, score: float, class_id: int) -> None:
        """Record a matched detection (the Kalman state is corrected by the caller)."""
        self.score_ema = score if not self.hits else (1.0 - SCORE_EMA) * self.score_ema + SCORE_EMA * score
        self.hits += 1
        self.score_sum += score
        self.last_frame = frame
        self.det_index = det_index
        self.score = score
        self.class_votes[class_id] = self.class_votes.get(class_id, 0.0) + score
        self.class_id = max(self.class_votes, key=self.class_votes.__getitem__)

    def event(self, kind: TrackEventKind) -> TrackEvent:
        x1, y1, x2, y2 = (float(v) for v in self.xyxy)
        return TrackEvent(kind, self.track_id, self.class_id, self.score, (x1, y1, x2, y2), self.hits)


class _Matches(NamedTuple):
    """Indices into the tracker's tracks and the frame's detections."""

    tracks: np.ndarray
    dets: np.ndarray
    unmatched_tracks: np.ndarray
    unmatched_dets: np.ndarray


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) intersection over union of (N, 4) and (M, 4) corner boxes."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0.0, None)
    inter = wh[..., 0] * wh[..., 1]
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return inter / np.maximum(union, 1e-9)


def _without(indices: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """``indices`` minus the entries at ``positions``."""
    keep = np.ones(len(indices), dtype=bool)
    keep[positions] = False
    return indices[keep]


def _assign(cost: np.ndarray, limit: float) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of the optimal matching that uses only pairs with ``cost < limit``.

    Minimizes the summed cost of the matched pairs plus ``limit`` per pair left
    unmatched (the objective of lapjv's ``cost_limit``): a matrix of ``cost - limit``
    with ineligible pairs at 0 gives that to a plain rectangular assignment, and
    pairs assigned at 0 are then dropped.
    """
    rows, cols = linear_sum_assignment(np.minimum(cost - limit, 0.0))
    keep = cost[rows, cols] < limit
    return rows[keep], cols[keep]


# Kalman noise as fractions of the box height: position half of DeepSORT's 1/20 (a detector's box of a
# walking person is steadier than that), velocity DeepSORT's 1/160; measured with `edgecv eval --suite`.
KALMAN = BoxKalmanFilter(std_weight_position=1.0 / 40, std_weight_velocity=1.0 / 160)


class ByteTracker:
    """Multi-object tracker for one camera (see the module docstring for the method).

    ``update`` returns the confirmed tracks matched on this call, as a new
    ``Detections`` in input order: ``xyxy`` is the matched detection's box in source
    pixels, ``score`` its score, ``class_id`` the track's class (score-weighted vote
    over its detections), ``track_id`` its id, and ``data["det_index"]`` (int64) the
    index of the matched input detection. The input's ``mask`` and ``data`` arrays
    are carried over for those rows and its ``metadata`` is copied.
    """

    def __init__(self, config: Optional[TrackerConfig] = None) -> None:
        self.config = config or TrackerConfig()
        self._lost_buffer = self.config.lost_buffer
        self._kalman = KALMAN
        self._camera = self._motion_estimator(self.config.motion_compensation)
        # Track i is self._tracks[i], with Kalman state self._mean[i] and self._cov[i], and appearance
        # self._feature[i] (tracking.appearance, smoothed) when self._has_feature[i].
        self._tracks: list[_Track] = []
        self._mean = np.zeros((0, 8))
        self._cov = np.zeros((0, 8, 8))
        self._feature = np.zeros((0, appearance.SIZE), np.float32)
        self._has_feature = np.zeros(0, bool)
        self._frame = 0
        self._calls = 0
        self._next_id = 1
        self.events: list[TrackEvent] = []
        self._feats = self._feat_ok = self._feat_clean = None

    @staticmethod
    def _motion_estimator(method: str) -> Optional[CameraMotion]:
        return CameraMotion(method) if method != "off" else None

    @property
    def active_count(self) -> int:
        """Confirmed tracks held now, tracked or lost (tentative ones not included)."""
        return sum(1 for t in self._tracks if t.state is not _State.TENTATIVE)

    def reconfigure(self, config: TrackerConfig) -> None:
        """Take new thresholds and timing (a config reload); the tracks and their ids are kept."""
        if config.motion_compensation != self.config.motion_compensation:
            self._camera = self._motion_estimator(config.motion_compensation)
        self.config = config
        self._lost_buffer = config.lost_buffer

    def reset(self) -> None:
        """Forget every track and restart ids at 1 (for a new stream on this camera)."""
        self._tracks = []
        self._mean = np.zeros((0, 8))
        self._cov = np.zeros((0, 8, 8))
        self._feature = np.zeros((0, appearance.SIZE), np.float32)
        self._has_feature = np.zeros(0, bool)
        self._frame = 0
        self._calls = 0
        self._next_id = 1
        self.events = []
        if self._camera is not None:
            self._camera.reset()

    def update(self, detections: Detections, frames_skipped: int = 0, image: Optional[np.ndarray] = None,
               motion: Optional[np.ndarray] = None) -> Detections:
        """Track one frame; ``frames_skipped`` frames were not fed since the previous call.

        ``motion``: the camera's motion since the previous call, a 2x3 affine from the previous frame's
        pixels to this frame's; every track is moved by it before association. Without it, and with
        ``motion_compensation`` on, it is estimated from ``image`` (the frame, BGR) when one is given.
        """
        if frames_skipped < 0:
            raise ValueError(f"frames_skipped: expected >= 0, got {frames_skipped}")
        if motion is None and image is not None and self._camera is not None:
            motion = self._camera.estimate(image, exclude=detections.xyxy)
        steps = 1 + frames_skipped
        self._frame += steps
        self._calls += 1
        self.events = []
        if motion is not None and len(self._tracks):
            self._mean, self._cov = self._kalman.warp(self._mean, self._cov, motion)
        track_boxes = self._predict(steps)
        self._describe(image, detections)
        track_idx, det_idx, unmatched_high = self._associate(track_boxes, detections)
        self._correct(track_idx, det_idx, detections)
        self._spawn(unmatched_high, detections)
        self._retire()
        return self._output(detections)

    def coast(self, image: Optional[np.ndarray] = None, frames_skipped: int = 0, hold: bool = False) -> Detections:
        """Advance ``1 + frames_skipped`` frames on a frame the detector skipped; the tracks reported now.

        No association: no track is matched or missed, so none is confirmed or marked lost; one unmatched for
        longer than the lost buffer is removed (``"lost"`` if it was tracked, then ``"removed"``), as on
        ``update``. With ``motion_compensation`` on, the camera's motion is estimated from ``image`` and every
        track moved by it; then every track is predicted ahead. ``hold``: the scene is known not to have changed
        (a motion gate saw nothing move): nothing is moved or predicted, and every track not lost is taken as
        matched to its last detection again, as ``update`` would on a repeat of the last frame (its hits and
        smoothed score go on; a ripe tentative track is confirmed). Returns the confirmed tracks the last
        ``update`` reported, with their ids, class and last score, at their predicted boxes (see
        ``coast_boxes``), ``data["det_index"]`` -1.
        """
        if frames_skipped < 0:
            raise ValueError(f"frames_skipped: expected >= 0, got {frames_skipped}")
        steps = 1 + frames_skipped
        self._frame += steps
        self.events = []
        if hold:  # the same frame again: the tracks not lost are matched to their last detections again
            for track in self._tracks:
                if track.state is not _State.LOST:
                    track.observe(self._frame, track.det_index, track.score, track.class_id)
                    self._matched(track)
        else:
            motion = None
            if image is not None and self._camera is not None:
                motion = self._camera.estimate(image, exclude=xyah_to_xyxy(self._mean[:, :4]))
            if motion is not None and len(self._tracks):
                self._mean, self._cov = self._kalman.warp(self._mean, self._cov, motion)
            self._predict(steps)
        self._expire()
        return self._coasted()

    def _describe(self, image: Optional[np.ndarray], detections: Detections) -> None:
        """Appearance descriptors of this call's detections (the appearance cue on and a frame given): which
        were described (``_feat_ok``: those scoring ``track_thresh`` or more, the only ones the cue is used for;
        the low-score association ignores it) and which are clear views, overlapping no other detection by more
        than ``appearance.OVERLAP`` IoU (``_feat_clean``, the only ones a track learns from)."""
        self._feats = self._feat_ok = self._feat_clean = None
        if self.config.appearance_weight <= 0 or image is None or not len(detections):
            return
        self._feats, self._feat_ok = appearance.describe(image, detections.xyxy,
                                                         detections.score >= self.config.track_thresh)
        iou = box_iou(detections.xyxy, detections.xyxy)
        np.fill_diagonal(iou, 0.0)
        self._feat_clean = self._feat_ok & (iou.max(axis=1) <= appearance.OVERLAP)

    def _appearance_cost(self) -> Optional[np.ndarray]:
        """(tracks, detections) appearance distances of every track and this call's detections; 0 where either has
        no descriptor. None when this call has no descriptors."""
        if self._feats is None:
            return None
        d = appearance.distance(self._feature, self._feats)
        d[~self._has_feature] = 0.0
        d[:, ~self._feat_ok] = 0.0
        return d

    def max_speed(self) -> float:
        """How fast the fastest tracked track moves, in source pixels per frame (its Kalman centre velocity, or
        its height's); 0.0 when none is tracked."""
        rows = [i for i, t in enumerate(self._tracks) if t.state is _State.TRACKED]
        if not rows:
            return 0.0
        v = self._mean[rows, 4:]
        return float(max(np.hypot(v[:, 0], v[:, 1]).max(), np.abs(v[:, 3]).max()))

    def _expire(self) -> None:
        """Remove the tracks unmatched for longer than the lost buffer (coasting)."""
        keep = np.array([self._frame - t.last_frame <= self._lost_buffer for t in self._tracks], dtype=bool)
        if keep.all():
            return
        for track in (t for t, k in zip(self._tracks, keep) if not k and t.state is not _State.TENTATIVE):
            if track.state is _State.TRACKED:
                self.events.append(track.event(TrackEventKind.LOST))
            self.events.append(track.event(TrackEventKind.REMOVED))
        self._keep(keep)

    def _keep(self, keep: np.ndarray) -> None:
        """Keep the tracks where ``keep`` (T,) is True, with their states."""
        self._tracks = [t for t, k in zip(self._tracks, keep) if k]
        self._mean, self._cov = self._mean[keep], self._cov[keep]
        self._feature, self._has_feature = self._feature[keep], self._has_feature[keep]

    def _coasted(self) -> Detections:
        """The tracks reported on the last ``update`` still held, at their predicted boxes, in that call's order."""
        floor, sure = self.config.report_thresh, self.config.confirm_thresh
        rows = sorted((i for i, t in enumerate(self._tracks)
                       if t.state is _State.TRACKED and (t.score_ema >= floor or t.score >= sure)),
                      key=lambda i: self._tracks[i].det_index)
        tracks = [self._tracks[i] for i in rows]
        n = len(rows)
        return Detections(
            coast_boxes(self._mean[rows], tracks),
            np.array([t.score for t in tracks], dtype=np.float32),
            np.array([t.class_id for t in tracks], dtype=np.int32),
            track_id=np.array([t.track_id for t in tracks], dtype=np.int64),
            data={"det_index": np.full(n, -1, dtype=np.int64)},
        )

    def _predict(self, steps: int) -> np.ndarray:
        """Advance every track ``steps`` frames; returns their (T, 4) predicted boxes."""
        lost = np.array([t.state is _State.LOST for t in self._tracks], dtype=bool)
        self._mean[lost, 7] = 0.0  # a lost track keeps moving but stops growing or shrinking
        self._mean, self._cov = self._kalman.predict(self._mean, self._cov, steps)
        return xyah_to_xyxy(self._mean[:, :4])

    def _associate(
        self, track_boxes: np.ndarray, detections: Detections
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The three association stages; returns matched track and detection indices,
        and the high-score detections left unmatched."""
        cfg = self.config
        xyxy, score, det_class = detections.xyxy, detections.score, detections.class_id
        usable = (
            np.isfinite(xyxy).all(axis=1)
            & (xyxy[:, 2] > xyxy[:, 0])
            & (xyxy[:, 3] > xyxy[:, 1])
            & (score >= cfg.low_thresh)
        )
        high = np.flatnonzero(usable & (score >= cfg.track_thresh))
        low = np.flatnonzero(usable & (score < cfg.track_thresh))

        tracks = self._tracks
        # A track that missed more than the buffer before this frame (the caller
        # skipped frames) cannot be recovered; it is retired as unmatched.
        confirmed = np.array(
            [i for i, t in enumerate(tracks)
             if t.state is not _State.TENTATIVE and self._frame - t.last_frame - 1 <= self._lost_buffer],
            dtype=np.intp,
        )
        tentative = np.array([i for i, t in enumerate(tracks) if t.state is _State.TENTATIVE], dtype=np.intp)
        if not len(tracks) or not len(high) + len(low):
            return confirmed[:0], high[:0], high

        # Every stage's costs, for all tracks and detections at once; each stage takes its rows and columns.
        # (an unusable detection, never a candidate, is read as an empty box: no NaN, no warning)
        plain = 1.0 - box_iou(track_boxes, np.where(usable[:, None], xyxy, 0.0))  # (tracks, detections)
        cost = 1.0 - (1.0 - plain) * np.where(usable, score, 1.0)[None, :] if cfg.fuse_score else plain
        if not cfg.class_agnostic:
            other = np.array([t.class_id for t in tracks], dtype=np.int64)[:, None] != det_class[None, :]
            plain[other] = np.inf
            cost[other] = np.inf  # (the same array as plain without fuse_score)
        limit = cfg.match_thresh
        d = self._appearance_cost()
        if d is not None:  # the IoU gate decides which pairs may match, appearance which of them do
            cost = np.where(cost < limit, cost + cfg.appearance_weight * d, np.inf)
            limit += cfg.appearance_weight

        def match(costs: np.ndarray, pool: np.ndarray, candidates: np.ndarray, gate: float) -> _Matches:
            if not len(pool) or not len(candidates):
                return _Matches(pool[:0], candidates[:0], pool, candidates)
            rows, cols = _assign(costs[np.ix_(pool, candidates)], gate)
            return _Matches(pool[rows], candidates[cols], _without(pool, rows), _without(candidates, cols))

        first = match(cost, confirmed, high, limit)
        still_tracked = np.array(
            [i for i in first.unmatched_tracks if tracks[i].state is _State.TRACKED], dtype=np.intp
        )
        second = match(plain, still_tracked, low, cfg.low_match_thresh)  # plain IoU: a weak box is often occluded
        third = match(cost, tentative, first.unmatched_dets, limit)
        track_idx = np.concatenate([first.tracks, second.tracks, third.tracks])
        det_idx = np.concatenate([first.dets, second.dets, third.dets])
        return track_idx, det_idx, third.unmatched_dets

    def _correct(self, track_idx: np.ndarray, det_idx: np.ndarray, detections: Detections) -> None:
        """Kalman-correct matched tracks, record their detections, confirm ripe ones."""
        if not len(track_idx):
            return
        boxes = detections.xyxy[det_idx]
        mean, cov = self._kalman.update(self._mean[track_idx], self._cov[track_idx], xyxy_to_xyah(boxes))
        self._mean[track_idx], self._cov[track_idx] = mean, cov
        self._learn(track_idx, det_idx)
        for i, box, d, centre in zip(track_idx.tolist(), boxes, det_idx.tolist(), mean[:, :2]):
            track = self._tracks[i]
            track.xyxy = box
            track.centre = centre
            track.observe(self._frame, d, float(detections.score[d]), int(detections.class_id[d]))
            self._matched(track)

    def _learn(self, track_idx: np.ndarray, det_idx: np.ndarray) -> None:
        """Fold the appearance of this call's detections ``det_idx`` into that of tracks ``track_idx`` (pairs, each
        track once): a clear view is averaged in (weight ``appearance.ALPHA`` for what the track had); any view is
        taken when the track has none yet. (Only confident detections, ``track_thresh`` or more, were described.)"""
        if self._feats is None:
            return
        seen = self._feat_ok[det_idx]
        first = seen & ~self._has_feature[track_idx]
        clear = seen & ~first & self._feat_clean[det_idx]
        self._feature[track_idx[first]] = self._feats[det_idx[first]]
        self._has_feature[track_idx[first]] = True
        rows, views = track_idx[clear], self._feats[det_idx[clear]]
        self._feature[rows] = appearance.ALPHA * self._feature[rows] + (1.0 - appearance.ALPHA) * views

    def _matched(self, track: _Track) -> None:
        """A track was matched (or held): a tentative one is confirmed once ripe, a lost one is tracked again."""
        if track.state is _State.TENTATIVE:
            if track.hits >= self.config.min_hits and track.mean_score >= self.config.confirm_thresh:
                self._confirm(track)
        else:
            track.state = _State.TRACKED

    def _spawn(self, unmatched_high: np.ndarray, detections: Detections) -> None:
        """Start tentative tracks from unmatched detections scoring ``new_track_thresh`` or more."""
        cfg = self.config
        candidates = unmatched_high[detections.score[unmatched_high] >= cfg.new_track_thresh]
        if not len(candidates):
            return
        boxes = detections.xyxy[candidates]
        mean, cov = self._kalman.initiate(xyxy_to_xyah(boxes))
        self._mean = np.concatenate([self._mean, mean])
        self._cov = np.concatenate([self._cov, cov])
        # a new track takes any view it has (a row without one is never read: _has_feature says so)
        described = self._feats is not None
        views = self._feats[candidates] if described else np.zeros((len(candidates), appearance.SIZE), np.float32)
        self._feature = np.concatenate([self._feature, views])
        self._has_feature = np.concatenate([self._has_feature, self._feat_ok[candidates] if described
                                            else np.zeros(len(candidates), bool)])
        at_once = cfg.min_hits <= 1 or (cfg.confirm_first_frame and self._calls == 1)
        for box, d, centre in zip(boxes, candidates.tolist(), mean[:, :2]):
            track = _Track(xyxy=box, centre=centre)
            track.observe(self._frame, d, float(detections.score[d]), int(detections.class_id[d]))
            if at_once and track.mean_score >= cfg.confirm_thresh:
                self._confirm(track)
            self._tracks.append(track)

    def _confirm(self, track: _Track) -> None:
        track.state = _State.TRACKED
        track.track_id = self._next_id
        self._next_id += 1
        self.events.append(track.event(TrackEventKind.NEW))

    def _retire(self) -> None:
        """Drop unmatched tentative tracks, mark unmatched tracked ones lost, remove expired ones."""
        keep = np.ones(len(self._tracks), dtype=bool)
        for i, track in enumerate(self._tracks):
            if track.last_frame == self._frame:
                continue
            if track.state is _State.TENTATIVE:
                keep[i] = False
                continue
            if track.state is _State.TRACKED:
                track.state = _State.LOST
                self.events.append(track.event(TrackEventKind.LOST))
            if self._frame - track.last_frame > self._lost_buffer:
                self.events.append(track.event(TrackEventKind.REMOVED))
                keep[i] = False
        if not keep.all():
            self._keep(keep)

    def _output(self, detections: Detections) -> Detections:
        """The confirmed tracks matched on this call whose smoothed score reaches ``report_thresh``, in input
        order."""
        floor, sure = self.config.report_thresh, self.config.confirm_thresh
        rows = sorted(
            (t for t in self._tracks
             if t.state is _State.TRACKED and t.last_frame == self._frame and (t.score_ema >= floor or t.score >= sure)),
            key=lambda t: t.det_index,
        )
        det_index = np.array([t.det_index for t in rows], dtype=np.int64)
        return Detections(
            detections.xyxy[det_index],
            detections.score[det_index],
            np.array([t.class_id for t in rows], dtype=np.int32),
            track_id=np.array([t.track_id for t in rows], dtype=np.int64),
            mask=None if detections.mask is None else detections.mask[det_index],
            data={**{k: v[det_index] for k, v in detections.data.items()}, "det_index": det_index},
            metadata=detections.metadata,
        )


def coast_boxes(mean: np.ndarray, tracks: list[_Track]) -> np.ndarray:
    """(N, 4) boxes of coasting tracks from their Kalman means ``(N, 8)``: each one's last matched detection box
    moved by its Kalman centre's motion since that match (measured with `edgecv eval --suite` at every_n 2 and 3
    against the Kalman box and the unmoved box: README, "Skipping frames")."""
    if not tracks:
        return np.zeros((0, 4), np.float64)
    last = np.array([t.xyxy for t in tracks], dtype=np.float64).reshape(-1, 4)
    shift = mean[:, :2] - np.array([t.centre for t in tracks], dtype=np.float64).reshape(-1, 2)
    return last + np.tile(shift, 2)


def bench_tracker(n_objects: int = 20, n_frames: int = 500, images: Optional[list[np.ndarray]] = None,
                  motion_compensation: str = "off", appearance_weight: float = 0.0,
                  progress: Optional[Progress] = None) -> float:
    """Median milliseconds per ``ByteTracker.update`` on synthetic moving boxes.

    Boxes move at constant velocity with pixel noise (bouncing off the edges of a 1920x1080 scene, or of the
    images when given), scores spread over the high and low ranges, and 5% of detections are missed at random.
    Seeded, so runs compare. With ``images`` (frames, cycled) each call is given a frame, so
    ``motion_compensation`` estimates the camera's motion on it and ``appearance_weight`` > 0 describes every
    box on it: the time then includes those. Each frame is counted in ``progress`` when given.
    """
    rng = np.random.default_rng(0)
    size = np.array(images[0].shape[1::-1] if images else (1920, 1080), dtype=np.float64)
    # on frames, people-sized for the frame (vtest.avi's walkers: about 30x80 px at 768x576)
    half_size = rng.uniform((10.0, 20.0), (30.0, 60.0), (n_objects, 2)) * (2.0 * size[1] / 1080.0 if images else 1.0)
    start = rng.uniform(half_size, size - half_size, (n_objects, 2))
    velocity = rng.uniform(-4.0, 4.0, (n_objects, 2))
    class_id = rng.integers(0, 3, n_objects)
    tracker = ByteTracker(TrackerConfig(motion_compensation=motion_compensation, appearance_weight=appearance_weight))
    times = []
    for frame in range(n_frames):
        span = size - 2 * half_size
        centre = half_size + np.abs((start - half_size + frame * velocity) % (2 * span) - span)  # bouncing
        centre = centre + rng.normal(0.0, 1.0, (n_objects, 2))
        seen = rng.random(n_objects) >= 0.05
        detections = Detections(
            np.concatenate([centre - half_size, centre + half_size], axis=1)[seen],
            rng.uniform(0.3, 0.95, n_objects)[seen],
            class_id[seen],
        )
        image = images[frame % len(images)] if images else None
        t0 = perf_counter()
        tracker.update(detections, image=image)
        times.append(perf_counter() - t0)
        if progress is not None:
            progress.update()
    return float(np.median(times)) * 1000.0
