"""Model-only throughput: inference on a fixed tensor, and pre/post-processing on one frame."""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

import numpy as np

from edgecv.engine.adapters import Detector


def _time_ms(fn: Callable[[], object], n: int) -> np.ndarray:
    """Milliseconds of each of ``n`` calls of ``fn``."""
    times = np.empty(n)
    for i in range(n):
        start = time.perf_counter()
        fn()
        times[i] = time.perf_counter() - start
    return times * 1000.0


def bench_model(
    detector: Detector,
    n: int = 100,
    image: Optional[np.ndarray] = None,
    batch: int = 1,
    warmup: int = 10,
) -> dict[str, Any]:
    """Measure a detector without any video I/O.

    Inference: ``backend.infer`` on one preprocessed tensor repeated ``batch`` times,
    ``n`` runs after ``warmup``. Pre- and post-processing: ``n`` runs each on ``image``
    (BGR uint8; default a seeded noise frame of 1280x720) and on its model output.
    Times are medians in milliseconds; ``infer_fps`` counts images, ``frame_fps`` is
    one frame through preprocess + inference (per image) + postprocess.
    """
    if n < 1 or warmup < 0:
        raise ValueError(f"bench_model: expected n >= 1 and warmup >= 0, got n={n}, warmup={warmup}")
    backend = detector.backend
    if not 1 <= batch <= backend.max_batch:
        raise ValueError(f"bench_model: expected batch between 1 and {backend.max_batch}, got {batch}")
    if image is None:
        image = np.random.default_rng(0).integers(0, 256, (720, 1280, 3), dtype=np.uint8)
    tensor, box = detector.preprocess(image)
    inputs = np.repeat(tensor[None], batch, axis=0)
    outputs = backend.infer(inputs)
    for _ in range(warmup):
        backend.infer(inputs)
    infer = _time_ms(lambda: backend.infer(inputs), n)
    pre = _time_ms(lambda: detector.preprocess(image, out=tensor), n)
    post = _time_ms(lambda: detector.postprocess(outputs, [box]), n)
    infer_ms, pre_ms, post_ms = float(np.median(infer)), float(np.median(pre)), float(np.median(post))
    frame_ms = pre_ms + infer_ms / batch + post_ms
    return {
        "model": str(backend.path),
        "family": detector.family,
        "backend": backend.name,
        "device": backend.device,
        "input_size": list(detector.input_size),
        "frame_size": [int(image.shape[1]), int(image.shape[0])],
        "batch": batch,
        "runs": n,
        "infer_ms": round(infer_ms, 3),
        "infer_ms_p90": round(float(np.percentile(infer, 90)), 3),
        "infer_fps": round(1000.0 * batch / infer_ms, 1),
        "preprocess_ms": round(pre_ms, 3),
        "postprocess_ms": round(post_ms, 3),
        "detections": len(detector.postprocess(outputs, [box])[0]),
        "frame_ms": round(frame_ms, 3),
        "frame_fps": round(1000.0 / frame_ms, 1),
    }
