"""Constant-velocity Kalman filter on boxes, batched over tracks.

The state of one box is ``(cx, cy, a, h, vcx, vcy, va, vh)``: centre, aspect ratio
(width / height), height, and their velocities in units per frame, as in SORT,
DeepSORT and ByteTrack. Only ``(cx, cy, a, h)`` is measured. Process and
measurement noise scale with the box height, so a near (large) object is allowed
to move more pixels per frame than a far (small) one.

Every function takes a batch: means ``(N, 8)``, covariances ``(N, 8, 8)`` and
measurements ``(N, 4)``, so a tracker predicts or corrects all its tracks with a
few numpy calls instead of one Python call per track.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

_MIN_HEIGHT = 1e-3  # floor for degenerate boxes, so the aspect ratio stays finite
_ASPECT_STD = (1e-2, 1e-5)  # process noise of the aspect ratio and its velocity (fixed: it changes slowly)
_R_H2 = np.diag([1.0, 1.0, 0.0, 1.0]).reshape(16)  # measurement noise: which entries scale with the height squared
_R_0 = np.diag([0.0, 0.0, 1e-2, 0.0]).reshape(16)  # and the aspect ratio's fixed one (0.1^2)


@lru_cache(maxsize=32)
def _prediction(weight_position: float, weight_velocity: float,
                k: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """What a ``k``-frame prediction needs: the transition F, F^T, and the process noise summed over the ``k``
    frames as ``h^2 * noise_h2 + noise_0`` (8x8 each) for a box of height ``h``.

    One frame adds ``q_pos`` to the positions and ``q_vel`` to the velocities; over ``k`` frames the velocity
    noise of frame ``j`` (j < k) leaks ``j`` times into the position: sum j and sum j^2 weigh it.
    """
    transition = np.eye(8)
    transition[:4, 4:] = k * np.eye(4)
    sum_j = k * (k - 1) / 2
    sum_j2 = (k - 1) * k * (2 * k - 1) / 6
    by_height = np.array([1.0, 1.0, 0.0, 1.0])  # cx, cy and h scale with the height, the aspect ratio does not
    fixed = np.array([0.0, 0.0, 1.0, 0.0])
    noise = []
    for q_pos, q_vel in ((weight_position**2 * by_height, weight_velocity**2 * by_height),
                         (_ASPECT_STD[0] ** 2 * fixed, _ASPECT_STD[1] ** 2 * fixed)):
        q = np.zeros((8, 8))
        q[:4, :4] = np.diag(k * q_pos + sum_j2 * q_vel)
        q[:4, 4:] = q[4:, :4] = np.diag(sum_j * q_vel)
        q[4:, 4:] = np.diag(k * q_vel)
        noise.append(q)
    arrays = (transition, transition.T.copy(), *noise)
    for a in arrays:
        a.setflags(write=False)  # shared by every call with the same k
    return arrays


def xyxy_to_xyah(xyxy: np.ndarray) -> np.ndarray:
    """(N, 4) corner boxes to (N, 4) float64 ``(cx, cy, width / height, height)``."""
    xyxy = np.asarray(xyxy, dtype=np.float64).reshape(-1, 4)
    w = xyxy[:, 2] - xyxy[:, 0]
    h = np.maximum(xyxy[:, 3] - xyxy[:, 1], _MIN_HEIGHT)
    return np.stack([(xyxy[:, 0] + xyxy[:, 2]) / 2, (xyxy[:, 1] + xyxy[:, 3]) / 2, w / h, h], axis=1)


def xyah_to_xyxy(xyah: np.ndarray) -> np.ndarray:
    """(N, 4) ``(cx, cy, a, h)`` boxes to (N, 4) float64 corner boxes."""
    xyah = np.asarray(xyah, dtype=np.float64).reshape(-1, 4)
    half_h = xyah[:, 3] / 2
    half_w = xyah[:, 2] * half_h
    return np.stack(
        [xyah[:, 0] - half_w, xyah[:, 1] - half_h, xyah[:, 0] + half_w, xyah[:, 1] + half_h], axis=1
    )


@dataclass(frozen=True)
class BoxKalmanFilter:
    """Kalman filter for ``(cx, cy, a, h)`` boxes moving at constant velocity.

    ``std_weight_position`` and ``std_weight_velocity`` are the standard deviations
    of position and velocity noise as fractions of the box height (DeepSORT's 1/20
    and 1/160). The aspect ratio gets small fixed noise: it changes slowly.
    """

    std_weight_position: float = 1.0 / 20
    std_weight_velocity: float = 1.0 / 160

    def _position_std(self, h: np.ndarray, aspect_std: float, scale: float = 1.0) -> np.ndarray:
        """(N, 4) standard deviations of ``(cx, cy, a, h)`` for heights ``h``."""
        s = scale * self.std_weight_position * h
        return np.stack([s, s, np.full_like(h, aspect_std), s], axis=1)

    def _velocity_std(self, h: np.ndarray, scale: float = 1.0) -> np.ndarray:
        """(N, 4) standard deviations of the velocities for heights ``h``."""
        s = scale * self.std_weight_velocity * h
        return np.stack([s, s, np.full_like(h, _ASPECT_STD[1]), s], axis=1)

    def initiate(self, measurement: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Start tracks at ``(N, 4)`` measured boxes with zero velocity.

        Returns means ``(N, 8)`` and covariances ``(N, 8, 8)``; the velocity is
        uncertain until a second measurement arrives.
        """
        measurement = np.asarray(measurement, dtype=np.float64).reshape(-1, 4)
        n = len(measurement)
        mean = np.concatenate([measurement, np.zeros((n, 4))], axis=1)
        h = measurement[:, 3]
        std = np.concatenate([self._position_std(h, _ASPECT_STD[0], 2.0), self._velocity_std(h, 10.0)], axis=1)
        cov = np.zeros((n, 8, 8))
        idx = np.arange(8)
        cov[:, idx, idx] = std**2
        return mean, cov

    def predict(self, mean: np.ndarray, cov: np.ndarray, steps: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Advance the state ``steps`` frames at once; returns new arrays.

        The process noise of the ``steps`` frames is summed in closed form with the
        noise level of the current height (exact for one step, and for several steps
        while the height is constant), so a caller that skipped frames pays one call.
        """
        if steps < 1:
            raise ValueError(f"steps: expected >= 1, got {steps}")
        transition, transition_t, noise_h2, noise_0 = _prediction(self.std_weight_position, self.std_weight_velocity,
                                                                  float(steps))
        h = mean[:, 3]
        new_cov = transition @ cov @ transition_t
        new_cov += (h * h)[:, None, None] * noise_h2 + noise_0
        return mean @ transition_t, new_cov

    def update(
        self, mean: np.ndarray, cov: np.ndarray, measurement: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Correct ``(N, 8)`` states with ``(N, 4)`` measured boxes; returns new arrays."""
        measurement = np.asarray(measurement, dtype=np.float64).reshape(-1, 4)
        # S = H P H^T + R, R: (std_weight_position * h)^2 for cx, cy and h, 0.1^2 for the aspect ratio
        r = (self.std_weight_position * mean[:, 3]) ** 2
        innovation_cov = cov[:, :4, :4] + (r[:, None] * _R_H2 + _R_0).reshape(-1, 4, 4)
        # Kalman gain K = P H^T S^-1; with H selecting the first four components,
        # K^T = S^-1 (H P) because P and S are symmetric, and K S K^T = K (H P).
        gain_t = np.linalg.solve(innovation_cov, cov[:, :4, :])
        innovation = (measurement - mean[:, :4])[:, None, :]
        new_mean = mean + (innovation @ gain_t)[:, 0]
        new_cov = cov - cov[:, :, :4] @ gain_t
        return new_mean, new_cov

    @staticmethod
    def warp(mean: np.ndarray, cov: np.ndarray, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Move states into the next frame's coordinates after the camera moved by ``matrix``.

        ``matrix``: 2x3 similarity transform (rotation and uniform scale ``s`` in its 2x2 part,
        translation in its last column) from the previous frame's pixels to this frame's. Centres go
        through the full transform, centre velocities through the 2x2 part, heights and their velocities
        are scaled by ``s``, aspect ratios are kept. Covariances follow (``J P J^T``). Returns new arrays.
        """
        if not len(mean):
            return mean.copy(), cov.copy()
        linear = np.asarray(matrix, dtype=np.float64)[:, :2]
        shift = np.asarray(matrix, dtype=np.float64)[:, 2]
        s = float(np.sqrt(abs(np.linalg.det(linear))))
        jac = np.eye(8)
        jac[0:2, 0:2] = linear
        jac[4:6, 4:6] = linear
        jac[3, 3] = jac[7, 7] = s
        new_mean = mean @ jac.T
        new_mean[:, 0:2] += shift
        new_cov = jac @ cov @ jac.T
        return new_mean, new_cov

