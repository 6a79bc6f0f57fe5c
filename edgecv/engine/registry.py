"""From config names to a ready detector: backends, families, labels.

The top of :mod:`edgecv.engine`: it knows the model families (adapters) and the backends,
and hands the TensorRT builder what it needs from the families (:func:`calibration_detector`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

from edgecv import EdgecvError
from edgecv.assets import resolve
from edgecv.engine.adapters import Detector, Yolov8Detector, YoloxDetector, model_input_size, model_output_shape
from edgecv.engine.backend import Backend, OnnxRuntimeBackend, format_shape
from edgecv.engine.segmentation import SemanticSegmenter, Yolov8SegDetector, model_output_shapes
from edgecv.engine.tensorrt import choose_backend, open_tensorrt  # tensorrt/pycuda are imported only when used

Adapter = Union[Detector, SemanticSegmenter]
"""A loaded model: a detector (``kind == "detector"``, boxes that get tracked) or a segmenter."""

# the adapter of each family that edgecv.types names (DETECTOR_FAMILIES, SEGMENTER_FAMILIES: what configs accept)
FAMILIES: dict[str, type] = {
    YoloxDetector.family: YoloxDetector,
    Yolov8Detector.family: Yolov8Detector,
    Yolov8SegDetector.family: Yolov8SegDetector,
    SemanticSegmenter.family: SemanticSegmenter,
}
ULTRALYTICS_TASKS: dict[str, str] = {"detect": Yolov8Detector.family, "segment": Yolov8SegDetector.family}
BACKENDS: tuple[str, ...] = ("auto", "onnxruntime", "tensorrt")

PathLike = Union[str, os.PathLike]


def infer_family(backend: Backend) -> str:
    """Guess the adapter family from metadata, else from the output shape.

    Ultralytics metadata (author, or names + task) means ``yolov8`` for task ``detect`` and
    ``yolov8-seg`` for ``segment``; otherwise one output (1, 4+C, N) with N > 4+C means
    ``yolov8``, (1, N, 5+C) with N > 5+C means ``yolox``; two outputs (1, 4+C+M, N) and
    (1, M, h, w) mean ``yolov8-seg``; only outputs (1, K, h, w) with 2 <= K <= 255 mean
    ``semseg``. Anything else asks for ``family``.
    """
    family = _family_from_metadata(backend) or _family_from_outputs(backend)
    if family is None:
        raise _unknown_family(backend)
    return family


def _family_from_metadata(backend: Backend) -> Optional[str]:
    """The family an Ultralytics export names by its task; None when the metadata is not Ultralytics'."""
    meta = backend.metadata
    if not (meta.get("author", "").startswith("Ultralytics") or ("names" in meta and "task" in meta)):
        return None
    task = meta.get("task", "detect")
    if task not in ULTRALYTICS_TASKS:
        raise EdgecvError(f"model {backend.path}: Ultralytics task {task!r} is not supported; "
                          f"supported: {', '.join(ULTRALYTICS_TASKS)}")
    return ULTRALYTICS_TASKS[task]


def _family_from_outputs(backend: Backend) -> Optional[str]:
    """The family the output shapes (for one image) point to; None when they fit none."""
    if len(backend.output_names) >= 2:
        return _family_of_shapes(model_output_shapes(backend, model_input_size(backend)))
    if len(backend.output_names) == 1:
        return _family_of_shape(model_output_shape(backend, model_input_size(backend)))
    return None


def _is_score_map(shape: Sequence[int]) -> bool:
    """(1, K, h, w) with 2 <= K <= 255: per-class scores of a semantic segmenter."""
    return len(shape) == 4 and shape[0] == 1 and 2 <= shape[1] <= 255


def _is_seg_head(shapes: list[tuple[int, ...]]) -> bool:
    """Detection rows (1, 4+C+M, N) with N > 4+C+M and prototypes (1, M, h, w): an instance segmentation head."""
    if sorted(len(s) for s in shapes) != [3, 4]:
        return False
    det = next(s for s in shapes if len(s) == 3)
    proto = next(s for s in shapes if len(s) == 4)
    return det[0] == 1 and proto[0] == 1 and det[2] > det[1] >= 5 + proto[1]


def _family_of_shapes(shapes: list[tuple[int, ...]]) -> Optional[str]:
    """Two or more outputs: detection rows + prototypes (``yolov8-seg``), or score maps only (``semseg``)."""
    if _is_seg_head(shapes):
        return Yolov8SegDetector.family
    if all(_is_score_map(s) for s in shapes):
        return SemanticSegmenter.family
    return None


