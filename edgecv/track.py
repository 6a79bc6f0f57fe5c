"""Offline runs of the daemon's pipeline on a video file: `edgecv track` (MOT-challenge rows) and the runs that
`edgecv eval` and the benchmarks score.

The same threaded pipeline as the daemon (capture + preprocessing, inference, post-processing, tracking and
rules on their own threads), with the file read as fast as possible and no frame dropped.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import cv2
import numpy as np
import yaml

from . import EdgecvError, UsageError
from .config import Config, ConfigError, parse
from .engine.adapters import Detector
from .models import ModelSet, load_models
from .pipeline import EventSink, Pipeline
from .progress import Progress
from .types import Detections, Frame

# config field paths as the command line names them
_CLI_NAMES = (("cameras.video.source", "VIDEO"), ("cameras.video.", "--rules: "), ("model.path", "--model"), ("model.classes", "--classes"),
              ("model.conf", "--conf"), ("model.threads", "--threads"), ("model.family", "--family"))


@dataclass(frozen=True)
class TrackResult:
    frames: int
    seconds: float
    rows: int
    tracks: int
    cpu_ms: Optional[dict[str, float]] = None  # CPU milliseconds per frame by stage (edgecv.cpu)

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0


@dataclass
class OfflineRun:
    """What one offline run of one camera did."""

    frames: int  # frames processed
    seconds: float
    source_fps: float  # the file's frame rate (what the tracker was told)
    frame_size: tuple[int, int]
    pipeline: Pipeline

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0


def format_rows(frame: int, ids: Iterable[int], xyxy: np.ndarray, scores: Iterable[float]) -> list[str]:
    """MOT result rows ``frame,id,x,y,w,h,score,-1,-1,-1`` for the boxes of one frame."""
    return [f"{frame},{tid},{x1:.2f},{y1:.2f},{x2 - x1:.2f},{y2 - y1:.2f},{score:.4f},-1,-1,-1\n"
            for (x1, y1, x2, y2), tid, score in zip(np.asarray(xyxy).tolist(), ids, scores)]


class MotWriter:
    """Writes `frame,id,x,y,w,h,score,-1,-1,-1` (1-based frames, source pixels)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows = 0
        self.ids: set[int] = set()
        self._f = open(path, "w", encoding="utf-8")

    def write(self, frame: Frame, tracks: Detections) -> None:
        if tracks.track_id is None:
            return
        ids = tracks.track_id.tolist()
        lines = format_rows(frame.index, ids, tracks.xyxy, tracks.score.tolist())
        self.ids.update(ids)
        self._f.writelines(lines)
        self.rows += len(lines)

    def close(self) -> None:
        self._f.close()


def offline_config(video: str, model: str, family: str = "auto", classes: Optional[Sequence[str]] = None,
                   conf: float = 0.3, threads: Optional[int] = None, tracker: Optional[dict] = None,
                   rules: Optional[dict] = None) -> Config:
    """The config of a command-line run (`edgecv track`, `edgecv eval --model`): one camera named ``video``,
    with the ``zones`` and ``lines`` of ``rules`` (as in a camera section) when given."""
    raw = {
        "node_id": "track",
        "mqtt": {"enabled": False},
        "console": {"enabled": False},
        "model": {"path": model, "family": family, "conf": conf, "classes": list(classes) if classes else None,
                  "threads": threads},
        "tracker": tracker or {},
        "cameras": {"video": {"source": video, "realtime": False, "objects": {"new": False, "lost": False},
                              **(rules or {})}},
    }
    try:
        return parse(raw, source="command line", base_dir=Path.cwd())
    except ConfigError as e:
        raise UsageError("; ".join(_cli_names(p) for p in e.problems)) from None


def _cli_names(problem: str) -> str:
    for field, name in _CLI_NAMES:
        problem = problem.replace(field, name)
    return problem


def config_for_video(cfg: Config, camera: Optional[str], video: str) -> tuple[Config, str]:
    """``cfg`` with only ``camera`` (default: the first), reading ``video`` as fast as possible."""
    name = camera or next(iter(cfg.cameras))
    if name not in cfg.cameras:
        raise EdgecvError(f"--camera: no camera {name!r} in the config (cameras: {', '.join(cfg.cameras)})")
    cam = cfg.cameras[name].model_copy(update={"source": video, "type": "file", "realtime": False, "loop": False,
                                              "max_fps": None, "pace_fps": None})
    return cfg.model_copy(update={"cameras": {name: cam}}), name


def with_tracker(cfg: Config, overrides: Sequence[str]) -> Config:
    """``cfg`` with ``tracker`` settings from the command line (``KEY=VALUE``, the value read as YAML)."""
    if not overrides:
        return cfg
    tracker = dict(cfg.tracker.model_dump())
    for item in overrides:
        key, value = _key_value(item, "--tracker")
        tracker[key] = value
    data = {**cfg.model_dump(), "tracker": tracker}
    try:
        checked = parse(data, source="command line", base_dir=Path(cfg.base_dir) if cfg.base_dir else None)
    except ConfigError as e:
        raise UsageError("; ".join(f"--tracker: {p}" for p in e.problems)) from None
    return cfg.model_copy(update={"tracker": checked.tracker})


