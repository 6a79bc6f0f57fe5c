"""From config names to a ready detector: backends, families, labels."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

from edgecv import EdgecvError
from edgecv.assets import resolve
from edgecv.engine.adapters import Detector, Yolov8Detector, YoloxDetector, model_input_size, model_output_shape
from edgecv.engine.backend import Backend, OnnxRuntimeBackend, format_shape

FAMILIES: dict[str, type[Detector]] = {
    YoloxDetector.family: YoloxDetector,
    Yolov8Detector.family: Yolov8Detector,
}
BACKENDS: tuple[str, ...] = ("auto", "onnxruntime", "tensorrt")

PathLike = Union[str, os.PathLike]


def infer_family(backend: Backend) -> str:
    """Guess the adapter family from metadata, else from the output shape.

    Ultralytics metadata (author, or names + task) means ``yolov8`` (task must be
    ``detect``); otherwise one output (1, 4+C, N) with N > 4+C means ``yolov8`` and
    (1, N, 5+C) with N > 5+C means ``yolox``. Anything else asks for ``family``.
    """
    meta = backend.metadata
    if meta.get("author", "").startswith("Ultralytics") or ("names" in meta and "task" in meta):
        task = meta.get("task", "detect")
        if task != "detect":
            raise EdgecvError(f"model {backend.path}: Ultralytics task {task!r} is not supported; supported: detect")
        return Yolov8Detector.family
    if len(backend.output_names) == 1:
        shape = model_output_shape(backend, model_input_size(backend))
        if len(shape) == 3 and shape[0] == 1:
            rows, cols = shape[1], shape[2]
            if rows >= 5 and cols > rows:
                return Yolov8Detector.family
            if cols >= 6 and rows > cols:
                return YoloxDetector.family
    shapes = ", ".join(format_shape(s) for s in backend.output_shapes)
    hints = "; ".join(f"{name}: output {cls.expected_output}" for name, cls in FAMILIES.items())
    raise EdgecvError(
        f"model {backend.path}: cannot tell the model family from output {shapes}; set family explicitly ({hints})"
    )


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


def open_backend(path: PathLike, backend: str = "auto", threads: Optional[int] = None) -> Backend:
    """Load a model with the named backend; a bare name is also looked up in the assets folders."""
    if backend not in BACKENDS:
        raise EdgecvError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "tensorrt":
        raise EdgecvError("backend 'tensorrt' is not available in this build of edgecv; use 'onnxruntime' or 'auto'")
    return OnnxRuntimeBackend(resolve(path) or Path(path), threads=threads)


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
) -> Detector:
    """Load a detection model and wrap it in its family's adapter.

    ``family``: "auto" (see :func:`infer_family`) or a key of :data:`FAMILIES`; an explicit
    family is checked against the model's output. ``labels``: a labels file (one name per
    line) or a list of names; it wins over the model's own names. ``threads``: ONNX Runtime
    intra-op threads (None: its default).
    """
    if family != "auto" and family not in FAMILIES:
        raise EdgecvError(f"family: expected one of auto, {', '.join(FAMILIES)}, got {family!r}")
    if labels is None or isinstance(labels, (str, os.PathLike)):
        names = None if labels is None else load_labels(labels)
    else:
        names = list(labels)
    engine = open_backend(path, backend, threads)
    chosen = infer_family(engine) if family == "auto" else family
    return FAMILIES[chosen](engine, conf=conf, iou=iou, classes=classes, names=names, max_det=max_det)
