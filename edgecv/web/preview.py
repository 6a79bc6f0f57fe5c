"""The live annotated preview: each camera's newest processed frame with its tracks, zones, lines, occupancy and
line counts drawn, as a JPEG, drawn and encoded on the HTTP thread when someone asks for it.

The camera worker only keeps a reference to its newest frame, tracks and masks (``CameraWorker.latest``); no copy,
drawing or encoding happens on the pipeline's threads. A frame is drawn and encoded at most once however many
viewers watch it (the JPEG is cached per frame, with and without the grid).
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Optional

import cv2
import numpy as np

from ..analytics.rules import LineRule, ZoneRule
from ..config import Config
from ..publish.snapshot import draw_counts, encode_jpeg, render

GRID_COLOR = (255, 255, 255)
GRID_TEXT = (0, 0, 0)
JPEG_QUALITY = 80


def draw_grid(image: np.ndarray) -> None:
    """In place: a coordinate grid with its source-pixel values, for drawing zones and lines by hand (a line every
    50 px, labelled every 100 px; every 100 and 200 px on frames wider than 1600 px)."""
    h, w = image.shape[:2]
    step = 100 if w > 1600 else 50
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, max(0.35, min(0.8, w / 2400))
    for x in range(step, w, step):
        cv2.line(image, (x, 0), (x, h - 1), GRID_COLOR, 2 if x % (2 * step) == 0 else 1)
    for y in range(step, h, step):
        cv2.line(image, (0, y), (w - 1, y), GRID_COLOR, 2 if y % (2 * step) == 0 else 1)
    for x in range(0, w, 2 * step):
        _tag(image, str(x), x + 2, 2, font, scale)
    for y in range(2 * step, h, 2 * step):
        _tag(image, str(y), 2, y + 2, font, scale)


def _tag(image: np.ndarray, text: str, x: int, y: int, font: int, scale: float) -> None:
    (tw, th), base = cv2.getTextSize(text, font, scale, 1)
    cv2.rectangle(image, (x, y), (x + tw + 2, y + th + base + 2), GRID_COLOR, -1)
    cv2.putText(image, text, (x + 1, y + th + 1), font, scale, GRID_TEXT, 1, cv2.LINE_AA)


def rule_counts(rules: list[Any]) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """Zone occupancy and line crossings of a camera's rules, read from another thread (a rule whose state
    changes while it is read is left out of this frame's drawing)."""
    occupancy: dict[str, int] = {}
    crossings: dict[str, dict[str, int]] = {}
    for rule in rules:
        try:
            if isinstance(rule, ZoneRule):
                occupancy[rule.name] = rule.occupancy
            elif isinstance(rule, LineRule):
                crossings[rule.name] = rule.counts
        except RuntimeError:  # its per-track state changed size while being counted
            continue
    return occupancy, crossings


class _Cache:
    """One camera's last encoded frames: {grid: (the worker's `latest` they were drawn from, JPEG)}."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.jpegs: dict[bool, tuple[Any, bytes]] = {}


class Preview:
    """Annotated JPEGs of the pipeline's cameras; ``config`` returns the running config (a reload may change
    zones and lines)."""

    def __init__(self, pipeline: Any, config: Callable[[], Config], names: list[str]) -> None:
        self.pipeline = pipeline
        self.config = config
        self.names = names
        self._caches = {name: _Cache() for name in pipeline.workers}
        self.encoded = 0  # frames drawn and encoded (not served from the cache)

    @property
    def cameras(self) -> list[str]:
        return list(self.pipeline.workers)

    def jpeg(self, camera: str, grid: bool = False) -> Optional[tuple[Any, bytes]]:
        """(a key that changes with each new frame, the JPEG) of ``camera``'s newest processed frame, or None
        while it has none. KeyError: no such camera."""
        worker = self.pipeline.workers[camera]
        cache = self._caches[camera]
        latest = worker.latest
        if latest is None:
            return None
        with cache.lock:  # two viewers of one frame: one encodes, the other gets its JPEG
            cached = cache.jpegs.get(grid)
            if cached is not None and cached[0] is latest:
                return cached
            data = encode_jpeg(self.annotate(camera, latest, worker.rules, grid), JPEG_QUALITY)
            cache.jpegs[grid] = (latest, data)
            self.encoded += 1
            return latest, data

    def annotate(self, camera: str, latest: tuple, rules: list[Any], grid: bool) -> np.ndarray:
        frame, tracks, semantic = latest
        cam = self.config().cameras.get(camera)
        image = render(frame.image, tracks, self.names, semantic, cam)
        if cam is not None:
            draw_counts(image, cam, *rule_counts(list(rules)))
        if grid:
            draw_grid(image)
        return image
