"""Segmentation adapters: instance masks (``yolov8-seg``) and semantic masks (``semseg``).

``yolov8-seg`` (Ultralytics segment export, YOLOv8/YOLO11): two outputs, detection rows
(1, 4+C+M, N) of cx, cy, w, h, C class scores and M mask coefficients, and a prototype tensor
(1, M, H/4, W/4). It is a detector (its boxes are tracked) whose :class:`Detections` also carry
``mask`` (N, H, W) bool at source resolution and ``data["mask_area"]`` (pixels per mask):

1. ``sigmoid(coefficients @ prototypes)`` for each kept box (after threshold, class filter, NMS);
2. cropped to the box in prototype space: cell (row i, column j) is kept when x1 <= j < x2 and
   y1 <= i < y2 with the box scaled to prototype pixels (as Ultralytics' ``crop_mask``), else 0;
3. mapped to source pixels through the letterbox: the padding is removed (the prototype cells the
   image covers are kept) and the remaining region resized to the source size (bilinear, pixel
   centres aligned and edges replicated as ``cv2.resize``; a padding that is not a whole number of
   cells is resampled exactly, not rounded), done in one ``cv2.warpAffine`` per mask, restricted to
   the box plus one prototype cell of margin;
4. thresholded: probability > 0.5.

``semseg`` (TwinLiteNet-style): one or more outputs (1, K, h, w) of per-class scores; the class
of a pixel is the argmax over K, class 0 is background. Each output with K = 2 gives one mask named
after the output (``da`` -> ``drivable``, ``ll`` -> ``lane``; other names as they are), K > 2 gives
``<output>.1`` ... ``<output>.K-1`` (``labels``/``names`` override, one name per mask in order).
The input is a plain resize of the frame to the model size by default (``resize="stretch"``,
as TwinLiteNet's own demo and training on 1280x720 BDD frames), or a centred letterbox
(``resize="letterbox"``). The label map is cropped to the image region and resized to the source
size with nearest-neighbour interpolation. The result per frame is a :class:`SemanticMasks`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Optional

import cv2
import numpy as np

from edgecv import EdgecvError
from edgecv.engine.adapters import Letterbox, Yolov8Detector, infer_in_chunks, metadata_names, model_input_size
from edgecv.engine.backend import Backend, format_shape
from edgecv.engine.ops import cxcywh_to_xyxy, letterbox, nms, to_chw
from edgecv.types import Detections, SemanticMasks, in_classes

__all__ = ["InputRegion", "SemanticSegmenter", "Yolov8SegDetector", "instance_masks", "model_output_shapes"]

MASK_THRESHOLD = 0.5
SEMSEG_ALIASES: dict[str, str] = {"da": "drivable", "ll": "lane"}
"""Output names of known semantic models and the class name their positive class gets."""


def model_output_shapes(backend: Backend, input_size: tuple[int, int]) -> list[tuple[int, ...]]:
    """Every output's shape for one image; one probe inference when any is declared dynamic."""
    shapes = [(1, *s[1:]) if s else s for s in backend.output_shapes]
    if all(d > 0 for s in shapes for d in s):
        return shapes
    w, h = input_size
    return [tuple(o.shape) for o in backend.infer(np.zeros((1, 3, h, w), dtype=backend.input_dtype))]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    out = np.negative(x, dtype=np.float32)
    np.exp(out, out=out)
    out += 1.0
    np.reciprocal(out, out=out)
    return out


