"""Which frames the detector runs on (a camera's ``detect`` section), decided on the capture thread before any
preprocessing, so a frame the detector skips costs a counter step, or a motion test on a small grey copy.

- ``every_n``: the detector runs on one frame in N; the tracker predicts the frames between.
- ``motion_gate``: a frame is skipped when nothing moved since the last inferred frame and no tracked object is
  still moving (``track_speed``, read from the camera worker). Motion: the frame, downscaled by a whole factor
  to at most ``work_width`` pixels across and made grey, against a running background (``cv2.accumulateWeighted``
  with weight ``alpha``, so a change fades from it over a few frames); pixels that differ by more than a threshold
  (``sensitivity`` 1: 4 grey levels, 0: 64) outside the ``mask`` polygons are changed, and a changed area of at
  least ``min_area`` source pixels² is motion. The test runs on every frame, skipped or not, so the background
  stays current and motion between two inferences is not missed.
- ``enabled: false``: no frame is inferred. ``FrameGate.enabled`` switches this at run time (the MQTT command
  ``<camera>/detect/set``): a bool written by one thread and read by the capture thread, atomic under the GIL; the
  first frame after switching on is inferred.

The first frame, and the first after the source (re)opens (``reset``), is always inferred.
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Optional, Sequence

import cv2
import numpy as np

from ..config import DetectConfig, MotionGateConfig

log = logging.getLogger(__name__)

# why a frame was not inferred
SKIP_INTERVAL, SKIP_STATIC, SKIP_DISABLED, SKIP_DEFERRED = "interval", "static", "disabled", "deferred"
SKIP_REASONS = (SKIP_INTERVAL, SKIP_STATIC, SKIP_DISABLED, SKIP_DEFERRED)
# a due frame is deferred when the other cameras' frames waiting for inference would take this long: half the 200 ms
# p99 that `edgecv bench capacity` holds to (30 ms deferred at 12 cameras already, the detector then on a third of
# the frames; 100 ms keeps it on nearly every due frame until near capacity: README, Capacity)
DEFER_WAIT_MS = 100.0
MOVING_PX = 1.0  # a tracked object moving faster (source pixels per frame) keeps the motion gate open


class MotionDetector:
    """Whether a frame changed from the running background (one instance per camera, its capture thread)."""

    def __init__(self, sensitivity: float = 0.5, min_area: float = 150.0,
                 mask: Optional[Sequence[Sequence[tuple[float, float]]]] = None, work_width: int = 320,
                 alpha: float = 0.25) -> None:
        self.level = 4.0 + (1.0 - sensitivity) * 60.0  # grey levels a pixel must change by
        self.min_area = min_area
        self.polygons = [np.asarray(p, dtype=np.float64) for p in mask or []]
        self.work_width = work_width
        self.alpha = alpha
        self._background: Optional[np.ndarray] = None  # float32, small grey
        self._keep: Optional[np.ndarray] = None  # uint8 small image: 255 where changes count
        self._size: tuple[int, int] = (0, 0)
        self._factor = 1
        self.changed_area = 0.0  # of the last frame tested, source pixels²

    @classmethod
    def from_config(cls, cfg: MotionGateConfig) -> MotionDetector:
        return cls(cfg.sensitivity, cfg.min_area, cfg.mask)

    def reset(self) -> None:
        """Forget the background (a new stream)."""
        self._background = None

    def _small_grey(self, image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        if (w, h) != self._size:  # a new size: a new background and mask
            self._size, self._background = (w, h), None
            self._factor = max(1, math.ceil(w / self.work_width))
            small = (max(1, w // self._factor), max(1, h // self._factor))
            self._keep = np.full((small[1], small[0]), 255, np.uint8)
            if self.polygons:
                pts = [np.round(p / self._factor).astype(np.int32) for p in self.polygons]
                cv2.fillPoly(self._keep, pts, 0)
        small = cv2.resize(image, (self._keep.shape[1], self._keep.shape[0]), interpolation=cv2.INTER_AREA)
        return cv2.cvtColor(small, cv2.COLOR_BGR2GRAY) if small.ndim == 3 else small

    def moved(self, image: np.ndarray) -> bool:
        """Whether ``image`` (BGR) differs from the background over at least ``min_area``; then it joins the
        background. The first frame (no background yet) counts as motion."""
        grey = self._small_grey(image)
        if self._background is None:
            self._background = grey.astype(np.float32)
            self.changed_area = float(image.shape[0] * image.shape[1])
            return True
        diff = cv2.absdiff(grey, cv2.convertScaleAbs(self._background))
        cv2.accumulateWeighted(grey, self._background, self.alpha)
        changed = cv2.threshold(diff, self.level, 255, cv2.THRESH_BINARY)[1]
        changed = cv2.bitwise_and(changed, self._keep)
        self.changed_area = float(cv2.countNonZero(changed) * self._factor ** 2)
        return self.changed_area >= self.min_area


class FrameGate:
    """Decides, frame by frame, whether the detector runs (``decide``); one per camera, on its capture thread.

    ``track_speed``: how fast the camera's fastest tracked object moves now (pixels per frame), read by the motion
    gate from the camera worker's thread (a float, so reading it is thread-safe).
    """

    def __init__(self, cfg: DetectConfig, track_speed: Callable[[], float] = lambda: 0.0,
                 name: str = "camera", wait_ms: Callable[[], float] = lambda: 0.0) -> None:
        self.cfg = cfg
        self.track_speed = track_speed
        self.wait_ms = wait_ms
        self.name = name
        self.every_n = cfg.every_n  # as applied: ``cfg.every_n`` limited by ``min_fps`` (``set_fps``)
        self.latest = cfg.every_n  # frames since the last inferred one by which the next is inferred, deferred or not
        self.set_fps(0.0)
        self.motion = MotionDetector.from_config(cfg.motion_gate) if cfg.motion_gate.enabled else None
        self._since = 0  # frames since the last inferred one
        self._moved = False  # motion seen since the last inferred frame
        self._fresh = True  # the next frame is a stream's first
        self._enabled = cfg.enabled  # the run-time switch (starts as configured)

    @property
    def enabled(self) -> bool:
        """Whether the detector runs on this camera (``detect.enabled``, switched at run time)."""
        return self._enabled

    @enabled.setter
    def enabled(self, on: bool) -> None:
        if on and not self._enabled:
            self._fresh = True  # the first frame after switching on is inferred
        self._enabled = bool(on)

    def set_fps(self, fps: float) -> None:
        """The source's frame rate (known once it opened): ``every_n`` is lowered so that the detector still runs
        ``min_fps`` times a second; logged once when that changes it."""
        # the largest gap, in frames, that keeps min_fps (None: no bound, or the rate is not known)
        bound = max(1, int(fps / self.cfg.min_fps + 1e-9)) if self.cfg.min_fps > 0 and fps > 0 else None
        n = self.cfg.every_n if bound is None else min(self.cfg.every_n, bound)
        if n != self.every_n and n < self.cfg.every_n:
            log.warning("%s: detect.every_n %d at %.3g fps would run the detector %.3g times a second, below "
                        "detect.min_fps %g: running it on %s", self.name, self.cfg.every_n, fps,
                        fps / self.cfg.every_n, self.cfg.min_fps, f"one frame in {n}" if n > 1 else "every frame")
        self.every_n = n
        latest = 2 * n - 1 if self.cfg.defer_when_busy else n
        self.latest = latest if bound is None else min(latest, max(n, bound))

    def reset(self, fps: float = 0.0) -> None:
        """The source (re)opened at ``fps`` (0: not known): its next frame is inferred, the motion background
        starts afresh, ``every_n`` follows the frame rate (``set_fps``)."""
        if fps > 0:
            self.set_fps(fps)
        self._fresh = True
        if self.motion is not None:
            self.motion.reset()

    def decide(self, image: np.ndarray) -> Optional[str]:
        """None when the detector runs on this frame, else why not (``SKIP_REASONS``)."""
        if not self._enabled:
            return SKIP_DISABLED
        if self.motion is not None:
            self._moved = self.motion.moved(image) or self._moved
        self._since += 1
        if not self._fresh:
            if self._since < self.every_n:
                return SKIP_INTERVAL
            if self._since < self.latest and self.wait_ms() >= DEFER_WAIT_MS:
                return SKIP_DEFERRED
            if self.motion is not None and not self._moved and self.track_speed() <= MOVING_PX:
                return SKIP_STATIC
        self._fresh, self._since, self._moved = False, 0, False
        return None
