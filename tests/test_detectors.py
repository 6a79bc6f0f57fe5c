"""The real detectors on real frames: YOLOX-Nano and YOLOv8n (int8) on vtest.avi pedestrians.

The two models are independent, so their agreement on where the people are is a
check on each one's letterbox, decoding and mapping back to source pixels.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from edgecv.engine import COCO_NAMES, Detector, OnnxRuntimeBackend, build_detector, infer_family
from edgecv.engine.ops import box_iou
from edgecv.types import Detections

pytestmark = pytest.mark.integration

FRAMES = (50, 150, 300, 600, 700)  # 1-based; each shows 5 to 9 pedestrians
MODELS = {"yolox": "yolox_nano.onnx", "yolov8": "yolov8n_int8.onnx"}


@pytest.fixture(scope="module")
def frames(vtest: Path) -> dict[int, np.ndarray]:
    capture = cv2.VideoCapture(str(vtest))
    found: dict[int, np.ndarray] = {}
    index = 0
    while index < max(FRAMES):
        ok, image = capture.read()
        assert ok, f"{vtest}: could not read frame {index + 1}"
        index += 1
        if index in FRAMES:
            found[index] = image
    capture.release()
    return found


@pytest.fixture(scope="module")
def people(assets: Path, frames: dict[int, np.ndarray]) -> dict[str, list[Detections]]:
    """Person detections of each model on each frame (one batched ``detect`` call per model)."""
    out = {}
    for family, name in MODELS.items():
        detector = build_detector(assets / "models" / name, family=family, classes=["person"])
        out[family] = detector.detect(list(frames.values()))
    return out


@pytest.mark.parametrize("family, name", MODELS.items())
def test_family_is_inferred(assets: Path, family: str, name: str) -> None:
    backend = OnnxRuntimeBackend(assets / "models" / name)
    assert infer_family(backend) == family
    detector: Detector = build_detector(assets / "models" / name)
    assert detector.family == family
    assert detector.names == list(COCO_NAMES)


def test_yolov8_names_and_size_come_from_metadata(assets: Path) -> None:
    detector = build_detector(assets / "models" / MODELS["yolov8"])
    assert detector.backend.metadata["names"].startswith("{0: 'person'")
    assert detector.names[0] == "person" and detector.names[79] == "toothbrush"
    assert detector.input_size == (640, 640)


@pytest.mark.parametrize("family", MODELS)
def test_finds_plausible_pedestrians(
    people: dict[str, list[Detections]], frames: dict[int, np.ndarray], family: str
) -> None:
    for index, det in zip(frames, people[family]):
        h_img, w_img = frames[index].shape[:2]
        assert len(det) >= 4, f"{family} frame {index}: {len(det)} people"
        assert (det.class_id == 0).all()
        assert (det.score >= 0.35).all() and (det.score <= 1).all()
        x1, y1, x2, y2 = det.xyxy.T
        assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= w_img).all() and (y2 <= h_img).all()
        width, height = x2 - x1, y2 - y1
        assert (height > width).all(), f"{family} frame {index}: boxes {det.xyxy}"
        # the few low-score boxes include far-away people and the odd sign post; confident ones are people
        sure = det.score >= 0.5
        assert sure.sum() >= 4, f"{family} frame {index}: scores {det.score}"
        assert ((height[sure] > 25) & (height[sure] < 400)).all(), f"{family} frame {index}: heights {height}"


def test_the_two_models_agree_on_people(people: dict[str, list[Detections]], frames: dict[int, np.ndarray]) -> None:
    for index, a, b in zip(frames, people["yolox"], people["yolov8"]):
        iou = box_iou(a.xyxy, b.xyxy)
        rows, cols = linear_sum_assignment(iou, maximize=True)
        matched = int((iou[rows, cols] >= 0.5).sum())
        assert matched >= 0.7 * min(len(a), len(b)), f"frame {index}: {matched} of {len(a)} / {len(b)} matched"


def test_batched_and_single_detection_agree(
    assets: Path, frames: dict[int, np.ndarray], people: dict[str, list[Detections]]
) -> None:
    detector = build_detector(assets / "models" / MODELS["yolox"], classes=["person"])
    for image, batched in zip(frames.values(), people["yolox"]):
        (single,) = detector.detect([image])
        np.testing.assert_allclose(single.xyxy, batched.xyxy, atol=1e-3)


def test_every_family_a_config_accepts_has_an_adapter_of_its_kind():
    from edgecv.engine.registry import FAMILIES
    from edgecv.types import DETECTOR_FAMILIES, SEGMENTER_FAMILIES

    assert sorted(n for n, cls in FAMILIES.items() if cls.kind == "detector") == sorted(DETECTOR_FAMILIES)
    assert sorted(n for n, cls in FAMILIES.items() if cls.kind == "segmenter") == sorted(SEGMENTER_FAMILIES)
