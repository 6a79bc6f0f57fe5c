"""`edgecv bench`: speed figures printed as a table (never asserted in tests).

- model: model-only throughput (inference on a pre-made input tensor), pre- and post-processing;
- track: `edgecv track` end to end on a video (decode, preprocess, infer, decode, NMS, tracking) and its
  ratio to the model-only throughput measured with the same thread settings (with several inference lanes,
  ``model.parallel``, against the larger of one at a time and that many at once, as `bench capacity`'s L);
- tracker: the tracker's time per frame on synthetic moving boxes;
- driving: the driving pipeline of a config (default: the built-in DRIVING_CONFIG, detector + segmenter on a
  dash-cam clip of the assets, as configs/driving.yaml) on its clip,
  time per frame by stage, each stage run one after the other on one thread (capture/decode, preprocess,
  inference and postprocess per model, tracking + rules), then the threaded pipeline end to end.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import cv2
import numpy as np

from . import EdgecvError, UsageError, assets
from .config import CameraConfig, Config, ConfigError, load, parse, resolve_path
from .engine.backend import DYNAMIC_MAX_BATCH, default_threads, parallel_limit
from .engine.bench import bench_batch, bench_model, bench_parallel
from .engine.onnx_batch import rewrite_file, sample_frames
from .engine.registry import build_detector
from .evaluation.compare import (
    Comparison,
    compare_suite,
    comparison_table,
    default_peers_python,
    summary_table,
)
from .evaluation.runner import RunSpec
from .evaluation.variants import read_frames, sequence_dirs
from .models import ModelSet, load_models
from .pipeline import CameraWorker, Pipeline, build_rules, tracker_config
from .progress import Progress
from .sources.capture import make_source
from .track import track_video
from .tracking.bytetrack import ByteTracker, TrackerConfig, bench_tracker
from .tracking.motion import CameraMotion
from .types import Frame, SemanticMasks


def _table(rows: list[tuple[str, str]], title: str) -> str:
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 3 + max(len(v) for _, v in rows))
    body = "\n".join(f"{k:<{width}} | {v}" for k, v in rows)
    return f"{title}\n{line}\n{body}\n{line}"


def _frame(video: Path, index: int = 200) -> Any:
    cap = cv2.VideoCapture(str(video))
    frame = None
    for _ in range(index):
        ok, img = cap.read()
        if not ok:
            break
        frame = img
    cap.release()
    return frame


def _stat(values: list[float]) -> str:
    arr = np.asarray(values, np.float64)
    return f"{np.median(arr):7.2f} ms median, p90 {np.percentile(arr, 90):7.2f} ms"


# `edgecv bench driving` without --config: the models and rules of configs/driving.yaml (the repository's
# configs/ is not part of the installed package), files looked up in the assets.
_CLASSES = ["person", "bicycle", "car", "motorcycle", "bus", "truck"]
DRIVING_CONFIG: dict[str, Any] = {
    "node_id": "bench",
    "models": [{"name": "detector", "path": "models/yolox_nano.onnx", "family": "yolox", "conf": 0.3,
                "classes": _CLASSES},
               {"name": "lanes", "path": "models/twinlitenet.onnx", "family": "semseg"}],
    "tracker": {"lost_buffer_s": 1.0},
    "cameras": {"front": {"source": "media/driving/bdd_clip1.gif", "driving": {
        "collision": {"ttc_s": 2.0, "window": 8, "min_frames": 4, "min_growth": 0.05, "cooldown_s": 3,
                      "classes": _CLASSES},
        "drivable_zone": {"enabled": True, "min_frames": 3, "classes": _CLASSES}}}},
}


def _driving_setup(config: Optional[str], threads: Optional[int]) -> tuple[Config, ModelSet]:
    """The config (``--config`` or the built-in one, ``--threads`` applied to every model) and its models."""
    try:
        cfg = load(config) if config else parse(DRIVING_CONFIG, "built-in driving config")
        if threads:
            update = {"models": [m.model_copy(update={"threads": threads}) for _, m in cfg.model_sections],
                      "model": None}
            cfg = cfg.model_copy(update=update)
        models = load_models(cfg)
    except ConfigError as e:
        raise EdgecvError("; ".join(e.problems)) from None
    return cfg, models


def _open_clip(cam_name: str, location: str) -> cv2.VideoCapture:
    """The camera's clip opened with FFmpeg (its rate read from it, its first frame for the warm-up)."""
    cap = cv2.VideoCapture(location, cv2.CAP_FFMPEG)
    if not cap.isOpened():
        raise EdgecvError(f"cameras.{cam_name}.source: cannot open {location}")
    return cap


