"""Engine plumbing on tiny ONNX models built here with onnx.helper (no model files needed).

Each model's output is a known raw detection head (a constant), plus optionally a score
that follows the input image's mean so batch items can be told apart.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

import numpy as np
import pytest
from onnx_models import save_graph
from onnx import TensorProto, helper, numpy_helper

from edgecv import EdgecvError, EdgecvWarning
from edgecv.engine import (
    COCO_NAMES,
    Letterbox,
    OnnxRuntimeBackend,
    Yolov8Detector,
    YoloxDetector,
    bench_model,
    build_detector,
    infer_family,
    load_labels,
)
from edgecv.engine.ops import box_iou, cxcywh_to_xyxy, letterbox, nms
from edgecv.engine.trt_build import fields_of, onnx_input_shape

Dim = Union[int, str]
SIZE = 64  # model input is SIZE x SIZE; YOLOX strides 8/16/32 give 64 + 16 + 4 anchors
YOLOX_N = 84


def make_model(
    path: Path,
    raw: np.ndarray,
    input_shape: Sequence[Dim] = (1, 3, SIZE, SIZE),
    output_shape: Optional[Sequence[Dim]] = None,
    score_mask: Optional[np.ndarray] = None,
    metadata: Optional[dict[str, str]] = None,
    extra_output: bool = False,
) -> Path:
    """Save a model with input ``images`` whose output is ``raw`` + ``score_mask`` * mean(images).

    ``raw`` and ``score_mask`` have shape (1, A, B); the output has the input's batch size.
    """
    mask = np.zeros_like(raw) if score_mask is None else score_mask
    batch = input_shape[0]
    out_shape = list(output_shape) if output_shape is not None else [batch, *raw.shape[1:]]
    nodes = [
        helper.make_node("ReduceMean", ["images"], ["mean4"], axes=[1, 2, 3], keepdims=1),
        helper.make_node("Reshape", ["mean4", "mean_shape"], ["mean"]),
        helper.make_node("Mul", ["mean", "mask"], ["scores"]),
        helper.make_node("Add", ["raw", "scores"], ["output"]),
    ]
    outputs = [helper.make_tensor_value_info("output", TensorProto.FLOAT, out_shape)]
    if extra_output:
        nodes.append(helper.make_node("Identity", ["mean"], ["extra"]))
        outputs.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, [batch, 1, 1]))
    graph = helper.make_graph(
        nodes,
        "head",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, list(input_shape))],
        outputs,
        initializer=[
            numpy_helper.from_array(raw.astype(np.float32), "raw"),
            numpy_helper.from_array(mask.astype(np.float32), "mask"),
            numpy_helper.from_array(np.array([-1, 1, 1], np.int64), "mean_shape"),
        ],
    )
    return save_graph(graph, path, metadata)


def yolox_raw(rows: dict[int, Sequence[float]], classes: int = 2, n: int = YOLOX_N) -> np.ndarray:
    """(1, n, 5+classes) head with the given rows (x, y, log w, log h, obj, cls...), zeros elsewhere."""
    raw = np.zeros((1, n, 5 + classes), np.float32)
    for i, row in rows.items():
        raw[0, i] = row
    return raw


def yolov8_raw(boxes: dict[int, tuple[Sequence[float], int, float]], classes: int = 3, n: int = 10) -> np.ndarray:
    """(1, 4+classes, n) head: anchor -> ((cx, cy, w, h), class id, score)."""
    raw = np.zeros((1, 4 + classes, n), np.float32)
    for anchor, (box, cls, score) in boxes.items():
        raw[0, :4, anchor] = box
        raw[0, 4 + cls, anchor] = score
    return raw


ULTRALYTICS_META = {
    "author": "Ultralytics",
    "task": "detect",
    "names": "{0: 'a', 1: 'b', 2: 'c'}",
    "imgsz": f"[{SIZE}, {SIZE}]",
}

# YOLOX rows: index = level offset + y * cells_per_row + x; level offsets 0 (stride 8), 64 (16), 80 (32).
YOLOX_ROWS = {
    80 + 1 * 2 + 1: [0.9, 0.9, math.log(2), math.log(2), 0.7, 0.6, 0.0],  # stride 32 cell (1, 1): runs off the image
    64 + 2 * 4 + 1: [0.5, 0.25, math.log(2), math.log(1.5), 0.9, 0.1, 0.8],  # stride 16 cell (1, 2)
    3 * 8 + 2: [0.0, 0.0, 0.0, 0.0, 0.5, 0.9, 0.05],  # stride 8 cell (2, 3)
    0: [0.0, 0.0, 0.0, 0.0, 0.2, 0.9, 0.9],  # obj too low
    1: [0.0, 0.0, 0.0, 0.0, 0.9, 0.3, 0.3],  # obj high, obj * cls too low
}


@pytest.fixture
def yolox_model(tmp_path: Path) -> Path:
    return make_model(tmp_path / "yolox.onnx", yolox_raw(YOLOX_ROWS))


@pytest.fixture
def yolov8_model(tmp_path: Path) -> Path:
    raw = yolov8_raw({2: ((32, 32, 20, 10), 1, 0.8)})
    return make_model(tmp_path / "v8.onnx", raw, metadata=ULTRALYTICS_META)


def bgr(w: int, h: int, color: tuple[int, int, int] = (10, 20, 30)) -> np.ndarray:
    image = np.empty((h, w, 3), np.uint8)
    image[:] = color
    return image


def one_line_error(excinfo: pytest.ExceptionInfo[EdgecvError], *parts: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, message
    return message


# -- decoding ------------------------------------------------------------------------------


def test_yolox_decode_gives_exact_source_boxes(yolox_model: Path) -> None:
    det = build_detector(yolox_model, labels=["a", "b"])
    assert isinstance(det, YoloxDetector) and det.input_size == (SIZE, SIZE) and det.num_classes == 2
    # 128x96 source -> scale 0.5, 64x48 image at the top-left of the 64x64 input
    (d,) = det.detect([bgr(128, 96)])
    np.testing.assert_allclose(
        d.xyxy,
        [[16, 48, 80, 96], [24, 40, 40, 56], [57.6, 57.6, 128, 96]],  # last one clipped to the image
        atol=1e-3,
    )
    np.testing.assert_allclose(d.score, [0.72, 0.45, 0.42], atol=1e-6)
    assert d.class_id.tolist() == [1, 0, 0]
    assert d.xyxy.dtype == np.float32 and d.class_id.dtype == np.int32


def test_yolox_preprocess_is_bgr_0_255_top_left(yolox_model: Path) -> None:
    det = build_detector(yolox_model, labels=["a", "b"])
    tensor, box = det.preprocess(bgr(128, 96))
    assert tensor.shape == (3, SIZE, SIZE) and tensor.dtype == np.float32
    assert box == Letterbox(scale=0.5, pad_x=0, pad_y=0, src_w=128, src_h=96)
    for channel, value in enumerate((10, 20, 30)):
        assert (tensor[channel, :48] == value).all()
    assert (tensor[:, 48:] == 114).all()


def test_yolov8_decode_names_and_centred_rgb(yolov8_model: Path) -> None:
    det = build_detector(yolov8_model)
    assert isinstance(det, Yolov8Detector)
    assert det.names == ["a", "b", "c"]
    # 128x64 source -> scale 0.5, 64x32 image centred: 16 px of padding above and below
    tensor, box = det.preprocess(bgr(128, 64))
    assert box == Letterbox(scale=0.5, pad_x=0, pad_y=16, src_w=128, src_h=64)
    np.testing.assert_allclose(tensor[:, 16:48, :].reshape(3, -1).mean(1), [30 / 255, 20 / 255, 10 / 255], rtol=1e-6)
    np.testing.assert_allclose(tensor[:, :16], 114 / 255, rtol=1e-6)
    np.testing.assert_allclose(tensor[:, 48:], 114 / 255, rtol=1e-6)
    (d,) = det.detect([bgr(128, 64)])
    np.testing.assert_allclose(d.xyxy, [[44, 22, 84, 42]], atol=1e-4)
    np.testing.assert_allclose(d.score, [0.8], atol=1e-6)
    assert d.class_id.tolist() == [1]


def test_postprocess_on_empty_output_gives_empty_detections(tmp_path: Path) -> None:
    det = build_detector(make_model(tmp_path / "m.onnx", yolov8_raw({})), labels=["a", "b", "c"])
    (d,) = det.detect([bgr(64, 64)])
    assert len(d) == 0 and d.xyxy.shape == (0, 4)


# -- batching ------------------------------------------------------------------------------


def batch_model(tmp_path: Path, batch: Dim) -> Path:
    """Yolov8-shaped: anchor 0 holds a class-0 box whose score is the image mean (0-1)."""
    raw = yolov8_raw({0: ((32, 32, 16, 16), 0, 0.0)})
    mask = np.zeros_like(raw)
    mask[0, 4, 0] = 1.0
    return make_model(tmp_path / f"batch_{batch}.onnx", raw, input_shape=(batch, 3, SIZE, SIZE), score_mask=mask)


@pytest.mark.parametrize(
    "batch, max_batch, n_images, calls",
    [("batch", 16, 20, [16, 4]), (1, 1, 3, [1, 1, 1]), (2, 2, 3, [2, 1])],
)
def test_detect_runs_in_chunks_of_max_batch_and_keeps_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batch: Dim, max_batch: int, n_images: int, calls: list[int]
) -> None:
    det = build_detector(batch_model(tmp_path, batch), labels=["a", "b", "c"], conf=0.5)
    assert det.backend.max_batch == max_batch
    seen: list[int] = []
    infer = det.backend.infer

    def counting_infer(b: np.ndarray) -> list[np.ndarray]:
        seen.append(len(b))
        return infer(b)

    monkeypatch.setattr(det.backend, "infer", counting_infer)
    white = [i % 3 == 0 for i in range(n_images)]
    results = det.detect([bgr(SIZE, SIZE, (255, 255, 255) if w else (0, 0, 0)) for w in white])
    assert seen == calls
    assert [len(d) for d in results] == [int(w) for w in white]


def test_fixed_batch_backend_pads_short_batches(tmp_path: Path) -> None:
    backend = OnnxRuntimeBackend(batch_model(tmp_path, 2))
    (out,) = backend.infer(np.ones((1, 3, SIZE, SIZE), np.float32))
    assert out.shape == (1, 7, 10) and out[0, 4, 0] == pytest.approx(1.0)


# -- NMS and class filter ------------------------------------------------------------------


def reference_nms(xyxy: np.ndarray, scores: np.ndarray, classes: np.ndarray, thr: float) -> list[int]:
    """Textbook greedy class-aware NMS, one box at a time."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    kept: list[int] = []
    for i in order:
        if all(classes[k] != classes[i] or box_iou(xyxy[k], xyxy[i])[0, 0] <= thr for k in kept):
            kept.append(i)
    return kept


