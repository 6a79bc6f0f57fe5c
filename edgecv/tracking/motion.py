"""Camera-motion compensation: the frame-to-frame motion of the background, as a 2x3 affine.

A camera on a drone, a vehicle or a pan-tilt head moves every box in the image although the objects
did not move; the tracker's constant-velocity prediction then misses and identities switch. As in
BoT-SORT's global motion compensation, the motion of the whole image between two processed frames is
estimated and the Kalman states are warped by it before association (``ByteTracker.update(motion=...)``).

Methods (``tracker.motion_compensation``):

- ``sparse_flow``: background points of the previous frame, followed into this one by pyramidal
  Lucas-Kanade optical flow, then a similarity transform (rotation, uniform scale, translation) fitted
  with RANSAC, so moving objects' points are outliers. The inliers are followed on to the next frame;
  when fewer than half of ``max_corners`` are left, new corners (Shi-Tomasi) are found, outside the
  object boxes given. All of it on a grey copy downscaled by a whole factor to at most ``work_width`` pixels
  across, so the cost hardly grows with the camera's resolution.
- ``ecc``: OpenCV's enhanced correlation coefficient maximisation (Euclidean motion) on the same small
  grey image; slower, and lost under large motion, but needs no texture corners.
- ``auto``: ``sparse_flow``, but the estimate is only used once the camera is seen to move (a shift of
  more than ``deadband_px`` or a rotation/zoom beyond ``deadband_rel``); a fixed camera's noise of a few
  tenths of a pixel is not fed to the tracker. While the camera keeps still it is only looked at on one
  call in ``still_every`` (the others return None at no cost); the look compares with the last frame
  looked at, so motion that starts in between is caught whole at the next look (the tracks, not moved
  in between, are then moved by all of it). A new stream, and a camera seen to move, is looked at on
  every call until it has kept still for ``still_every`` looks in a row.
- ``off``: nothing is estimated.

``estimate`` returns the motion from the previous frame given to it to this one, in source pixels, or None
when there is no previous frame, the frame size changed, or too few points agree (then the tracker just
predicts, as without compensation).
"""
from __future__ import annotations

import math
from typing import Optional

import cv2
import numpy as np

METHODS = ("off", "sparse_flow", "ecc", "auto")


def identity() -> np.ndarray:
    return np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


