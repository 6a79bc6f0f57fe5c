"""Rules turn confirmed tracks into events.

Each rule is a small stateful object: geometry in the constructor, one `update` fed the tracks
of a frame, per-track state deleted when the track ends, debouncing by a minimum number of frames
and an optional per-track cooldown.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence

import cv2
import numpy as np

from ..types import Detections, Event, ObjectInfo, SemanticMasks


@dataclass(frozen=True)
class FrameContext:
    """What every event of one processed frame shares."""

    node: str
    camera: str
    frame: int
    captured_at: float  # wall clock
    t: float  # stream time in seconds (media time for files, monotonic for live sources)
    frame_size: tuple[int, int]
    names: Sequence[str]
    epoch: str = ""
    semantic: Optional[SemanticMasks] = None  # masks of semantic segmentation models for this frame (if any)
    mask_areas: Mapping[int, float] = field(default_factory=dict)  # track id -> instance mask pixels (seg models)

    def label(self, class_id: int) -> str:
        return self.names[class_id] if 0 <= class_id < len(self.names) else str(class_id)

    def obj(self, track_id: int, class_id: int, score: float, xyxy: Iterable[float]) -> ObjectInfo:
        """Object fields of an event; the box is clipped to the frame (predicted boxes may overshoot)."""
        w, h = self.frame_size
        x1, y1, x2, y2 = (float(v) for v in xyxy)
        box = (min(max(x1, 0.0), w), min(max(y1, 0.0), h), min(max(x2, 0.0), w), min(max(y2, 0.0), h))
        return ObjectInfo(int(track_id), self.label(int(class_id)), int(class_id), float(score), box, self.frame_size,
                          self.mask_areas.get(int(track_id)))

    def event(self, type_: str, obj: Optional[ObjectInfo], rule: str = "", **fields: Any) -> Event:
        return Event(type_, self.node, self.camera, self.frame, self.captured_at, obj, fields,
                     epoch=self.epoch, rule=rule)


@dataclass(frozen=True)
class Removed:
    """A confirmed track that ended (its last known state)."""

    track_id: int
    class_id: int
    score: float
    xyxy: tuple[float, float, float, float]


class Rule:
    """Base: class filter and cooldown bookkeeping."""

    kind = "rule"

    def __init__(self, name: str, class_ids: Optional[set[int]] = None, min_frames: int = 1,
                 cooldown_s: float = 0.0) -> None:
        self.name = name
        self.class_ids = class_ids
        self.min_frames = max(1, int(min_frames))
        self.cooldown_s = cooldown_s
        self._last_event_t: dict[tuple[int, str], float] = {}

    def wants(self, class_id: int) -> bool:
        return self.class_ids is None or int(class_id) in self.class_ids

    def select(self, tracks: Detections) -> Detections:
        """The tracks of the classes this rule watches."""
        if self.class_ids is None:
            return tracks
        return tracks[np.isin(tracks.class_id, np.fromiter(self.class_ids, np.int32, len(self.class_ids)))]

    def _cooled(self, track_id: int, kind: str, t: float) -> bool:
        """True when this track may emit `kind` now (and records it)."""
        key = (track_id, kind)
        last = self._last_event_t.get(key)
        if last is not None and t - last < self.cooldown_s:
            return False
        self._last_event_t[key] = t
        return True

    def _forget(self, track_id: int) -> None:
        for key in [k for k in self._last_event_t if k[0] == track_id]:
            del self._last_event_t[key]

    def update(self, ctx: FrameContext, tracks: Detections, removed: Sequence[Removed]) -> list[Event]:
        raise NotImplementedError

    @property
    def tracked(self) -> int:
        """How many tracks this rule holds state for (bounded by live tracks)."""
        return 0


@dataclass
class _ZoneState:
    inside: Optional[bool] = None  # confirmed state; None until min_frames observations agree
    streak: int = 0  # consecutive frames observed in the candidate state
    candidate: Optional[bool] = None  # state being observed while it differs from `inside`
    entered_t: float = 0.0
    loitered: bool = False
    announced: bool = False  # zone.enter of the current visit was emitted (not held back by the cooldown)
    last: tuple = field(default_factory=tuple)  # (class_id, score, xyxy) last seen


class ZoneRule(Rule):
    """Polygon zone: zone.enter, zone.exit, zone.loiter by the anchor point of each box."""

    kind = "zone"

    def __init__(self, name: str, polygon: Sequence[Sequence[float]], anchor: str = "bottom_center",
                 class_ids: Optional[set[int]] = None, min_frames: int = 3, cooldown_s: float = 0.0,
                 loiter_s: Optional[float] = None, exit_on_lost: bool = True) -> None:
        super().__init__(name, class_ids, min_frames, cooldown_s)
        self.polygon = np.asarray(polygon, dtype=np.float32).reshape(-1, 1, 2)
        self.anchor = anchor
        self.loiter_s = loiter_s
        self.exit_on_lost = exit_on_lost
        self._state: dict[int, _ZoneState] = {}

    def contains(self, points: np.ndarray) -> np.ndarray:
        """Boolean per point: inside or on the edge of the polygon."""
        return np.array([cv2.pointPolygonTest(self.polygon, (float(x), float(y)), False) >= 0
                         for x, y in points], dtype=bool)

    def inside(self, ctx: FrameContext, tracks: Detections) -> np.ndarray:
        """Boolean per track: is it in the zone this frame (subclasses may use other geometry)."""
        return self.contains(tracks.anchors(self.anchor))

    @property
    def occupancy(self) -> int:
        return sum(1 for s in self._state.values() if s.inside)

    @property
    def tracked(self) -> int:
        return len(self._state)

    def update(self, ctx: FrameContext, tracks: Detections, removed: Sequence[Removed]) -> list[Event]:
        events: list[Event] = []
        if len(tracks):
            sel = self.select(tracks)
            inside = self.inside(ctx, sel) if len(sel) else np.zeros(0, bool)
            for i in range(len(sel)):
                tid = int(sel.track_id[i])
                st = self._state.setdefault(tid, _ZoneState())
                st.last = (int(sel.class_id[i]), float(sel.score[i]), tuple(sel.xyxy[i]))
                now_in = bool(inside[i])
                if st.inside is None or now_in != st.inside:
                    if now_in != st.candidate:  # only consecutive agreeing observations count
                        st.candidate, st.streak = now_in, 0
                    st.streak += 1
                    if st.streak >= self.min_frames:
                        was = st.inside
                        st.inside, st.streak, st.candidate = now_in, 0, None
                        if now_in:
                            st.entered_t, st.loitered = ctx.t, False
                            # the cooldown holds back a repeated enter; its exit then goes unannounced too
                            st.announced = self._cooled(tid, "zone.enter", ctx.t)
                            if st.announced:
                                events.append(ctx.event("zone.enter", ctx.obj(tid, *st.last), self.name,
                                                        zone=self.name))
                        elif was and st.announced:
                            st.announced = False
                            events.append(ctx.event("zone.exit", ctx.obj(tid, *st.last), self.name, zone=self.name,
                                                    dwell_s=round(ctx.t - st.entered_t, 2)))
                else:
                    st.streak, st.candidate = 0, None
                if st.inside and self.loiter_s and not st.loitered and ctx.t - st.entered_t >= self.loiter_s:
                    st.loitered = True
                    events.append(ctx.event("zone.loiter", ctx.obj(tid, *st.last), self.name, zone=self.name,
                                            dwell_s=round(ctx.t - st.entered_t, 2)))
        for r in removed:
            st = self._state.pop(r.track_id, None)
            if st is not None and st.inside and st.announced and self.exit_on_lost:
                events.append(ctx.event("zone.exit", ctx.obj(r.track_id, r.class_id, r.score, r.xyxy), self.name,
                                        zone=self.name, dwell_s=round(ctx.t - st.entered_t, 2), reason="lost"))
            self._forget(r.track_id)
        return events


@dataclass
class _LineState:
    side: int = 0  # confirmed side: -1, +1, or 0 until min_frames observations agree
    candidate: int = 0
    streak: int = 0
    last_on_side: Optional[np.ndarray] = None  # last anchor on the confirmed side
    first_on_candidate: Optional[np.ndarray] = None


def _segments_intersect(p1: np.ndarray, p2: np.ndarray, q1: np.ndarray, q2: np.ndarray) -> bool:
    """Whether segment p1-p2 meets segment q1-q2 (touching counts)."""

    def orient(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> float:
        return float((b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0]))

    d1, d2 = orient(q1, q2, p1), orient(q1, q2, p2)
    d3, d4 = orient(p1, p2, q1), orient(p1, p2, q2)
    return (d1 * d2 <= 0) and (d3 * d4 <= 0)


class LineRule(Rule):
    """Directional line crossing: line.cross with direction `in` or `out`.

    With the line drawn from points[0] to points[1] (image coordinates, y down), `in` is a crossing
    from the left-hand side of that vector to its right-hand side as seen on screen: for a line drawn
    left to right, `in` is moving down the image; for a line drawn top to bottom, `in` is moving
    from right to left.
    """

    kind = "line"

    def __init__(self, name: str, points: Sequence[Sequence[float]], anchor: str = "bottom_center",
                 class_ids: Optional[set[int]] = None, min_frames: int = 3, cooldown_s: float = 0.0) -> None:
        super().__init__(name, class_ids, min_frames, cooldown_s)
        self.a = np.asarray(points[0], dtype=np.float64)
        self.b = np.asarray(points[1], dtype=np.float64)
        self.anchor = anchor
        self._state: dict[int, _LineState] = {}
        self._counts = {"in": 0, "out": 0}

    @property
    def counts(self) -> dict[str, int]:
        """Crossings so far by direction (a copy): {"in": n, "out": m}."""
        return dict(self._counts)

    def sides(self, points: np.ndarray) -> np.ndarray:
        d = self.b - self.a
        cross = d[0] * (points[:, 1] - self.a[1]) - d[1] * (points[:, 0] - self.a[0])
        return np.sign(cross).astype(int)

    @property
    def tracked(self) -> int:
        return len(self._state)

    def update(self, ctx: FrameContext, tracks: Detections, removed: Sequence[Removed]) -> list[Event]:
        events: list[Event] = []
        if len(tracks):
            sel = self.select(tracks)
            pts = sel.anchors(self.anchor).astype(np.float64)
            sides = self.sides(pts) if len(sel) else np.zeros(0, int)
            for i in range(len(sel)):
                tid = int(sel.track_id[i])
                st = self._state.setdefault(tid, _LineState())
                s, p = int(sides[i]), pts[i]
                if s == 0:  # exactly on the line: no information
                    continue
                if s == st.side:
                    st.candidate, st.streak, st.first_on_candidate = 0, 0, None
                    st.last_on_side = p
                    continue
                if s != st.candidate:
                    st.candidate, st.streak, st.first_on_candidate = s, 0, p
                st.streak += 1
                if st.streak < self.min_frames:
                    continue
                prev_side, prev_point = st.side, st.last_on_side
                st.side, st.last_on_side = s, p
                st.candidate, st.streak = 0, 0
                first = st.first_on_candidate
                st.first_on_candidate = None
                if prev_side == 0 or prev_point is None or first is None:
                    continue  # first confirmed side of this track: no crossing
                if not _segments_intersect(prev_point, first, self.a, self.b):
                    continue  # went around the end of the line
                direction = "in" if prev_side < 0 < s else "out"
                if not self._cooled(tid, direction, ctx.t):
                    continue
                self._counts[direction] += 1
                obj = ctx.obj(tid, int(sel.class_id[i]), float(sel.score[i]), sel.xyxy[i])
                events.append(ctx.event("line.cross", obj, self.name, line=self.name, direction=direction))
        for r in removed:
            self._state.pop(r.track_id, None)
            self._forget(r.track_id)
        return events


class ObjectRule(Rule):
    """object.new when a track is confirmed, object.lost when a confirmed track is removed."""

    kind = "object"

    def __init__(self, class_ids: Optional[set[int]] = None, new: bool = True, lost: bool = True) -> None:
        super().__init__("", class_ids)
        self.emit_new, self.emit_lost = new, lost
        self._seen: set[int] = set()

    @property
    def tracked(self) -> int:
        return len(self._seen)

    def update(self, ctx: FrameContext, tracks: Detections, removed: Sequence[Removed]) -> list[Event]:
        events: list[Event] = []
        if tracks.track_id is not None:
            for i in range(len(tracks)):
                tid = int(tracks.track_id[i])
                if tid in self._seen:
                    continue
                self._seen.add(tid)
                if self.emit_new and self.wants(tracks.class_id[i]):
                    obj = ctx.obj(tid, int(tracks.class_id[i]), float(tracks.score[i]), tracks.xyxy[i])
                    events.append(ctx.event("object.new", obj))
        for r in removed:
            if r.track_id in self._seen:
                self._seen.discard(r.track_id)
                if self.emit_lost and self.wants(r.class_id):
                    events.append(ctx.event("object.lost", ctx.obj(r.track_id, r.class_id, r.score, r.xyxy)))
        return events