@pytest.mark.parametrize(
    "boxes, scores, classes, thr, expected",
    [
        ([[0, 0, 10, 10], [1, 1, 11, 11]], [0.8, 0.9], [0, 0], 0.5, [1]),  # same class: lower one dropped
        ([[0, 0, 10, 10], [1, 1, 11, 11]], [0.8, 0.9], [0, 1], 0.5, [1, 0]),  # different classes: both kept
        ([[0, 0, 10, 10], [0, 0, 10, 6]], [0.9, 0.8], [0, 0], 0.5, [0]),  # IoU 0.6 > 0.5
        ([[0, 0, 10, 10], [0, 0, 10, 6]], [0.9, 0.8], [0, 0], 0.7, [0, 1]),  # IoU 0.6 <= 0.7
        ([[0, 0, 1.9, 1.9], [0.9, 0.9, 1.9, 1.9]], [0.9, 0.8], [0, 0], 0.5, [0, 1]),  # sub-pixel boxes stay float
        ([[-100, -100, 0, 0], [-100, -100, 0, 0]], [0.9, 0.8], [0, 1], 0.5, [0, 1]),  # negative coords, 2 classes
        ([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], [0.5, 0.9, 0.7], [0, 0, 0], 0.5, [1, 2]),  # max_det 2
    ],
)
def test_nms_cases(boxes: list, scores: list, classes: list, thr: float, expected: list[int]) -> None:
    keep = nms(np.array(boxes, np.float32), np.array(scores, np.float32), np.array(classes), thr, max_det=2)
    assert keep.tolist() == expected