def _driving_worker(cfg: Config, models: ModelSet, cam_name: str, cam: CameraConfig, location: str, fps: float) -> CameraWorker:
    """The camera worker of the benchmarked camera, its source at the clip's rate."""
    source = make_source(cam_name, cam, location)
    source.fps = fps

    def tracker(rate: float) -> ByteTracker:
        return ByteTracker(tracker_config(cfg, rate, models.detector.family))

    return CameraWorker(cam_name, cfg.node_id, source, models, tracker, build_rules(cam, models.detector), [])


def _warm_up(cap: cv2.VideoCapture, models: ModelSet, cam_name: str, location: str) -> None:
    """One inference per model on the clip's first frame, outside the timings (session start-up costs);
    releases ``cap``."""
    ok, image = cap.read()
    if not ok:
        raise EdgecvError(f"cameras.{cam_name}.source: no decodable frame in {location}")
    for m in models.all:
        m.backend.infer(m.preprocess(image)[0][None])
    cap.release()


def _stage_times(names: list[str]) -> dict[str, list[float]]:
    """Empty lists of times (ms) per stage, in the order of the table's rows."""
    times: dict[str, list[float]] = {"decode": []}
    for stage in ("preprocess", "inference", "postprocess"):
        for n in names:
            times[f"{stage} {n}"] = []
    times["track_rules"], times["total"] = [], []
    return times


def _run_models(models: ModelSet, image: np.ndarray, times: dict[str, list[float]]) -> list[Any]:
    """Each model's result on ``image``, its preprocess, inference and postprocess times appended."""
    results = []
    for n, m in zip(models.names, models.all):
        t0 = time.perf_counter()
        tensor, box = m.preprocess(image)
        t1 = time.perf_counter()
        outputs = m.backend.infer(tensor[None])
        t2 = time.perf_counter()
        results.append(m.postprocess(outputs, [box])[0])
        t3 = time.perf_counter()
        times[f"preprocess {n}"].append((t1 - t0) * 1000)
        times[f"inference {n}"].append((t2 - t1) * 1000)
        times[f"postprocess {n}"].append((t3 - t2) * 1000)
    return results


def _time_stages(worker: CameraWorker, models: ModelSet, location: str, frames: int,
                 times: dict[str, list[float]], progress: Progress) -> tuple[int, int, tuple[int, int]]:
    """Up to ``frames`` frames of the clip through every stage in sequence: (frames, events, frame size)."""
    cap = cv2.VideoCapture(location, cv2.CAP_FFMPEG)
    events = 0
    size = (0, 0)
    n_frames = 0
    while n_frames < frames:
        start = time.perf_counter()
        ok, image = cap.read()
        t_dec = time.perf_counter()
        if not ok:
            break
        n_frames += 1
        size = (image.shape[1], image.shape[0])
        times["decode"].append((t_dec - start) * 1000)
        frame = Frame(worker.name, n_frames, time.monotonic(), time.time(), image)
        results = _run_models(models, image, times)
        semantic = SemanticMasks.merge(results[1:]) if len(results) > 1 else None
        t4 = time.perf_counter()
        events += len(worker.handle(frame, results[0], semantic))
        end = time.perf_counter()
        times["track_rules"].append((end - t4) * 1000)
        times["total"].append((end - start) * 1000)
        progress.update()
    cap.release()
    return n_frames, events, size


def _stage_rows(times: dict[str, list[float]]) -> list[tuple[str, str]]:
    """One row per stage (its share of the median frame), then the frame with the stages in sequence."""
    total = float(np.median(times["total"]))
    rows = []
    for key, values in times.items():
        if key == "total":
            continue
        label = {"decode": "capture: decode", "track_rules": "tracking + rules"}.get(key, key)
        share = 100.0 * float(np.median(values)) / total if total else 0.0
        rows.append((label, f"{_stat(values)} ({share:4.1f} % of the median frame)"))
    rows.append(("frame, stages in sequence", f"{_stat(times['total'])} = {1000.0 / total:.1f} fps"))
    return rows


