"""Annotated JPEG snapshots of event frames on ``<prefix>/<node>/<camera>/snapshot`` (QoS 0).

When a processed frame produced events, at most ``mqtt.snapshots.max_hz`` times a second per camera,
the frame is drawn on (semantic masks such as the drivable area and lanes, instance masks, zones,
lines, the ego corridor, every track's box with its id and label, the events of the frame) and
published as a JPEG of the source size. Best effort like stats and track lists: dropped while the
broker is not connected, never spooled.

It runs on the camera worker, after the frame's events were handed to the sinks: drawing and
encoding a 1280x720 frame takes a few milliseconds on one core, bounded by the rate limit (one a
second by default), and ``publish_raw`` only queues the message for paho's network thread, so the
worker is not held up for long; frames without events cost nothing.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Optional

import cv2
import numpy as np

from ..config import CameraConfig, Config
from ..types import Detections, Event, Frame, SemanticMasks

log = logging.getLogger("edgecv.snapshot")

# BGR colours
SEMANTIC_COLORS: dict[str, tuple[int, int, int]] = {"drivable": (60, 180, 60), "lane": (40, 40, 230)}
DEFAULT_SEMANTIC = (200, 120, 40)
ZONE_COLOR = (0, 215, 255)
LINE_COLOR = (255, 200, 0)
CORRIDOR_COLOR = (200, 0, 200)
TEXT_COLOR = (255, 255, 255)
MASK_ALPHA = 0.4


def track_color(track_id: int) -> tuple[int, int, int]:
    """A stable, distinct-looking colour per track id."""
    hue = (int(track_id) * 47) % 180
    bgr = cv2.cvtColor(np.uint8([[[hue, 200, 255]]]), cv2.COLOR_HSV2BGR)[0, 0]
    return int(bgr[0]), int(bgr[1]), int(bgr[2])


def _blend(image: np.ndarray, mask: np.ndarray, color: tuple[int, int, int], alpha: float = MASK_ALPHA) -> None:
    if mask.shape != image.shape[:2] or not mask.any():
        return
    region = image[mask].astype(np.float32)
    image[mask] = (region * (1.0 - alpha) + np.float32(color) * alpha).astype(np.uint8)


def _label(image: np.ndarray, text: str, x: float, y: float, color: tuple[int, int, int], scale: float) -> None:
    font = cv2.FONT_HERSHEY_SIMPLEX
    thick = max(1, int(round(scale * 2)))
    (tw, th), base = cv2.getTextSize(text, font, scale, thick)
    x0 = int(min(max(0, x), max(0, image.shape[1] - tw - 2)))
    y0 = int(min(max(th + base, y), image.shape[0] - 1))
    cv2.rectangle(image, (x0, y0 - th - base), (x0 + tw + 2, y0), color, -1)
    cv2.putText(image, text, (x0 + 1, y0 - base // 2 - 1), font, scale, (0, 0, 0), thick, cv2.LINE_AA)


def _draw_masks(out: np.ndarray, tracks: Detections, ids: np.ndarray, semantic: Optional[SemanticMasks]) -> None:
    """Semantic masks first, then each track's instance mask in its colour."""
    if semantic is not None:
        for name, mask in semantic.masks.items():
            _blend(out, mask, SEMANTIC_COLORS.get(name, DEFAULT_SEMANTIC))
    if tracks.mask is not None:
        for tid, mask in zip(ids.tolist(), tracks.mask):
            _blend(out, mask, track_color(tid))


def _draw_geometry(out: np.ndarray, camera: CameraConfig, thick: int, scale: float) -> None:
    """The camera's zones, lines and ego corridor."""
    for zname, z in camera.zones.items():
        pts = np.round(np.asarray(z.polygon, np.float32)).astype(np.int32)
        cv2.polylines(out, [pts], True, ZONE_COLOR, thick, cv2.LINE_AA)
        _label(out, zname, float(pts[:, 0].min()), float(pts[:, 1].min()), ZONE_COLOR, scale)
    for lname, ln in camera.lines.items():
        (x1, y1), (x2, y2) = ln.points
        cv2.line(out, (int(x1), int(y1)), (int(x2), int(y2)), LINE_COLOR, thick + 1, cv2.LINE_AA)
        _label(out, lname, x1, y1, LINE_COLOR, scale)
    col = camera.driving.collision if camera.driving is not None else None
    if col is not None and col.ego_corridor:
        pts = np.round(np.asarray(col.ego_corridor, np.float32)).astype(np.int32)
        cv2.polylines(out, [pts], True, CORRIDOR_COLOR, thick, cv2.LINE_AA)