def test_nms_matches_reference_on_random_boxes() -> None:
    rng = np.random.default_rng(7)
    xy = rng.uniform(-20, 200, (300, 2))
    xyxy = np.concatenate([xy, xy + rng.uniform(5, 60, (300, 2))], axis=1).astype(np.float32)
    scores = rng.uniform(0, 1, 300).astype(np.float32)
    classes = rng.integers(0, 4, 300)
    for thr in (0.3, 0.5, 0.7):
        expected = reference_nms(xyxy, scores, classes, thr)
        assert nms(xyxy, scores, classes, thr, max_det=1000).tolist() == expected
        assert nms(xyxy, scores, classes, thr, max_det=5).tolist() == expected[:5]


def test_nms_in_detector_suppresses_same_class_only(tmp_path: Path) -> None:
    raw = yolov8_raw({0: ((32, 32, 20, 20), 0, 0.9), 1: ((33, 33, 20, 20), 0, 0.8), 2: ((32, 32, 20, 20), 1, 0.7)})
    det = build_detector(make_model(tmp_path / "m.onnx", raw), labels=["a", "b", "c"])
    (d,) = det.detect([bgr(SIZE, SIZE)])
    assert d.class_id.tolist() == [0, 1]
    np.testing.assert_allclose(d.score, [0.9, 0.7], atol=1e-6)


