"""Camera-motion compensation: the estimate on real frames moved by known transforms, and the tracker
keeping an identity through a synthetic pan made from a shared sequence."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from edgecv.evaluation.variants import PanSettings, apply, pan_path, read_clip, window_matrix
from edgecv.tracking import BoxKalmanFilter, ByteTracker, TrackerConfig, xyxy_to_xyah
from edgecv.tracking.motion import CameraMotion
from edgecv.types import Detections


@pytest.fixture(scope="module")
def street(assets: Path) -> np.ndarray:
    cap = cv2.VideoCapture(str(assets / "media" / "vtest.avi"))
    for _ in range(120):
        ok, image = cap.read()
        assert ok
    cap.release()
    return image


def _moved(image: np.ndarray, dx: float, dy: float, angle: float, scale: float) -> tuple[np.ndarray, np.ndarray]:
    h, w = image.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
    m[:, 2] += (dx, dy)
    return cv2.warpAffine(image, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT), m


def _grid(w: int, h: int) -> np.ndarray:
    """Points spread over the frame (corners, edge midpoints, centre), homogeneous."""
    return np.array([[x, y, 1.0] for x in (0, w / 2, w) for y in (0, h / 2, h)])


@pytest.mark.parametrize("method", ["sparse_flow", "ecc"])
@pytest.mark.parametrize("dx, dy, angle, scale", [
    (7.3, -4.6, 0.0, 1.0),  # a shift with sub-pixel parts
    (-15.2, 9.7, 0.0, 1.0),  # a larger shift
    (0.0, 0.0, 1.5, 1.0),  # a roll about the centre
    (12.5, 3.2, -0.8, 1.0),  # both
])
def test_estimate_recovers_a_known_motion_within_half_a_pixel(street: np.ndarray, method: str, dx: float,
                                                              dy: float, angle: float, scale: float) -> None:
    moved, truth = _moved(street, dx, dy, angle, scale)
    cm = CameraMotion(method)
    assert cm.estimate(street) is None  # no previous frame yet
    est = cm.estimate(moved)
    assert est is not None
    h, w = street.shape[:2]
    pts = _grid(w, h)
    error = np.abs(pts @ est.T - pts @ truth.T).max()
    assert error <= 0.5, f"{method}: largest point error {error:.3f} px"


def test_sparse_flow_recovers_zoom_and_ignores_moving_objects(street: np.ndarray) -> None:
    """A zoom (uniform scale) is part of the model; boxes given as `exclude` are left out."""
    moved, truth = _moved(street, 4.0, -2.0, 0.3, 1.02)
    cm = CameraMotion("sparse_flow")
    cm.estimate(street, exclude=np.array([[300.0, 100.0, 400.0, 400.0]]))
    est = cm.estimate(moved)
    h, w = street.shape[:2]
    assert np.abs(_grid(w, h) @ est.T - _grid(w, h) @ truth.T).max() <= 0.5


def test_auto_reports_no_motion_for_a_fixed_camera_and_the_motion_of_a_moving_one(street: np.ndarray) -> None:
    cm = CameraMotion("auto", still_every=5)
    looks = []
    original = cm._small_grey
    cm._small_grey = lambda image: looks.append(1) or original(image)  # count the frames actually looked at
    assert cm.estimate(street) is None and cm.moving  # a new stream is looked at on every frame at first
    for _ in range(5):
        assert cm.estimate(street.copy()) is None
    assert not cm.moving and len(looks) == 6  # seen still five times: a still camera
    for _ in range(10):  # nothing to compensate, and only one frame in five is looked at
        assert cm.estimate(street.copy()) is None and not cm.moving
    assert len(looks) == 6 + 2
    # the camera moves by 6 px: caught at the next look, whole
    moved, _ = _moved(street, 6.0, 0.0, 0.0, 1.0)
    results = [cm.estimate(moved) for _ in range(5)]
    found = [m for m in results if m is not None]
    assert len(found) == 1 and cm.moving
    assert abs(found[0][0, 2] - 6.0) < 0.5 and abs(found[0][1, 2]) < 0.5
    # while moving, every frame is looked at; after five still looks it is a still camera again
    further, _ = _moved(street, 9.0, 0.0, 0.0, 1.0)
    step = cm.estimate(further)
    assert step is not None and abs(step[0, 2] - 3.0) < 0.5
    before = len(looks)
    for _ in range(5):
        assert cm.estimate(further) is None
    assert len(looks) - before == 5 and not cm.moving


def test_estimate_gives_none_on_a_blank_frame_and_after_a_size_change(street: np.ndarray) -> None:
    cm = CameraMotion("sparse_flow")
    blank = np.full_like(street, 128)
    cm.estimate(blank)
    assert cm.estimate(blank) is None  # no texture: nothing to follow
    cm.estimate(street)
    half = cv2.resize(street, (street.shape[1] // 2, street.shape[0] // 2))
    assert cm.estimate(half) is None  # a new size starts over


def test_kalman_warp_moves_centres_velocities_and_sizes() -> None:
    kf = BoxKalmanFilter()
    mean, cov = kf.initiate(xyxy_to_xyah(np.array([[100.0, 100.0, 140.0, 200.0]])))
    mean[0, 4:6] = (3.0, -1.0)
    angle = np.deg2rad(10.0)
    s = 1.1
    linear = s * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    matrix = np.concatenate([linear, [[5.0], [-7.0]]], axis=1)
    new_mean, new_cov = kf.warp(mean, cov, matrix)
    assert np.allclose(new_mean[0, :2], linear @ mean[0, :2] + [5.0, -7.0])
    assert np.allclose(new_mean[0, 4:6], linear @ mean[0, 4:6])
    assert new_mean[0, 2] == pytest.approx(mean[0, 2])  # aspect ratio kept
    assert new_mean[0, 3] == pytest.approx(s * mean[0, 3])
    assert np.allclose(new_cov[0], new_cov[0].T)
    assert np.trace(new_cov[0][:2, :2]) == pytest.approx(s * s * np.trace(cov[0][:2, :2]))


def test_tracker_follows_a_static_object_through_a_fast_pan_only_with_compensation() -> None:
    """Synthetic boxes: the camera jumps 60 px per frame, the object stands still in the world."""
    def run(motion: bool) -> list[int]:
        """The id reported on each frame (0: not reported)."""
        tracker = ByteTracker(TrackerConfig(frame_rate=10.0))
        ids = []
        for f in range(12):
            shift = -60.0 * f
            box = np.array([[400.0 + shift + 1000, 200.0, 440.0 + shift + 1000, 300.0]])
            m = np.array([[1.0, 0.0, -60.0], [0.0, 1.0, 0.0]]) if (motion and f) else None
            out = tracker.update(Detections(box, [0.9], [0]), motion=m)
            ids.append(int(out.track_id[0]) if len(out) else 0)
        return ids

    assert run(True) == [1] * 12
    without = run(False)
    assert without[0] == 1 and without[1:] != [1] * 11  # the track is lost at once


def test_variant_pan_moves_gt_with_the_window(assets: Path) -> None:
    clip = read_clip(assets / "media" / "mot" / "PETS09-S3-MF1")
    panned = apply(clip, "pan")
    assert len(panned.frames) == len(clip.frames)
    path = pan_path(len(clip.frames), clip.size, PanSettings(), clip.name)
    out_size = panned.size
    # a gt box wholly inside the window is the original box moved by the window's transform
    w, h = out_size
    scored = panned.gt[(panned.gt[:, 6] == 1) & (panned.gt[:, 2] > 1) & (panned.gt[:, 3] > 1)
                       & (panned.gt[:, 2] + panned.gt[:, 4] < w - 1) & (panned.gt[:, 3] + panned.gt[:, 5] < h - 1)]
    assert len(scored) > 100
    row = scored[len(scored) // 2]
    f = int(row[0])
    src = clip.gt[(clip.gt[:, 0] == f) & (clip.gt[:, 1] == row[1])][0]
    m = window_matrix(*path[f - 1], out_size)
    assert row[2] == pytest.approx(src[2] + m[0, 2], abs=0.01)
    assert row[3] == pytest.approx(src[3] + m[1, 2], abs=0.01)
    assert row[4:6] == pytest.approx(src[4:6], abs=0.01)
    # the picture moved the same way: the window is the original frame cropped at the path's offset
    x, y = int(round(path[f - 1][0])), int(round(path[f - 1][1]))
    crop = clip.frames[f - 1][y:y + out_size[1], x:x + out_size[0]].astype(float)
    assert np.abs(crop - panned.frames[f - 1].astype(float)).mean() < 12.0
