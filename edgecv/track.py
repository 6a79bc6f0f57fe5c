"""Offline tracking of a video file to MOT-challenge rows (`edgecv track`).

Runs the same threaded pipeline as the daemon (capture + preprocessing, inference, post-processing
and tracking on their own threads), with the file read as fast as possible and no frame dropped.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from . import EdgecvError
from .config import ConfigError, parse
from .daemon import load_detector
from .pipeline import Pipeline
from .types import Detections, Frame


@dataclass(frozen=True)
class TrackResult:
    frames: int
    seconds: float
    rows: int
    tracks: int

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0


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
        lines = []
        for (x1, y1, x2, y2), tid, score in zip(tracks.xyxy.tolist(), tracks.track_id.tolist(), tracks.score.tolist()):
            lines.append(f"{frame.index},{tid},{x1:.2f},{y1:.2f},{x2 - x1:.2f},{y2 - y1:.2f},{score:.4f},-1,-1,-1\n")
            self.ids.add(tid)
        self._f.writelines(lines)
        self.rows += len(lines)

    def close(self) -> None:
        self._f.close()


def track_video(video: str, model: str, mot: str, family: str = "auto", classes: Optional[Sequence[str]] = None,
                conf: float = 0.3, threads: Optional[int] = None, max_frames: Optional[int] = None,
                tracker: Optional[dict] = None) -> TrackResult:
    raw = {
        "node_id": "track",
        "mqtt": {"enabled": False},
        "console": {"enabled": False},
        "model": {"path": model, "family": family, "conf": conf, "classes": list(classes) if classes else None,
                  "threads": threads},
        "tracker": tracker or {},
        "cameras": {"video": {"source": video, "realtime": False, "objects": {"new": False, "lost": False}}},
    }
    try:
        cfg = parse(raw, source="edgecv track", base_dir=Path.cwd())
        detector = load_detector(cfg)
    except ConfigError as e:
        raise EdgecvError("; ".join(p.replace("cameras.video.source", "VIDEO").replace("model.path", "--model")
                                    .replace("model.classes", "--classes") for p in e.problems)) from None
    writer = MotWriter(Path(mot))
    pipeline = Pipeline(cfg, detector, sinks=[], max_frames=max_frames, on_tracks=lambda _c, f, t: writer.write(f, t))
    t0 = time.perf_counter()
    try:
        pipeline.run()
    finally:
        writer.close()
    seconds = time.perf_counter() - t0
    worker = pipeline.workers["video"]
    source = pipeline.sources["video"]
    if source.state == "failed":
        raise EdgecvError(f"{video}: {source.reason}")
    if pipeline.inference.error:
        raise EdgecvError(pipeline.inference.error)
    return TrackResult(worker.processed, seconds, writer.rows, len(writer.ids))