def test_class_filter_applies_before_nms_and_max_det(tmp_path: Path) -> None:
    raw = yolov8_raw({0: ((32, 32, 20, 20), 0, 0.9), 1: ((10, 10, 8, 8), 2, 0.6)})
    path = make_model(tmp_path / "m.onnx", raw)
    (d,) = build_detector(path, labels=["a", "b", "c"], classes=["c"], max_det=1).detect([bgr(SIZE, SIZE)])
    assert d.class_id.tolist() == [2]
    (d,) = build_detector(path, labels=["a", "b", "c"], classes=[]).detect([bgr(SIZE, SIZE)])
    assert d.class_id.tolist() == [0, 2]  # an empty filter keeps every class


def test_unknown_class_lists_valid_ones(yolov8_model: Path) -> None:
    with pytest.raises(EdgecvError) as excinfo:
        build_detector(yolov8_model, classes=["a", "dog"])
    one_line_error(excinfo, "'dog'", "valid classes: a, b, c")


# -- names and labels ----------------------------------------------------------------------


def test_labels_file_wins_over_metadata_names(tmp_path: Path, yolov8_model: Path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("x\n  y \nz\n\n")
    assert load_labels(labels) == ["x", "y", "z"]
    assert build_detector(yolov8_model, labels=labels).names == ["x", "y", "z"]


@pytest.mark.parametrize(
    "text, expected",
    [("x\ny\n", "expected 3 class names (one per class), got 2"), ("x\n\ny\nz\n", "line 2"), ("", "empty file")],
)
def test_bad_labels_files(tmp_path: Path, yolov8_model: Path, text: str, expected: str) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text(text)
    with pytest.raises(EdgecvError) as excinfo:
        build_detector(yolov8_model, labels=labels)
    one_line_error(excinfo, expected)


def test_missing_labels_file(tmp_path: Path) -> None:
    with pytest.raises(EdgecvError) as excinfo:
        load_labels(tmp_path / "nope.txt")
    one_line_error(excinfo, "nope.txt")


def test_default_names_coco_for_80_classes_else_generic(tmp_path: Path) -> None:
    coco = make_model(tmp_path / "coco.onnx", yolov8_raw({}, classes=80, n=200))
    assert build_detector(coco).names == list(COCO_NAMES)
    with pytest.warns(EdgecvWarning, match="2 classes and no class names"):
        det = build_detector(make_model(tmp_path / "two.onnx", yolov8_raw({}, classes=2)))
    assert det.names == ["class0", "class1"]


# -- family inference and signature checks -------------------------------------------------


def test_infer_family_from_shape_and_metadata(tmp_path: Path, yolox_model: Path, yolov8_model: Path) -> None:
    assert infer_family(OnnxRuntimeBackend(yolox_model)) == "yolox"
    assert infer_family(OnnxRuntimeBackend(yolov8_model)) == "yolov8"  # metadata
    plain_v8 = make_model(tmp_path / "plain.onnx", yolov8_raw({}))
    assert infer_family(OnnxRuntimeBackend(plain_v8)) == "yolov8"  # shape


def test_unknown_output_shape_asks_for_family(tmp_path: Path) -> None:
    path = make_model(tmp_path / "square.onnx", np.zeros((1, 10, 10), np.float32))
    for call in (lambda: infer_family(OnnxRuntimeBackend(path)), lambda: build_detector(path)):
        with pytest.raises(EdgecvError) as excinfo:
            call()
        one_line_error(excinfo, str(path), "(1, 10, 10)", "set family explicitly")


@pytest.mark.parametrize(
    "model, family, expected",
    [
        ("v8", "yolox", "family 'yolox' expects output (1, N, 5+C), got (1, 7, 10)"),
        ("yolox", "yolov8", "family 'yolov8' expects output (1, 4+C, N), got (1, 84, 7)"),
        (
            "yolox_bad_n",
            "yolox",
            "family 'yolox' expects output (1, N, 5+C), got (1, 100, 7) "
            "(a 64x64 input with strides 8, 16, 32 gives N = 84)",
        ),
        ("two_outputs", "yolov8", "family 'yolov8' expects 1 output, got 2 (output, extra)"),
    ],
)
def test_explicit_family_must_match_output(tmp_path: Path, model: str, family: str, expected: str) -> None:
    paths = {
        "v8": lambda p: make_model(p, yolov8_raw({})),
        "yolox": lambda p: make_model(p, yolox_raw({})),
        "yolox_bad_n": lambda p: make_model(p, yolox_raw({}, n=100)),
        "two_outputs": lambda p: make_model(p, yolov8_raw({}), extra_output=True),
    }
    path = paths[model](tmp_path / f"{model}.onnx")
    with pytest.raises(EdgecvError) as excinfo:
        build_detector(path, family=family, labels=["a", "b", "c"][: 2 if model != "v8" else 3])
    assert one_line_error(excinfo) == f"model {path}: {expected}"


def test_ultralytics_task_other_than_detect_or_segment_is_refused(tmp_path: Path) -> None:
    path = make_model(tmp_path / "pose.onnx", yolov8_raw({}), metadata={**ULTRALYTICS_META, "task": "pose"})
    with pytest.raises(EdgecvError) as excinfo:
        build_detector(path)
    one_line_error(excinfo, "task 'pose' is not supported; supported: detect, segment")
    # task segment selects yolov8-seg, which checks for its two outputs (tests/test_segmentation.py)
    seg = make_model(tmp_path / "seg.onnx", yolov8_raw({}), metadata={**ULTRALYTICS_META, "task": "segment"})
    with pytest.raises(EdgecvError) as excinfo:
        build_detector(seg)
    one_line_error(excinfo, "family 'yolov8-seg' expects 2 outputs, got 1")


def test_dynamic_input_size_comes_from_imgsz_metadata(tmp_path: Path) -> None:
    raw = yolov8_raw({0: ((32, 32, 16, 16), 0, 0.9)})
    dynamic = ("batch", 3, "height", "width")
    path = make_model(
        tmp_path / "dyn.onnx",
        raw,
        input_shape=dynamic,
        output_shape=("batch", "rows", "anchors"),
        metadata=ULTRALYTICS_META,
    )
    det = build_detector(path)
    assert det.input_size == (SIZE, SIZE) and det.num_classes == 3 and det.backend.max_batch == 16
    assert len(det.detect([bgr(SIZE, SIZE)])[0]) == 1
    bare = make_model(tmp_path / "bare.onnx", raw, input_shape=dynamic)
    with pytest.raises(EdgecvError) as excinfo:
        build_detector(bare)
    one_line_error(excinfo, "expected a fixed input size or 'imgsz' metadata, got input (?, 3, ?, ?)")


# -- loading errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("missing", "expected an ONNX model file, found no such file"),
        ("directory", "expected an ONNX model file, found a directory"),
        ("text", "expected an ONNX model onnxruntime can load, found one it rejects"),
        ("truncated", "expected an ONNX model onnxruntime can load, found one it rejects"),
    ],
)
def test_bad_model_files_give_one_line_errors(tmp_path: Path, yolox_model: Path, kind: str, expected: str) -> None:
    path = tmp_path / f"{kind}.onnx"
    if kind == "directory":
        path.mkdir()
    elif kind == "text":
        path.write_text("this is not a model\n")
    elif kind == "truncated":
        path.write_bytes(yolox_model.read_bytes()[:200])
    with pytest.raises(EdgecvError) as excinfo:
        build_detector(path)
    one_line_error(excinfo, f"model {path}: {expected}")


