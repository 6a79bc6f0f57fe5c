"""The daemon: builds the pipeline from a config, owns signals, stats and shutdown."""
from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import numpy as np

from . import EdgecvError
from .config import Config, ConfigError, resolve_path
from .engine.adapters import Detector
from .engine.registry import build_detector
from .pipeline import EventSink, Pipeline
from .publish.console import ConsoleSink
from .publish.mqtt import MqttPublisher
from .publish.spool import Spool, SpoolError, default_spool_path
from .types import Detections, Event, Frame

log = logging.getLogger("edgecv")

SHUTDOWN_DEADLINE_S = 4.0


def setup_logging(level: str = "info") -> None:
    root = logging.getLogger()
    if not any(getattr(h, "_edgecv", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S"))
        handler._edgecv = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))


def load_detector(cfg: Config) -> Detector:
    """Build the configured detector and check every class name the config uses against it."""
    model_path = resolve_path(cfg, cfg.model.path)
    if model_path is None:
        raise ConfigError([f"model.path: file not found: {cfg.model.path}"])
    labels = resolve_path(cfg, cfg.model.labels) if cfg.model.labels else None
    detector = build_detector(model_path, family=cfg.model.family, backend=cfg.model.backend, conf=cfg.model.conf,
                              iou=cfg.model.iou, classes=None, labels=labels, threads=cfg.model.threads)
    problems: list[str] = []
    valid = set(detector.names)

    def check(field: str, classes: Optional[list[str]]) -> None:
        for c in classes or []:
            if c not in valid:
                problems.append(f"{field}: unknown class {c!r} for model {model_path.name} "
                                f"(e.g. {', '.join(list(detector.names)[:6])}, ...)")

    check("model.classes", cfg.model.classes)
    for cam_name, cam in cfg.cameras.items():
        check(f"cameras.{cam_name}.objects.classes", cam.objects.classes)
        for zname, z in cam.zones.items():
            check(f"cameras.{cam_name}.zones.{zname}.classes", z.classes)
        for lname, ln in cam.lines.items():
            check(f"cameras.{cam_name}.lines.{lname}.classes", ln.classes)
    if problems:
        raise ConfigError(problems)
    if cfg.model.classes:
        detector.class_filter = np.asarray(detector.class_ids(cfg.model.classes), np.int32)
    return detector


class PublisherSink:
    """Event sink that stores events in the spool for the MQTT sender."""

    def __init__(self, publisher: MqttPublisher) -> None:
        self.publisher = publisher
        self.failed = 0

    def emit(self, event: Event) -> None:
        try:
            self.publisher.submit(event)
        except SpoolError as e:
            self.failed += 1
            log.error("%s (event %s %s not stored)", e, event.type, event.id)


class TracksPublisher:
    """Per-frame track lists on <prefix>/<node>/<camera>/tracks, QoS 0, at most `max_hz` per camera."""

    def __init__(self, publisher: MqttPublisher, names: list[str], max_hz: float) -> None:
        self.publisher = publisher
        self.names = names
        self.min_dt = 1.0 / max_hz
        self._last: dict[str, float] = {}

    def __call__(self, camera: str, frame: Frame, tracks: Detections) -> None:
        now = time.monotonic()
        if now - self._last.get(camera, -1e9) < self.min_dt:
            return
        self._last[camera] = now
        ids = tracks.track_id if tracks.track_id is not None else np.zeros(len(tracks), np.int64)
        items = [{"track_id": int(t), "label": self.names[int(c)] if 0 <= int(c) < len(self.names) else str(int(c)),
                  "score": round(float(s), 3), "bbox": [round(float(v), 1) for v in box]}
                 for t, c, s, box in zip(ids, tracks.class_id, tracks.score, tracks.xyxy)]
        body = {"camera": camera, "frame": frame.index, "captured_at": round(frame.t_wall, 3),
                "frame_size": list(frame.size), "tracks": items}
        self.publisher.publish_raw(self.publisher.topics.tracks(camera), json.dumps(body, separators=(",", ":")))


