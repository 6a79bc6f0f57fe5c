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

import numpy as np

_MIN_HEIGHT = 1e-3  # floor for degenerate boxes, so the aspect ratio stays finite


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
        return np.stack([s, s, np.full_like(h, 1e-5), s], axis=1)

    def initiate(self, measurement: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Start tracks at ``(N, 4)`` measured boxes with zero velocity.

        Returns means ``(N, 8)`` and covariances ``(N, 8, 8)``; the velocity is
        uncertain until a second measurement arrives.
        """
        measurement = np.asarray(measurement, dtype=np.float64).reshape(-1, 4)
        n = len(measurement)
        mean = np.concatenate([measurement, np.zeros((n, 4))], axis=1)
        h = measurement[:, 3]
        std = np.concatenate([self._position_std(h, 1e-2, 2.0), self._velocity_std(h, 10.0)], axis=1)
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
        k = float(steps)
        transition = np.eye(8)
        transition[:4, 4:] = k * np.eye(4)
        new_mean = mean @ transition.T
        new_cov = transition @ cov @ transition.T

        h = mean[:, 3]
        q_pos = self._position_std(h, 1e-2) ** 2
        q_vel = self._velocity_std(h) ** 2
        sum_j = k * (k - 1) / 2  # sum over j < k of j: how velocity noise leaks into position
        sum_j2 = (k - 1) * k * (2 * k - 1) / 6  # sum over j < k of j**2
        idx = np.arange(4)
        new_cov[:, idx, idx] += k * q_pos + sum_j2 * q_vel
        new_cov[:, idx, idx + 4] += sum_j * q_vel
        new_cov[:, idx + 4, idx] += sum_j * q_vel
        new_cov[:, idx + 4, idx + 4] += k * q_vel
        return new_mean, new_cov

    def update(
        self, mean: np.ndarray, cov: np.ndarray, measurement: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Correct ``(N, 8)`` states with ``(N, 4)`` measured boxes; returns new arrays."""
        measurement = np.asarray(measurement, dtype=np.float64).reshape(-1, 4)
        r = self._position_std(mean[:, 3], 1e-1) ** 2
        idx = np.arange(4)
        innovation_cov = cov[:, :4, :4].copy()
        innovation_cov[:, idx, idx] += r
        # Kalman gain K = P H^T S^-1; with H selecting the first four components,
        # K^T = S^-1 (H P) because P and S are symmetric.
        gain = np.linalg.solve(innovation_cov, cov[:, :4, :]).transpose(0, 2, 1)
        innovation = measurement - mean[:, :4]
        new_mean = mean + np.einsum("nij,nj->ni", gain, innovation)
        new_cov = cov - gain @ innovation_cov @ gain.transpose(0, 2, 1)
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