def _trt_probe():
    from edgecv.engine.tensorrt import probe

    return probe()


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        pytest.param(
            {"backend": "tensorrt"},
            "backend 'tensorrt' requested but TensorRT cannot run here",
            marks=pytest.mark.skipif(_trt_probe().usable, reason="TensorRT runs on this machine"),
        ),
        ({"backend": "openvino"}, "backend: expected one of auto, onnxruntime, tensorrt, got 'openvino'"),
        ({"family": "ssd"}, "family: expected one of auto, yolox, yolov8, yolov8-seg, semseg, got 'ssd'"),
        ({"conf": 1.5}, "conf: expected a number between 0 and 1, got 1.5"),
        ({"threads": 0}, "threads: expected a positive number or None, got 0"),
    ],
)
def test_bad_options(yolox_model: Path, kwargs: dict, expected: str) -> None:
    with pytest.raises(EdgecvError) as excinfo:
        build_detector(yolox_model, **kwargs)
    one_line_error(excinfo, expected)


def test_backend_spec_and_input_checks(yolov8_model: Path) -> None:
    backend = OnnxRuntimeBackend(yolov8_model, threads=1, providers=["CPUExecutionProvider"])
    assert backend.name == "onnxruntime" and backend.device == "cpu"
    assert backend.input_name == "images" and backend.input_shape == (1, 3, SIZE, SIZE)
    assert backend.input_dtype == np.float32 and backend.output_names == ["output"]
    assert backend.output_shapes == [(1, 7, 10)] and backend.max_batch == 1
    assert backend.metadata["author"] == "Ultralytics"
    outputs = backend.infer(np.zeros((1, 3, SIZE, SIZE), np.float64))  # cast to the input dtype
    assert outputs[0].shape == (1, 7, 10)
    with pytest.raises(EdgecvError) as excinfo:
        backend.infer(np.zeros((1, 3, 32, 32), np.float32))
    one_line_error(excinfo, "expected input (1, 3, 64, 64) with batch 1..1, got (1, 3, 32, 32)")
    with pytest.raises(EdgecvError) as excinfo:
        OnnxRuntimeBackend(yolov8_model, providers=["NopeExecutionProvider"])
    one_line_error(excinfo, "'NopeExecutionProvider'")


