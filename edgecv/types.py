"""The few types every stage shares: Frame, Detections, Event, LatencyWindow.

`Detections` is one columnar structure of parallel numpy arrays (in the spirit of
supervision's ``Detections``): stages take it and return it, and there are no
per-object Python objects on the hot path.
"""
from __future__ import annotations

import hashlib
import json
from bisect import bisect_left
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional

import numpy as np

EVENT_SCHEMA = "edgecv.event/1"


# Model families by kind: the config accepts these names, engine.registry maps each to its adapter class.
DETECTOR_FAMILIES: tuple[str, ...] = ("yolox", "yolov8", "yolov8-seg")  # boxes (tracked)
SEGMENTER_FAMILIES: tuple[str, ...] = ("semseg",)  # per-pixel masks

@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame of one camera."""

    camera: str
    index: int  # 1-based count of frames read from the source since it started
    t_mono: float  # time.monotonic() at capture
    t_wall: float  # time.time() at capture
    image: np.ndarray  # BGR, H x W x 3, uint8

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return int(self.image.shape[1]), int(self.image.shape[0])


class Detections:
    """Parallel arrays describing N objects of one frame.

    xyxy: float32 (N, 4) in source-image pixels; score: float32 (N,);
    class_id: int32 (N,); track_id: int64 (N,) or None; mask: bool (N, H, W) or None;
    data: extra per-object arrays of length N; metadata: free-form (camera, frame time...).
    """

    __slots__ = ("xyxy", "score", "class_id", "track_id", "mask", "data", "metadata")

    def __init__(
        self,
        xyxy: np.ndarray,
        score: np.ndarray,
        class_id: np.ndarray,
        track_id: Optional[np.ndarray] = None,
        mask: Optional[np.ndarray] = None,
        data: Optional[dict[str, np.ndarray]] = None,
        metadata: Optional[dict[str, Any]] = None,
    ) -> None:
        self.xyxy = np.asarray(xyxy, dtype=np.float32).reshape(-1, 4)
        n = len(self.xyxy)
        self.score = np.asarray(score, dtype=np.float32).reshape(-1)
        self.class_id = np.asarray(class_id, dtype=np.int32).reshape(-1)
        self.track_id = None if track_id is None else np.asarray(track_id, dtype=np.int64).reshape(-1)
        self.mask = None if mask is None else np.asarray(mask, dtype=bool)
        self.data = {k: np.asarray(v) for k, v in (data or {}).items()}
        self.metadata = dict(metadata or {})
        for name, arr in (("score", self.score), ("class_id", self.class_id), ("track_id", self.track_id)):
            if arr is not None and len(arr) != n:
                raise ValueError(f"Detections.{name}: expected length {n}, got {len(arr)}")
        if self.mask is not None and (self.mask.ndim != 3 or len(self.mask) != n):
            raise ValueError(f"Detections.mask: expected shape ({n}, H, W), got {self.mask.shape}")
        for k, v in self.data.items():
            if len(v) != n:
                raise ValueError(f"Detections.data[{k!r}]: expected length {n}, got {len(v)}")

    @classmethod
    def empty(cls, with_track_id: bool = False, metadata: Optional[dict[str, Any]] = None) -> "Detections":
        return cls(
            np.zeros((0, 4), np.float32),
            np.zeros(0, np.float32),
            np.zeros(0, np.int32),
            track_id=np.zeros(0, np.int64) if with_track_id else None,
            metadata=metadata,
        )

    def __len__(self) -> int:
        return len(self.xyxy)

    def __getitem__(self, index: Any) -> "Detections":
        """Select by boolean mask, integer array or slice; returns a new Detections."""
        if isinstance(index, (int, np.integer)):
            index = [int(index)]
        return Detections(
            self.xyxy[index],
            self.score[index],
            self.class_id[index],
            track_id=None if self.track_id is None else self.track_id[index],
            mask=None if self.mask is None else self.mask[index],
            data={k: v[index] for k, v in self.data.items()},
            metadata=self.metadata,
        )

    @classmethod
    def merge(cls, parts: Iterable["Detections"]) -> "Detections":
        parts = [p for p in parts]
        if not parts:
            return cls.empty()
        return cls(
            np.concatenate([p.xyxy for p in parts]),
            np.concatenate([p.score for p in parts]),
            np.concatenate([p.class_id for p in parts]),
            track_id=_concat_all([p.track_id for p in parts]),
            mask=_concat_all([p.mask for p in parts]),
            data=_concat_common(parts),
            metadata=parts[0].metadata,
        )

    def anchors(self, anchor: str = "bottom_center") -> np.ndarray:
        """(N, 2) float32 points of each box: bottom_center, center, top_center, ..."""
        return box_anchors(self.xyxy, anchor)

    def __repr__(self) -> str:
        return f"Detections(n={len(self)}, track_id={'yes' if self.track_id is not None else 'no'})"


def _concat_all(arrays: list[Optional[np.ndarray]]) -> Optional[np.ndarray]:
    """The arrays concatenated, or None unless every part has one (track ids, masks)."""
    return np.concatenate(arrays) if all(a is not None for a in arrays) else None


def _concat_common(parts: list[Detections]) -> dict[str, np.ndarray]:
    """The ``data`` arrays every part has, concatenated (the others are dropped)."""
    keys = set.intersection(*(set(p.data) for p in parts))
    return {k: np.concatenate([p.data[k] for p in parts]) for k in keys}


ANCHORS = ("bottom_center", "center", "top_center", "bottom_left", "bottom_right", "top_left", "top_right")


# each anchor as two columns of (x1, y1, x2, y2) averaged for its x, two for its y (a column twice: that value)
_ANCHOR_COLUMNS = {
    "bottom_center": [0, 2, 3, 3],
    "center": [0, 2, 1, 3],
    "top_center": [0, 2, 1, 1],
    "bottom_left": [0, 0, 3, 3],
    "bottom_right": [2, 2, 3, 3],
    "top_left": [0, 0, 1, 1],
    "top_right": [2, 2, 1, 1],
}


def in_classes(class_id: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """(N,) bool: which of ``class_id`` (N,) are among ``wanted`` (K,), as ``np.isin``. On the few ids of one
    frame (a class filter per detector and per rule, every frame) ``np.isin`` costs 15-25 us a call; this 1-3."""
    if len(wanted) == 1:
        return class_id == wanted[0]
    return (class_id[:, None] == wanted[None, :]).any(axis=1)


def box_anchors(xyxy: np.ndarray, anchor: str = "bottom_center") -> np.ndarray:
    """(N, 2) float32 anchor points of (N, 4) corner boxes (the rules ask for them on every frame: one gather and
    one mean, in the boxes' own precision)."""
    columns = _ANCHOR_COLUMNS.get(anchor)
    if columns is None:
        raise ValueError(f"anchor: expected one of {', '.join(ANCHORS)}, got {anchor!r}")
    pairs = xyxy[:, columns]
    return ((pairs[:, 0::2] + pairs[:, 1::2]) / 2).astype(np.float32)


class SemanticMasks:
    """Per-class boolean masks of one frame at source resolution (semantic segmentation).

    ``masks`` maps a class name ("drivable", "lane", ...) to an (H, W) bool array of the frame's
    size. Produced by the ``semseg`` adapter, merged across segmentation models by the pipeline and
    handed to the rules in ``FrameContext.semantic`` (and to snapshots). Treat it as read-only.
    """

    __slots__ = ("masks", "size")

    def __init__(self, masks: Mapping[str, np.ndarray]) -> None:
        self.masks: dict[str, np.ndarray] = {str(k): np.asarray(v, dtype=bool) for k, v in masks.items()}
        shapes = {m.shape for m in self.masks.values()}
        if any(len(s) != 2 for s in shapes) or len(shapes) > 1:
            raise ValueError(f"SemanticMasks: expected (H, W) masks of one size, got {sorted(shapes)}")
        h, w = next(iter(shapes)) if shapes else (0, 0)
        self.size: tuple[int, int] = (int(w), int(h))  # (width, height)

    @classmethod
    def merge(cls, parts: Iterable["SemanticMasks"]) -> "SemanticMasks":
        """One set of masks from several models; a class name given by two models is an error."""
        out: dict[str, np.ndarray] = {}
        for part in parts:
            for name, mask in part.masks.items():
                if name in out:
                    raise ValueError(f"SemanticMasks.merge: class {name!r} comes from two models")
                out[name] = mask
        return cls(out)

    def __contains__(self, name: object) -> bool:
        return name in self.masks

    def __getitem__(self, name: str) -> np.ndarray:
        return self.masks[name]

    def get(self, name: str) -> Optional[np.ndarray]:
        return self.masks.get(name)

    @property
    def names(self) -> list[str]:
        return list(self.masks)

    def fraction(self, name: str) -> float:
        """Share of the frame's pixels in class ``name`` (0..1)."""
        m = self.masks[name]
        return float(m.mean()) if m.size else 0.0

    def __repr__(self) -> str:
        w, h = self.size
        parts = ", ".join(f"{n}={self.fraction(n):.1%}" for n in self.masks)
        return f"SemanticMasks({w}x{h}: {parts})"


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    track_id: int
    label: str
    class_id: int
    score: float
    bbox: tuple[float, float, float, float]
    frame_size: tuple[int, int]
    mask_area: Optional[float] = None  # pixels of the instance mask (instance segmentation models only)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "track_id": int(self.track_id),
            "label": self.label,
            "class_id": int(self.class_id),
            "score": round(float(self.score), 4),
            "bbox": [round(float(v), 1) for v in self.bbox],
            "frame_size": [int(self.frame_size[0]), int(self.frame_size[1])],
        }
        if self.mask_area is not None:
            out["mask_area"] = int(round(float(self.mask_area)))
        return out


