"""`edgecv eval`: run the pipeline on annotated clips and score it (tracking metrics and event accuracy).

One sequence: a video, its ground truth (MOT-challenge ``gt.txt``) and how to run the pipeline, either a
config (its camera's source replaced by the video) or a model with command-line settings. A suite is a
folder of sequence folders, each with ``video.*``, ``gt.txt``, optional ``seqinfo.ini`` and optional
``config.yaml`` (which wins over the command line's config or model for that sequence).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from .. import EdgecvError
from ..config import Config, ConfigError, load, load_yaml
from ..pipeline import build_rules, tracker_config
from ..models import ModelSet
from ..track import (
    OfflineRun,
    config_for_video,
    load_offline_models,
    offline_config,
    run_offline,
    video_frames,
    with_detect,
    with_tracker,
)
from ..progress import Progress
from ..types import Detections, Event, Frame
from .events import EventScore, event_key, match_events, reference_events, scored_rules
from .metrics import COLUMNS, mean_row, score
from .mot import FrameBoxes, MotSequence, load_gt, load_results
from .variants import sequence_dirs


@dataclass(frozen=True)
class RunSpec:
    """How to run the pipeline on a sequence: ``config`` (+ ``camera``), or ``model`` with these settings."""

    config: Optional[str] = None
    camera: Optional[str] = None
    model: Optional[str] = None
    family: str = "auto"
    classes: Optional[tuple[str, ...]] = None  # default: the labels of the gt's classes
    conf: float = 0.3
    threads: Optional[int] = None
    tolerance_s: float = 1.0  # event matching: largest frame gap, in seconds of the clip
    rules: Optional[str] = None  # with ``model``: a YAML file of `zones` and `lines` (as in a camera section)
    tracker: tuple[str, ...] = ()  # tracker settings overridden, "KEY=VALUE"
    detect: tuple[str, ...] = ()  # the camera's `detect` settings overridden, "KEY=VALUE" (every_n=2)


@dataclass
class SequenceResult:
    name: str
    frames: int
    fps: float  # the clip's frame rate
    seconds: float  # wall time of the pipeline run
    metrics: dict[str, float]
    events: Optional[list[EventScore]] = None  # None when the config has no zone or line
    tracker: str = "edgecv"
    tracks: Optional[MotSequence] = None  # what the tracker reported (not in the JSON)

    def row(self) -> dict[str, Any]:
        out: dict[str, Any] = {"sequence": self.name, "tracker": self.tracker, "frames": self.frames,
                               "fps": round(self.fps, 3), "run_seconds": round(self.seconds, 3),
                               **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.metrics.items()}}
        if self.events is not None:
            out["events"] = [e.to_dict() for e in self.events]
            out["event_f1"] = round(self.events[-1].f1, 4)
        return out


class _Collector:
    """Tracks (as MOT rows in memory) and events of one offline run."""

    def __init__(self) -> None:
        self.frames: dict[int, FrameBoxes] = {}
        self.events: list[Event] = []

    def tracks(self, frame: Frame, tracks: Detections) -> None:
        if tracks.track_id is not None and len(tracks):
            self.frames[frame.index] = FrameBoxes(tracks.track_id.copy(), tracks.xyxy.astype(np.float64),
                                                  tracks.score.astype(np.float64))

    def emit(self, event: Event) -> None:
        self.events.append(event)


def _sequence_spec(spec: RunSpec, folder: Path) -> RunSpec:
    """A sequence folder's own ``config.yaml`` wins; its ``rules.yaml`` joins a command-line model run."""
    own, rules = folder / "config.yaml", folder / "rules.yaml"
    if own.is_file():
        return replace(spec, config=str(own), camera=None)
    return replace(spec, rules=str(rules)) if rules.is_file() and not spec.config else spec