def _pipeline_row(cfg: Config, models: ModelSet, cam_name: str, cam: CameraConfig, n_frames: int,
                  progress: Progress) -> tuple[str, str]:
    """The threaded pipeline (capture, inference, worker overlap), as `edgecv run --fast` without MQTT."""
    cams = {cam_name: cam.model_copy(update={"realtime": False, "loop": False})}
    quiet = cfg.model_copy(update={"cameras": cams})
    pipe = Pipeline(quiet, models, sinks=[], max_frames=n_frames, on_tracks=lambda *_: progress.update())
    t0 = time.perf_counter()
    pipe.run()
    seconds = time.perf_counter() - t0
    done = pipe.workers[cam_name].processed
    return ("pipeline end to end (threads)", f"{done} frames in {seconds:.2f} s = {done / seconds:.1f} fps")


def bench_driving(config: Optional[str], frames: int, threads: Optional[int]) -> list[tuple[str, str]]:
    """Rows of the driving benchmark (see the module docstring)."""

    cfg, models = _driving_setup(config, threads)
    cam_name, cam = next(iter(cfg.cameras.items()))
    location = str(resolve_path(cfg, str(cam.source)) or cam.source)
    cap = _open_clip(cam_name, location)
    worker = _driving_worker(cfg, models, cam_name, cam, location, cap.get(cv2.CAP_PROP_FPS) or 10.0)
    names = models.names
    times = _stage_times(names)
    _warm_up(cap, models, cam_name, location)
    with Progress("bench driving: stages in sequence", total=frames) as progress:
        n_frames, events, size = _time_stages(worker, models, location, frames, times, progress)
    if not n_frames:
        raise EdgecvError(f"cameras.{cam_name}.source: no decodable frame in {location}")
    rows = [("config", f"{Path(config).name if config else 'built-in driving config'}: camera {cam_name}, {Path(location).name} {size[0]}x{size[1]}, "
                       f"{n_frames} frames, {events} events"),
            ("models", ", ".join(f"{n} = {Path(str(m.backend.path)).name} ({m.family}, "
                                 f"{m.input_size[0]}x{m.input_size[1]}, {m.backend.name} {m.backend.device})"
                                 for n, m in zip(names, models.all)))]
    rows += _stage_rows(times)
    with Progress("bench driving: pipeline", total=n_frames) as progress:
        rows.append(_pipeline_row(cfg, models, cam_name, cam, n_frames, progress))
    return rows


def bench_tracker_rows(video: Optional[Path], frames: int) -> list[tuple[str, str]]:
    """Tracker time per frame (median) at 10 and 50 objects: on boxes alone, then on the video's frames with
    the appearance cue, and with it and camera-motion compensation; and the compensation alone."""

    n = max(100, min(frames, 500))
    images = read_frames(video, n) if video is not None else []
    with Progress("bench tracker", total=2 * n + 6 * len(images)) as progress:
        return _tracker_rows(n, images, video, progress)


def _tracker_rows(n: int, images: list[np.ndarray], video: Optional[Path],
                  progress: Progress) -> list[tuple[str, str]]:
    """The rows of :func:`bench_tracker_rows`, each frame run counted in ``progress``."""
    rows = []
    for objects in (10, 50):
        ms = bench_tracker(objects, n, progress=progress)
        rows.append((f"tracker, {objects} objects", f"{ms:.3f} ms per frame (median, IoU and motion only)"))
    if not images:
        return rows + [("appearance, motion compensation", "skipped: no video frames (--video)")]
    h, w = images[0].shape[:2]
    where = f"{Path(str(video)).name} {w}x{h}"
    weight = TrackerConfig.appearance_weight
    for objects in (10, 50):
        ms = bench_tracker(objects, len(images), images=images, appearance_weight=weight, progress=progress)
        rows.append((f"tracker + appearance, {objects} objects", f"{ms:.3f} ms per frame (median, {where})"))
    for method in ("sparse_flow", "ecc"):
        cm = CameraMotion(method)
        times = []
        for image in images:
            t0 = time.perf_counter()
            cm.estimate(image)
            times.append((time.perf_counter() - t0) * 1000)
            progress.update()
        rows.append((f"motion compensation, {method}", f"{np.median(times[1:]):.3f} ms per frame (median, {where})"))
    for objects in (10, 50):
        ms = bench_tracker(objects, len(images), images=images, motion_compensation="sparse_flow",
                           appearance_weight=weight, progress=progress)
        rows.append((f"tracker + appearance + sparse_flow, {objects} objects",
                     f"{ms:.3f} ms per frame (median, {where})"))
    return rows