def instance_masks(
    coefficients: np.ndarray,
    prototypes: np.ndarray,
    xyxy_input: np.ndarray,
    box: Letterbox,
    input_size: tuple[int, int],
    threshold: float = MASK_THRESHOLD,
) -> np.ndarray:
    """(K, src_h, src_w) bool masks from (K, M) coefficients and (M, mh, mw) prototypes.

    ``xyxy_input``: the K boxes in model-input pixels (the crop). ``box``: the letterbox placement.
    """
    k = len(coefficients)
    out = np.zeros((k, box.src_h, box.src_w), dtype=bool)
    if k == 0:
        return out
    m, mh, mw = prototypes.shape
    prob = _sigmoid(np.asarray(coefficients, np.float32) @ prototypes.reshape(m, -1).astype(np.float32, copy=False))
    prob = prob.reshape(k, mh, mw)
    in_w, in_h = input_size
    rx, ry = mw / in_w, mh / in_h
    # crop to the box in prototype space (Ultralytics' crop_mask convention)
    bx = np.asarray(xyxy_input, np.float32) * np.array([rx, ry, rx, ry], np.float32)
    cols, rows = np.arange(mw, dtype=np.float32), np.arange(mh, dtype=np.float32)
    in_cols = (cols >= bx[:, 0:1]) & (cols < bx[:, 2:3])
    in_rows = (rows >= bx[:, 1:2]) & (rows < bx[:, 3:4])
    prob *= in_rows[:, :, None] & in_cols[:, None, :]
    # remove the padding: keep the prototype cells the image covers (whole cells; edges replicate from here)
    c0 = max(0, int(np.floor(box.pad_x * rx + 1e-3)))
    c1 = min(mw, max(c0 + 1, int(np.ceil((box.pad_x + box.src_w * box.scale) * rx - 1e-3))))
    r0 = max(0, int(np.floor(box.pad_y * ry + 1e-3)))
    r1 = min(mh, max(r0 + 1, int(np.ceil((box.pad_y + box.src_h * box.scale) * ry - 1e-3))))
    prob = prob[:, r0:r1, c0:c1]
    # source pixel u (centre u + 0.5) -> input x = (u + 0.5) * scale + pad_x -> prototype sample x * rx - 0.5
    ax, ay = box.scale * rx, box.scale * ry
    bx0 = (box.pad_x + 0.5 * box.scale) * rx - 0.5 - c0
    by0 = (box.pad_y + 0.5 * box.scale) * ry - 0.5 - r0
    src = box.to_source(xyxy_input)
    margin_x, margin_y = 1.0 / ax + 1.0, 1.0 / ay + 1.0  # one prototype cell in source pixels
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    for i in range(k):
        x1, y1, x2, y2 = src[i]
        u0, u1 = max(0, int(np.floor(x1 - margin_x))), min(box.src_w, int(np.ceil(x2 + margin_x)))
        v0, v1 = max(0, int(np.floor(y1 - margin_y))), min(box.src_h, int(np.ceil(y2 + margin_y)))
        if u1 <= u0 or v1 <= v0:
            continue
        warp = np.array([[ax, 0.0, ax * u0 + bx0], [0.0, ay, ay * v0 + by0]], dtype=np.float64)
        roi = cv2.warpAffine(prob[i], warp, (u1 - u0, v1 - v0), flags=flags, borderMode=cv2.BORDER_REPLICATE,
                             borderValue=0.0)
        np.greater(roi, threshold, out=out[i, v0:v1, u0:u1])
    return out