def load_rules(path: str) -> dict:
    """`zones` and `lines` from a rules file (checked with the camera section's validation when used)."""
    try:
        data = load_yaml(Path(path).read_text(encoding="utf-8"), f"--rules: {path}")
    except (OSError, UnicodeDecodeError) as e:
        raise EdgecvError(f"--rules: cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    except ConfigError as e:
        raise EdgecvError(e.problems[0]) from None
    if not isinstance(data, dict) or set(data) - {"zones", "lines"}:
        raise EdgecvError(f"--rules: {path}: expected a mapping with only `zones` and `lines`")
    return data


def _setup(video: str, gt: MotSequence, spec: RunSpec) -> tuple[Config, str, ModelSet]:
    """The config, camera and models of a run on ``video``: ``spec``'s config (its camera's source replaced by the
    video), or its model with the command-line settings (classes: the gt's labels unless given)."""
    if spec.config:
        try:
            base = load(spec.config)
        except ConfigError as e:
            raise EdgecvError("; ".join(e.problems)) from None
        cfg, camera = config_for_video(base, spec.camera, str(Path(video).resolve()))
        cfg = with_detect(with_tracker(cfg, spec.tracker), spec.detect)
        return cfg, camera, load_offline_models(cfg)
    if spec.model:
        classes = list(spec.classes) if spec.classes else gt.labels()
        rules = load_rules(spec.rules) if spec.rules else None
        cfg, camera = offline_config(str(Path(video).resolve()), spec.model, spec.family, classes, spec.conf,
                                     spec.threads, rules=rules), "video"
        cfg = with_detect(with_tracker(cfg, spec.tracker), spec.detect)
        return cfg, camera, load_offline_models(cfg, cli=True)
    raise EdgecvError("give --config CONFIG or --model MODEL (how to run the pipeline)")


def _score_events(cfg: Config, camera: str, models: ModelSet, gt: MotSequence, run: OfflineRun,
                  predicted: list[Event], fps: float, tolerance_s: float) -> Optional[list[EventScore]]:
    """The zone and line events found against those the gt's tracks give; None when the camera has no such rule."""
    cam = cfg.cameras[camera]
    rules = scored_rules(build_rules(cam, models.detector))
    if not rules:
        return None
    label = _gt_label(cfg, models.detector, gt)
    ref = reference_events(rules, gt, models.detector.class_ids([label])[0], models.detector.names, fps,
                           run.frame_size, run.frames, tracker_config(cfg, fps, models.detector.family).lost_buffer, camera,
                           cfg.node_id)
    names = {r.name for r in rules}
    pred = [e for e in predicted if e.rule in names and event_key(e)[0].startswith(("zone.", "line."))]
    tolerance = max(1, int(math.ceil(tolerance_s * fps)))
    expected = [("line.cross", r.name, d) for r in rules if r.kind == "line" for d in ("in", "out")]
    return match_events(pred, ref, tolerance, keys=expected)


def evaluate(video: str, gt_path: str, spec: RunSpec, name: Optional[str] = None,
             on_detections: Optional[Callable[[Frame, Detections], None]] = None,
             progress: bool = False) -> SequenceResult:
    """Run the pipeline on ``video`` as ``spec`` says and score it against ``gt_path`` (``progress``: its frames
    on stderr, see :mod:`edgecv.progress`)."""
    if not Path(video).is_file():
        raise EdgecvError(f"VIDEO: file not found: {video}")
    gt = load_gt(gt_path)
    cfg, camera, models = _setup(video, gt, spec)
    collector = _Collector()
    bar = Progress(f"eval {name or _name(video)}", total=video_frames(video), leave=False) if progress else None
    try:
        run = run_offline(cfg, models, camera, sinks=[collector], on_tracks=collector.tracks,
                          on_detections=on_detections, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    if not run.frames:
        raise EdgecvError(f"{video}: no frame decoded")
    tracks = MotSequence(collector.frames)
    metrics = score(gt, tracks, last_frame=run.frames)
    fps = run.source_fps or 10.0
    events = _score_events(cfg, camera, models, gt, run, collector.events, fps, spec.tolerance_s)
    return SequenceResult(name or _name(video), run.frames, fps, run.seconds, metrics, events, tracks=tracks)


def _name(video: str) -> str:
    """A sequence's name: the video's file name, or its folder's for a sequence folder's ``video.*``."""
    p = Path(video)
    return p.parent.resolve().name if p.stem == "video" else p.stem


def _gt_label(cfg: Any, detector: Any, gt: MotSequence) -> str:
    """The detector label the gt objects are given for the rules: the gt's class, if the model tracks it."""
    wanted = gt.labels()
    _, model = next(iter(cfg.model_sections))
    tracked = model.classes or list(detector.names)
    for label in wanted:
        if label in tracked:
            return label
    return tracked[0]


def evaluate_suite(suite: str, spec: RunSpec,
                   on_sequence: Optional[Callable[[SequenceResult], None]] = None,
                   progress: bool = False) -> list[SequenceResult]:
    """Every sequence of ``suite`` (``progress``: sequences and each one's frames on stderr)."""
    results = []
    folders = list(sequence_dirs(Path(suite)))
    bar = Progress("eval suite", total=len(folders), unit="sequences") if progress else None
    for folder in folders:
        video = sorted(p for p in folder.glob("video.*") if p.is_file())[0]
        result = evaluate(str(video), str(folder / "gt.txt"), _sequence_spec(spec, folder), name=folder.name,
                          progress=progress)
        results.append(result)
        if on_sequence is not None:
            on_sequence(result)
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    return results


# ---- output

def _fmt(value: float, integer: bool) -> str:
    return f"{value:.0f}" if integer else f"{value:.3f}"


def metrics_table(results: Sequence[SequenceResult], mean: bool = True, with_tracker: bool = False) -> str:
    """One row per sequence (and tracker), then the mean (rates) / sum (counts) over sequences."""
    head = ["sequence"] + (["tracker"] if with_tracker else []) + [c.label for c in COLUMNS] + ["events F1"]
    rows = []
    for r in results:
        f1 = f"{r.events[-1].f1:.3f}" if r.events else "-"
        rows.append([r.name] + ([r.tracker] if with_tracker else [])
                    + [_fmt(r.metrics[c.key], c.integer) for c in COLUMNS] + [f1])
    if mean and len(results) > 1 and not with_tracker:
        m = mean_row([r.metrics for r in results])
        pooled = pooled_events(results)
        rows.append(["mean (counts: sum)"] + [_fmt(m[c.key], c.integer) for c in COLUMNS]
                    + [f"{pooled[-1].f1:.3f}" if pooled else "-"])
    return _grid(head, rows)


def pooled_events(results: Sequence[SequenceResult]) -> list[EventScore]:
    """Event counts summed over sequences, per (type, rule, direction), then the total: the events F1 of a suite
    (a mean of per-sequence F1s would weigh a clip with one event like one with a hundred)."""
    sums: dict[tuple[str, str, str], list[int]] = {}
    for r in results:
        for e in r.events or []:
            acc = sums.setdefault(e.key, [0, 0, 0])
            acc[0] += e.truth
            acc[1] += e.predicted
            acc[2] += e.matched
    total = sums.pop(("all", "", ""), None)
    if total is None:
        return []
    return [EventScore(k, *v) for k, v in sorted(sums.items())] + [EventScore(("all", "", ""), *total)]


def events_table(events: Sequence[EventScore]) -> str:
    head = ["event", "truth", "found", "matched", "precision", "recall", "F1", "count error"]
    rows = [[e.label, str(e.truth), str(e.predicted), str(e.matched), f"{e.precision:.3f}", f"{e.recall:.3f}",
             f"{e.f1:.3f}", f"{e.count_error:+d}"] for e in events]
    return _grid(head, rows)


def _grid(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = "  ".join("-" * w for w in widths)
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([fmt(head), line, *(fmt(r) for r in rows)])


def to_json(results: Sequence[SequenceResult]) -> str:
    out: dict[str, Any] = {"sequences": [r.row() for r in results]}
    if len(results) > 1:
        out["mean"] = {k: round(v, 4) for k, v in mean_row([r.metrics for r in results]).items()}
        pooled = pooled_events(results)
        if pooled:
            out["events"] = [e.to_dict() for e in pooled]
            out["mean"]["event_f1"] = round(pooled[-1].f1, 4)
    return json.dumps(out, indent=2)


def score_results(gt_path: str, results_path: str, video: Optional[str] = None) -> SequenceResult:
    """Score an existing MOT result file (any tracker's); frames up to the last of gt and results."""
    gt = load_gt(gt_path)
    results = load_results(results_path, "--results")
    frames = max(gt.last_frame, results.last_frame)
    name = _name(video) if video else Path(results_path).stem
    return SequenceResult(name, frames, 0.0, 0.0, score(gt, results, last_frame=frames), tracker=Path(results_path).stem,
                          tracks=results)