def run_bench_trackers(args: argparse.Namespace) -> int:

    if not args.suite:
        raise EdgecvError("bench trackers: --suite DIR is required (sequence folders with video.* and gt.txt)")
    listed = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    if args.classes is not None and not listed:
        raise EdgecvError(f"--classes: no class name given (got {args.classes!r})")
    classes = tuple(listed) if listed else None
    spec = RunSpec(config=args.config, model=None if args.config else args.model, classes=classes, conf=args.conf,
                   threads=args.threads, tracker=tuple(args.tracker or ()))
    python = Path(args.peers_python) if args.peers_python else default_peers_python()
    with Progress("bench trackers", total=len(sequence_dirs(Path(args.suite))), unit="sequences") as progress:

        def done(c: Comparison) -> None:
            progress.write(f"  {c.sequence}: {c.results[0].frames} frames")
            progress.update()

        comparisons = compare_suite(args.suite, spec, python, args.peers, on_sequence=done)
    print("edgecv bench trackers: every tracker on the same detections (edgecv's pipeline), "
          f"{'config ' + args.config if args.config else Path(args.model).name}, scored at IoU 0.5")
    print(comparison_table(comparisons))
    print()
    print(summary_table(comparisons))
    return 0


def _batch_sizes(text: str) -> list[int]:
    """--batches: comma-separated batch sizes, each 1 to DYNAMIC_MAX_BATCH."""
    try:
        sizes = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        sizes = []
    if not sizes or not all(1 <= b <= DYNAMIC_MAX_BATCH for b in sizes):
        raise UsageError(f"--batches: expected comma-separated numbers 1 to {DYNAMIC_MAX_BATCH}, got {text!r}")
    return sizes


def bench_batch_rows(model: Path, video: Path, threads: Optional[int], frames: int,
                     sizes: list[int]) -> list[tuple[str, str]]:
    """Inference time per batch size on different frames of ``video``; a fixed-batch ONNX model is made dynamic
    for the benchmark (as `edgecv model dynamic-batch`, without its check) and timed as it was at batch 1 too."""
    with tempfile.TemporaryDirectory() as tmp:
        detector = original = build_detector(model, threads=threads)
        backend = detector.backend
        if backend.max_batch < max(sizes) and backend.input_shape[0] > 0 and model.suffix == ".onnx":
            rewrite_file(model, Path(tmp) / model.name)
            detector = build_detector(Path(tmp) / model.name, family=detector.family, threads=threads)
            backend = detector.backend
        usable = [b for b in sizes if b <= backend.max_batch]
        inputs = np.stack([detector.preprocess(image)[0] for image in sample_frames(video, max(usable))])
        with Progress("bench batch", unit="rounds") as progress:
            results = bench_batch(backend, inputs, usable, frames,
                                  original=original.backend if detector is not original else None, progress=progress)
    w, h = detector.input_size
    made = ", made dynamic for the benchmark (edgecv model dynamic-batch)" if detector is not original else ""
    rows = [("model", f"{model.name} ({detector.family}, {backend.name} {backend.device}, input {w}x{h}{made})"),
            ("frames", f"{max(usable)} different frames of {video.name}, about {frames} inferred per row, "
                       "the rows interleaved")]
    for r in results:
        label = "batch 1, as it was" if r["name"] == "original" else r["name"]
        rows.append((label, f"{r['run_ms']:8.1f} ms per run (median of {r['runs']}), {r['frame_ms']:7.1f} ms per "
                            f"frame, {r['fps']:6.2f} frames/s, x{r['speedup']:.2f}"))
    if len(usable) < len(sizes):
        rows.append(("skipped", f"batch {', '.join(str(b) for b in sizes if b not in usable)}: the model takes at "
                                f"most {backend.max_batch} frames at once"))
    return rows