def _family_of_shape(shape: tuple[int, ...]) -> Optional[str]:
    """One output: (1, 4+C, N) ``yolov8``, (1, N, 5+C) ``yolox``, or a score map (``semseg``)."""
    if len(shape) == 3 and shape[0] == 1:
        rows, cols = shape[1], shape[2]
        if rows >= 5 and cols > rows:
            return Yolov8Detector.family
        if cols >= 6 and rows > cols:
            return YoloxDetector.family
    if _is_score_map(shape):
        return SemanticSegmenter.family
    return None


def _unknown_family(backend: Backend) -> EdgecvError:
    """The error asking for ``family`` when neither metadata nor output shapes tell it."""
    shapes = ", ".join(format_shape(s) for s in backend.output_shapes)
    hints = "; ".join(f"{name}: output {cls.expected_output}" for name, cls in FAMILIES.items())
    return EdgecvError(
        f"model {backend.path}: cannot tell the model family from output {shapes}; set family explicitly ({hints})"
    )


def calibration_detector(onnx: PathLike, family: str = "auto") -> Adapter:
    """The model adapter whose ``preprocess`` INT8 calibration uses (model loaded with ONNX Runtime on the CPU).

    The ``adapter_factory`` that :func:`edgecv.engine.trt_build.build_engine` takes.
    """
    try:
        backend = OnnxRuntimeBackend(onnx, threads=1, providers=["CPUExecutionProvider"])
    except EdgecvError as exc:
        raise EdgecvError(f"INT8 calibration preprocesses images with the model's adapter: {exc}") from exc
    chosen = infer_family(backend) if family == "auto" else family
    if chosen not in FAMILIES:
        raise EdgecvError(f"family: expected one of auto, {', '.join(FAMILIES)}, got {family!r}")
    return FAMILIES[chosen](backend)


def load_labels(path: PathLike) -> list[str]:
    """Class names from a text file, one per line (index = class id); trailing blank lines ignored."""
    p = Path(path)
    try:
        lines = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise EdgecvError(f"labels {p}: expected a UTF-8 text file with one class name per line, got {exc}") from exc
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise EdgecvError(f"labels {p}: expected one class name per line, found an empty file")
    if "" in lines:
        raise EdgecvError(f"labels {p}: line {lines.index('') + 1}: expected a class name, found a blank line")
    return lines


def open_backend(path: PathLike, backend: str = "auto", threads: Optional[int] = None,
                 build: Optional[dict[str, Any]] = None) -> Backend:
    """Load a model with the named backend; a bare name is also looked up in the assets folders. ``build``:
    TensorRT engine build options (the model's `tensorrt:` section; see ``trt_build.ensure_engine``)."""
    if backend not in BACKENDS:
        raise EdgecvError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    model = resolve(path) or Path(path)
    chosen, reason = choose_backend(backend, model)
    logging.getLogger("edgecv.engine").info("backend %s for %s (%s)", chosen, Path(model).name, reason)
    if chosen == "tensorrt":
        return open_tensorrt(model, adapter_factory=calibration_detector, **(build or {}))
    return OnnxRuntimeBackend(model, threads=threads)


def build_detector(
    path: PathLike,
    family: str = "auto",
    backend: str = "auto",
    conf: float = 0.35,
    iou: float = 0.5,
    classes: Optional[list[str]] = None,
    labels: Optional[Union[PathLike, Sequence[str]]] = None,
    threads: Optional[int] = None,
    max_det: int = 300,
    build: Optional[dict[str, Any]] = None,
) -> Adapter:
    """Load a model and wrap it in its family's adapter (a detector, or a segmenter for ``semseg``).

    ``family``: "auto" (see :func:`infer_family`) or a key of :data:`FAMILIES`; an explicit
    family is checked against the model's output. ``labels``: a labels file (one name per
    line) or a list of names; it wins over the model's own names. ``threads``: ONNX Runtime
    intra-op threads (None: its default). ``build``: TensorRT engine build options (see :func:`open_backend`).
    """
    if family != "auto" and family not in FAMILIES:
        raise EdgecvError(f"family: expected one of auto, {', '.join(FAMILIES)}, got {family!r}")
    if labels is None or isinstance(labels, (str, os.PathLike)):
        names = None if labels is None else load_labels(labels)
    else:
        names = list(labels)
    engine = open_backend(path, backend, threads, build)
    chosen = infer_family(engine) if family == "auto" else family
    adapter = FAMILIES[chosen](engine, conf=conf, iou=iou, classes=classes, names=names, max_det=max_det)
    engine.attach(adapter.input_spec)  # TensorRT: the GPU letterbox kernel (logs why not, keeps the CPU path)
    return adapter
