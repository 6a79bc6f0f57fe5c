"""Model-only throughput: inference on a fixed tensor, and pre/post-processing on one frame; inference time by
batch size (frames of several cameras inferred together)."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

from edgecv.engine.adapters import Detector
from edgecv.engine.backend import Backend
from edgecv.progress import Progress


def _time_ms(fn: Callable[[], object], n: int, progress: Optional[Progress] = None) -> np.ndarray:
    """Milliseconds of each of ``n`` calls of ``fn`` (each counted in ``progress`` when given)."""
    times = np.empty(n)
    for i in range(n):
        start = time.perf_counter()
        fn()
        times[i] = time.perf_counter() - start
        if progress is not None:
            progress.update()
    return times * 1000.0


def bench_model(
    detector: Detector,
    n: int = 100,
    image: Optional[np.ndarray] = None,
    batch: int = 1,
    warmup: int = 10,
    progress: Optional[Progress] = None,
) -> dict[str, Any]:
    """Measure a detector without any video I/O.

    Inference: ``backend.infer`` on one preprocessed tensor repeated ``batch`` times,
    ``n`` runs after ``warmup``. Pre- and post-processing: ``n`` runs each on ``image``
    (BGR uint8; default a seeded noise frame of 1280x720) and on its model output.
    Times are medians in milliseconds; ``infer_fps`` counts images, ``frame_fps`` is
    one frame through preprocess + inference (per image) + postprocess. ``progress``: its total set to the
    runs (warm-up and timed), each counted.
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
    if progress is not None:
        progress.set_total(warmup + 3 * n)
    outputs = backend.infer(inputs)
    _time_ms(lambda: backend.infer(inputs), warmup, progress)
    infer = _time_ms(lambda: backend.infer(inputs), n, progress)
    pre = _time_ms(lambda: detector.preprocess(image, out=tensor), n, progress)
    post = _time_ms(lambda: detector.postprocess(outputs, [box]), n, progress)
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


def bench_batch(backend: Backend, inputs: np.ndarray, sizes: Sequence[int], frames: int = 40, warmup: int = 1,
                original: Optional[Backend] = None, progress: Optional[Progress] = None) -> list[dict[str, Any]]:
    """Inference time by batch size: ``backend.infer`` on the first b of ``inputs`` (different preprocessed frames)
    for each size b, and ``original`` (the model before it was made dynamic) at batch 1 when given. Everything is
    interleaved (each round runs every entry on max(sizes) frames) so that a load that comes and goes on the
    machine weighs on every entry alike; about ``frames`` frames per entry, at least 3 rounds, after ``warmup``
    runs each. Per entry (``name``: "original" or "batch b"): the median time of a run, per frame (run / b),
    frames per second and the speed-up over the first entry. ``progress``: its total set to the rounds, each counted."""
    top = max(sizes)
    if not all(1 <= b <= min(len(inputs), backend.max_batch) for b in sizes):
        raise ValueError(f"bench_batch: batch sizes {list(sizes)} must be between 1 and "
                         f"{min(len(inputs), backend.max_batch)}")
    entries = [("original", original, 1)] if original is not None else []
    entries += [(f"batch {b}", backend, b) for b in sizes]
    times: dict[str, list[float]] = {name: [] for name, _, _ in entries}
    for _, runner, b in entries:
        for _ in range(warmup):
            runner.infer(inputs[:b])
    rounds = max(3, -(-frames // top))
    if progress is not None:
        progress.set_total(rounds)
    for _ in range(rounds):
        for name, runner, b in entries:
            x = np.ascontiguousarray(inputs[:b])
            times[name] += _time_ms(lambda r=runner, x=x: r.infer(x), max(1, top // b)).tolist()
        if progress is not None:
            progress.update()
    rows: list[dict[str, Any]] = []
    for name, _, b in entries:
        run_ms = float(np.median(times[name]))
        rows.append({"name": name, "batch": b, "runs": len(times[name]), "run_ms": round(run_ms, 2),
                     "frame_ms": round(run_ms / b, 2), "fps": round(1000.0 * b / run_ms, 2)})
    for row in rows:
        row["speedup"] = round(row["fps"] / rows[0]["fps"], 2)
    return rows


def bench_parallel(detector: Detector, lanes: int, n: int = 100, image: Optional[np.ndarray] = None,
                   progress: Optional[Progress] = None) -> float:
    """Frames per second of ``backend.infer`` (batch 1) run by ``lanes`` threads at once, as the daemon's
    inference threads do (``model.parallel``): ``n`` runs in all, split among them, after one warm-up run each.
    ``image``: as for :func:`bench_model`."""
    if lanes < 1 or n < lanes:
        raise ValueError(f"bench_parallel: expected 1 <= lanes <= n, got lanes={lanes}, n={n}")
    backend = detector.backend
    if image is None:
        image = np.random.default_rng(0).integers(0, 256, (720, 1280, 3), dtype=np.uint8)
    inputs = detector.preprocess(image)[0][None]
    if progress is not None:
        progress.set_total(lanes + n)
    start = threading.Barrier(lanes + 1)

    def lane(runs: int) -> None:
        backend.infer(inputs)
        if progress is not None:
            progress.update()
        start.wait()
        for _ in range(runs):
            backend.infer(inputs)
            if progress is not None:
                progress.update()

    threads = [threading.Thread(target=lane, args=(n // lanes + (i < n % lanes),), daemon=True) for i in range(lanes)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return n / (time.perf_counter() - t0)