@dataclass(frozen=True, slots=True)
class Event:
    """One analytics event. Serializes to the `edgecv.event/1` MQTT payload."""

    type: str
    node: str
    camera: str
    frame: int
    captured_at: float  # wall clock of the frame's capture
    object: Optional[ObjectInfo] = None
    fields: Mapping[str, Any] = field(default_factory=dict)  # rule fields: zone, line, direction, ttc_s...
    epoch: str = ""  # identifies the stream run; part of the deterministic id
    rule: str = ""  # rule name (zone/line name) for the id

    @property
    def id(self) -> str:
        """Deterministic id: the same event of the same stream run always gets the same id."""
        tid = self.object.track_id if self.object is not None else -1
        key = "|".join(
            [self.epoch, self.node, self.camera, self.type, str(self.frame), str(tid), self.rule,
             json.dumps(dict(self.fields), sort_keys=True, default=str)]
        )
        return hashlib.sha1(key.encode()).hexdigest()[:24]

    def to_payload(self, published_at: float) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "schema": EVENT_SCHEMA,
            "id": self.id,
            "type": self.type,
            "node": self.node,
            "camera": self.camera,
            "frame": int(self.frame),
            "captured_at": round(self.captured_at, 3),
            "published_at": round(published_at, 3),
            "latency_ms": round(max(0.0, (published_at - self.captured_at) * 1000.0), 1),
        }
        if self.object is not None:
            payload["object"] = self.object.to_dict()
        for k, v in self.fields.items():
            payload[k] = v
        return payload