def _key_value(item: str, option: str) -> tuple[str, object]:
    """``KEY=VALUE`` of a command-line override, the value read as YAML (empty: None)."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise UsageError(f"{option}: expected KEY=VALUE, got {item!r}")
    try:
        return key.strip(), yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        raise UsageError(f"{option}: {key.strip()}: cannot read the value {value!r}") from None


def with_detect(cfg: Config, overrides: Sequence[str]) -> Config:
    """``cfg`` with every camera's ``detect`` settings from the command line (``KEY=VALUE``, the value read as YAML;
    ``motion_gate.enabled=true`` sets a key of the motion gate)."""
    if not overrides:
        return cfg
    data = cfg.model_dump()
    for cam in data["cameras"].values():
        for item in overrides:
            key, value = _key_value(item, "--detect")
            *parents, last = key.split(".")
            node = cam["detect"]
            for part in parents:
                if not isinstance(node.get(part), dict):
                    raise UsageError(f"--detect: {key}: {part} is not a section of detect")
                node = node[part]
            node[last] = value
    try:
        checked = parse(data, source="command line", base_dir=Path(cfg.base_dir) if cfg.base_dir else None)
    except ConfigError as e:
        raise UsageError("; ".join(f"--detect: {p}" for p in e.problems)) from None
    return cfg.model_copy(update={"cameras": checked.cameras})


def load_offline_models(cfg: Config, cli: bool = False) -> ModelSet:
    """The config's models, with config problems as one EdgecvError (named as on the command line when ``cli``)."""
    try:
        return load_models(cfg)
    except ConfigError as e:
        raise UsageError("; ".join(_cli_names(p) if cli else p for p in e.problems)) from None


def video_frames(video: str | Path, max_frames: Optional[int] = None) -> Optional[int]:
    """The frames an offline run of ``video`` will have: its container's frame count (None: unknown), at most
    ``max_frames``."""
    cap = cv2.VideoCapture(str(video))
    try:
        count = cap.get(cv2.CAP_PROP_FRAME_COUNT) if cap.isOpened() else 0
    finally:
        cap.release()
    frames = int(count) if count and 0 < count < 1e9 else None
    if max_frames:
        return min(frames, max_frames) if frames else max_frames
    return frames


def run_offline(cfg: Config, models: ModelSet | Detector, camera: str, sinks: Sequence[EventSink] = (),
                on_tracks: Optional[Callable[[Frame, Detections], None]] = None,
                on_detections: Optional[Callable[[Frame, Detections], None]] = None,
                max_frames: Optional[int] = None, progress: Optional[Progress] = None) -> OfflineRun:
    """Run the pipeline on ``camera`` of ``cfg`` (a file read with ``realtime: false``) to its end; each frame
    counted in ``progress`` when given."""
    def tracked(_camera: str, frame: Frame, tracks: Detections) -> None:
        if on_tracks is not None:
            on_tracks(frame, tracks)
        if progress is not None:
            progress.update()

    pipeline = Pipeline(cfg, models, sinks=list(sinks), max_frames=max_frames,
                        on_tracks=tracked if on_tracks or progress else None,
                        on_detections=(lambda _c, f, d: on_detections(f, d)) if on_detections else None)
    t0 = time.perf_counter()
    pipeline.run()
    seconds = time.perf_counter() - t0
    worker, source = pipeline.workers[camera], pipeline.sources[camera]
    if source.state == "failed":
        raise EdgecvError(f"{source.display}: {source.reason}")
    if pipeline.failed:
        raise EdgecvError(pipeline.failed)
    if worker.frames_failed:  # an offline run is scored or written frame by frame: a dropped frame is an error
        raise EdgecvError(f"{worker.frames_failed} frames could not be processed: {worker.error or 'inference failed'}")
    return OfflineRun(worker.processed, seconds, source.fps, worker.frame_size, pipeline)


def track_video(video: str, model: str, mot: str, family: str = "auto", classes: Optional[Sequence[str]] = None,
                conf: float = 0.3, threads: Optional[int] = None, max_frames: Optional[int] = None,
                tracker: Optional[dict] = None) -> TrackResult:
    cfg = offline_config(video, model, family, classes, conf, threads, tracker)
    models = load_offline_models(cfg, cli=True)
    writer = MotWriter(Path(mot))
    try:
        with Progress("track", total=video_frames(video, max_frames)) as progress:
            run = run_offline(cfg, models, "video", on_tracks=writer.write, max_frames=max_frames, progress=progress)
    finally:
        writer.close()
    return TrackResult(run.frames, run.seconds, writer.rows, len(writer.ids), run.pipeline.cpu.per_frame_ms(run.frames))
