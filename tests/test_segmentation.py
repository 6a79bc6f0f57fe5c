"""Segmentation adapters: `yolov8-seg` instance masks on ONNX models built here (constant outputs with the
Ultralytics segment signature) against an independent per-detection numpy reference, and `semseg`
(TwinLiteNet) on the BDD stills."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import cv2
import numpy as np
import pytest
from onnx_models import save_graph
from onnx import TensorProto, helper, numpy_helper

from edgecv import EdgecvError
from edgecv.engine import OnnxRuntimeBackend, build_detector, infer_family
from edgecv.engine.segmentation import SemanticSegmenter, Yolov8SegDetector
from edgecv.types import SemanticMasks

SIZE = 64  # model input SIZE x SIZE
PROTO = SIZE // 4  # prototype maps PROTO x PROTO
M = 32  # mask coefficients
C = 3  # classes
N = 64  # candidate rows (> 4 + C + M)
NAMES = ["a", "b", "c"]


def constant_model(path: Path, outputs: dict[str, np.ndarray], metadata: Optional[dict[str, str]] = None) -> Path:
    """A model with input `images` (1, 3, SIZE, SIZE) whose outputs are the given constants."""
    nodes = [helper.make_node("Identity", [f"{name}_const"], [name]) for name in outputs]
    graph = helper.make_graph(
        nodes, "const", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, SIZE, SIZE])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, list(a.shape)) for name, a in outputs.items()],
        initializer=[numpy_helper.from_array(a.astype(np.float32), f"{name}_const") for name, a in outputs.items()],
    )
    return save_graph(graph, path, metadata)


def letterbox_params(src_w: int, src_h: int) -> tuple[float, int, int, int, int]:
    """scale, new_w, new_h, pad_x, pad_y of a centred letterbox into SIZE x SIZE (written out independently)."""
    scale = min(SIZE / src_w, SIZE / src_h)
    new_w, new_h = round(src_w * scale), round(src_h * scale)
    return scale, new_w, new_h, (SIZE - new_w) // 2, (SIZE - new_h) // 2


def seg_scene(src_w: int, src_h: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[tuple]]:
    """Raw detection rows, prototypes and the planted detections (source box, class, score, anchor row).

    The prototypes are smooth random fields plus a constant map; each detection's coefficients give a
    blob that the box crop cuts through, so masks have both curved and straight (cropped) edges.
    """
    rng = np.random.default_rng(seed)
    protos = np.stack([cv2.GaussianBlur(rng.normal(0, 4, (PROTO, PROTO)).astype(np.float32), (0, 0), 1.5)
                       for _ in range(M)])
    protos[0] = 1.0  # a bias map
    scale, _, _, pad_x, pad_y = letterbox_params(src_w, src_h)
    planted = [((0.10, 0.15, 0.55, 0.80), 0, 0.9, 5), ((0.50, 0.30, 0.95, 0.95), 2, 0.8, 17),
               ((0.05, 0.60, 0.40, 0.98), 1, 0.7, 40)]
    raw = np.zeros((1, 4 + C + M, N), np.float32)
    scene = []
    for (fx1, fy1, fx2, fy2), cls, score, row in planted:
        box = np.array([fx1 * src_w, fy1 * src_h, fx2 * src_w, fy2 * src_h], np.float32)
        bx = box * scale + np.array([pad_x, pad_y, pad_x, pad_y], np.float32)  # input pixels
        raw[0, :4, row] = [(bx[0] + bx[2]) / 2, (bx[1] + bx[3]) / 2, bx[2] - bx[0], bx[3] - bx[1]]
        raw[0, 4 + cls, row] = score
        coef = rng.normal(0, 1, M).astype(np.float32)
        coef[0] = 1.0
        raw[0, 4 + C:, row] = coef
        scene.append((box, cls, score, row))
    return raw, protos[None], scene


def reference_mask(raw: np.ndarray, protos: np.ndarray, row: int, src_w: int, src_h: int) -> np.ndarray:
    """One detection's mask, written as a loop: sigmoid(coef . protos), crop, unpad, resize, > 0.5."""
    coef = raw[0, 4 + C:, row].astype(np.float64)
    p = np.zeros((PROTO, PROTO), np.float64)
    for k in range(M):
        p += coef[k] * protos[0, k]
    p = 1.0 / (1.0 + np.exp(-p))
    cx, cy, w, h = raw[0, :4, row]
    x1, y1, x2, y2 = ((cx - w / 2) / 4, (cy - h / 2) / 4, (cx + w / 2) / 4, (cy + h / 2) / 4)
    for i in range(PROTO):
        for j in range(PROTO):
            if not (x1 <= j < x2 and y1 <= i < y2):
                p[i, j] = 0.0
    _, new_w, new_h, pad_x, pad_y = letterbox_params(src_w, src_h)
    assert pad_x % 4 == 0 and pad_y % 4 == 0 and new_w % 4 == 0 and new_h % 4 == 0  # whole prototype cells
    p = p[pad_y // 4:(pad_y + new_h) // 4, pad_x // 4:(pad_x + new_w) // 4]
    return cv2.resize(p.astype(np.float32), (src_w, src_h), interpolation=cv2.INTER_LINEAR) > 0.5


def seg_model(tmp_path: Path, raw: np.ndarray, protos: np.ndarray, swap: bool = False,
              metadata: Optional[dict[str, str]] = None) -> Path:
    outs = {"output0": raw, "output1": protos}
    if swap:  # the prototype output first: the adapter finds the outputs by rank
        outs = {"protos": protos, "dets": raw}
    return constant_model(tmp_path / "seg.onnx", outs, metadata)


@pytest.mark.parametrize("src_w, src_h", [(128, 128), (128, 64), (64, 128)], ids=["square", "wide", "tall"])
def test_yolov8_seg_masks_match_reference(tmp_path: Path, src_w: int, src_h: int) -> None:
    raw, protos, scene = seg_scene(src_w, src_h)
    path = seg_model(tmp_path, raw, protos, swap=(src_w == 64))
    det = build_detector(path, labels=NAMES, conf=0.5)
    assert isinstance(det, Yolov8SegDetector) and det.family == "yolov8-seg" and det.num_classes == C
    image = np.zeros((src_h, src_w, 3), np.uint8)
    (d,) = det.detect([image])
    assert d.mask is not None and d.mask.shape == (len(scene), src_h, src_w) and d.mask.dtype == bool
    assert d.score.tolist() == pytest.approx([s for _, _, s, _ in scene])  # sorted by score, all kept
    for k, (box, cls, _, row) in enumerate(scene):
        assert int(d.class_id[k]) == cls
        np.testing.assert_allclose(d.xyxy[k], np.clip(box, 0, [src_w, src_h, src_w, src_h]), atol=1e-3)
        ref = reference_mask(raw, protos, row, src_w, src_h)
        got = d.mask[k]
        assert ref.sum() > 100, "the planted blob must be visible"
        union = (ref | got).sum()
        assert (ref ^ got).sum() <= 0.01 * union, f"detection {k}: {(ref ^ got).sum()} of {union} pixels differ"
        assert d.data["mask_area"][k] == got.sum()
        # nothing outside the box (the crop is made of whole prototype cells: up to one cell beyond it)
        ys, xs = np.nonzero(got)
        x1, y1, x2, y2 = box
        cell = 4 / letterbox_params(src_w, src_h)[0] + 1  # one prototype cell in source pixels, + the bilinear rim
        assert xs.min() >= x1 - cell and xs.max() <= x2 + cell and ys.min() >= y1 - cell and ys.max() <= y2 + cell


def test_yolov8_seg_mask_of_a_source_not_aligned_to_the_prototype_grid(tmp_path: Path) -> None:
    """Padding of 13.5 input pixels (3.4 prototype cells): the unpadded region is resampled, not rounded."""
    src_w, src_h = 150, 90  # scale 64/150, new 64x38, pad_y 13
    raw, protos, scene = seg_scene(src_w, src_h, seed=3)
    det = build_detector(seg_model(tmp_path, raw, protos), labels=NAMES, conf=0.5)
    (d,) = det.detect([np.zeros((src_h, src_w, 3), np.uint8)])
    scale, _, _, pad_x, pad_y = letterbox_params(src_w, src_h)
    for k, (box, _, _, row) in enumerate(scene):
        # reference: sample the cropped probability map at every source pixel's centre, bilinear by hand
        coef = raw[0, 4 + C:, row]
        p = 1 / (1 + np.exp(-np.tensordot(coef, protos[0], axes=1)))
        cx, cy, w, h = raw[0, :4, row]
        jj, ii = np.meshgrid(np.arange(PROTO), np.arange(PROTO))
        p = p * ((jj >= (cx - w / 2) / 4) & (jj < (cx + w / 2) / 4) & (ii >= (cy - h / 2) / 4) & (ii < (cy + h / 2) / 4))
        u, v = np.meshgrid(np.arange(src_w), np.arange(src_h))
        px = ((u + 0.5) * scale + pad_x) / 4 - 0.5
        py = ((v + 0.5) * scale + pad_y) / 4 - 0.5
        x0, y0 = np.floor(px).astype(int), np.floor(py).astype(int)
        fx, fy = px - x0, py - y0

        # the cells the image covers: rows 3 (13 / 4 = 3.25) .. 12 (ceil((13 + 38.4) / 4) = 13, exclusive)
        r0, r1 = int(np.floor(pad_y / 4)), int(np.ceil((pad_y + src_h * scale) / 4))
        assert (r0, r1) == (3, 13) and pad_x == 0

        def at(y: np.ndarray, x: np.ndarray) -> np.ndarray:  # edges replicate from the kept cells
            return p[np.clip(y, r0, r1 - 1), np.clip(x, 0, PROTO - 1)]

        val = (at(y0, x0) * (1 - fx) * (1 - fy) + at(y0, x0 + 1) * fx * (1 - fy)
               + at(y0 + 1, x0) * (1 - fx) * fy + at(y0 + 1, x0 + 1) * fx * fy)
        ref = val > 0.5
        union = (ref | d.mask[k]).sum()
        assert union > 50 and (ref ^ d.mask[k]).sum() <= 0.01 * union


def test_yolov8_seg_family_is_inferred_from_outputs_and_metadata(tmp_path: Path) -> None:
    raw, protos, _ = seg_scene(128, 128)
    path = seg_model(tmp_path, raw, protos)
    assert infer_family(OnnxRuntimeBackend(path)) == "yolov8-seg"
    meta = {"author": "Ultralytics", "task": "segment", "names": str(dict(enumerate(NAMES))), "imgsz": "[64, 64]"}
    meta_path = constant_model(tmp_path / "meta.onnx", {"output0": raw, "output1": protos}, meta)
    det = build_detector(meta_path)
    assert det.family == "yolov8-seg" and det.names == NAMES


def test_yolov8_seg_class_filter_and_empty_output(tmp_path: Path) -> None:
    raw, protos, scene = seg_scene(128, 128)
    path = seg_model(tmp_path, raw, protos)
    (d,) = build_detector(path, labels=NAMES, classes=["c"], conf=0.5).detect([np.zeros((128, 128, 3), np.uint8)])
    assert d.class_id.tolist() == [2] and d.mask.shape == (1, 128, 128)
    (d,) = build_detector(path, labels=NAMES, conf=0.95).detect([np.zeros((128, 128, 3), np.uint8)])
    assert len(d) == 0 and d.mask.shape == (0, 128, 128) and d.data["mask_area"].shape == (0,)


def test_yolov8_seg_rejects_a_detect_model_and_vice_versa(tmp_path: Path) -> None:
    raw, protos, _ = seg_scene(128, 128)
    det_only = constant_model(tmp_path / "det.onnx", {"output0": raw[:, : 4 + C, :]})
    with pytest.raises(EdgecvError, match="family 'yolov8-seg' expects 2 outputs, got 1"):
        build_detector(det_only, family="yolov8-seg", labels=NAMES)
    with pytest.raises(EdgecvError, match="family 'yolov8' expects 1 output, got 2"):
        build_detector(seg_model(tmp_path, raw, protos), family="yolov8", labels=NAMES)
    two_protos = constant_model(tmp_path / "bad.onnx", {"a": protos, "b": protos})
    with pytest.raises(EdgecvError, match=r"expects outputs \(1, 4\+C\+M, N\) and prototypes"):
        build_detector(two_protos, family="yolov8-seg")


# -- semantic segmentation ---------------------------------------------------------------------


def test_semseg_synthetic_names_letterbox_and_nearest_upsampling(tmp_path: Path) -> None:
    """Outputs at half the input size; K = 2 gives one mask named by alias, K = 3 gives two masks."""
    da = np.zeros((1, 2, SIZE // 2, SIZE // 2), np.float32)
    da[0, 1, 16:, :] = 1.0  # lower half of the model input
    multi = np.zeros((1, 3, SIZE // 2, SIZE // 2), np.float32)
    multi[0, 0] = 0.5
    multi[0, 2, :, :16] = 1.0  # left half is class 2
    path = constant_model(tmp_path / "sem.onnx", {"da": da, "parts": multi})
    assert infer_family(OnnxRuntimeBackend(path)) == "semseg"
    seg = build_detector(path)
    assert isinstance(seg, SemanticSegmenter) and seg.kind == "segmenter"
    assert seg.names == ["drivable", "parts.1", "parts.2"]
    (stretch,) = seg.segment([np.zeros((50, 100, 3), np.uint8)])
    assert stretch.size == (100, 50) and stretch.names == ["drivable", "parts.1", "parts.2"]
    assert stretch["drivable"][25:].all() and not stretch["drivable"][:25].any()
    assert stretch["parts.2"][:, :50].all() and not stretch["parts.2"][:, 50:].any()
    assert not stretch["parts.1"].any()
    # letterbox: a 100x50 source fills rows 16..48 of the 64x64 input, the mask's lower half starts at row 32
    lb = SemanticSegmenter(seg.backend, resize="letterbox", classes=["drivable"])
    (m,) = lb.segment([np.zeros((50, 100, 3), np.uint8)])
    assert m.names == ["drivable"] and m["drivable"].shape == (50, 100)
    assert m["drivable"][26:].all() and not m["drivable"][:24].any()
    with pytest.raises(EdgecvError, match="unknown class 'road'; valid classes: drivable, parts.1, parts.2"):
        build_detector(path, classes=["road"])


def test_semantic_masks_merge_rejects_a_class_from_two_models() -> None:
    a = SemanticMasks({"drivable": np.ones((4, 6), bool)})
    b = SemanticMasks({"lane": np.zeros((4, 6), bool)})
    merged = SemanticMasks.merge([a, b])
    assert merged.names == ["drivable", "lane"] and merged.size == (6, 4) and merged.fraction("drivable") == 1.0
    with pytest.raises(ValueError, match="'drivable' comes from two models"):
        SemanticMasks.merge([a, a])


@pytest.fixture(scope="module")
def twinlitenet(assets: Path) -> SemanticSegmenter:
    seg = build_detector(assets / "models" / "twinlitenet.onnx")
    assert isinstance(seg, SemanticSegmenter)
    return seg


@pytest.mark.integration
def test_twinlitenet_masks_on_bdd_stills(assets: Path, twinlitenet: SemanticSegmenter) -> None:
    """Drivable area 5-60 % of each 1280x720 still, mostly in the lower half; lane lines 0-10 %.

    Measured (stretch resize): drivable 7-33 %, lower-half share >= 0.86; lane 0.0-2.9 %, median ~1.1 %;
    7dd9ef45 is a snow-covered street with no visible markings (lane ~0 %).
    """
    assert twinlitenet.family == "semseg" and twinlitenet.names == ["drivable", "lane"]
    assert twinlitenet.input_size == (640, 360)
    stills = sorted((assets / "media" / "bdd").glob("*.jpg"))
    assert len(stills) >= 10
    lanes = []
    for path in stills:
        image = cv2.imread(str(path))
        assert image.shape == (720, 1280, 3)
        (m,) = twinlitenet.segment([image])
        assert m.size == (1280, 720)
        drivable, lane = m["drivable"], m["lane"]
        assert drivable.shape == lane.shape == (720, 1280) and drivable.dtype == bool
        assert 0.05 <= m.fraction("drivable") <= 0.60, (path.name, m)
        assert m.fraction("lane") <= 0.10, (path.name, m)
        lower = drivable[360:].sum() / drivable.sum()
        assert lower >= 0.8, (path.name, lower)
        lanes.append(m.fraction("lane"))
        if path.name.startswith("7dd9ef45"):  # snow, no markings
            assert m.fraction("lane") < 0.003
    assert 0.003 <= float(np.median(lanes)) <= 0.05, lanes
    assert sum(f >= 0.003 for f in lanes) >= len(lanes) - 3, lanes


@pytest.mark.integration
def test_twinlitenet_on_a_4_3_dashcam_frame(assets: Path, twinlitenet: SemanticSegmenter) -> None:
    """A 320x240 GIF frame: masks at its resolution, the road in the lower half."""
    cap = cv2.VideoCapture(str(assets / "media" / "driving" / "bdd_clip1.gif"), cv2.CAP_FFMPEG)
    ok, image = cap.read()
    cap.release()
    assert ok and image.shape == (240, 320, 3)
    (m,) = twinlitenet.segment([image])
    assert m.size == (320, 240)
    assert 0.05 <= m.fraction("drivable") <= 0.6
    assert m["drivable"][120:].sum() >= 0.9 * m["drivable"].sum()