def _draw_tracks(out: np.ndarray, tracks: Detections, ids: np.ndarray, names: Sequence[str],
                 events: Sequence[Event], thick: int, scale: float) -> None:
    """Every track's box and ``label #id``; tracks named by an event get a thicker box."""
    flagged = {e.object.track_id for e in events if e.object is not None}
    for tid, cid, box in zip(ids.tolist(), tracks.class_id.tolist(), tracks.xyxy):
        x1, y1, x2, y2 = (int(round(float(v))) for v in box)
        color = track_color(tid)
        cv2.rectangle(out, (x1, y1), (x2, y2), color, thick * (2 if tid in flagged else 1))
        label = names[cid] if 0 <= cid < len(names) else str(cid)
        _label(out, f"{label} #{tid}", x1, y1 - 1, color, scale)


def _event_text(ev: Event) -> str:
    extra = [f"{k}={v}" for k, v in ev.fields.items() if k in ("zone", "line", "direction", "ttc_s")]
    who = f" #{ev.object.track_id}" if ev.object is not None else ""
    return " ".join([ev.type + who, *extra])


def _draw_events(out: np.ndarray, events: Sequence[Event], scale: float) -> None:
    """The frame's events, one line each from the top left, as many as fit."""
    h = out.shape[0]
    y = 4
    for ev in events:
        text = _event_text(ev)
        (_, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        y += th + base + 4
        if y > h:
            break
        _label(out, text, 4, y, TEXT_COLOR, scale)


def draw_counts(image: np.ndarray, camera: CameraConfig, occupancy: Mapping[str, int],
                crossings: Mapping[str, Mapping[str, int]]) -> None:
    """In place: each zone's occupancy below its name, each line's crossings by direction at its middle (the live
    preview; zones and lines themselves are drawn by :func:`render`)."""
    scale = max(0.35, min(1.0, image.shape[1] / 1600))
    for zname, z in camera.zones.items():
        if zname in occupancy:
            pts = np.asarray(z.polygon, np.float32)
            _label(image, f"{zname}: {occupancy[zname]} inside", float(pts[:, 0].min()), float(pts[:, 1].max()),
                   ZONE_COLOR, scale)
    for lname, ln in camera.lines.items():
        counts = crossings.get(lname)
        if counts is not None:
            (x1, y1), (x2, y2) = ln.points
            _label(image, f"{lname}: in {counts.get('in', 0)} out {counts.get('out', 0)}", (x1 + x2) / 2,
                   (y1 + y2) / 2, LINE_COLOR, scale)


def render(image: np.ndarray, tracks: Detections, names: Sequence[str], semantic: Optional[SemanticMasks] = None,
           camera: Optional[CameraConfig] = None, events: Sequence[Event] = (), draw_masks: bool = True) -> np.ndarray:
    """A copy of the BGR ``image`` with masks, geometry, tracks and the frame's events drawn on it."""
    out = image.copy()
    w = out.shape[1]
    scale = max(0.35, min(1.0, w / 1600))
    thick = max(1, int(round(w / 640)))
    ids = tracks.track_id if tracks.track_id is not None else np.zeros(len(tracks), np.int64)
    if draw_masks:
        _draw_masks(out, tracks, ids, semantic)
    if camera is not None:
        _draw_geometry(out, camera, thick, scale)
    _draw_tracks(out, tracks, ids, names, events, thick, scale)
    _draw_events(out, events, scale)
    return out


def encode_jpeg(image: np.ndarray, quality: int = 80) -> bytes:
    ok, buf = cv2.imencode(".jpg", image, [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)])
    if not ok:
        raise ValueError(f"JPEG encoding failed for an image of shape {image.shape}")
    return buf.tobytes()


class SnapshotPublisher:
    """The pipeline's ``on_events`` hook: rate-limited, annotated JPEGs of frames with events."""

    def __init__(self, publisher, cfg: Config, names: Sequence[str],
                 clock=time.monotonic) -> None:  # publisher: MqttPublisher (or anything with topics + publish_raw)
        self.publisher = publisher
        self.cameras: Mapping[str, CameraConfig] = cfg.cameras
        self.names = list(names)
        self.opts = cfg.mqtt.snapshots
        self.min_dt = 1.0 / self.opts.max_hz
        self.clock = clock
        self._last: dict[str, float] = {}
        self.published = 0
        self.skipped = 0  # frames with events inside the rate limit

    def __call__(self, camera: str, frame: Frame, tracks: Detections, semantic: Optional[SemanticMasks],
                 events: Sequence[Event]) -> None:
        if not events:
            return
        now = self.clock()
        if now - self._last.get(camera, -1e9) < self.min_dt:
            self.skipped += 1
            return
        self._last[camera] = now
        image = render(frame.image, tracks, self.names, semantic, self.cameras.get(camera), events,
                       self.opts.draw_masks)
        data = encode_jpeg(image, self.opts.quality)
        self.publisher.publish_raw(self.publisher.topics.snapshot(camera), data)
        self.published += 1