# -- small helpers and bench ---------------------------------------------------------------


def test_letterbox_helpers() -> None:
    canvas, box = letterbox(bgr(SIZE, SIZE), (SIZE, SIZE), center=True)
    assert box == Letterbox(1.0, 0, 0, SIZE, SIZE) and (canvas == bgr(SIZE, SIZE)).all()
    box = Letterbox(scale=0.5, pad_x=4, pad_y=2, src_w=100, src_h=50)
    np.testing.assert_allclose(
        box.to_source(np.array([[4, 2, 24, 12], [-10, -10, 80, 80]])), [[0, 0, 40, 20], [0, 0, 100, 50]]
    )
    np.testing.assert_allclose(cxcywh_to_xyxy(np.array([[10.0, 20, 4, 6]])), [[8, 17, 12, 23]])
    np.testing.assert_allclose(
        box_iou(np.array([[0, 0, 10, 10]]), np.array([[5, 0, 15, 10], [20, 20, 30, 30]])), [[1 / 3, 0]]
    )
    with pytest.raises(ValueError):
        letterbox(np.zeros((10, 10), np.uint8), (SIZE, SIZE), center=True)


def test_bench_model_reports_timings(yolov8_model: Path) -> None:
    report = bench_model(build_detector(yolov8_model), n=3, warmup=1)
    assert report["family"] == "yolov8" and report["input_size"] == [SIZE, SIZE]
    assert report["frame_size"] == [1280, 720] and report["runs"] == 3
    for key in ("infer_ms", "preprocess_ms", "postprocess_ms", "frame_ms", "infer_fps", "frame_fps"):
        assert report[key] > 0


def test_fields_of_reads_one_protobuf_field_lazily_and_onnx_input_shape_uses_it(tmp_path: Path) -> None:
    message = b"\x08\x05" + b"\x12\x01a" + b"\x12\x01b" + b"\x12\x05x"  # 1: 5, 2: "a", 2: "b", 2: truncated
    values = fields_of(message, 2, 2)
    assert [next(values), next(values)] == [b"a", b"b"]  # read up to what is asked for
    with pytest.raises(ValueError, match="truncated field"):
        next(values)
    assert next(fields_of(message, 1, 0)) == 5
    assert list(fields_of(message[:5], 2, 0)) == []  # field 2 has wire type 2, not 0
    images = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 8, 8])
    weight = helper.make_tensor_value_info("w", TensorProto.FLOAT, [3, 1, 1])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, 8, 8])
    init = numpy_helper.from_array(np.ones((3, 1, 1), np.float32), "w")
    graph = helper.make_graph([helper.make_node("Mul", ["images", "w"], ["y"])], "g", [images, weight], [out], [init])
    path = tmp_path / "init_input.onnx"
    path.write_bytes(helper.make_model(graph).SerializeToString())
    assert onnx_input_shape(path) == ("images", (-1, 3, 8, 8))  # an initializer listed as input is no input
