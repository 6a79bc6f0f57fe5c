"""Wires the stages: sources -> inference -> per-camera tracking and rules -> sinks.

Threads (no unbounded queue anywhere):
- one capture thread per camera (decode + model preprocessing, one-slot newest-frame buffer);
- one inference thread per engine, batching frames that are ready together;
- one worker per camera: output decoding, NMS, tracking, rules, events;
- paho's network thread and the spool sender (publish/).
"""
from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence

import numpy as np

from .analytics.rules import FrameContext, LineRule, ObjectRule, Removed, Rule, ZoneRule
from .config import CameraConfig, Config, resolve_path
from .engine.adapters import Detector, Letterbox
from .sources.base import Source
from .sources.capture import make_source
from .tracking.bytetrack import ByteTracker, TrackerConfig
from .types import Detections, Event, Frame

log = logging.getLogger("edgecv.pipeline")


class EventSink(Protocol):
    def emit(self, event: Event) -> None: ...


@dataclass(frozen=True)
class Prepared:
    """A frame with the model input made from it on the capture thread."""

    frame: Frame
    tensor: np.ndarray  # C x H x W, ready for the engine
    box: Letterbox


class LatencyWindow:
    """Recent latencies for percentiles (bounded)."""

    def __init__(self, size: int = 512) -> None:
        self._values: deque[float] = deque(maxlen=size)

    def add(self, value: float) -> None:
        self._values.append(value)

    def percentiles(self) -> dict[str, float]:
        if not self._values:
            return {"p50": 0.0, "p95": 0.0, "max": 0.0}
        arr = np.fromiter(self._values, dtype=np.float64)
        return {"p50": round(float(np.percentile(arr, 50)), 1), "p95": round(float(np.percentile(arr, 95)), 1),
                "max": round(float(arr.max()), 1)}


def build_rules(cam: CameraConfig, detector: Detector) -> list[Rule]:
    def ids(classes: Optional[list[str]]) -> Optional[set[int]]:
        return None if classes is None else set(detector.class_ids(classes))

    rules: list[Rule] = [ObjectRule(ids(cam.objects.classes), cam.objects.new, cam.objects.lost)]
    for name, z in cam.zones.items():
        rules.append(ZoneRule(name, z.polygon, z.anchor, ids(z.classes), z.min_frames, z.cooldown_s,
                              z.loiter_s, z.exit_on_lost))
    for name, ln in cam.lines.items():
        rules.append(LineRule(name, ln.points, ln.anchor, ids(ln.classes), ln.min_frames, ln.cooldown_s))
    return rules


def stream_epoch(source: Source) -> str:
    """Part of every event id: the same file yields the same ids on every run; live streams differ per run."""
    if source.cfg.kind == "file":
        p = Path(source.location)
        try:
            st = p.stat()
            return hashlib.sha1(f"{p.resolve()}|{st.st_size}".encode()).hexdigest()[:12]
        except OSError:
            pass
    return f"{time.time():.6f}"


