"""Event accuracy: the events a config's zones and lines give on the tracker's output, against the events the
same rules give on the ground-truth tracks ("how right are my counts on this camera?").

Reference events come from the product's own rule code (``pipeline.build_rules``), fed every gt box as a
perfectly tracked object: the gt id is the track id, every object has the class the evaluation tracks
(``label``), and an id that is no longer in the gt is removed ``lost_buffer`` frames after its last box,
as the tracker would remove it (so ``zone.exit`` on a lost object is due at the same frame).

A pipeline event matches a reference event of the same type, rule and direction when their frames are at most
``tolerance`` frames apart and their object boxes overlap; the pairing is one to one and, among those
allowed, the one with the least frame difference in total.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from ..analytics.rules import FrameContext, Removed, Rule
from ..types import Detections, Event
from .metrics import box_iou
from .mot import MotSequence

SCORED_KINDS = ("zone", "line")  # rules with geometry a gt track can be checked against


def scored_rules(rules: Iterable[Rule]) -> list[Rule]:
    return [r for r in rules if r.kind in SCORED_KINDS]


def event_key(event: Event) -> tuple[str, str, str]:
    """(type, rule, direction): events are only compared within one key."""
    return event.type, event.rule, str(event.fields.get("direction", ""))


def reference_events(rules: Sequence[Rule], gt: MotSequence, class_id: int, names: Sequence[str], fps: float,
                     frame_size: tuple[int, int], frames: int, lost_buffer: int, camera: str = "eval",
                     node: str = "eval") -> list[Event]:
    """The events ``rules`` give on the gt tracks, frames 1..``frames`` (see the module docstring)."""
    last_seen: dict[int, int] = {}
    last_box: dict[int, np.ndarray] = {}
    events: list[Event] = []
    for f in range(1, frames + 1):
        boxes = gt.frames.get(f)
        if boxes is not None and len(boxes.ids):
            tracks = Detections(boxes.xyxy, np.ones(len(boxes.ids)), np.full(len(boxes.ids), class_id),
                                track_id=boxes.ids)
            for tid, box in zip(boxes.ids.tolist(), boxes.xyxy):
                last_seen[tid], last_box[tid] = f, box
        else:
            tracks = Detections.empty(with_track_id=True)
        gone = [tid for tid, seen in last_seen.items() if f - seen > lost_buffer]
        removed = [Removed(tid, class_id, 1.0, tuple(float(v) for v in last_box[tid])) for tid in gone]
        for tid in gone:
            del last_seen[tid], last_box[tid]
        ctx = FrameContext(node, camera, f, 0.0, (f - 1) / fps, frame_size, names, epoch="truth")
        for rule in rules:
            events.extend(rule.update(ctx, tracks, removed))
    return events


@dataclass(frozen=True)
class EventScore:
    """Counts of one (type, rule, direction), or of all of them (key ``("all", "", "")``)."""

    key: tuple[str, str, str]
    truth: int
    predicted: int
    matched: int

    @property
    def precision(self) -> float:
        return self.matched / self.predicted if self.predicted else (1.0 if not self.truth else 0.0)

    @property
    def recall(self) -> float:
        return self.matched / self.truth if self.truth else (1.0 if not self.predicted else 0.0)

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    @property
    def count_error(self) -> int:
        """Predicted minus true count (what a counting dashboard would be off by)."""
        return self.predicted - self.truth

    @property
    def label(self) -> str:
        kind, rule, direction = self.key
        return " ".join(p for p in (kind, rule, direction) if p)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.key[0], "rule": self.key[1], "direction": self.key[2] or None, "truth": self.truth,
                "predicted": self.predicted, "matched": self.matched, "precision": round(self.precision, 4),
                "recall": round(self.recall, 4), "f1": round(self.f1, 4), "count_error": self.count_error}


def _pair(pred: Sequence[Event], ref: Sequence[Event], tolerance: int) -> int:
    """Number of one-to-one matches within the tolerance with overlapping boxes (least total frame gap)."""
    if not pred or not ref:
        return 0
    gap = np.abs(np.array([p.frame for p in pred])[:, None] - np.array([r.frame for r in ref])[None, :]).astype(float)

    def boxes(events: Sequence[Event]) -> np.ndarray:
        return np.array([e.object.bbox if e.object is not None else (0.0, 0.0, 0.0, 0.0) for e in events], float)

    overlap = box_iou(boxes(pred), boxes(ref)) > 0.0
    allowed = (gap <= tolerance) & overlap
    if not allowed.any():
        return 0
    big = float(tolerance + 1) * (len(pred) + len(ref) + 1)  # never worth a forbidden pair
    rows, cols = linear_sum_assignment(np.where(allowed, gap, big))
    return int(np.count_nonzero(allowed[rows, cols]))


def match_events(pred: Sequence[Event], ref: Sequence[Event], tolerance: int,
                 keys: Optional[Iterable[tuple[str, str, str]]] = None) -> list[EventScore]:
    """Scores per key (every key seen in either list, plus ``keys``), sorted, then the total."""
    all_keys = sorted({event_key(e) for e in (*pred, *ref)} | set(keys or ()))
    scores = []
    for key in all_keys:
        p = [e for e in pred if event_key(e) == key]
        r = [e for e in ref if event_key(e) == key]
        scores.append(EventScore(key, len(r), len(p), _pair(p, r, tolerance)))
    total = EventScore(("all", "", ""), sum(s.truth for s in scores), sum(s.predicted for s in scores),
                       sum(s.matched for s in scores))
    return scores + [total]