class Yolov8SegDetector(Yolov8Detector):
    """Ultralytics segment head: detections with instance masks (see the module docstring).

    Input: RGB, 0-1, image centred in the letterbox, as ``yolov8``.
    """

    family = "yolov8-seg"
    expected_output = "(1, 4+C+M, N) and prototypes (1, M, H/4, W/4)"
    num_outputs = 2
    _det_index: int
    _proto_index: int
    num_masks: int
    proto_size: tuple[int, int]  # (w, h) of the prototype maps

    def _check_output(self, shape: tuple[int, ...]) -> int:
        shapes = model_output_shapes(self.backend, self.input_size)
        got = " and ".join(format_shape(s) for s in shapes)
        det = [i for i, s in enumerate(shapes) if len(s) == 3]
        proto = [i for i, s in enumerate(shapes) if len(s) == 4]
        if len(det) != 1 or len(proto) != 1:
            raise EdgecvError(
                f"model {self.backend.path}: family {self.family!r} expects outputs {self.expected_output}, got {got}"
            )
        d, p = shapes[det[0]], shapes[proto[0]]
        nm, mh, mw = p[1], p[2], p[3]
        if not self._head_fits(d, p):
            raise EdgecvError(
                f"model {self.backend.path}: family {self.family!r} expects outputs {self.expected_output} "
                f"(M = {p[1]} prototypes, at least one class), got {got}"
            )
        self._det_index, self._proto_index = det[0], proto[0]
        self.num_masks, self.proto_size = nm, (mw, mh)
        return d[1] - 4 - nm

    def _head_fits(self, det: tuple[int, ...], proto: tuple[int, ...]) -> bool:
        """Rows (1, 4+C+M, N) with C >= 1 and N > 4+C+M; M >= 1 prototypes no larger than the input."""
        nm, mh, mw = proto[1], proto[2], proto[3]
        w, h = self.input_size
        return not (nm < 1 or det[1] < 5 + nm or det[2] <= det[1] or not (0 < mw <= w and 0 < mh <= h))

    def _candidates(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        boxes, score, class_id, _ = self._seg_candidates(raw)
        return boxes, score, class_id

    def _seg_candidates(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(K, 4) cx, cy, w, h in input pixels, (K,) scores, (K,) class ids, (K, M) mask coefficients."""
        c = self.num_classes
        cls = raw[4 : 4 + c]
        best = cls.max(axis=0)
        idx = np.flatnonzero(best >= self.conf)
        return raw[:4, idx].T, best[idx], cls[:, idx].argmax(axis=0), raw[4 + c :, idx].T

    def postprocess(self, outputs: list[np.ndarray], boxes: list[Letterbox]) -> list[Detections]:
        """Detections with ``mask`` (N, H, W) bool at source resolution and ``data["mask_area"]``."""
        det, protos = outputs[self._det_index], outputs[self._proto_index]
        results = []
        for i, box in enumerate(boxes):
            cxcywh, score, class_id, coef = self._seg_candidates(det[i])
            if self.class_filter is not None:
                wanted = in_classes(class_id, self.class_filter)
                cxcywh, score, class_id, coef = cxcywh[wanted], score[wanted], class_id[wanted], coef[wanted]
            xyxy = cxcywh_to_xyxy(cxcywh)
            keep = nms(xyxy, score, class_id, self.iou, self.max_det)
            masks = instance_masks(coef[keep], protos[i], xyxy[keep], box, self.input_size)
            area = masks.sum(axis=(1, 2), dtype=np.int64).astype(np.float32)
            results.append(Detections(box.to_source(xyxy[keep]), score[keep], class_id[keep], mask=masks,
                                      data={"mask_area": area}))
        return results


def _is_score_map(shape: tuple[int, ...]) -> bool:
    """(1, K, h, w) with 2 <= K <= 255 and a non-empty map: one output of a semantic segmenter."""
    return len(shape) == 4 and shape[0] == 1 and 2 <= shape[1] <= 255 and shape[2] >= 1 and shape[3] >= 1


@dataclass(frozen=True, slots=True)
class InputRegion:
    """Where the source image sits in a segmentation model's input: x0, y0, w, h in input pixels."""

    x0: float
    y0: float
    w: float
    h: float
    src_w: int
    src_h: int


class SemanticSegmenter:
    """Semantic segmentation (TwinLiteNet-style): per-class boolean masks at source resolution.

    ``classes``: mask names to keep (None: all). ``names``: mask names overriding the defaults
    (one per mask, in output order). ``resize``: "stretch" (plain resize, default) or "letterbox".
    ``conf``, ``iou`` and ``max_det`` are accepted for a uniform constructor and not used.
    """

    family: ClassVar[str] = "semseg"
    kind: ClassVar[str] = "segmenter"
    expected_output: ClassVar[str] = "one or more (1, K, h, w) class score maps with K >= 2"
    _rgb: ClassVar[bool] = True
    _scale: ClassVar[float] = 1.0 / 255.0
    input_spec: ClassVar[None] = None  # its own resize (stretch or letterbox into a region): CPU preprocessing only

    def __init__(
        self,
        backend: Backend,
        conf: float = 0.35,
        iou: float = 0.5,
        classes: Optional[list[str]] = None,
        names: Optional[list[str]] = None,
        max_det: int = 300,
        resize: str = "stretch",
    ) -> None:
        if resize not in ("stretch", "letterbox"):
            raise EdgecvError(f"resize: expected 'stretch' or 'letterbox', got {resize!r}")
        self.backend = backend
        self.resize = resize
        self.input_size: tuple[int, int] = model_input_size(backend)
        shapes = model_output_shapes(backend, self.input_size)
        defaults = self._plan_outputs(shapes)
        self.output_sizes = [(s[3], s[2]) for s in shapes]
        self.names = self._mask_names(names, defaults)
        if len(set(self.names)) != len(self.names):
            raise EdgecvError(f"model {backend.path}: mask names must be unique, got {', '.join(self.names)}")
        self.keep: set[str] = set(self.names if not classes else [self.names[i] for i in self.class_ids(classes)])
        self.conf, self.iou, self.max_det = float(conf), float(iou), int(max_det)

    def _plan_outputs(self, shapes: list[tuple[int, ...]]) -> list[str]:
        """Check every output is a score map; set :attr:`_outputs`; the default mask names, in order."""
        backend = self.backend
        self._outputs: list[tuple[int, list[int]]] = []  # (output index, class indices 1..K-1)
        defaults: list[str] = []
        for i, (name, shape) in enumerate(zip(backend.output_names, shapes)):
            if not _is_score_map(shape):
                got = ", ".join(f"{n} {format_shape(s)}" for n, s in zip(backend.output_names, shapes))
                raise EdgecvError(
                    f"model {backend.path}: family {self.family!r} expects {self.expected_output}, got {got}"
                )
            alias = SEMSEG_ALIASES.get(name, name)
            ks = list(range(1, shape[1]))
            self._outputs.append((i, ks))
            defaults.extend([alias] if shape[1] == 2 else [f"{alias}.{k}" for k in ks])
        return defaults

    def _mask_names(self, names: Optional[list[str]], defaults: list[str]) -> list[str]:
        """``names`` (one per mask), else the model's own names when they fit, else ``defaults``."""
        own = metadata_names(self.backend.metadata)
        if names is None:
            return own if own is not None and len(own) == len(defaults) else defaults
        if len(names) != len(defaults):
            raise EdgecvError(
                f"model {self.backend.path}: expected {len(defaults)} mask names (one per mask), got {len(names)}"
            )
        return list(names)

    def class_ids(self, names: Sequence[str]) -> list[int]:
        """Mask indices of ``names``; an unknown name is an error listing the valid ones."""
        unknown = [n for n in names if n not in self.names]
        if unknown:
            raise EdgecvError(
                f"model {self.backend.path}: unknown class {unknown[0]!r}; valid classes: {', '.join(self.names)}"
            )
        return [self.names.index(n) for n in names]

    def preprocess(self, image: np.ndarray, out: Optional[np.ndarray] = None) -> tuple[np.ndarray, InputRegion]:
        """Resize (or letterbox) and normalise a BGR uint8 image into a (3, H, W) float32 tensor."""
        w, h = self.input_size
        src_h, src_w = image.shape[:2]
        if self.resize == "stretch":
            canvas = image if (src_w, src_h) == (w, h) else cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
            region = InputRegion(0.0, 0.0, float(w), float(h), src_w, src_h)
        else:
            canvas, lb = letterbox(image, self.input_size, center=True)
            region = InputRegion(lb.pad_x, lb.pad_y, float(min(w, max(1, round(src_w * lb.scale)))),
                                 float(min(h, max(1, round(src_h * lb.scale)))), src_w, src_h)
        if out is None:
            out = np.empty((3, h, w), dtype=np.float32)
        to_chw(canvas, out, scale=self._scale, swap_rb=self._rgb)
        return out, region

    def postprocess(self, outputs: list[np.ndarray], regions: list[InputRegion]) -> list[SemanticMasks]:
        """Masks for the first ``len(regions)`` batch items of ``outputs``, at source resolution."""
        in_w, in_h = self.input_size
        results = []
        for b, reg in enumerate(regions):
            masks: dict[str, np.ndarray] = {}
            names = iter(self.names)
            for (index, ks), (ow, oh) in zip(self._outputs, self.output_sizes):
                wanted = [(k, n) for k, n in zip(ks, names) if n in self.keep]
                if not wanted:
                    continue
                scores = outputs[index][b]
                label = scores.argmax(axis=0).astype(np.uint8) if len(ks) > 1 else (scores[1] > scores[0]).view(np.uint8)
                sx, sy = ow / in_w, oh / in_h
                c0, r0 = int(round(reg.x0 * sx)), int(round(reg.y0 * sy))
                c1, r1 = max(c0 + 1, int(round((reg.x0 + reg.w) * sx))), max(r0 + 1, int(round((reg.y0 + reg.h) * sy)))
                crop = np.ascontiguousarray(label[r0:r1, c0:c1])
                if crop.shape != (reg.src_h, reg.src_w):
                    crop = cv2.resize(crop, (reg.src_w, reg.src_h), interpolation=cv2.INTER_NEAREST)
                for k, n in wanted:
                    masks[n] = crop == k
            results.append(SemanticMasks(masks))
        return results

    def segment(self, images: Sequence[np.ndarray]) -> list[SemanticMasks]:
        """Masks of BGR uint8 images; inference in chunks of ``backend.max_batch``."""
        return infer_in_chunks(self, images)

    detect = segment  # the adapters' common name

    def __repr__(self) -> str:
        w, h = self.input_size
        return f"SemanticSegmenter({str(self.backend.path)!r}, input={w}x{h}, masks={self.names}, resize={self.resize})"