class CameraWorker:
    """Per camera: decode model outputs, track, run the rules, emit events."""

    def __init__(self, name: str, node: str, source: Source, detector: Detector,
                 make_tracker: Callable[[float], ByteTracker], rules: Sequence[Rule], sinks: Sequence[EventSink],
                 on_tracks: Optional[Callable[[Frame, Detections], None]] = None, queue_size: int = 8) -> None:
        self.name = name
        self.node = node
        self.source = source
        self.detector = detector
        self.make_tracker = make_tracker
        self.tracker: Optional[ByteTracker] = None  # made on the first frame, once the source's fps is known
        self.rules = list(rules)
        self.sinks = list(sinks)
        self.on_tracks = on_tracks
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.processed = 0
        self.events = 0
        self.latency = LatencyWindow()
        self.post_ms = LatencyWindow()
        self.epoch = stream_epoch(source)
        self._last_index = 0
        self._thread = threading.Thread(target=self._run, name=f"worker-{name}", daemon=True)
        self.error: Optional[str] = None

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            try:
                self.process(*item)
            except Exception as e:  # keep the camera alive; report once per distinct error
                msg = f"camera {self.name}: frame processing failed: {type(e).__name__}: {e}"
                if msg != self.error:
                    log.exception(msg)
                self.error = msg

    def process(self, prepared: Prepared, outputs: list[np.ndarray]) -> None:
        t0 = time.perf_counter()
        frame = prepared.frame
        dets = self.detector.postprocess(outputs, [prepared.box])[0]
        if self.tracker is None:
            self.tracker = self.make_tracker(self.source.fps or self.source.cfg.max_fps or 15.0)
        skipped = max(0, frame.index - self._last_index - 1) if self._last_index else 0
        self._last_index = frame.index
        tracks = self.tracker.update(dets, frames_skipped=skipped)
        w, h = frame.size
        np.clip(tracks.xyxy, 0, np.array([w, h, w, h], np.float32), out=tracks.xyxy)  # Kalman boxes may overshoot
        removed = [Removed(e.track_id, e.class_id, e.score, e.xyxy) for e in self.tracker.events if e.kind == "removed"]
        fps = self.source.fps
        t = (frame.index - 1) / fps if (self.source.cfg.kind == "file" and fps) else frame.t_mono
        ctx = FrameContext(self.node, self.name, frame.index, frame.t_wall, t, frame.size, self.detector.names,
                           self.epoch)
        events: list[Event] = []
        for rule in self.rules:
            events.extend(rule.update(ctx, tracks, removed))
        if self.on_tracks is not None:
            self.on_tracks(frame, tracks)
        for ev in events:
            for sink in self.sinks:
                sink.emit(ev)
        self.events += len(events)
        self.processed += 1
        self.post_ms.add((time.perf_counter() - t0) * 1000)
        self.latency.add((time.monotonic() - frame.t_mono) * 1000)


class InferenceWorker:
    """One thread per engine: takes ready frames from every camera, infers in batches, hands results on."""

    def __init__(self, detector: Detector, workers: dict[str, CameraWorker], notify: threading.Event,
                 max_frames: Optional[int] = None) -> None:
        self.detector = detector
        self.workers = workers
        self.notify = notify
        self.max_frames = max_frames
        self.infer_ms = LatencyWindow()
        self.frames = 0
        self._counts = {name: 0 for name in workers}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)
        self.error: Optional[str] = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.notify.set()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _collect(self) -> list[tuple[CameraWorker, Prepared]]:
        ready = []
        for name, w in self.workers.items():
            if self.max_frames is not None and self._counts[name] >= self.max_frames:
                continue
            item = w.source.slot.take()
            if item is not None:
                ready.append((w, item))
        return ready

    def _all_done(self) -> bool:
        for name, w in self.workers.items():
            limit_hit = self.max_frames is not None and self._counts[name] >= self.max_frames
            if not (limit_hit or w.source.finished):
                return False
        return True

    def _run(self) -> None:
        backend = self.detector.backend
        try:
            while True:
                ready = self._collect()
                if not ready:
                    if self._stop.is_set() or self._all_done():
                        return
                    self.notify.wait(0.05)
                    self.notify.clear()
                    continue
                for start in range(0, len(ready), max(1, backend.max_batch)):
                    chunk = ready[start:start + max(1, backend.max_batch)]
                    batch = np.stack([p.tensor for _, p in chunk])
                    t0 = time.perf_counter()
                    outputs = backend.infer(batch)
                    self.infer_ms.add((time.perf_counter() - t0) * 1000 / len(chunk))
                    for i, (w, p) in enumerate(chunk):
                        self._counts[w.name] += 1
                        self.frames += 1
                        w.queue.put((p, [o[i:i + 1] for o in outputs]))
        except Exception as e:
            self.error = f"inference failed: {type(e).__name__}: {e}"
            log.error(self.error)