def run_bench_batch(args: argparse.Namespace) -> int:
    model, video = assets.resolve(args.model), assets.resolve(args.video)
    if model is None:
        raise EdgecvError(f"--model: file not found: {args.model}")
    if video is None:
        raise EdgecvError(f"--video: file not found: {args.video}")
    sizes = _batch_sizes(args.batches)
    rows = [("cpu cores", str(os.cpu_count())), ("threads", str(args.threads) if args.threads else f"auto ({default_threads()})")]
    rows += bench_batch_rows(model, video, args.threads, min(args.frames, 64), sizes)
    print(_table(rows, "edgecv bench batch: inference time by batch size (frames of several cameras at once)"))
    return 0


def cpu_rows(per_frame: dict[str, float]) -> list[tuple[str, str]]:
    """Where the CPU went, per frame, by stage (:mod:`edgecv.cpu`): the stages that used any."""
    rows = [(f"cpu per frame: {role.replace('_', ' ')}", f"{ms:.2f} ms") for role, ms in per_frame.items()
            if role != "total" and ms > 0]
    return rows + [("cpu per frame: total", f"{per_frame['total']:.2f} ms")] if rows else []


def run_bench(args: argparse.Namespace) -> int:
    if args.what == "trackers":
        return run_bench_trackers(args)
    if args.what == "batch":
        return run_bench_batch(args)
    if args.what == "driving":
        rows = [("cpu cores", str(os.cpu_count())),
                ("threads", str(args.threads) if args.threads else f"auto ({default_threads()})")]
        rows += bench_driving(getattr(args, "config", None), args.frames, args.threads)
        print(_table(rows, "edgecv bench driving"))
        return 0

    model = assets.resolve(args.model)
    video = assets.resolve(args.video)
    if args.what in ("model", "track", "all") and model is None:
        raise EdgecvError(f"--model: file not found: {args.model}")
    if args.what in ("model", "track", "all") and video is None:
        raise EdgecvError(f"--video: file not found: {args.video}")
    rows: list[tuple[str, str]] = [("cpu cores", str(os.cpu_count())),
                                   ("threads", str(args.threads) if args.threads else f"auto ({default_threads()})")]
    model_fps = None
    if args.what in ("model", "track", "all"):
        detector = build_detector(model, threads=args.threads)
        with Progress("bench model", unit="runs") as progress:
            image = _frame(video)
            r = bench_model(detector, n=max(20, min(args.frames, 200)), image=image, progress=progress)
        model_fps = 1000.0 / r["infer_ms"]
        rows += [
            ("model", f"{Path(r['model']).name} ({r['family']}, {r['backend']}, {r['device']}, "
                      f"input {r['input_size'][0]}x{r['input_size'][1]})"),
            ("inference (model only)", f"{r['infer_ms']:.2f} ms median, p90 {r['infer_ms_p90']:.2f} ms "
                                       f"= {model_fps:.1f} fps"),
        ]
        lanes = parallel_limit(detector.backend)  # model.parallel auto: what `edgecv track` runs with
        if lanes > 1:
            with Progress(f"bench model, {lanes} at once", unit="runs") as progress:
                at_once = bench_parallel(detector, lanes, n=max(40, min(args.frames, 200)), image=image,
                                         progress=progress)
            rows.append((f"inference, {lanes} at once (model only)", f"{at_once:.1f} fps (model.parallel {lanes})"))
            model_fps = max(model_fps, at_once)
        rows += [
            ("preprocess", f"{r['preprocess_ms']:.2f} ms ({r['frame_size'][0]}x{r['frame_size'][1]} frame)"),
            ("postprocess", f"{r['postprocess_ms']:.2f} ms ({r['detections']} detections)"),
        ]
    if args.what in ("track", "all"):
        with tempfile.TemporaryDirectory() as tmp:
            res = track_video(str(video), str(model), str(Path(tmp) / "mot.txt"), threads=args.threads,
                              max_frames=args.frames)
        rows += [
            ("edgecv track", f"{res.frames} frames of {video.name} in {res.seconds:.2f} s = {res.fps:.1f} fps"),
            ("track / model-only", f"{res.fps / model_fps:.2f} (against the larger model-only figure)"
                                   if model_fps else "n/a"),
            *cpu_rows(res.cpu_ms or {}),
        ]
    if args.what in ("tracker", "all"):
        rows += bench_tracker_rows(video, args.frames)
    print(_table(rows, f"edgecv bench {args.what}"))
    return 0
