"""Wires the stages: sources -> inference -> per-camera tracking and rules -> sinks.

Threads (no unbounded queue anywhere):
- one capture thread per camera (decode + every model's preprocessing, one-slot newest-frame buffer);
- one inference thread, batching frames that are ready together and running every model on them
  (the detector, then each segmenter) before handing the frame on: a frame is complete or not at all,
  and the one-slot buffers and bounded worker queues keep their backpressure;
- one worker per camera: output decoding (boxes, instance masks, semantic masks), NMS, tracking, rules,
  events, snapshots;
- paho's network thread and the spool sender (publish/).
"""
from __future__ import annotations

import collections
import hashlib
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence

import numpy as np

from . import EdgecvError
from .analytics.driving import CollisionRule, MaskZoneRule
from .analytics.rules import FrameContext, LineRule, ObjectRule, Removed, Rule, ZoneRule
from .config import CameraConfig, Config, resolve_path
from .cpu import CpuMeter
from .engine.adapters import Detector
from .models import ModelSet, Prepared, merge_skipped
from .sources.base import Source
from .sources.capture import make_source
from .sources.gate import SKIP_INTERVAL, SKIP_REASONS, SKIP_STATIC, FrameGate
from .tracking.bytetrack import ByteTracker, TrackerConfig, TrackEventKind
from .types import Detections, Event, Frame, LatencyWindow, SemanticMasks

log = logging.getLogger("edgecv.pipeline")


class EventSink(Protocol):
    def emit(self, event: Event) -> None: ...


def build_rules(cam: CameraConfig, detector: Detector) -> list[Rule]:
    """The rules of a camera's config, their ``classes`` resolved to ``detector``'s class ids."""
    def ids(classes: Optional[list[str]]) -> Optional[set[int]]:
        return None if classes is None else set(detector.class_ids(classes))

    rules: list[Rule] = [ObjectRule.from_config(cam.objects, ids(cam.objects.classes))]
    rules += [ZoneRule.from_config(name, z, ids(z.classes)) for name, z in cam.zones.items()]
    rules += [LineRule.from_config(name, ln, ids(ln.classes)) for name, ln in cam.lines.items()]
    drv = cam.driving
    if drv is not None and drv.collision is not None and drv.collision.enabled:
        rules.append(CollisionRule.from_config(drv.collision, ids(drv.collision.classes)))
    if drv is not None and drv.drivable_zone is not None and drv.drivable_zone.enabled:
        rules.append(MaskZoneRule.from_config(drv.drivable_zone, ids(drv.drivable_zone.classes)))
    return rules


# Score thresholds that depend on the detector's score calibration: YOLOX scores (objectness x class) run
# higher than YOLOv8's (class only) for the same objects. (confirm_thresh, report_thresh) by family, measured
# with `edgecv eval --suite`; other families get TrackerConfig's defaults.
SCORE_THRESHOLDS = {"yolox": (0.65, 0.6), "yolov8": (0.6, 0.55), "yolov8-seg": (0.6, 0.55)}


def tracker_config(cfg: Config, fps: float, family: str = "") -> TrackerConfig:
    """The tracker settings of ``cfg`` for a camera at ``fps`` whose detector is of ``family``."""
    values = cfg.tracker.model_dump()
    confirm, report = SCORE_THRESHOLDS.get(family, (TrackerConfig.confirm_thresh, TrackerConfig.report_thresh))
    if values["confirm_thresh"] is None:
        values["confirm_thresh"] = confirm
    if values["report_thresh"] is None:
        values["report_thresh"] = report
    return TrackerConfig(frame_rate=fps, **values)


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


@dataclass(frozen=True)
class _Reconfigure:
    """A config reload's changes for one camera worker (None: unchanged)."""

    rules: Optional[list[Rule]] = None
    tracker_config: Optional[TrackerConfig] = None
    detector: Optional[Detector] = None


EventsHook = Callable[[Frame, Detections, Optional[SemanticMasks], list[Event]], None]