class Daemon:
    def __init__(self, cfg: Config, max_frames: Optional[int] = None, realtime: Optional[bool] = None) -> None:
        self.cfg = cfg
        if realtime is not None:
            cams = {n: c.model_copy(update={"realtime": realtime}) for n, c in cfg.cameras.items()}
            self.cfg = cfg = cfg.model_copy(update={"cameras": cams})
        self.max_frames = max_frames
        self.stop_event = threading.Event()
        self.detector = load_detector(cfg)
        sinks: list[EventSink] = []
        if cfg.console.enabled:
            sinks.append(ConsoleSink(cfg.console.format))
        self.publisher: Optional[MqttPublisher] = None
        if cfg.mqtt.enabled:
            spool_path = default_spool_path(cfg.node_id, cfg.mqtt.spool.path)
            spool = Spool(spool_path, int(cfg.mqtt.spool.max_mb * 1024 * 1024))
            tls = None
            if cfg.mqtt.tls is not None:
                tls = {k: resolve_path(cfg, v) if v else None
                       for k, v in cfg.mqtt.tls.model_dump(include={"ca_file", "cert_file", "key_file"}).items()}
            self.publisher = MqttPublisher(cfg.mqtt, cfg.node_id, spool, tls)
            sinks.append(PublisherSink(self.publisher))
        on_tracks = None
        if self.publisher is not None and cfg.mqtt.publish_tracks:
            on_tracks = TracksPublisher(self.publisher, self.detector.names, cfg.mqtt.tracks_max_hz)
        self.pipeline = Pipeline(cfg, self.detector, sinks, max_frames=max_frames, on_tracks=on_tracks)

    def _signal(self, signum: int, _frame: object) -> None:
        log.info("received %s: shutting down", signal.Signals(signum).name)
        self.stop_event.set()

    def install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self._signal)
        signal.signal(signal.SIGINT, self._signal)

    def run(self) -> int:
        cfg = self.cfg
        log.info("edgecv node %s: %d camera(s), model %s (%s, %s)", cfg.node_id, len(cfg.cameras),
                 Path(cfg.model.path).name, self.detector.family, self.detector.backend.name)
        if self.publisher is not None:
            self.publisher.start()
        self.pipeline.start()
        next_stats = time.monotonic() + cfg.mqtt.stats_interval_s
        while not self.stop_event.wait(0.2):
            self.pipeline.check_stalls()
            if time.monotonic() >= next_stats:
                self.publish_stats()
                next_stats = time.monotonic() + cfg.mqtt.stats_interval_s
            if self.pipeline.done:
                log.info("all sources finished")
                break
        return self.shutdown()

    def publish_stats(self) -> dict:
        stats = self.pipeline.stats()
        if self.publisher is not None:
            stats["spool"] = {"depth": self.publisher.spool.depth, "bytes": self.publisher.spool.size_bytes,
                              "dropped": self.publisher.spool.dropped}
            stats["mqtt"] = self.publisher.state
            self.publisher.publish_raw(self.publisher.topics.stats, json.dumps(stats, separators=(",", ":")))
        return stats

    def shutdown(self) -> int:
        t0 = time.monotonic()
        self.pipeline.stop(timeout=SHUTDOWN_DEADLINE_S / 2)
        stats = self.publish_stats()
        for name, cam in stats["cameras"].items():
            log.info("camera %s: %d frames read, %d processed, %d dropped, %d events", name, cam["frames_read"],
                     cam["frames_processed"], cam["frames_dropped"], cam["events"])
        if self.publisher is not None:
            self.publisher.close(deadline_s=max(0.5, SHUTDOWN_DEADLINE_S - (time.monotonic() - t0)))
            self.publisher.spool.close()
        failed = [f"{n}: {s.reason}" for n, s in self.pipeline.sources.items() if s.state == "failed"]
        for msg in failed:
            log.error("camera %s", msg)
        return 1 if (failed and len(failed) == len(self.pipeline.sources)) or self.pipeline.inference.error else 0


def run(cfg: Config, max_frames: Optional[int] = None, realtime: Optional[bool] = None) -> int:
    setup_logging(cfg.log_level)
    try:
        daemon = Daemon(cfg, max_frames=max_frames, realtime=realtime)
    except SpoolError as e:
        raise EdgecvError(str(e)) from None
    daemon.install_signals()
    return daemon.run()