class CameraMotion:
    """Estimates the background motion between consecutive calls (one instance per camera)."""

    def __init__(self, method: str = "sparse_flow", work_width: int = 400, max_corners: int = 150,
                 min_inliers: int = 12, deadband_px: float = 0.5, deadband_rel: float = 2e-3,
                 still_every: int = 5) -> None:
        if method not in METHODS or method == "off":
            raise ValueError(f"CameraMotion.method: expected sparse_flow, ecc or auto, got {method!r}")
        self.method = method
        self.work_width = work_width
        self.max_corners = max_corners
        self.min_inliers = min_inliers
        self.deadband_px = deadband_px
        self.deadband_rel = deadband_rel
        self._prev: Optional[np.ndarray] = None  # small grey image of the previous frame
        self._prev_pts: Optional[np.ndarray] = None  # its corners, (N, 1, 2) float32, small-image pixels
        self._scale = 1.0  # source pixels per small-image pixel
        self._size: tuple[int, int] = (0, 0)
        self.still_every = max(1, still_every)
        self.moving = True  # auto: whether the camera is taken to be moving (until seen still)
        self._still_looks = 0  # auto: estimates in a row without motion since it last moved
        self._skipped = 0  # auto: calls not looked at since the last look
        self.last_inliers = 0

    def reset(self) -> None:
        self._prev = self._prev_pts = None
        self._size = (0, 0)
        self.moving = True
        self._still_looks = self._skipped = 0

    def _small_grey(self, image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        if (w, h) != self._size:
            self._size = (w, h)
            self._scale = float(max(1, math.ceil(w / self.work_width)))  # whole factors downscale fastest
            self._prev = self._prev_pts = None
        size = (max(1, int(round(w / self._scale))), max(1, int(round(h / self._scale))))
        small = cv2.resize(image, size, interpolation=cv2.INTER_AREA) if self._scale > 1.0 else image
        return cv2.cvtColor(small, cv2.COLOR_BGR2GRAY) if small.ndim == 3 else small

    def _corners(self, grey: np.ndarray, exclude: Optional[np.ndarray]) -> Optional[np.ndarray]:
        mask = None
        if exclude is not None and len(exclude):
            h, w = grey.shape
            mask = np.full((h, w), 255, np.uint8)
            boxes = np.round(np.asarray(exclude, np.float64) / self._scale).astype(np.int64)
            for x1, y1, x2, y2 in np.clip(boxes, 0, [w, h, w, h]).tolist():
                mask[y1:y2, x1:x2] = 0
            if np.count_nonzero(mask) < mask.size // 4:  # the boxes cover nearly everything: use all of it
                mask = None
        return cv2.goodFeaturesToTrack(grey, self.max_corners, 0.01, 7, mask=mask, blockSize=3)

    def estimate(self, image: np.ndarray, exclude: Optional[np.ndarray] = None) -> Optional[np.ndarray]:
        """Motion from the previous call's frame to ``image``: a 2x3 affine in source pixels, or None.

        ``exclude``: (N, 4) boxes (source pixels, this frame) of objects whose points must not be used
        (they move on their own); they mask the corners taken from this frame when new ones are needed.
        """
        if self._skip_still(image):
            return None  # a still camera is only looked at now and then
        self._skipped = 0
        grey = self._small_grey(image)
        matrix, kept = self._measure(self._prev, grey, self._prev_pts)
        self._prev = grey
        if self.method != "ecc":
            self._prev_pts = self._follow(grey, kept, exclude)
        if matrix is not None and self.method == "auto":
            return self._auto_gate(matrix)
        return matrix

    def _skip_still(self, image: np.ndarray) -> bool:
        """auto: whether this call is one of those not looked at while the camera keeps still."""
        if self.method == "auto" and not self.moving and self._prev is not None and image.shape[1::-1] == self._size:
            self._skipped += 1
            return self._skipped < self.still_every
        return False

    def _measure(self, prev: Optional[np.ndarray], grey: np.ndarray,
                 prev_pts: Optional[np.ndarray]) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
        """The motion prev -> grey in source pixels (or None) and, for the flow, the inlier points moved into grey."""
        if prev is None:
            return None, None
        kept = None
        if self.method == "ecc":
            matrix = self._ecc(prev, grey)
        else:
            matrix, kept = self._flow(prev, grey, prev_pts)
        if matrix is not None:
            matrix = matrix.copy()
            matrix[:, 2] *= self._scale  # only the translation depends on the pixel size
        return matrix, kept

    def _follow(self, grey: np.ndarray, kept: Optional[np.ndarray],
                exclude: Optional[np.ndarray]) -> Optional[np.ndarray]:
        """The points to follow into the next frame: the background points that agreed, topped up with new
        corners (the costly part) only when too few are left."""
        if kept is None or len(kept) < self.max_corners // 2:
            fresh = self._corners(grey, exclude)
            kept = fresh if kept is None or fresh is None else np.concatenate([kept, fresh])[:self.max_corners]
        return kept

    def _auto_gate(self, matrix: np.ndarray) -> Optional[np.ndarray]:
        """auto: the motion when the camera is seen to move, else None (and count the still look)."""
        if self._significant(matrix):
            self.moving, self._still_looks = True, 0
            return matrix
        self._still_looks += 1
        self.moving = self.moving and self._still_looks < self.still_every
        return None

    def _significant(self, matrix: np.ndarray) -> bool:
        linear = matrix[:, :2] - np.eye(2)
        return bool(np.abs(matrix[:, 2]).max() > self.deadband_px or np.abs(linear).max() > self.deadband_rel)

    def _flow(self, prev: np.ndarray, grey: np.ndarray,
              pts: Optional[np.ndarray]) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
        """The similarity transform prev -> grey (small-image pixels) and the inlier points moved into grey."""
        self.last_inliers = 0
        if pts is None or len(pts) < self.min_inliers:
            return None, None
        nxt, status, _ = cv2.calcOpticalFlowPyrLK(prev, grey, pts, None, winSize=(15, 15), maxLevel=3)
        ok = status.reshape(-1) == 1
        if np.count_nonzero(ok) < self.min_inliers:
            return None, None
        matrix, inliers = cv2.estimateAffinePartial2D(pts[ok], nxt[ok], method=cv2.RANSAC,
                                                      ransacReprojThreshold=1.0, maxIters=200, confidence=0.99)
        if matrix is None or inliers is None:
            return None, None
        inlier = inliers.reshape(-1) == 1
        self.last_inliers = int(np.count_nonzero(inlier))
        if self.last_inliers < self.min_inliers:
            return None, None
        return matrix, nxt[ok][inlier]

    def _ecc(self, prev: np.ndarray, grey: np.ndarray) -> Optional[np.ndarray]:
        warp = np.eye(2, 3, dtype=np.float32)
        criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 50, 1e-4)
        try:
            _, warp = cv2.findTransformECC(prev, grey, warp, cv2.MOTION_EUCLIDEAN, criteria, None, 3)
        except cv2.error:  # did not converge
            return None
        # the warp maps the template's (previous frame's) coordinates to this frame's: the motion itself
        return warp.astype(np.float64)