class CameraWorker:
    """Per camera: decode model outputs, track, run the rules, emit events.

    ``models``: a :class:`ModelSet` (or a bare detector). ``on_events(frame, tracks, semantic, events)``
    runs after the events of a frame were handed to the sinks (snapshots); its errors are logged, once.
    """

    def __init__(self, name: str, node: str, source: Source, models: ModelSet | Detector,
                 make_tracker: Callable[[float], ByteTracker], rules: Sequence[Rule], sinks: Sequence[EventSink],
                 on_tracks: Optional[Callable[[Frame, Detections], None]] = None, queue_size: int = 8,
                 on_events: Optional[EventsHook] = None,
                 on_detections: Optional[Callable[[Frame, Detections], None]] = None,
                 failure_limit: int = 50, on_frame: Optional[EventsHook] = None) -> None:
        self.name = name
        self.node = node
        self.source = source
        self.models: ModelSet = models if isinstance(models, ModelSet) else ModelSet(models)
        self.detector = self.models.detector
        self.on_events = on_events
        self._hook_error: Optional[str] = None
        self.model_frames = {n: 0 for n in self.models.names}  # frames each model's output was decoded for
        self.prep_ms = LatencyWindow()
        self.decode_ms = LatencyWindow()
        self.rules_ms = LatencyWindow()
        self.make_tracker = make_tracker
        self.tracker: Optional[ByteTracker] = None  # made on the first frame, once the source's fps is known
        self.rules = list(rules)
        self.sinks = list(sinks)
        self.on_tracks = on_tracks
        self.on_detections = on_detections
        self.on_frame = on_frame  # after every processed frame, its events emitted (retained state, snapshots)
        self.frame_size = (0, 0)  # of the last frame processed
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.processed = 0
        self.frames_inferred = 0  # frames the models ran on; the others, skipped by reason (sources.gate):
        self.frames_skipped_by = dict.fromkeys(SKIP_REASONS, 0)
        self.track_speed = 0.0  # px/frame of the fastest tracked object after the last frame (read by a motion gate)
        self.measure_speed = False  # set when a gate reads track_speed: measured only then
        self._semantic: Optional[SemanticMasks] = None  # of the last inferred frame (a skipped frame keeps them)
        self.events = 0
        self.events_by_type: dict[str, int] = {}  # the same, by event type (metrics)
        # the newest processed frame, its tracks and masks: a reference, for the HTTP preview to draw on demand
        self.latest: Optional[tuple[Frame, Detections, Optional[SemanticMasks]]] = None
        self.latency = LatencyWindow()
        self.post_ms = LatencyWindow()
        # the latency budget (stats `latency_budget_ms`): waiting in the slot until inference started, the
        # inference of the frame's batch, waiting in this worker's queue
        self.wait_ms = LatencyWindow()
        self.batch_ms = LatencyWindow()
        self.queue_ms = LatencyWindow()
        self.epoch = stream_epoch(source)
        self._last_index = 0
        self._thread = threading.Thread(target=self._run, name=f"worker-{name}", daemon=True)
        self.error: Optional[str] = None
        self.failure_limit = failure_limit
        self.frames_failed = 0  # frames dropped because inference or their processing failed
        self.failures_in_a_row = 0
        self.failed: Optional[str] = None  # why this camera was given up (failure_limit frames failed in a row)
        self.decoder: Detector = self.detector  # decodes the boxes (a reload may hand over a retuned copy)
        # set by reconfigure() from another thread, taken by this worker's thread before its next frame
        self._handoff: Optional[_Reconfigure] = None
        self._handoff_lock = threading.Lock()
        self.busy_since = 0.0  # monotonic time the frame being processed was taken (0: waiting for one)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def reconfigure(self, rules: Optional[Sequence[Rule]] = None,
                    tracker_config: Optional[TrackerConfig] = None, detector: Optional[Detector] = None) -> None:
        """Swap in new rules, tracker thresholds and/or a detector copy with new thresholds (config reload),
        all taken by this worker's thread before its next frame (None: unchanged).

        The source and the tracker's tracks (and ids) are kept; new rules start with no per-track state.
        """
        with self._handoff_lock:  # two reloads before the next frame: the newer value of each part wins
            pending = self._handoff or _Reconfigure()
            self._handoff = _Reconfigure(pending.rules if rules is None else list(rules),
                                         tracker_config or pending.tracker_config, detector or pending.detector)

    def _apply_reconfigure(self) -> None:
        with self._handoff_lock:
            change, self._handoff = self._handoff, None
        if change is None:
            return
        if change.rules is not None:
            self.rules = change.rules
        if change.tracker_config is not None:  # called with a frame at hand: the source's fps is known
            tracker = self._ensure_tracker()
            tracker.reconfigure(replace(change.tracker_config, frame_rate=tracker.config.frame_rate))
        if change.detector is not None:
            self.decoder = change.detector

    def _ensure_tracker(self) -> ByteTracker:
        """The tracker, made on the first frame, once the source's fps is known."""
        if self.tracker is None:
            self.tracker = self.make_tracker(self.source.fps or self.source.cfg.max_fps or 15.0)
        return self.tracker

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            self.busy_since = time.monotonic()
            try:
                self.process(*item)
            except Exception as e:  # keep the camera alive; report once per distinct error
                msg = f"camera {self.name}: frame processing failed: {type(e).__name__}: {e}"
                if msg != self.error:
                    log.exception(msg)
                self.error = msg
                self.frame_failed(msg)
            else:
                self.failures_in_a_row = 0
            finally:
                self.busy_since = 0.0

    def frame_failed(self, reason: str) -> None:
        """A frame of this camera was dropped because inference or its processing failed (counted); after
        ``failure_limit`` in a row the camera is given up: its source stops in state `failed`."""
        self.frames_failed += 1
        self.failures_in_a_row += 1
        if self.failures_in_a_row >= self.failure_limit and self.failed is None:
            self.failed = f"{self.failures_in_a_row} frames in a row could not be processed: {reason}"
            log.error("camera %s: giving up: %s", self.name, self.failed)
            self.source.fail(self.failed)

    def process(self, prepared: Prepared, placements: Sequence[Any], outputs: Sequence[list[np.ndarray]],
                inferred: Optional[tuple[float, float]] = None) -> None:
        """One frame: ``outputs`` holds each model's outputs (ModelSet order) for this frame only, ``placements``
        where the frame sits in each model's input; ``inferred``: when its batch's inference began and ended
        (monotonic), for the latency budget."""
        t0 = time.perf_counter()
        frame = prepared.frame
        if inferred is not None:
            began, ended = inferred
            self.wait_ms.add(max(0.0, began - frame.t_mono - prepared.prep_ms / 1000) * 1000)
            self.batch_ms.add((ended - began) * 1000)
            self.queue_ms.add((time.monotonic() - ended) * 1000)
        if self._handoff is not None:  # a reload: from this frame on, decoding included
            self._apply_reconfigure()
        if not prepared.infer:  # the detector skipped it: the tracker predicts the frame, the last masks stand
            self.handle(frame, None, self._semantic, skip=prepared.skip)
            self.latency.add((time.monotonic() - frame.t_mono) * 1000)
            return
        dets, semantic = self.models.decode(placements, outputs, self.decoder)
        self._semantic = semantic
        for n in self.model_frames:
            self.model_frames[n] += 1
        t1 = time.perf_counter()
        self.handle(frame, dets, semantic)
        self.prep_ms.add(prepared.prep_ms)
        self.decode_ms.add((t1 - t0) * 1000)
        self.post_ms.add((time.perf_counter() - t0) * 1000)
        self.latency.add((time.monotonic() - frame.t_mono) * 1000)

    def handle(self, frame: Frame, dets: Optional[Detections], semantic: Optional[SemanticMasks],
               skip: Optional[str] = None) -> list[Event]:
        """Track, run the rules and emit the events of one decoded frame; returns the events. ``dets`` None: the
        detector skipped the frame (``skip`` says why, sources.gate) and the tracker predicts it."""
        t1 = time.perf_counter()
        if self._handoff is not None:  # handle() alone (no decode) takes a reload here
            self._apply_reconfigure()
        tracks = self._track(frame, dets, skip)
        removed = [Removed(e.track_id, e.class_id, e.score, e.xyxy) for e in self.tracker.events
                   if e.kind == TrackEventKind.REMOVED]
        ctx = self._context(frame, tracks, semantic)
        events: list[Event] = []
        for rule in self.rules:
            events.extend(rule.update(ctx, tracks, removed))
        t2 = time.perf_counter()
        if self.on_tracks is not None:
            self.on_tracks(frame, tracks)
        self._emit(frame, tracks, semantic, events)
        if self.on_frame is not None:
            self.on_frame(frame, tracks, semantic, events)
        for ev in events:
            self.events_by_type[ev.type] = self.events_by_type.get(ev.type, 0) + 1
        self.events += len(events)
        self.latest = (frame, tracks, semantic)
        self.processed += 1
        self.rules_ms.add((t2 - t1) * 1000)
        return events

    def _track(self, frame: Frame, dets: Optional[Detections], skip: Optional[str] = None) -> Detections:
        """The tracks after this frame's detections (frames dropped since the last one counted), their boxes
        clipped to the frame. Without detections (skipped by the detector) the tracker coasts: it predicts, or,
        when the motion gate saw nothing move, holds its tracks where they are."""
        tracker = self._ensure_tracker()
        skipped = max(0, frame.index - self._last_index - 1) if self._last_index else 0
        self._last_index = frame.index
        if dets is None:
            self.frames_skipped_by[skip or SKIP_INTERVAL] += 1
            hold = skip == SKIP_STATIC
            tracks = tracker.coast(image=None if hold else frame.image, frames_skipped=skipped, hold=hold)
        else:
            self.frames_inferred += 1
            if self.on_detections is not None:
                self.on_detections(frame, dets)
            tracks = tracker.update(dets, frames_skipped=skipped, image=frame.image)
        if self.measure_speed:
            self.track_speed = tracker.max_speed()
        w, h = self.frame_size = frame.size
        np.clip(tracks.xyxy, 0, np.array([w, h, w, h], np.float32), out=tracks.xyxy)  # Kalman boxes may overshoot
        return tracks

    def _context(self, frame: Frame, tracks: Detections, semantic: Optional[SemanticMasks]) -> FrameContext:
        """What the rules see of this frame: its time (stream time for files), names, masks and mask areas."""
        fps = self.source.fps
        t = (frame.index - 1) / fps if (self.source.cfg.kind == "file" and fps) else frame.t_mono
        areas = tracks.data.get("mask_area")
        mask_areas = {} if areas is None or tracks.track_id is None else dict(
            zip(tracks.track_id.tolist(), areas.tolist()))
        return FrameContext(self.node, self.name, frame.index, frame.t_wall, t, frame.size, self.detector.names,
                            self.epoch, semantic, mask_areas)

    def _emit(self, frame: Frame, tracks: Detections, semantic: Optional[SemanticMasks],
              events: list[Event]) -> None:
        """Hand the events to every sink, then to the ``on_events`` hook (its errors logged once each)."""
        for ev in events:
            for sink in self.sinks:
                sink.emit(ev)
        if not events or self.on_events is None:
            return
        try:
            self.on_events(frame, tracks, semantic, events)
        except Exception as e:  # a snapshot must never cost the camera its events
            msg = f"camera {self.name}: event hook failed: {type(e).__name__}: {e}"
            if msg != self._hook_error:
                log.exception(msg)
            self._hook_error = msg


