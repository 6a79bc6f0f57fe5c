"""The tracker's appearance cue (tracking/appearance.py): descriptors, distances, and what it is for: two
objects whose boxes overlap keep their ids where IoU and motion alone swap them."""
from __future__ import annotations

import numpy as np
import pytest

from edgecv.config import ConfigError, parse
from edgecv.pipeline import tracker_config
from edgecv.tracking import appearance
from edgecv.tracking.bytetrack import ByteTracker, TrackerConfig
from edgecv.types import Detections

RED, BLUE, GREY = (40, 40, 200), (200, 40, 40), (90, 90, 90)  # BGR


def _image(*patches: tuple[tuple[int, int, int, int], tuple[int, int, int]]) -> np.ndarray:
    img = np.full((240, 400, 3), GREY, np.uint8)
    for (x1, y1, x2, y2), colour in patches:
        img[y1:y2, x1:x2] = colour
    return img


def test_same_colours_are_near_different_colours_far() -> None:
    img = _image(((20, 20, 80, 200), RED), ((200, 20, 260, 200), BLUE), ((300, 20, 360, 200), RED))
    feats, ok = appearance.describe(img, np.array([[20, 20, 80, 200], [200, 20, 260, 200], [300, 20, 360, 200],
                                                   [22, 24, 82, 204]], np.float64))
    assert ok.all() and feats.shape == (4, appearance.SIZE)
    d = appearance.distance(feats, feats)
    assert d[0, 2] < 0.05 and d[0, 3] < 0.1  # the same colours, elsewhere or a few pixels off
    assert d[0, 1] == pytest.approx(1.0)  # red against blue: as different as the scale allows
    assert np.allclose(np.diag(d), 0.0) and np.allclose(d, d.T)


def test_the_descriptor_is_the_mean_colour_of_each_cell_in_ycrcb() -> None:
    img = _image(((100, 40, 200, 200), RED))
    feats, ok = appearance.describe(img, np.array([[100, 40, 200, 200]], np.float64))
    b, g, r = RED
    y, cr, cb = 0.114 * b + 0.587 * g + 0.299 * r, 0.5 * r - 0.419 * g - 0.081 * b, 0.5 * b - 0.331 * g - 0.169 * r
    assert ok[0] and np.allclose(feats.reshape(-1, 3), [y, cr, cb], atol=0.5)


def test_grey_and_four_channel_frames_are_described_like_their_bgr() -> None:
    img = _image(((100, 40, 200, 200), RED), ((220, 40, 300, 200), BLUE))
    boxes = np.array([[100, 40, 200, 200], [220, 40, 300, 200]], np.float64)
    bgr, _ = appearance.describe(img, boxes)
    bgra, _ = appearance.describe(np.dstack([img, np.full(img.shape[:2], 255, np.uint8)]), boxes)
    assert np.array_equal(bgr, bgra)
    grey = img.mean(axis=2).astype(np.uint8)
    feats, ok = appearance.describe(grey, boxes)
    as_bgr, _ = appearance.describe(np.dstack([grey] * 3), boxes)
    assert ok.all() and np.allclose(feats, as_bgr, atol=1e-3)


def test_boxes_that_cannot_be_described_are_marked_so() -> None:
    img = _image()
    boxes = np.array([[10, 10, 12, 12],  # too small for the grid
                      [500, 10, 560, 100],  # outside the image
                      [np.nan, 0, 50, 100],  # not a box
                      [10, 10, 70, 150],  # fine
                      [100, 10, 160, 150]], np.float64)  # fine, but not wanted
    feats, ok = appearance.describe(img, boxes, wanted=np.array([True, True, True, True, False]))
    assert ok.tolist() == [False, False, False, True, False]
    assert not feats[~ok].any()
    empty, none = appearance.describe(img, np.zeros((0, 4)))
    assert empty.shape == (0, appearance.SIZE) and not len(none)


def _bounce(weight: float) -> list[dict[int, int]]:
    """A red and a blue person walk towards each other, meet (boxes overlapping by 80 %) and walk back: the
    constant-velocity prediction carries each track into the other's box. Detection index -> id per frame."""
    tracker = ByteTracker(TrackerConfig(appearance_weight=weight))
    ids = []
    for f in range(30):
        t = f if f < 12 else 24 - f
        xa, xb = 60 + 8 * t, 260 - 8 * t
        img = _image(((xb, 60, xb + 40, 180), BLUE), ((xa, 60, xa + 40, 180), RED))  # red in front
        boxes = np.array([[xa, 60, xa + 40, 180], [xb, 60, xb + 40, 180]], np.float32)
        out = tracker.update(Detections(boxes, np.array([0.9, 0.9], np.float32), np.zeros(2, np.int32)), image=img)
        ids.append(dict(zip(out.data["det_index"].tolist(), out.track_id.tolist())))
    return ids


def test_two_people_meeting_and_turning_back_keep_their_ids_with_appearance_and_swap_without() -> None:
    without, with_ = _bounce(0.0), _bounce(TrackerConfig.appearance_weight)  # off, the default
    assert without[2] == with_[2] == {0: 1, 1: 2}
    assert without[-1] == {0: 2, 1: 1}  # IoU and motion alone: swapped (the case the cue is for)
    assert all(frame == {0: 1, 1: 2} for frame in with_[2:])  # with it: red is 1 and blue is 2 throughout


def test_without_a_frame_the_tracker_runs_on_boxes_alone() -> None:
    boxes = np.array([[10, 10, 50, 100]], np.float32)
    tracker = ByteTracker(TrackerConfig())
    for _ in range(3):
        out = tracker.update(Detections(boxes, np.array([0.9], np.float32), np.zeros(1, np.int32)))
    assert out.track_id.tolist() == [1]


def test_config_field_reaches_the_tracker_and_is_validated(assets) -> None:
    def raw(weight: object) -> dict:
        return {"node_id": "n", "mqtt": {"enabled": False},
                "model": {"path": str(assets / "models" / "yolox_nano.onnx")},
                "cameras": {"c": {"source": str(assets / "media" / "vtest.avi")}},
                "tracker": {"appearance_weight": weight}}

    assert tracker_config(parse(raw(0.5)), 10.0, "yolox").appearance_weight == 0.5
    assert tracker_config(parse(raw(0)), 10.0, "yolox").appearance_weight == 0.0  # off
    with pytest.raises(ConfigError) as e:
        parse(raw(-1))
    assert len(e.value.problems) == 1 and e.value.problems[0].startswith("tracker.appearance_weight")
    with pytest.raises(ValueError, match="appearance_weight"):
        TrackerConfig(appearance_weight=-1.0)
