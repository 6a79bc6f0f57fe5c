"""The daemon: builds the pipeline from a config, owns signals, stats and shutdown."""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np

from . import EdgecvError
from .config import Config, ConfigError, resolve_path
from .config import load as load_config
from .config_diff import applied, diff
from .models import load_models, retuned
from .pipeline import EventSink, Pipeline, build_rules, tracker_config
from .publish.console import ConsoleSink
from .publish.consumers import MqttConsumers
from .publish.mqtt import MqttPublisher
from .publish.snapshot import SnapshotPublisher
from .publish.spool import Spool, SpoolError, default_spool_path
from .logfmt import formatter as log_formatter
from .service import ServiceNotify
from .types import Detections, Event, Frame
from .web.server import OperatorServer

log = logging.getLogger("edgecv")

SHUTDOWN_DEADLINE_S = 4.0


def _warning_line(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: Optional[str] = None) -> None:
    """warnings.showwarning: one log line (NumPy's RuntimeWarning, EdgecvWarning), not Python's two raw lines."""
    logging.getLogger("edgecv.warnings").warning("%s: %s (%s:%d)", category.__name__, " ".join(str(message).split()),
                                                 Path(filename).name, lineno)


def setup_logging(level: str = "info", fmt: Optional[str] = None) -> None:
    """stderr logging at ``level``; ``fmt`` (the config's log_format: text, json) when known, else text (see
    :mod:`edgecv.logfmt`: no timestamp of its own when stderr is the journal)."""
    warnings.showwarning = _warning_line
    root = logging.getLogger()
    handler = next((h for h in root.handlers if getattr(h, "_edgecv", False)), None)
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(log_formatter(fmt or "text"))
        handler._edgecv = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    elif fmt is not None:
        handler.setFormatter(log_formatter(fmt))
    root.setLevel(getattr(logging, level.upper(), logging.INFO))


class PublisherSink:
    """Event sink that stores events in the spool for the MQTT sender.

    An event the spool cannot store is published directly or counted as lost by the publisher
    (logged in one line each, counted in the stats' `spool` section); the camera keeps running.
    """

    def __init__(self, publisher: MqttPublisher) -> None:
        self.publisher = publisher

    def emit(self, event: Event) -> None:
        self.publisher.submit(event)


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


