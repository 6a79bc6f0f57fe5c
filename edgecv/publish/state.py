"""Retained state topics: consumers read the present without replaying events (DESIGN.md, MQTT conventions).

- ``<prefix>/<node>/<camera>/zones/<zone>/<label>`` and ``.../zones/<zone>/all``: tracks in the zone now. Read from
  the zone rule's own state after every frame (``ZoneRule.occupants``: visits whose ``zone.enter`` was emitted,
  by the class that event named), so it equals zone.enter minus zone.exit events per label at every frame. Labels:
  the zone's ``classes``, else the detector's ``classes``, plus every label seen in it (0 once it has left).
- ``<prefix>/<node>/<camera>/lines/<line>/<in|out>/<label>``: running count of ``line.cross`` events by direction
  and label. The rule's directions are already ``in`` and ``out`` and map one to one: with the line drawn from
  ``points[0]`` to ``points[1]``, ``in`` is a crossing from the left-hand side of that vector to its right-hand side
  as seen on screen (``LineRule``). Counts survive restarts (``<node>.lines.json`` next to the spool, written
  atomically within a second of a change and at shutdown) and go back to 0 on the reset command or at the line's
  ``reset: daily@HH:MM`` (local time; a reset time passed while the daemon was down resets at the next start).
- ``<prefix>/<node>/<camera>/state``: ``{"state": "streaming|connecting|stalled|failed|disabled", "reason": ...}``
  from the source's state callback (a stopped source, at the end of a file or at shutdown, is ``disabled``).
- ``<prefix>/<node>/<camera>/detect/state``: ``ON`` or ``OFF``; ``<prefix>/<node>/<camera>/fps``: processed frames
  per second over the last stats interval.

All retained, QoS 1. Camera workers never wait on MQTT: they store the new value (a dict under a lock) and one
thread, ``edgecv-state``, publishes what changed, and everything again after each (re)connection (a broker
restarted without persistence has lost its retained messages).
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from ..config import DETECTOR_FAMILIES, Config
from ..types import Detections, Event, Frame, SemanticMasks
from .snapshot import encode_jpeg, render

log = logging.getLogger("edgecv.state")

TICK_S = 0.5  # the state thread's period: persisting counts, daily resets, fps
DIRECTIONS = ("in", "out")
SOURCE_STATES = {"stopped": "disabled"}  # a source's state -> the state topic's (others unchanged)


def write_json_atomic(path: Path, data: Any) -> None:
    """``data`` as JSON in ``path``, replaced atomically (a crash leaves the old file or the new one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, separators=(",", ":"), sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> Optional[dict]:
    """The JSON object in ``path``, None when missing; unreadable or not an object: logged, None."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("%s is unreadable (%s): starting afresh", path, e)
        return None
    return data if isinstance(data, dict) else None


def last_daily(spec: str, now: datetime) -> datetime:
    """The latest ``daily@HH:MM`` (local time) at or before ``now``."""
    hh, mm = (int(v) for v in spec.split("@", 1)[1].split(":"))
    at = now.replace(hour=hh, minute=mm, second=0, microsecond=0)
    return at if at <= now else at - timedelta(days=1)


def _rule_names(cfg: Config, kind: str) -> set[tuple[str, str]]:
    """(camera, name) of every zone (``kind`` "zones") or line ("lines") of ``cfg``."""
    return {(cam, name) for cam, c in cfg.cameras.items() for name in getattr(c, kind)}


class RetainedState:
    """The latest payload of each retained topic, published by one thread: the changed ones, and all of them after
    each (re)connection. ``tick`` runs on that thread every ``TICK_S``."""

    def __init__(self, publisher: Any, tick: Callable[[], None] = lambda: None) -> None:
        self.publisher = publisher  # MqttPublisher: connected, publish_retained
        self._tick = tick
        self._lock = threading.Lock()
        self._values: dict[str, str] = {}
        self._dirty: dict[str, None] = {}  # ordered set: published in the order they changed
        self._everything = threading.Event()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edgecv-state", daemon=True)
        publisher.on_connected.append(self.republish)

    def set(self, topic: str, payload: str) -> None:
        """The retained value of ``topic`` is now ``payload`` (published when it changed). "": delete it."""
        with self._lock:
            if self._values.get(topic) == payload:
                return
            self._values[topic] = payload
            self._dirty[topic] = None
        self._wake.set()

    def delete(self, topic: str) -> None:
        """Remove ``topic``'s retained message from the broker (an empty retained payload)."""
        self.set(topic, "")

    def get(self, topic: str) -> Optional[str]:
        with self._lock:
            return self._values.get(topic)

    def topics(self) -> set[str]:
        """The topics with a (non-empty) value."""
        with self._lock:
            return {t for t, v in self._values.items() if v}

    def republish(self) -> None:
        """Publish everything again (paho's thread calls it after a connection: only flags it)."""
        self._everything.set()
        self._wake.set()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(2.0)
        self.flush()

    def flush(self) -> None:
        """Publish what changed now (the caller's thread)."""
        if not self.publisher.connected:
            return
        with self._lock:
            if self._everything.is_set():
                self._everything.clear()
                batch = dict(self._values)
            else:
                batch = {t: self._values[t] for t in self._dirty}
            self._dirty.clear()
            for topic, payload in batch.items():
                if not self.publisher.publish_retained(topic, payload):  # the connection dropped: all again later
                    self._everything.set()
                    break
            for topic in [t for t, v in batch.items() if not v]:  # deleted: forgotten once sent
                if self._values.get(topic) == "":
                    del self._values[topic]

    def _run(self) -> None:
        next_tick = time.monotonic()
        while not self._stop.is_set():
            self._wake.wait(max(0.0, next_tick - time.monotonic()))
            self._wake.clear()
            try:
                if time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + TICK_S
                    self._tick()
                self.flush()
            except Exception:  # the state thread outlives any one failure (logged); values wait for the next try
                log.exception("retained state: publishing failed")
                self._stop.wait(1.0)


class LineCounters:
    """Running ``line.cross`` counts by camera, line, direction and label, persisted in a JSON file; thread-safe."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        data = read_json(path) or {}
        counts = data.get("counts", {})
        self.counts: dict[str, dict[str, dict[str, dict[str, int]]]] = {
            cam: {line: {d: {str(k): int(v) for k, v in dict(by.get(d, {})).items()} for d in DIRECTIONS}
                  for line, by in dict(lines).items()}
            for cam, lines in dict(counts).items()} if isinstance(counts, dict) else {}
        self.reset_at: dict[str, float] = {str(k): float(v) for k, v in dict(data.get("reset_at", {})).items()}
        self._dirty = False

    def line(self, camera: str, line: str) -> dict[str, dict[str, int]]:
        """The counts of one line by direction and label (made when missing; call with the lock held)."""
        return self.counts.setdefault(camera, {}).setdefault(line, {d: {} for d in DIRECTIONS})

    def add(self, camera: str, line: str, direction: str, label: str) -> int:
        with self._lock:
            by = self.line(camera, line)[direction]
            by[label] = by.get(label, 0) + 1
            self._dirty = True
            return by[label]

    def reset(self, camera: str, line: str, at: float) -> dict[str, dict[str, int]]:
        """Zero one line's counts (the labels stay, at 0); returns them."""
        with self._lock:
            counts = self.line(camera, line)
            for by in counts.values():
                for label in by:
                    by[label] = 0
            self.reset_at[f"{camera}/{line}"] = at
            self._dirty = True
            return {d: dict(by) for d, by in counts.items()}

    def snapshot(self, camera: str, line: str) -> dict[str, dict[str, int]]:
        with self._lock:
            return {d: dict(by) for d, by in self.line(camera, line).items()}

    def drop(self, keep: set[tuple[str, str]]) -> list[tuple[str, str, dict[str, dict[str, int]]]]:
        """Forget the lines not in ``keep`` ((camera, line) pairs); returns what they held."""
        gone = []
        with self._lock:
            for cam, lines in self.counts.items():
                for line in [ln for ln in lines if (cam, ln) not in keep]:
                    gone.append((cam, line, lines.pop(line)))
                    self.reset_at.pop(f"{cam}/{line}", None)
                    self._dirty = True
        return gone

    def save(self, force: bool = False) -> None:
        """Write the file when something changed (``force``: anyway); an I/O error is logged, tried again later."""
        with self._lock:
            if not (self._dirty or force):
                return
            data = {"version": 1, "counts": self.counts, "reset_at": self.reset_at}
            text = json.loads(json.dumps(data))  # a copy, written outside the lock
            self._dirty = False
        try:
            write_json_atomic(self.path, text)
        except OSError as e:
            with self._lock:
                self._dirty = True
            log.error("line counters: cannot write %s: %s (kept in memory, tried again)", self.path, e)


class StateService:
    """The retained state topics of one daemon; an event sink (line counters) and the pipeline's ``on_state`` and
    ``on_frame`` hooks (camera state, zone occupancy, snapshots on request). ``attach(pipeline)`` once it exists."""

    def __init__(self, cfg: Config, publisher: Any, names: Sequence[str], spool_path: Path) -> None:
        self.cfg = cfg
        self.publisher = publisher
        self.topics = publisher.topics
        self.names = list(names)
        self.lines = LineCounters(spool_path.with_name(f"{cfg.node_id}.lines.json"))
        self.retained = RetainedState(publisher, self._tick)
        self.pipeline: Any = None
        self._zone_last: dict[str, dict[str, dict[str, int]]] = {}  # per camera (its worker's thread only)
        self._zone_seen: dict[tuple[str, str], set[str]] = {}  # labels seen per (camera, zone)
        self._snapshot_wanted: set[str] = set()
        self._fps_mark: dict[str, tuple[float, int]] = {}
        self._next_fps = 0.0
        self.on_new_label: Optional[Callable[[str, str, str, str], None]] = None  # (camera, kind, name, label)

    # ---- set-up
    def model_classes(self) -> Optional[list[str]]:
        """The detector's ``classes`` filter (None: every class it knows)."""
        for m in self.cfg.models or []:
            if m.family in DETECTOR_FAMILIES:
                return list(m.classes) if m.classes else None
        return None

    def zone_labels(self, camera: str, zone: str) -> list[str]:
        """The labels a zone's topics are published for before anything was seen in it."""
        z = self.cfg.cameras[camera].zones.get(zone)
        return list((z.classes if z is not None and z.classes else None) or self.model_classes() or [])

    def line_labels(self, camera: str, line: str) -> list[str]:
        ln = self.cfg.cameras[camera].lines.get(line)
        return list((ln.classes if ln is not None and ln.classes else None) or self.model_classes() or [])

    def attach(self, pipeline: Any) -> None:
        """The running pipeline: its workers' rules, detect switch and frame counts."""
        self.pipeline = pipeline

    def start(self) -> None:
        """Publish the initial values (state, detect switch, zones at 0, line counts as persisted) and start."""
        now = datetime.now()
        for cam in self.cfg.cameras:
            self.on_state(cam, "connecting", "")
            self._publish_detect(cam)
            self.retained.set(self.topics.fps(cam), "0.0")
        self._publish_geometry(self.cfg)
        for cam, c in self.cfg.cameras.items():
            for line, ln in c.lines.items():
                key = f"{cam}/{line}"
                if ln.reset and key not in self.lines.reset_at:
                    self.lines.reset_at[key] = now.timestamp()  # counting starts now: no reset before the next time
        self.retained.start()

    def _publish_geometry(self, cfg: Config) -> None:
        """Zone and line topics of ``cfg`` (zones: at their occupancy seen so far or 0; lines: their counts)."""
        for cam, c in cfg.cameras.items():
            for zone in c.zones:
                last = self._zone_last.get(cam, {}).get(zone, {})
                labels = set(self.zone_labels(cam, zone)) | self._zone_seen.get((cam, zone), set())
                for label in labels:
                    self.retained.set(self.topics.zone(cam, zone, label), str(last.get(label, 0)))
                self.retained.set(self.topics.zone(cam, zone, "all"), str(sum(last.values())))
            for line in c.lines:
                self._publish_line(cam, line, self.lines.snapshot(cam, line))

    def _publish_line(self, cam: str, line: str, counts: dict[str, dict[str, int]]) -> None:
        labels = set(self.line_labels(cam, line)) | {lb for by in counts.values() for lb in by}
        for d in DIRECTIONS:
            for label in labels:
                self.retained.set(self.topics.line(cam, line, d, label), str(counts[d].get(label, 0)))

    def stop(self) -> None:
        """Publish the last values, write the counters."""
        self.retained.stop()
        self.lines.save(force=True)

    def reconfigure(self, cfg: Config) -> None:
        """A reload applied: topics of removed zones and lines are deleted (retained), new ones published."""
        old, self.cfg = self.cfg, cfg
        for cam, zone in _rule_names(old, "zones") - _rule_names(cfg, "zones"):
            for topic in self._zone_topics(cam, zone):
                self.retained.delete(topic)
            self._zone_seen.pop((cam, zone), None)
            self._zone_last.get(cam, {}).pop(zone, None)
        for cam, line, counts in self.lines.drop(_rule_names(cfg, "lines")):
            for topic in [self.topics.line(cam, line, d, label) for d in DIRECTIONS for label in counts.get(d, {})]:
                self.retained.delete(topic)
        self._publish_geometry(cfg)

    def _zone_topics(self, cam: str, zone: str) -> list[str]:
        prefix = self.topics.zone(cam, zone, "")
        return [t for t in self.retained.topics() if t.startswith(prefix) and "/" not in t[len(prefix):]]

    # ---- hooks
    def emit(self, event: Event) -> None:
        """Event sink: a ``line.cross`` adds to its line's count (camera worker's thread)."""
        if event.type != "line.cross" or event.object is None:
            return
        line, direction = str(event.fields.get("line", "")), str(event.fields.get("direction", ""))
        if direction not in DIRECTIONS or not line:
            return
        label = event.object.label
        n = self.lines.add(event.camera, line, direction, label)
        self.retained.set(self.topics.line(event.camera, line, direction, label), str(n))
        if n == 1 and label not in self.line_labels(event.camera, line) and self.on_new_label is not None:
            self.on_new_label(event.camera, "line", line, label)

    def on_state(self, camera: str, state: str, reason: str) -> None:
        """The pipeline's ``on_state`` (capture thread)."""
        body = {"state": SOURCE_STATES.get(state, state), "reason": reason}
        self.retained.set(self.topics.camera_state(camera), json.dumps(body, separators=(",", ":")))

    def on_frame(self, camera: str, frame: Frame, tracks: Detections, semantic: Optional[SemanticMasks],
                 events: list[Event]) -> None:
        """The pipeline's ``on_frame`` (camera worker's thread): zone occupancy, a snapshot when one was asked for.
        Never raises (logged): the camera's frames go on."""
        try:
            self._zones(camera)
            if camera in self._snapshot_wanted:
                self._snapshot_wanted.discard(camera)
                self._snapshot(camera, frame, tracks, semantic, events)
        except Exception:
            log.exception("camera %s: retained state update failed", camera)

    def _zones(self, camera: str) -> None:
        if self.pipeline is None:
            return
        last = self._zone_last.setdefault(camera, {})
        for rule in self.pipeline.workers[camera].rules:
            occupants = getattr(rule, "occupants", None)
            if occupants is None:
                continue
            by_label: dict[str, int] = {}
            for cid, n in occupants().items():
                label = self.names[cid] if 0 <= cid < len(self.names) else str(cid)
                by_label[label] = by_label.get(label, 0) + n
            if by_label == last.get(rule.name):
                continue
            self._publish_zone(camera, rule.name, by_label, last.get(rule.name, {}))
            last[rule.name] = by_label

    def _publish_zone(self, camera: str, zone: str, now: dict[str, int], before: dict[str, int]) -> None:
        seen = self._zone_seen.setdefault((camera, zone), set())
        for label in set(now) | set(before):
            self.retained.set(self.topics.zone(camera, zone, label), str(now.get(label, 0)))
            if label not in seen:
                seen.add(label)
                if label not in self.zone_labels(camera, zone) and self.on_new_label is not None:
                    self.on_new_label(camera, "zone", zone, label)
        self.retained.set(self.topics.zone(camera, zone, "all"), str(sum(now.values())))

    def _snapshot(self, camera: str, frame: Frame, tracks: Detections, semantic: Optional[SemanticMasks],
                  events: Sequence[Event]) -> None:
        opts = self.cfg.mqtt.snapshots
        image = render(frame.image, tracks, self.names, semantic, self.cfg.cameras.get(camera), events,
                       opts.draw_masks)
        self.publisher.publish_raw(self.topics.snapshot(camera), encode_jpeg(image, opts.quality))
        log.info("camera %s: snapshot of frame %d published (asked for by command)", camera, frame.index)

    # ---- what commands do (paho's thread)
    def request_snapshot(self, camera: str) -> None:
        self._snapshot_wanted.add(camera)

    def set_detect(self, camera: str, on: bool) -> None:
        self.pipeline.set_detect(camera, on)
        self._publish_detect(camera)

    def _publish_detect(self, camera: str) -> None:
        on = self.pipeline.detect_enabled(camera) if self.pipeline is not None else \
            self.cfg.cameras[camera].detect.enabled
        self.retained.set(self.topics.detect_state(camera), "ON" if on else "OFF")

    def reset_line(self, camera: str, line: str) -> None:
        self._publish_line(camera, line, self.lines.reset(camera, line, time.time()))

    # ---- the state thread
    def _tick(self) -> None:
        self._daily_resets(datetime.now())
        self.lines.save()
        self._fps(time.monotonic())

    def _daily_resets(self, now: datetime) -> None:
        for cam, c in self.cfg.cameras.items():
            for line, ln in c.lines.items():
                if not ln.reset:
                    continue
                due = last_daily(ln.reset, now).timestamp()
                if self.lines.reset_at.get(f"{cam}/{line}", 0.0) < due:
                    log.info("camera %s: line %s counters reset (%s)", cam, line, ln.reset)
                    self.reset_line(cam, line)

    def _fps(self, now: float) -> None:
        if self.pipeline is None or now < self._next_fps:
            return
        self._next_fps = now + self.cfg.mqtt.stats_interval_s
        for cam, w in self.pipeline.workers.items():
            t0, n0 = self._fps_mark.get(cam, (self.pipeline.started_at or now, 0))
            self._fps_mark[cam] = (now, w.processed)
            if now - t0 > 0.1:
                self.retained.set(self.topics.fps(cam), f"{(w.processed - n0) / (now - t0):.1f}")