class Pipeline:
    """Everything between the sources and the sinks, for one config."""

    def __init__(self, cfg: Config, detector: Detector, sinks: Sequence[EventSink],
                 max_frames: Optional[int] = None,
                 on_tracks: Optional[Callable[[str, Frame, Detections], None]] = None,
                 on_state: Optional[Callable[[str, str, str], None]] = None) -> None:
        self.cfg = cfg
        self.detector = detector
        self.notify = threading.Event()
        self.sources: dict[str, Source] = {}
        self.workers: dict[str, CameraWorker] = {}
        for name, cam in cfg.cameras.items():
            location = str(resolve_path(cfg, str(cam.source)) or cam.source) if cam.kind == "file" else str(cam.source)
            src = make_source(name, cam, location, on_state)
            src.prepare = lambda f, _d=detector: Prepared(f, *_d.preprocess(f.image))
            src.notify = self.notify
            cb = (lambda f, t, _n=name: on_tracks(_n, f, t)) if on_tracks else None
            self.sources[name] = src
            self.workers[name] = CameraWorker(name, cfg.node_id, src, detector, self._tracker_factory,
                                              build_rules(cam, detector), sinks, cb)
        self.inference = InferenceWorker(detector, self.workers, self.notify, max_frames)
        self.started_at = 0.0

    def _tracker_factory(self, fps: float) -> ByteTracker:
        t = self.cfg.tracker
        return ByteTracker(TrackerConfig(
            track_thresh=t.track_thresh, low_thresh=t.low_thresh, new_track_thresh=t.new_track_thresh,
            match_thresh=t.match_thresh, min_hits=t.min_hits, lost_buffer_s=t.lost_buffer_s, frame_rate=fps))

    def start(self) -> None:
        self.started_at = time.monotonic()
        for w in self.workers.values():
            w.start()
        self.inference.start()
        for s in self.sources.values():
            s.start()

    @property
    def done(self) -> bool:
        """All input consumed (finite sources ended or --max-frames reached) and processed."""
        return not self.inference.alive and all(w.queue.empty() for w in self.workers.values())

    def stop(self, timeout: float = 5.0) -> None:
        """Stop sources, let in-flight frames finish, stop workers."""
        for s in self.sources.values():
            s.stop()
        deadline = time.monotonic() + timeout
        for s in self.sources.values():
            s.join(max(0.1, deadline - time.monotonic()))
        self.inference.stop()
        self.inference.join(max(0.1, deadline - time.monotonic()))
        for w in self.workers.values():
            try:
                w.queue.put(None, timeout=max(0.1, deadline - time.monotonic()))
            except queue.Full:
                log.warning("camera %s: worker did not drain in time", w.name)
        for w in self.workers.values():
            w.join(max(0.1, deadline - time.monotonic()))

    def check_stalls(self) -> None:
        for s in self.sources.values():
            s.check_stall()

    def stats(self) -> dict[str, Any]:
        elapsed = max(1e-6, time.monotonic() - self.started_at)
        cams = {}
        for name, w in self.workers.items():
            s = self.sources[name]
            cams[name] = {
                "state": s.state,
                "fps_in": round(s.stats.read / elapsed, 2),
                "fps_processed": round(w.processed / elapsed, 2),
                "frames_read": s.stats.read,
                "frames_processed": w.processed,
                "frames_dropped": s.slot.dropped,
                "frames_skipped": s.stats.skipped,
                "reconnects": s.stats.reconnects,
                "events": w.events,
                "latency_ms": w.latency.percentiles(),
                "post_ms": w.post_ms.percentiles(),
            }
        return {"cameras": cams, "inference_ms": self.inference.infer_ms.percentiles(),
                "uptime_s": round(elapsed, 1), "threads": threading.active_count(),
                "pid": os.getpid()}
