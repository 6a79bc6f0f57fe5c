"""Rules turn confirmed tracks into events.

Each rule is a small stateful object: geometry in the constructor (or ``from_config`` with its config
section), one `update` fed the tracks of a frame, per-track state deleted when the track ends, debouncing
by a minimum number of frames (:class:`Debounce`) and an optional per-track cooldown.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Generic, Iterable, Mapping, Optional, Sequence, TypeVar, Union

import cv2
import numpy as np

from ..types import Detections, Event, ObjectInfo, SemanticMasks, in_classes

if TYPE_CHECKING:
    from ..config import LineConfig, ObjectEventsConfig, ZoneConfig

T = TypeVar("T")


class EventType(str, Enum):
    """The ``type`` of the events rules publish (``Event.type`` holds the plain string value)."""

    OBJECT_NEW = "object.new"  # a track was confirmed
    OBJECT_LOST = "object.lost"  # a confirmed track was removed (the tracker's "removed", not its "lost")
    ZONE_ENTER = "zone.enter"
    ZONE_EXIT = "zone.exit"
    ZONE_LOITER = "zone.loiter"
    LINE_CROSS = "line.cross"
    COLLISION_WARNING = "collision.warning"


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

    def event(self, type_: Union[EventType, str], obj: Optional[ObjectInfo], rule: str = "", **fields: Any) -> Event:
        """An event of this frame; its ``type`` is stored as a plain string (an EventType's value)."""
        return Event(type_.value if isinstance(type_, EventType) else type_, self.node, self.camera, self.frame,
                     self.captured_at, obj, fields, epoch=self.epoch, rule=rule)


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

    def __init__(self, name: str, *, class_ids: Optional[set[int]] = None, min_frames: int = 1,
                 cooldown_s: float = 0.0) -> None:
        self.name = name
        self.class_ids = class_ids
        self.min_frames = max(1, int(min_frames))
        self.cooldown_s = cooldown_s
        self._last_event_t: dict[tuple[int, str], float] = {}

    def wants(self, class_id: int) -> bool:
        return self.class_ids is None or int(class_id) in self.class_ids

    def select(self, tracks: Detections) -> Detections:
        """The tracks of the classes this rule watches (``tracks`` itself when that is all of them: read only)."""
        if self.class_ids is None:
            return tracks
        wanted = in_classes(tracks.class_id, np.fromiter(self.class_ids, np.int32, len(self.class_ids)))
        return tracks if wanted.all() else tracks[wanted]

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
class Debounce(Generic[T]):
    """A per-track state confirmed once ``min_frames`` consecutive observations agree on a new value.

    ``confirmed`` is None until the first value is confirmed; an observation equal to ``confirmed``
    drops the candidate, one that differs from the candidate starts a new streak.
    """

    confirmed: Optional[T] = None
    candidate: Optional[T] = None  # value being observed while it differs from `confirmed`
    streak: int = 0  # consecutive observations of `candidate`

    def observe(self, value: T, min_frames: int) -> Optional[T]:
        """Feed one observation; returns ``value`` when it becomes the confirmed value, else None."""
        if value == self.confirmed:
            self.candidate, self.streak = None, 0
            return None
        if value != self.candidate:  # only consecutive agreeing observations count
            self.candidate, self.streak = value, 0
        self.streak += 1
        if self.streak < min_frames:
            return None
        self.confirmed, self.candidate, self.streak = value, None, 0
        return value


@dataclass
class _ZoneState:
    inside: Debounce[bool] = field(default_factory=Debounce)  # confirmed: in the zone (None: not yet known)
    entered_t: float = 0.0
    loitered: bool = False
    announced: bool = False  # zone.enter of the current visit was emitted (not held back by the cooldown)
    entered_class: int = -1  # the class the zone.enter of the current visit named (its zone.exit names it too)
    last: tuple = field(default_factory=tuple)  # (class_id, score, xyxy) last seen


class ZoneRule(Rule):
    """Polygon zone: zone.enter, zone.exit, zone.loiter by the anchor point of each box."""

    kind = "zone"

    def __init__(self, name: str, polygon: Sequence[Sequence[float]], *, anchor: str = "bottom_center",
                 class_ids: Optional[set[int]] = None, min_frames: int = 3, cooldown_s: float = 0.0,
                 loiter_s: Optional[float] = None, exit_on_lost: bool = True) -> None:
        super().__init__(name, class_ids=class_ids, min_frames=min_frames, cooldown_s=cooldown_s)
        self.polygon = np.asarray(polygon, dtype=np.float32).reshape(-1, 1, 2)
        self.anchor = anchor
        self.loiter_s = loiter_s
        self.exit_on_lost = exit_on_lost
        self._state: dict[int, _ZoneState] = {}

    @classmethod
    def from_config(cls, name: str, cfg: ZoneConfig, class_ids: Optional[set[int]] = None) -> ZoneRule:
        """The zone ``name`` of a camera's config; ``class_ids``: its ``classes`` as the detector's ids."""
        return cls(name, cfg.polygon, anchor=cfg.anchor, class_ids=class_ids, min_frames=cfg.min_frames,
                   cooldown_s=cfg.cooldown_s, loiter_s=cfg.loiter_s, exit_on_lost=cfg.exit_on_lost)

    def contains(self, points: np.ndarray) -> np.ndarray:
        """Boolean per point: inside or on the edge of the polygon."""
        return np.array([cv2.pointPolygonTest(self.polygon, (float(x), float(y)), False) >= 0
                         for x, y in points], dtype=bool)

    def inside(self, ctx: FrameContext, tracks: Detections) -> np.ndarray:
        """Boolean per track: is it in the zone this frame (subclasses may use other geometry)."""
        return self.contains(tracks.anchors(self.anchor))

    @property
    def occupancy(self) -> int:
        return sum(1 for s in self._state.values() if s.inside.confirmed)

    def occupants(self) -> dict[int, int]:
        """Tracks in the zone now by class id, counting only visits whose zone.enter was emitted: zone.enter minus
        zone.exit events per class so far (with ``exit_on_lost`` false a lost track leaves without an exit)."""
        counts: dict[int, int] = {}
        for s in self._state.values():
            if s.inside.confirmed and s.announced:
                counts[s.entered_class] = counts.get(s.entered_class, 0) + 1
        return counts

    @property
    def tracked(self) -> int:
        return len(self._state)

    def update(self, ctx: FrameContext, tracks: Detections, removed: Sequence[Removed]) -> list[Event]:
        events: list[Event] = []
        if len(tracks):
            sel = self.select(tracks)
            inside = self.inside(ctx, sel) if len(sel) else np.zeros(0, bool)
            for tid, cls, score, box, now_in in zip(sel.track_id.tolist(), sel.class_id.tolist(), sel.score.tolist(),
                                                    sel.xyxy.tolist(), inside.tolist()):
                st = self._state.get(tid)
                if st is None:
                    st = self._state[tid] = _ZoneState()
                st.last = (cls, score, tuple(box))
                events.extend(self._observe(ctx, tid, st, now_in))
        for r in removed:
            st = self._state.pop(r.track_id, None)
            if st is not None and st.inside.confirmed and st.announced and self.exit_on_lost:
                events.append(ctx.event(EventType.ZONE_EXIT, ctx.obj(r.track_id, st.entered_class, r.score, r.xyxy),
                                        self.name, zone=self.name, dwell_s=round(ctx.t - st.entered_t, 2),
                                        reason="lost"))
            self._forget(r.track_id)
        return events

    def _observe(self, ctx: FrameContext, tid: int, st: _ZoneState, now_in: bool) -> list[Event]:
        """The events of one observation of a track: enter / exit once confirmed, loiter."""
        events: list[Event] = []
        was = st.inside.confirmed
        changed = st.inside.observe(now_in, self.min_frames)
        if changed is True:
            st.entered_t, st.loitered = ctx.t, False
            # the cooldown holds back a repeated enter; its exit then goes unannounced too
            st.announced = self._cooled(tid, EventType.ZONE_ENTER, ctx.t)
            if st.announced:
                st.entered_class = st.last[0]
                events.append(ctx.event(EventType.ZONE_ENTER, ctx.obj(tid, *st.last), self.name, zone=self.name))
        elif changed is False and was and st.announced:
            st.announced = False
            events.append(ctx.event(EventType.ZONE_EXIT, ctx.obj(tid, st.entered_class, *st.last[1:]), self.name,
                                    zone=self.name,
                                    dwell_s=round(ctx.t - st.entered_t, 2)))
        if st.inside.confirmed and self.loiter_s and not st.loitered and ctx.t - st.entered_t >= self.loiter_s:
            st.loitered = True
            events.append(ctx.event(EventType.ZONE_LOITER, ctx.obj(tid, *st.last), self.name, zone=self.name,
                                    dwell_s=round(ctx.t - st.entered_t, 2)))
        return events


@dataclass
class _LineState:
    side: Debounce[int] = field(default_factory=Debounce)  # confirmed side: -1 or +1 (None: not yet known)
    last_on_side: Optional[np.ndarray] = None  # last anchor on the confirmed side
    first_on_candidate: Optional[np.ndarray] = None  # first anchor of the current candidate side


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

    def __init__(self, name: str, points: Sequence[Sequence[float]], *, anchor: str = "bottom_center",
                 class_ids: Optional[set[int]] = None, min_frames: int = 3, cooldown_s: float = 0.0) -> None:
        super().__init__(name, class_ids=class_ids, min_frames=min_frames, cooldown_s=cooldown_s)
        self.a = np.asarray(points[0], dtype=np.float64)
        self.b = np.asarray(points[1], dtype=np.float64)
        self.anchor = anchor
        self._state: dict[int, _LineState] = {}
        self._counts = {"in": 0, "out": 0}

    @classmethod
    def from_config(cls, name: str, cfg: LineConfig, class_ids: Optional[set[int]] = None) -> LineRule:
        """The line ``name`` of a camera's config; ``class_ids``: its ``classes`` as the detector's ids."""
        return cls(name, cfg.points, anchor=cfg.anchor, class_ids=class_ids, min_frames=cfg.min_frames,
                   cooldown_s=cfg.cooldown_s)

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
            for i, (tid, side) in enumerate(zip(sel.track_id.tolist(), sides.tolist())):
                st = self._state.get(tid)
                if st is None:
                    st = self._state[tid] = _LineState()
                direction = self._observe(st, side, pts[i])
                if direction is None or not self._cooled(tid, direction, ctx.t):
                    continue
                self._counts[direction] += 1
                obj = ctx.obj(tid, int(sel.class_id[i]), float(sel.score[i]), sel.xyxy[i])
                events.append(ctx.event(EventType.LINE_CROSS, obj, self.name, line=self.name, direction=direction))
        for r in removed:
            self._state.pop(r.track_id, None)
            self._forget(r.track_id)
        return events

    def _observe(self, st: _LineState, side: int, point: np.ndarray) -> Optional[str]:
        """The direction ("in" / "out") of the crossing this observation confirms, if any."""
        if side == 0:  # exactly on the line: no information
            return None
        prev_side, prev_point = st.side.confirmed, st.last_on_side
        if side == prev_side:
            st.last_on_side = point
        elif side != st.side.candidate:
            st.first_on_candidate = point  # a new candidate side starts here
        if st.side.observe(side, self.min_frames) is None:
            return None
        st.last_on_side = point
        first = st.first_on_candidate
        if prev_side is None or prev_point is None or first is None:
            return None  # first confirmed side of this track: no crossing
        if not _segments_intersect(prev_point, first, self.a, self.b):
            return None  # went around the end of the line
        return "in" if prev_side < 0 < side else "out"


class ObjectRule(Rule):
    """object.new when a track is confirmed, object.lost when a confirmed track is removed."""

    kind = "object"

    def __init__(self, class_ids: Optional[set[int]] = None, *, new: bool = True, lost: bool = True) -> None:
        super().__init__("", class_ids=class_ids)
        self.emit_new, self.emit_lost = new, lost
        self._seen: set[int] = set()

    @classmethod
    def from_config(cls, cfg: ObjectEventsConfig, class_ids: Optional[set[int]] = None) -> ObjectRule:
        """A camera's ``objects`` section; ``class_ids``: its ``classes`` as the detector's ids."""
        return cls(class_ids, new=cfg.new, lost=cfg.lost)

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
                    events.append(ctx.event(EventType.OBJECT_NEW, obj))
        for r in removed:
            if r.track_id in self._seen:
                self._seen.discard(r.track_id)
                if self.emit_lost and self.wants(r.class_id):
                    events.append(ctx.event(EventType.OBJECT_LOST, ctx.obj(r.track_id, r.class_id, r.score, r.xyxy)))
        return events