class BucketCounts:
    """A cumulative histogram (Prometheus' buckets): how many values were at most each bound, and their sum, since
    the start. Written by one thread (a list item and a float: no lock), read by any (a scrape)."""

    def __init__(self, bounds: Iterable[float]) -> None:
        self.bounds = tuple(sorted(bounds))
        self.counts = [0] * (len(self.bounds) + 1)  # per bucket, not cumulative; the last: above every bound
        self.sum = 0.0

    def add(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> tuple[list[tuple[float, int]], float]:
        """[(bound, values <= bound), ..., (inf, all values)] and the sum of the values."""
        total, out = 0, []
        for bound, n in zip((*self.bounds, float("inf")), list(self.counts)):
            total += n
            out.append((bound, total))
        return out, self.sum


class LatencyWindow:
    """Recent latencies (ms) for percentiles (bounded); written by one thread, read by any (the stats).
    ``buckets``, when set (the HTTP server's /metrics), also counts every value since the start."""

    def __init__(self, size: int = 512) -> None:
        self._values: deque[float] = deque(maxlen=size)
        self.buckets: Optional[BucketCounts] = None

    def add(self, value: float) -> None:
        self._values.append(value)
        if self.buckets is not None:
            self.buckets.add(value)

    def __len__(self) -> int:
        return len(self._values)

    def clear(self) -> None:
        self._values.clear()

    def percentiles(self) -> dict[str, float]:
        """p50, p95, p99 and max (0.0 each while empty)."""
        values = list(self._values)  # a copy: another thread may be adding
        if not values:
            return {"p50": 0.0, "p95": 0.0, "p99": 0.0, "max": 0.0}
        p50, p95, p99 = np.percentile(np.asarray(values, np.float64), (50, 95, 99))
        return {"p50": round(float(p50), 1), "p95": round(float(p95), 1), "p99": round(float(p99), 1),
                "max": round(float(max(values)), 1)}

    def budget(self) -> dict[str, float]:
        """p50 and p99 to 0.01 ms (a stage of the latency budget; 0.0 while empty)."""
        values = list(self._values)
        if not values:
            return {"p50": 0.0, "p99": 0.0}
        p50, p99 = np.percentile(np.asarray(values, np.float64), (50, 99))
        return {"p50": round(float(p50), 2), "p99": round(float(p99), 2)}
