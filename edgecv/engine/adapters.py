"""Model adapters: turn frames into model input and model output into :class:`Detections`.

An adapter owns everything model-specific around a :class:`Backend`: letterbox and
normalisation, decoding the raw head, confidence threshold, class filter, class-aware
NMS, and mapping boxes back to source pixels. It validates on construction that the
model's input and output look like its family, so a wrong ``family`` fails at load
time with one line instead of producing garbage boxes.

Adapters hold no per-call state: ``preprocess`` and ``postprocess`` may run on several
threads at once (``detect`` too, as far as the backend allows).
"""

from __future__ import annotations

import abc
import functools
import ast
import logging
import warnings
from collections.abc import Sequence
from typing import Any, ClassVar, Optional

import numpy as np

from edgecv import EdgecvError, EdgecvWarning
from edgecv.engine.backend import Backend, format_shape
from edgecv.engine.coco import COCO_NAMES
from edgecv.engine.ops import InputSpec, Letterbox, cxcywh_to_xyxy, nms
from edgecv.types import Detections, in_classes

log = logging.getLogger("edgecv.engine")

__all__ = [
    "Detector",
    "Letterbox",
    "Yolov8Detector",
    "YoloxDetector",
    "metadata_names",
    "model_input_size",
    "model_output_shape",
]


def _literal(text: str) -> object:
    """``ast.literal_eval`` (no code runs) that returns None instead of raising on bad input."""
    try:
        return ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None


def metadata_names(metadata: dict[str, str]) -> Optional[list[str]]:
    """Class names from an ONNX ``names`` metadata entry (``{0: 'person', ...}`` or a list), or None."""
    text = metadata.get("names")
    if not text:
        return None
    value = _literal(text)
    if isinstance(value, dict) and set(value) == set(range(len(value))):
        return [str(value[i]) for i in range(len(value))]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    warnings.warn(
        f"ignoring model metadata 'names': expected a dict of class id to name, got {text[:60]!r}",
        EdgecvWarning,
        stacklevel=2,
    )
    return None


def model_input_size(backend: Backend) -> tuple[int, int]:
    """(w, h) of an image model's input: from its shape, or its ``imgsz`` metadata when dynamic."""
    shape = backend.input_shape
    if len(shape) != 4 or shape[1] not in (3, -1):
        raise EdgecvError(f"model {backend.path}: expected an image input (N, 3, H, W), got {format_shape(shape)}")
    if shape[2] > 0 and shape[3] > 0:
        return shape[3], shape[2]
    imgsz = _literal(backend.metadata.get("imgsz", ""))
    if isinstance(imgsz, int):
        imgsz = [imgsz, imgsz]
    if isinstance(imgsz, (list, tuple)) and len(imgsz) == 2 and all(isinstance(v, int) and v > 0 for v in imgsz):
        return imgsz[1], imgsz[0]  # Ultralytics writes [h, w]
    raise EdgecvError(
        f"model {backend.path}: expected a fixed input size or 'imgsz' metadata, got input {format_shape(shape)} "
        "and no usable 'imgsz'"
    )


def model_output_shape(backend: Backend, input_size: tuple[int, int]) -> tuple[int, ...]:
    """The first output's shape for one image; runs one probe inference when it is declared dynamic."""
    declared = backend.output_shapes[0]
    shape = (1, *declared[1:]) if declared else declared
    if all(d > 0 for d in shape):
        return shape
    w, h = input_size
    return tuple(backend.infer(np.zeros((1, 3, h, w), dtype=backend.input_dtype))[0].shape)