def _capture_time(item: Prepared) -> float:
    return item.frame.t_mono


class _Turn:
    """A camera's place in its worker's order: what goes to the worker's queue at this point (a frame with its
    outputs, frames the detector skipped), known once ``done``."""

    __slots__ = ("since", "done", "items")

    def __init__(self, since: float = 0.0, items: Optional[list[tuple]] = None) -> None:
        self.since = since  # since when the camera has waited for this frame's inference (monotonic)
        self.done = items is not None
        self.items: list[tuple] = items or []


class InferenceWorker:
    """The inference threads: take ready frames from every camera, run every model on them in batches, hand each
    frame with all its models' outputs to its camera worker.

    ``models.parallel`` threads (lanes) infer at the same time. Whenever a lane is free it first takes every ready
    frame out of the cameras' slots into the waiting list (so a camera's next frame finds its slot free: it waits
    rather than replacing the one taken), then the frames of the cameras that have waited longest
    (``models.max_batch`` at most). A camera waits from the capture of the frame that found its slot empty: a
    newer frame that replaced that one (a drop) keeps its place. Under load every camera waits alike, none is
    starved by where it stands in the config, by when its frames arrive, or by having dropped one.

    A live camera has at most one frame waiting or in inference. A replay (a blocking slot: every frame is
    processed, as fast as the machine goes) may have one per lane, so that one file uses every lane (`edgecv
    track`, `eval`); frames inferred out of turn wait for the earlier ones, so every camera's frames, inferred
    or skipped by the detector, reach its worker in the order they were read."""

    def __init__(self, models: ModelSet | Detector, workers: dict[str, CameraWorker], notify: threading.Event,
                 max_frames: Optional[int] = None, failure_limit: int = 50) -> None:
        self.models: ModelSet = models if isinstance(models, ModelSet) else ModelSet(models)
        self.detector = self.models.detector
        self.workers = workers
        self.notify = notify
        self.max_frames = max_frames
        self.infer_ms = LatencyWindow()  # all models, per frame
        self.model_ms = {n: LatencyWindow() for n in self.models.names}  # per model, per frame
        self.frames = 0
        self.batches: dict[int, int] = {}  # chunks inferred, by size (frames of several cameras run together)
        self._counts = {name: 0 for name in workers}  # frames taken from each camera's slot
        self._stop = threading.Event()
        self.lanes = max(1, self.models.parallel)
        # the first lane keeps the name "inference" (stats, CPU by role); the others are inference-2, -3...
        self._threads = [threading.Thread(target=self._run, args=(i,), name="inference" + (f"-{i + 1}" if i else ""),
                                          daemon=True) for i in range(self.lanes)]
        self._lock = threading.Lock()  # the waiting frames, their cameras, counts and failures: shared by the lanes
        self._waiting: list[tuple[CameraWorker, Prepared, _Turn]] = []  # collected, not yet taken by a lane
        self._taken = {name: 0 for name in workers}  # frames of each camera waiting or in inference
        # how many it may have (class docstring): one per lane for a replay with no drop, else one
        self._limit = {name: self.lanes if w.source.slot.blocking else 1 for name, w in workers.items()}
        # each camera's turns not yet handed to its worker, in the order its frames were read
        self._turns: dict[str, collections.deque[_Turn]] = {name: collections.deque() for name in workers}
        self._busy: dict[int, float] = {}  # lane -> monotonic time its chunk's inference began
        self.error: Optional[str] = None  # set when inference is given up (the pipeline has failed)
        self.failure_limit = failure_limit
        self.failures = 0  # frames whose inference failed
        self.failures_in_a_row = 0
        self._reported: set[str] = set()  # distinct failure messages logged so far
        self.frame_ms = 0.0  # one frame's inference, all models, moving average (weight 0.1 of the newest)
        self.on_exit: Optional[Callable[[], None]] = None  # called on each lane's thread as it ends (CPU meter)

    def start(self) -> None:
        for t in self._threads:
            t.start()

    @property
    def busy_since(self) -> float:
        """When the longest-running inference now began (monotonic; 0.0: none running)."""
        return min(tuple(self._busy.values()), default=0.0)

    def backlog(self, camera: str = "") -> int:
        """Frames waiting for inference now, but ``camera``'s own: collected and not yet inferred (waiting or
        in inference), or ready in another camera's slot to be collected (not a slot holding only frames the
        detector skips: they pass straight through). Read from capture threads (``detect.defer_when_busy``): a
        snapshot, no lock taken."""
        waiting = sum(1 for name, w in self.workers.items()
                      if name != camera and (item := w.source.slot.peek()) is not None and item.infer)
        return sum(self._taken.values()) + waiting

    def wait_ms(self, camera: str = "") -> float:
        """How long a frame of ``camera`` put now would wait for inference: the backlog times the recent time of
        one frame's inference (a moving average), shared by the lanes."""
        return self.backlog(camera) * self.frame_ms / self.lanes

    def stop(self) -> None:
        self._stop.set()
        self.notify.set()

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    @property
    def alive(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def _collect(self) -> list[tuple[CameraWorker, Prepared, _Turn]]:
        """The frame ready in each camera's slot that has fewer than its limit waiting or in inference (lock
        held)."""
        ready = []
        for name, w in self.workers.items():
            if self._taken[name] >= self._limit[name] or (
                    self.max_frames is not None and self._counts[name] >= self.max_frames):
                continue
            item, since = w.source.slot.take_waiting()
            if item is None:
                continue
            self._pass_skipped(w, item.before)
            if item.infer:
                self._counts[name] += 1
                self._taken[name] += 1
                turn = _Turn(since)
                self._turns[name].append(turn)
                ready.append((w, item, turn))
            else:  # the detector skips it (sources.gate): straight to the worker
                self._pass_skipped(w, [item])
        return ready

    def _next_chunk(self) -> list[tuple[CameraWorker, Prepared, _Turn]]:
        """The frames of the cameras that have waited longest (at most ``models.max_batch``), frames newly ready in
        the slots collected first; empty when none is ready."""
        with self._lock:
            self._waiting.extend(self._collect())
            self._waiting.sort(key=lambda item: item[2].since)
            chunk, self._waiting = self._waiting[:self.models.max_batch], self._waiting[self.models.max_batch:]
            return chunk

    def _pass_skipped(self, w: CameraWorker, items: Sequence[Prepared]) -> None:
        """Frames the detector skips, to their camera worker in order (its tracker predicts them): at once, or
        after the camera's frames still in inference (lock held)."""
        if not items:
            return
        self._counts[w.name] += len(items)
        self._turns[w.name].append(_Turn(items=[(item, (), ()) for item in items]))
        self._deliver(w)

    def _finish(self, w: CameraWorker, turn: _Turn, items: list[tuple], after: Sequence[Prepared]) -> None:
        """A frame of ``w`` is through inference (``items``: what its worker gets for it, none when it failed),
        followed by the skipped frames that rode along with it: handed on in the camera's order (lock held)."""
        self._counts[w.name] += len(after)
        turn.items = [*items, *((item, (), ()) for item in after)]
        turn.done = True
        self._taken[w.name] -= 1
        self._deliver(w)

    def _deliver(self, w: CameraWorker) -> None:
        """Put the camera's turns that are done, up to its first still in inference, on its worker's queue."""
        turns = self._turns[w.name]
        while turns and turns[0].done:
            for entry in turns.popleft().items:
                w.queue.put(entry)

    def _all_done(self) -> bool:
        for name, w in self.workers.items():
            limit_hit = self.max_frames is not None and self._counts[name] >= self.max_frames
            if not (limit_hit or w.source.finished):
                return False
        return True

    def _infer(self, chunk: Sequence[Prepared]) -> tuple[list[list[np.ndarray]], list[list[Any]]]:
        """Every model's outputs for a chunk of frames, and each frame's placement, per model."""
        per_model: list[list[np.ndarray]] = []
        placements: list[list[Any]] = []
        total = 0.0
        for j, name in enumerate(self.models.names):
            t0 = time.perf_counter()
            outputs, where = self.models.infer(j, chunk)
            per_model.append(outputs)
            placements.append(where)
            ms = (time.perf_counter() - t0) * 1000 / len(chunk)
            self.model_ms[name].add(ms)
            total += ms
        self.infer_ms.add(total)
        self.frame_ms = total if not self.frame_ms else 0.9 * self.frame_ms + 0.1 * total
        return per_model, placements

    def _hand_over(self, items: Sequence[tuple[CameraWorker, Prepared, _Turn]], per_model: list[list[np.ndarray]],
                   placements: list[list[Any]], began: float = 0.0) -> None:
        inferred = (began, time.monotonic())  # the batch's inference (latency budget)
        with self._lock:
            self.failures_in_a_row = 0  # inferred: the run of failures is over
            self.batches[len(items)] = self.batches.get(len(items), 0) + 1
            for i, (w, p, turn) in enumerate(items):
                self.frames += 1
                self._finish(w, turn, [(p, [where[i] for where in placements],
                                        [[o[i:i + 1] for o in outputs] for outputs in per_model], inferred)], p.after)

    def _run_chunk(self, items: Sequence[tuple[CameraWorker, Prepared, _Turn]], lane: int = 0) -> bool:
        """Infer a chunk and hand its frames on. When inference fails, a chunk of several frames is tried again
        one frame at a time (so a frame that breaks the model costs only itself); a frame that fails alone is
        dropped and counted, the failure logged once per distinct message. Returns False once inference has
        failed ``failure_limit`` frames in a row: the pipeline has failed."""
        try:
            self._busy[lane] = began = time.monotonic()
            per_model, placements = self._infer([p for _, p, _ in items])
        except Exception as e:
            if len(items) > 1:
                return all(self._run_chunk([item], lane) for item in items)
            return self._failed(items[0], e)
        finally:
            self._busy.pop(lane, None)
        self._hand_over(items, per_model, placements, began)
        return True

    def _failed(self, item: tuple[CameraWorker, Prepared, _Turn], e: Exception) -> bool:
        """One frame's inference failed: counted, dropped, logged once per message; False once ``failure_limit``
        frames in a row have failed."""
        w, failed, turn = item
        why = str(e) if isinstance(e, EdgecvError) else f"{type(e).__name__}: {e}"  # EdgecvError names the model
        msg = f"inference failed: {' '.join(why.split())}"
        with self._lock:
            if msg not in self._reported and len(self._reported) < 100:
                self._reported.add(msg)
                log.error("camera %s: %s (such frames are dropped and counted; this message is logged once)",
                          w.name, msg)
            self.failures += 1
            self.failures_in_a_row += 1
            w.frame_failed(msg)
            self._finish(w, turn, [], failed.after)
            if self.failures_in_a_row >= self.failure_limit:
                self.error = self.error or f"inference failed on {self.failures_in_a_row} frames in a row: {msg}"
                log.error(self.error)
                return False
        return True

    def _run(self, lane: int = 0) -> None:
        try:
            while not self.error:
                self.notify.clear()  # before collecting: a frame put from now on sets it again, and is waited for
                chunk = self._next_chunk()
                if not chunk:
                    if self._stop.is_set() or self._all_done():
                        return
                    self.notify.wait(0.05)
                    continue
                if not self._run_chunk(chunk, lane):
                    return
        except Exception as e:  # not an inference error: a defect; the pipeline has failed
            self.error = f"inference thread failed: {type(e).__name__}: {e}"
            log.exception(self.error)
        finally:
            if self.on_exit is not None:
                self.on_exit()


class Pipeline:
    """Everything between the sources and the sinks, for one config."""

    def __init__(self, cfg: Config, detector: ModelSet | Detector, sinks: Sequence[EventSink],
                 max_frames: Optional[int] = None,
                 on_tracks: Optional[Callable[[str, Frame, Detections], None]] = None,
                 on_state: Optional[Callable[[str, str, str], None]] = None,
                 on_events: Optional[Callable[[str, Frame, Detections, Optional[SemanticMasks], list[Event]], None]] = None,
                 on_detections: Optional[Callable[[str, Frame, Detections], None]] = None,
                 on_frame: Optional[Callable[[str, Frame, Detections, Optional[SemanticMasks], list[Event]], None]] = None,
                 detect_switch: bool = False,
                 ) -> None:
        """``detector``: a :class:`ModelSet` (detector + segmenters) or a bare detector. ``detect_switch``: every
        camera gets a frame gate, so that :meth:`set_detect` can switch its detector at run time."""
        self.cfg = cfg
        self.models = detector if isinstance(detector, ModelSet) else ModelSet(detector)
        self.detector = self.models.detector
        self.notify = threading.Event()
        self.sources: dict[str, Source] = {}
        self.workers: dict[str, CameraWorker] = {}
        self.gates: dict[str, FrameGate] = {}
        for name, cam in cfg.cameras.items():
            location = str(resolve_path(cfg, str(cam.source)) or cam.source) if cam.kind == "file" else str(cam.source)
            src = make_source(name, cam, location, on_state)
            src.prepare = self.models.prepare
            src.slot.stamp = _capture_time
            src.notify = self.notify
            cb = (lambda f, t, _n=name: on_tracks(_n, f, t)) if on_tracks else None
            ev = (lambda f, t, s, e, _n=name: on_events(_n, f, t, s, e)) if on_events else None
            dh = (lambda f, d, _n=name: on_detections(_n, f, d)) if on_detections else None
            fh = (lambda f, t, s, e, _n=name: on_frame(_n, f, t, s, e)) if on_frame else None
            self.sources[name] = src
            self.workers[name] = CameraWorker(name, cfg.node_id, src, self.models, self._tracker_factory,
                                              build_rules(cam, self.detector), sinks, cb, on_events=ev,
                                              on_detections=dh, failure_limit=cfg.failure_limit, on_frame=fh)
            self._install_gate(src, self.workers[name], cam, detect_switch)
        self.inference = InferenceWorker(self.models, self.workers, self.notify, max_frames, cfg.failure_limit)
        self.started_at = 0.0
        self.cpu = CpuMeter()  # CPU time by stage from here on (stats: cpu_ms_per_frame)
        self.inference.on_exit = self.cpu.thread_ended  # threads that end before the run does count in full
        for src in self.sources.values():
            src.on_exit = self.cpu.thread_ended

    def _install_gate(self, src: Source, worker: CameraWorker, cam: CameraConfig, switch: bool = False) -> None:
        """The camera's `detect` section in front of its preprocessing (capture thread): a frame the detector skips
        reaches the worker unprepared, and never replaces (nor is replaced by) a frame waiting in the source's slot: it
        rides along with it (``models.merge_skipped``), so the rules see every frame read.
        ``switch``: installed even when every frame is inferred, so that :meth:`set_detect` can switch it."""
        if not (cam.detect.gated or switch):
            return  # every frame inferred, as without the section
        # a replay with no drop (block mode) never defers: it has no latency to keep, and stays reproducible
        wait_ms = (lambda: 0.0) if src.slot.blocking else (lambda: self.inference.wait_ms(worker.name))
        gate = self.gates[worker.name] = FrameGate(cam.detect, track_speed=lambda: worker.track_speed,
                                                   name=src.display, wait_ms=wait_ms)
        worker.measure_speed = cam.detect.gated
        models = self.models

        def prepare(frame: Frame) -> Prepared:
            skip = gate.decide(frame.image)
            return models.prepare(frame) if skip is None else Prepared(frame, (), skip=skip)

        src.prepare = prepare
        src.on_open = lambda: gate.reset(src.fps)  # a stream's first frame is inferred; every_n follows its fps
        src.slot.merge = merge_skipped

    def detect_enabled(self, camera: str) -> bool:
        """Whether the detector runs on ``camera`` (its gate's run-time switch, else ``detect.enabled``)."""
        gate = self.gates.get(camera)
        return gate.enabled if gate is not None else self.cfg.cameras[camera].detect.enabled

    def set_detect(self, camera: str, on: bool) -> None:
        """Switch ``camera``'s detector on or off from any thread (its source keeps streaming; while off, its frames
        are counted as ``frames_skipped_disabled`` and the tracker coasts). Needs ``detect_switch`` or a gated
        ``detect`` section (KeyError otherwise)."""
        self.gates[camera].enabled = on

    def _tracker_factory(self, fps: float) -> ByteTracker:
        return ByteTracker(tracker_config(self.cfg, fps, self.detector.family))

    def start(self) -> None:
        self.started_at = time.monotonic()
        for w in self.workers.values():
            w.start()
        self.inference.start()
        for s in self.sources.values():
            s.start()

    def run(self, poll_s: float = 0.01) -> None:
        """Start, process until every source is consumed (finite sources or max_frames), stop."""
        try:
            self.start()
            next_sample = 0.0
            while not (self.done or self.failed):
                time.sleep(poll_s)
                if time.monotonic() >= next_sample:  # CPU by stage: a thread counts up to its last sample
                    self.cpu.sample()
                    next_sample = time.monotonic() + 0.5
            self.cpu.sample()
        finally:
            self.stop()

    @property
    def done(self) -> bool:
        """All input consumed (finite sources ended or --max-frames reached) and processed (not `failed`)."""
        return (self.failed is None and not self.inference.alive
                and all(w.queue.empty() for w in self.workers.values()))

    @property
    def failed(self) -> Optional[str]:
        """Why the pipeline cannot go on (inference failed ``failure_limit`` frames in a row, or every camera was
        given up), else None. Never the same as `done`: a service must not take a failure for the end."""
        if self.inference.error:
            return self.inference.error
        given_up = [w for w in self.workers.values() if w.failed]
        if given_up and len(given_up) == len(self.workers):
            return "every camera was given up: " + "; ".join(f"{w.name}: {w.failed}" for w in given_up)
        return None

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

    def health(self, now: Optional[float] = None) -> list[str]:
        """Why the pipeline is not making progress, one reason per stuck or dead thread (empty: healthy).

        Stuck: the inference thread busy on one batch, or a camera worker on one frame, for the config's
        `stuck_after_s`; a capture thread blocked in one read (or in opening the source) for that long past the
        camera's read (open) timeout (the backend ignores its timeout, and the thread cannot be interrupted).
        Dead: a thread that ended while the pipeline runs (a finished file source, a camera given up or a stop
        are not problems). Read by systemd's watchdog (no ping while there is a reason) and the HTTP `/healthz`."""
        now = time.monotonic() if now is None else now
        limit = self.cfg.stuck_after_s
        problems = []
        if self.started_at and not self.done:
            if self.inference.error:
                problems.append(self.inference.error)
            elif not self.inference.alive and not self.inference.stopping:
                problems.append("inference thread ended")
        busy = self.inference.busy_since
        if busy and now - busy > limit:
            problems.append(f"inference stuck: one batch running for {now - busy:.0f}s")
        for name in self.workers:
            problems += self._camera_health(name, now, limit)
        return problems

    def _camera_health(self, name: str, now: float, limit: float) -> list[str]:
        """Camera ``name``'s part of :meth:`health`."""
        w, src = self.workers[name], self.sources[name]
        problems = []
        if w.busy_since and now - w.busy_since > limit:
            problems.append(f"camera {name}: worker stuck on one frame for {now - w.busy_since:.0f}s")
        elif self.started_at and not w.alive and self.inference.alive:
            problems.append(f"camera {name}: worker thread ended")
        blocked = src.read_blocked_s(now)
        if blocked > limit + src.cfg.read_timeout_s:
            problems.append(f"camera {name}: capture blocked in one read for {blocked:.0f}s")
        opening = src.open_blocked_s(now)
        if opening > limit + src.cfg.open_timeout_s:
            problems.append(f"camera {name}: capture blocked opening the source for {opening:.0f}s")
        return problems

    def check_stalls(self) -> None:
        for s in self.sources.values():
            s.check_stall()

    def latency_windows(self, name: str) -> dict[str, LatencyWindow]:
        """Camera ``name``'s latency budget, stage by stage in the order a frame goes through them: reading
        (decode; live streams: waiting for the camera too; before `captured_at`), preprocessing, waiting for the
        inference thread, the inference of its batch, waiting in the camera worker's queue, decoding + NMS,
        tracking + rules. The events' spool write and broker acknowledgement are the publisher's."""
        w, s = self.workers[name], self.sources[name]
        return {"capture": s.read_ms, "preprocess": w.prep_ms, "queue_inference": w.wait_ms,
                "inference": w.batch_ms, "queue_worker": w.queue_ms, "decode_nms": w.decode_ms,
                "track_rules": w.rules_ms}

    def latency_budget(self, name: str) -> dict[str, dict[str, float]]:
        """p50 and p99 (ms) of each stage of :meth:`latency_windows`."""
        return {stage: window.budget() for stage, window in self.latency_windows(name).items()}

    def cpu_per_frame(self) -> dict[str, float]:
        """CPU milliseconds per processed frame (all cameras) by stage, since the start (:mod:`edgecv.cpu`)."""
        self.cpu.sample()
        return self.cpu.per_frame_ms(sum(w.processed for w in self.workers.values()))

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
                "frames_failed": w.frames_failed,
                "frames_skipped": s.stats.skipped,
                "frames_inferred": w.frames_inferred,
                **{f"frames_skipped_{why}": n for why, n in w.frames_skipped_by.items()},
                "reconnects": s.stats.reconnects,
                "events": w.events,
                "latency_ms": w.latency.percentiles(),
                "post_ms": w.post_ms.percentiles(),
                "stage_ms": {"preprocess": w.prep_ms.percentiles(), "decode": w.decode_ms.percentiles(),
                             "track_rules": w.rules_ms.percentiles()},
                "models": dict(w.model_frames),
                "latency_budget_ms": self.latency_budget(name),
            }
        return {"cameras": cams, "pipeline": "failed" if self.failed else "running",
                "inference_ms": self.inference.infer_ms.percentiles(),
                "inference_ms_by_model": {n: m.percentiles() for n, m in self.inference.model_ms.items()},
                "inference_batches": {str(n): c for n, c in sorted(dict(self.inference.batches).items())},
                "cpu_ms_per_frame": self.cpu_per_frame(),
                "uptime_s": round(elapsed, 1), "threads": threading.active_count(),
                "pid": os.getpid()}