class Signals:
    """SIGTERM/SIGINT ask to stop, SIGHUP to reload the config. Installed first thing in `edgecv run`, before
    the config and the models are loaded (minutes for a TensorRT build), so that a signal in that window is
    never fatal: a stop during start-up ends the process at once with exit 0, a reload waits until start-up is
    done (then the config is read again)."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.reload = threading.Event()
        self.starting = True

    def install(self, reload: bool) -> "Signals":
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        if hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, self._hup if reload else self._no_reload)
        return self

    def _stop(self, signum: int, _frame: object) -> None:
        log.info("received %s: %s", signal.Signals(signum).name,
                 "stopping start-up and exiting" if self.starting else "shutting down")
        self.stop.set()

    def _hup(self, _signum: int, _frame: object) -> None:
        if self.starting:
            log.info("received SIGHUP during start-up: the config is read again once start-up is done")
        self.reload.set()

    def _no_reload(self, _signum: int, _frame: object) -> None:
        log.info("received SIGHUP: ignored (no config file to reload)")


class Daemon:
    def __init__(self, cfg: Config, max_frames: Optional[int] = None, realtime: Optional[bool] = None,
                 config_path: Optional[str] = None, signals: Optional[Signals] = None) -> None:
        self.realtime = realtime
        self.config_path = config_path
        self.cfg = cfg = self._override(cfg)
        self.max_frames = max_frames
        self.signals = signals or Signals()
        self.stop_event = self.signals.stop
        self.reload_event = self.signals.reload
        # the operator HTTP server binds first: a port in use fails at once, before the models load
        self.http = OperatorServer(cfg.http) if cfg.http.enabled else None
        self.models = load_models(cfg)
        self.detector = self.models.detector
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
        # retained state topics, Home Assistant discovery, commands (None without MQTT)
        self.consumers = MqttConsumers.make(cfg, self.publisher, self.detector.names, self.reload_event)
        on_tracks = None
        if self.publisher is not None and cfg.mqtt.publish_tracks:
            on_tracks = TracksPublisher(self.publisher, self.detector.names, cfg.mqtt.tracks_max_hz)
        on_events = None
        if self.publisher is not None and cfg.mqtt.snapshots.enabled:
            on_events = SnapshotPublisher(self.publisher, cfg, self.detector.names)
        extra_sinks, hooks = MqttConsumers.wiring(self.consumers)
        self.pipeline = Pipeline(cfg, self.models, sinks + extra_sinks, max_frames=max_frames, on_tracks=on_tracks,
                                 on_events=on_events, **hooks)
        MqttConsumers.attach_to(self.consumers, self.pipeline)

    def _override(self, cfg: Config) -> Config:
        """Apply command-line overrides (--fast: files as fast as possible, also unpaced)."""
        if self.realtime is None:
            return cfg
        update = {"realtime": self.realtime, **({} if self.realtime else {"pace_fps": None})}
        return cfg.model_copy(update={"cameras": {n: c.model_copy(update=update) for n, c in cfg.cameras.items()}})

    def reload(self) -> bool:
        """SIGHUP: re-read the config file; apply rule, tracker and detector-threshold changes to the running
        cameras, each from its next frame (through the worker's handoff), without restarting their sources. An
        invalid file is rejected and the running config kept. Changes that need new sources, models or a new
        broker connection are reported, not applied (see :mod:`edgecv.config_diff`)."""
        assert self.config_path is not None
        log.info("received SIGHUP: reloading %s", self.config_path)
        try:
            new = self._override(load_config(self.config_path))
            change = diff(self.cfg, new, self.models.names[0])
            # everything is built before anything applies: an unknown class name rejects the whole reload
            rules = {name: build_rules(new.cameras[name], self.detector) for name in change.rules}
            tcfg = tracker_config(new, 1.0, self.detector.family) if change.tracker else None
            decoder = retuned(self.detector, dict(new.model_sections)[change.detector]) if change.detector else None
        except ConfigError as e:
            for problem in e.problems:
                log.error("reload rejected: %s", problem)
            log.error("reload rejected: keeping the running config")
            return False
        except EdgecvError as e:
            log.error("reload rejected: %s; keeping the running config", e)
            return False
        for name, w in self.pipeline.workers.items():  # each worker keeps its own frame rate
            w.reconfigure(rules=rules.get(name), tracker_config=tcfg, detector=decoder)
        self.cfg = applied(self.cfg, new, change)
        if self.consumers is not None:
            self.consumers.reconfigure(self.cfg)
        live = change.live
        log.info("reload: applied %s", ", ".join(live) if live else "nothing (no change)")
        if change.restart:
            log.warning("reload: not applied until a restart: %s", ", ".join(change.restart))
        return True

    def run(self) -> int:
        cfg = self.cfg
        log.info("edgecv node %s: %d camera(s), model %s", cfg.node_id, len(cfg.cameras),
                 ", ".join(f"{Path(str(m.backend.path)).name} ({m.family}, {m.backend.name})" for m in self.models.all))
        if self.publisher is not None:
            self.publisher.start()
        if self.consumers is not None:
            self.consumers.start()
        if self.http is not None:
            self.http.attach(self.pipeline, self.publisher, lambda: self.cfg, self.detector.names)
            self.http.start()
        self.pipeline.start()
        next_stats = time.monotonic() + cfg.mqtt.stats_interval_s
        service = ServiceNotify()  # systemd (Type=notify): READY, STATUS, WATCHDOG while healthy; no-op without it
        while not self.stop_event.wait(0.2):
            if self.reload_event.is_set():
                self.reload_event.clear()
                service.reloading()
                self.reload()
                service.reloaded(self.pipeline, self.publisher)
            self.pipeline.check_stalls()
            service.tick(self.pipeline, self.publisher)
            if time.monotonic() >= next_stats:
                self.publish_stats()
                next_stats = time.monotonic() + cfg.mqtt.stats_interval_s
            failed = self.pipeline.failed
            if failed:
                log.error("pipeline failed: %s; shutting down (exit 1)", failed)
                break
            if self.pipeline.done:
                log.info("all sources finished")
                break
        service.stopping()
        return self.shutdown()

    def publish_stats(self) -> dict:
        stats = self.pipeline.stats()
        if self.publisher is not None:
            # every event is delivered, waiting (depth), dropped past the bound, or failed to be stored
            # (then published without the spool, or lost)
            stats["spool"] = {**self.publisher.spool.stats(), "unspooled": self.publisher.unspooled,
                              "lost": self.publisher.lost}
            stats["mqtt"] = self.publisher.state
            # the broker's maximum packet size when known (announced, configured or learned), and the stats, tracks
            # and snapshot messages skipped because they were over it (oversize events: spool.dead_letter)
            stats["mqtt_max_packet_size"] = self.publisher.max_packet
            stats["mqtt_skipped"] = self.publisher.skipped
            stats["mqtt_skipped_backlog"] = self.publisher.skipped_backlog
            for name, cam in stats["cameras"].items():  # the latency budget's events part: spool, broker
                cam.setdefault("latency_budget_ms", {}).update(self.publisher.latency_budget(name))
            self.publisher.publish_raw(self.publisher.topics.stats, json.dumps(stats, separators=(",", ":")))
        return stats

    def shutdown(self) -> int:
        t0 = time.monotonic()
        self.pipeline.stop(timeout=SHUTDOWN_DEADLINE_S / 2)
        if self.publisher is not None:  # deliver the last events first, so the final stats tell where they are
            self.publisher.flush(max(0.2, SHUTDOWN_DEADLINE_S - 0.5 - (time.monotonic() - t0)))
        stats = self.publish_stats()
        for name, cam in stats["cameras"].items():
            failed = f", {cam['frames_failed']} failed" if cam["frames_failed"] else ""
            log.info("camera %s: %d frames read, %d processed, %d dropped%s, %d events", name, cam["frames_read"],
                     cam["frames_processed"], cam["frames_dropped"], failed, cam["events"])
        if self.consumers is not None:
            self.consumers.stop()
        if self.publisher is not None:
            self.publisher.close(deadline_s=max(0.5, SHUTDOWN_DEADLINE_S - (time.monotonic() - t0)))
            if self.publisher.spool.dead_letters:
                log.warning("mqtt: %d events set aside as undeliverable (over the broker's maximum packet size): in "
                            "the dead_letter table of %s", self.publisher.spool.dead_letters, self.publisher.spool.path)
            self.publisher.spool.close()
        if self.http is not None:  # answers until here: the final counters can be scraped
            self.http.stop()
        failed = [f"{n}: {s.reason}" for n, s in self.pipeline.sources.items() if s.state == "failed"]
        for msg in failed:
            log.error("camera %s", msg)
        return 1 if (failed and len(failed) == len(self.pipeline.sources)) or self.pipeline.failed else 0


def run(cfg: Config, max_frames: Optional[int] = None, realtime: Optional[bool] = None,
        config_path: Optional[str] = None, signals: Optional[Signals] = None) -> int:
    """The daemon: start-up (models, spool, pipeline) on a helper thread so that the main thread keeps answering
    signals, then the run. A SIGTERM/SIGINT during start-up exits 0 at once."""
    setup_logging(cfg.log_level, cfg.log_format)
    if signals is None:
        signals = Signals().install(reload=config_path is not None)
    made: dict[str, Any] = {}

    def start_up() -> None:
        try:
            made["daemon"] = Daemon(cfg, max_frames=max_frames, realtime=realtime, config_path=config_path,
                                    signals=signals)
        except BaseException as e:  # re-raised on the main thread
            made["error"] = e

    helper = threading.Thread(target=start_up, name="start-up", daemon=True)
    ServiceNotify().status("starting: loading the models")
    helper.start()
    while helper.is_alive():
        if signals.stop.wait(0.05):
            log.info("start-up interrupted: exiting")
            # the helper may be inside a model runtime's C++ code (a session, an engine build): ending the
            # interpreter around it would abort; nothing has started that needs stopping, so leave at once
            logging.shutdown()
            os._exit(0)
    error = made.get("error")
    if isinstance(error, SpoolError):
        raise EdgecvError(str(error)) from None
    if error is not None:
        raise error
    signals.starting = False
    if signals.stop.is_set():
        return 0
    return made["daemon"].run()