class Detector(abc.ABC):
    """Base adapter for box detectors with one output tensor.

    ``conf``: minimum score kept (score >= conf). ``iou``: NMS IoU threshold.
    ``classes``: class names to keep (None or empty: all). ``names``: class names
    overriding the model's (index = class id). ``max_det``: most boxes per image.
    """

    family: ClassVar[str]
    expected_output: ClassVar[str]  # the output signature, for messages
    kind: ClassVar[str] = "detector"  # boxes that get tracked (segmenters: "segmenter")
    num_outputs: ClassVar[int] = 1  # output tensors the family expects
    _center: ClassVar[bool]  # letterbox placement: centred or top-left
    _rgb: ClassVar[bool]  # model wants RGB (else BGR)
    _scale: ClassVar[float]  # pixel value multiplier (1/255 for 0-1 input)

    def __init__(
        self,
        backend: Backend,
        conf: float = 0.35,
        iou: float = 0.5,
        classes: Optional[list[str]] = None,
        names: Optional[list[str]] = None,
        max_det: int = 300,
    ) -> None:
        for field, value in (("conf", conf), ("iou", iou)):
            if not 0.0 <= value <= 1.0:
                raise EdgecvError(f"{field}: expected a number between 0 and 1, got {value}")
        if max_det < 1:
            raise EdgecvError(f"max_det: expected a positive number, got {max_det}")
        self.backend = backend
        self.conf = float(conf)
        self.iou = float(iou)
        self.max_det = int(max_det)
        self.input_size: tuple[int, int] = model_input_size(backend)
        if len(backend.output_names) != self.num_outputs:
            raise EdgecvError(
                f"model {backend.path}: family {self.family!r} expects {self.num_outputs} "
                f"output{'s' if self.num_outputs > 1 else ''}, "
                f"got {len(backend.output_names)} ({', '.join(backend.output_names)})"
            )
        self.num_classes = self._check_output(model_output_shape(backend, self.input_size))
        self.names: list[str] = self._resolve_names(names)
        self.class_filter: Optional[np.ndarray] = np.asarray(self.class_ids(classes), np.int32) if classes else None

    # -- subclass hooks ------------------------------------------------------------------

    @abc.abstractmethod
    def _check_output(self, shape: tuple[int, ...]) -> int:
        """Validate the output shape for one image against the family; return the class count."""

    @abc.abstractmethod
    def _candidates(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Decode one image's raw output into boxes with score >= conf.

        Returns (K, 4) float cx, cy, w, h in input pixels, (K,) scores, (K,) class ids.
        """

    def _signature_error(self, shape: tuple[int, ...], detail: str = "") -> EdgecvError:
        return EdgecvError(
            f"model {self.backend.path}: family {self.family!r} expects output {self.expected_output}, "
            f"got {format_shape(shape)}{detail}"
        )

    # -- public API ----------------------------------------------------------------------

    def class_ids(self, names: Sequence[str]) -> list[int]:
        """Class ids of ``names``; an unknown name is an error listing the valid ones."""
        index: dict[str, int] = {}
        for i, name in enumerate(self.names):
            index.setdefault(name, i)
        unknown = [n for n in names if n not in index]
        if unknown:
            raise EdgecvError(
                f"model {self.backend.path}: unknown class {unknown[0]!r}; valid classes: {', '.join(self.names)}"
            )
        return [index[n] for n in names]

    @functools.cached_property
    def input_spec(self) -> InputSpec:
        """How frames become this model's input: what a backend needs to make it itself."""
        return InputSpec(self.input_size, self._center, self._rgb, self._scale)

    def preprocess(self, image: np.ndarray, out: Optional[np.ndarray] = None) -> tuple[np.ndarray, Letterbox]:
        """Letterbox and normalise a BGR uint8 image into a (3, H, W) float32 tensor.

        Writes into ``out`` when given (e.g. one slot of a batch array), else a new array.
        """
        return self.input_spec.make(image, out)

    def postprocess(self, outputs: list[np.ndarray], boxes: list[Letterbox]) -> list[Detections]:
        """Detections for the first ``len(boxes)`` batch items of ``outputs``, in source pixels."""
        raw = outputs[0]
        return [self._finish(*self._candidates(raw[i]), box) for i, box in enumerate(boxes)]

    def detect(self, images: Sequence[np.ndarray]) -> list[Detections]:
        """Detect objects in BGR uint8 images; inference runs in chunks of ``backend.max_batch``."""
        return infer_in_chunks(self, images)

    # -- internals -----------------------------------------------------------------------

    def _finish(self, cxcywh: np.ndarray, score: np.ndarray, class_id: np.ndarray, box: Letterbox) -> Detections:
        """Class filter, NMS, max_det, and mapping back to source pixels.

        A model whose scores are not probabilities (above 1) or whose outputs are not finite is said so once;
        scores are clamped to 1 and rows with non-finite numbers dropped, so nothing downstream (events, whose
        schema caps the score at 1) sees them."""
        finite = np.isfinite(cxcywh).all(axis=1) & np.isfinite(score)
        if not finite.all() or (len(score) and float(score.max()) > 1.0):
            self._warn_outputs(score, finite)
            cxcywh, score, class_id = cxcywh[finite], np.minimum(score[finite], 1.0), class_id[finite]
        if self.class_filter is not None:
            wanted = in_classes(class_id, self.class_filter)
            cxcywh, score, class_id = cxcywh[wanted], score[wanted], class_id[wanted]
        xyxy = cxcywh_to_xyxy(cxcywh)
        keep = nms(xyxy, score, class_id, self.iou, self.max_det)
        return Detections(box.to_source(xyxy[keep]), score[keep], class_id[keep])

    def _warn_outputs(self, score: np.ndarray, finite: np.ndarray) -> None:
        if getattr(self, "_warned_outputs", False):
            return
        self._warned_outputs = True
        problems = []
        if not finite.all():
            problems.append(f"{int((~finite).sum())} candidate boxes with NaN or infinite numbers (dropped)")
        top = float(np.max(score[finite])) if finite.any() else 0.0
        if top > 1.0:
            problems.append(f"scores up to {top:.3g}, above 1: its outputs are not probabilities (clamped to 1; "
                            "is `family` right, or is this a model without its final sigmoid?)")
        log.warning("model %s: %s; said once", self.backend.path, "; ".join(problems))

    def _resolve_names(self, names: Optional[list[str]]) -> list[str]:
        """Given names, else the model's metadata names, else COCO (80 classes) or class0..classN-1."""
        count, path = self.num_classes, self.backend.path
        if names is not None:
            if len(names) != count:
                raise EdgecvError(f"model {path}: expected {count} class names (one per class), got {len(names)}")
            return list(names)
        own = metadata_names(self.backend.metadata)
        if own is not None and len(own) == count:
            return own
        if own is not None:
            warnings.warn(
                f"model {path}: ignoring metadata names: {len(own)} names for {count} classes",
                EdgecvWarning,
                stacklevel=2,
            )
        if count == len(COCO_NAMES):
            return list(COCO_NAMES)
        warnings.warn(
            f"model {path}: {count} classes and no class names; calling them class0..class{count - 1} "
            "(give a labels file)",
            EdgecvWarning,
            stacklevel=2,
        )
        return [f"class{i}" for i in range(count)]

    def __repr__(self) -> str:
        w, h = self.input_size
        return (
            f"{type(self).__name__}({str(self.backend.path)!r}, input={w}x{h}, classes={self.num_classes}, "
            f"conf={self.conf}, iou={self.iou})"
        )


def yolox_grid(input_size: tuple[int, int], strides: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """YOLOX anchor points: (N, 2) float32 grid cell (x, y) and (N,) float32 stride, row-major per level."""
    w, h = input_size
    cells, steps = [], []
    for s in strides:
        gy, gx = np.mgrid[0 : h // s, 0 : w // s]
        cells.append(np.stack([gx.ravel(), gy.ravel()], axis=1))
        steps.append(np.full(gx.size, s))
    return np.concatenate(cells).astype(np.float32), np.concatenate(steps).astype(np.float32)


class YoloxDetector(Detector):
    """YOLOX exported with its raw head: output (1, N, 5+C) rows of (x, y, log w, log h, obj, cls...).

    obj and cls are already sigmoided in the official export; score = obj * cls.
    Input: BGR, 0-255, image at the top-left of the letterbox.
    """

    family = "yolox"
    expected_output = "(1, N, 5+C)"
    strides: ClassVar[tuple[int, ...]] = (8, 16, 32)
    _grid: np.ndarray  # (N, 2) cell x, y of each output row, set by _check_output
    _stride: np.ndarray  # (N,) stride of each output row
    _center = False
    _rgb = False
    _scale = 1.0

    def _check_output(self, shape: tuple[int, ...]) -> int:
        if len(shape) != 3 or shape[2] < 6 or shape[1] <= shape[2]:
            raise self._signature_error(shape)
        self._grid, self._stride = yolox_grid(self.input_size, self.strides)
        if shape[1] != len(self._grid):
            w, h = self.input_size
            strides = ", ".join(map(str, self.strides))
            raise self._signature_error(shape, f" (a {w}x{h} input with strides {strides} gives N = {len(self._grid)})")
        return shape[2] - 5

    def _candidates(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        idx = np.flatnonzero(raw[:, 4] >= self.conf)  # score = obj * cls <= obj
        rows = raw[idx]
        scores = rows[:, 5:] * rows[:, 4:5]
        class_id = scores.argmax(axis=1)
        score = scores[np.arange(len(idx)), class_id]
        good = score >= self.conf
        idx, rows, class_id, score = idx[good], rows[good], class_id[good], score[good]
        stride = self._stride[idx, None]
        xy = (rows[:, :2] + self._grid[idx]) * stride
        wh = np.exp(rows[:, 2:4]) * stride
        return np.concatenate([xy, wh], axis=1), score, class_id


class Yolov8Detector(Detector):
    """Ultralytics detect head (YOLOv8, YOLO11, ...): output (1, 4+C, N), rows cx, cy, w, h, class scores.

    Input: RGB, 0-1, image centred in the letterbox. Names and imgsz come from the
    model's metadata when present.
    """

    family = "yolov8"
    expected_output = "(1, 4+C, N)"
    _center = True
    _rgb = True
    _scale = 1.0 / 255.0

    def _check_output(self, shape: tuple[int, ...]) -> int:
        if len(shape) != 3 or shape[1] < 5 or shape[2] <= shape[1]:
            raise self._signature_error(shape)
        return shape[1] - 4

    def _candidates(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        cls = raw[4:]
        best = cls.max(axis=0)
        idx = np.flatnonzero(best >= self.conf)
        return raw[:4, idx].T, best[idx], cls[:, idx].argmax(axis=0)


def infer_in_chunks(adapter: Any, images: Sequence[np.ndarray]) -> list:
    """Preprocess, infer and postprocess images with any adapter (detector or segmenter), in chunks of
    ``adapter.backend.max_batch``, each preprocessed straight into its slot of the batch array."""
    w, h = adapter.input_size
    step = adapter.backend.max_batch
    results: list = []
    for start in range(0, len(images), step):
        chunk = images[start : start + step]
        batch = np.empty((len(chunk), 3, h, w), dtype=np.float32)
        placements = [adapter.preprocess(image, out=batch[i])[1] for i, image in enumerate(chunk)]
        results.extend(adapter.postprocess(adapter.backend.infer(batch), placements))
    return results
