"""Home Assistant MQTT discovery (``mqtt.homeassistant``): the node's retained state topics as entities.

One device per node; per camera: a ``sensor`` per zone and label (occupancy), a ``binary_sensor`` per zone
(``device_class: occupancy``, on while ``zones/<zone>/all`` > 0), a ``sensor`` per line, direction and label
(``state_class: total_increasing``), a ``sensor`` for processed fps and one for the camera's state, a ``switch`` for
detection bound to ``detect/set`` (a ``binary_sensor`` when commands are disabled), and a ``camera`` fed by the
snapshot topic when ``mqtt.snapshots`` is on. Availability: ``<prefix>/<node>/status`` (``online``/``offline``, the
publisher's last-will).

Configs go to ``<discovery_prefix>/<component>/<node_id>/<object_id>/config``, retained, published again after every
reconnection. ``unique_id`` and ``object_id`` derive from node, camera, zone/line, direction and label only, so they
are stable across restarts. What was announced is kept in ``<node>.homeassistant.json`` next to the spool: at each
start and reload an entity that is no longer configured (its zone, line or camera gone, or discovery switched off)
is removed with an empty retained config.
"""
from __future__ import annotations

import json
import logging
import re
import threading
from pathlib import Path
from typing import Any

from .. import __version__
from ..config import Config
from .state import StateService, read_json, write_json_atomic
from .topics import ha_config

log = logging.getLogger("edgecv.homeassistant")

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def slug(*parts: str) -> str:
    """An id HA accepts in topics and entity ids: the parts joined by ``_``, other characters as ``_``."""
    return _UNSAFE.sub("_", "_".join(parts))


class Discovery:
    """Builds, announces and withdraws this node's discovery configs (through the retained state publisher)."""

    def __init__(self, cfg: Config, state: StateService, spool_path: Path) -> None:
        self.cfg = cfg
        self.state = state
        self.topics = state.topics
        self.path = spool_path.with_name(f"{cfg.node_id}.homeassistant.json")
        self._lock = threading.Lock()
        self._announced: dict[str, str] = {}  # config topic -> payload
        self._deleting: set[str] = set()
        state.on_new_label = self.add_label

    # ---- the configs
    def device(self) -> dict[str, Any]:
        node = self.cfg.node_id
        return {"identifiers": [slug("edgecv", node)], "name": f"edgecv {node}", "model": "edgecv",
                "manufacturer": "edgecv", "sw_version": __version__}

    def _entity(self, component: str, parts: tuple[str, ...], name: str, **keys: Any) -> tuple[str, str]:
        """(config topic, payload) of one entity."""
        object_id = slug("edgecv", self.cfg.node_id, *parts)
        body = {"name": name, "unique_id": object_id, "object_id": object_id,
                "default_entity_id": f"{component}.{object_id}", "device": self.device(),
                "availability": [{"topic": self.topics.status, "payload_available": "online",
                                  "payload_not_available": "offline"}], "qos": 1, **keys}
        prefix = self.cfg.mqtt.homeassistant.discovery_prefix
        return ha_config(prefix, component, slug(self.cfg.node_id), object_id), json.dumps(body, separators=(",", ":"))

    def zone_label(self, cam: str, zone: str, label: str) -> tuple[str, str]:
        return self._entity("sensor", (cam, "zone", zone, label), f"{cam} {zone} {label}",
                            state_topic=self.topics.zone(cam, zone, label), state_class="measurement",
                            unit_of_measurement="objects", icon="mdi:account-group")

    def line_label(self, cam: str, line: str, direction: str, label: str) -> tuple[str, str]:
        return self._entity("sensor", (cam, "line", line, direction, label), f"{cam} {line} {direction} {label}",
                            state_topic=self.topics.line(cam, line, direction, label),
                            state_class="total_increasing", unit_of_measurement="crossings", icon="mdi:counter")

    def camera_entities(self, cam: str) -> list[tuple[str, str]]:
        t = self.topics
        c = self.cfg.cameras[cam]
        out = [self._entity("sensor", (cam, "fps"), f"{cam} processed fps", state_topic=t.fps(cam),
                            unit_of_measurement="fps", state_class="measurement", icon="mdi:speedometer"),
               self._entity("sensor", (cam, "state"), f"{cam} state", state_topic=t.camera_state(cam),
                            value_template="{{ value_json.state }}", json_attributes_topic=t.camera_state(cam),
                            icon="mdi:cctv")]
        if self.cfg.mqtt.commands.enabled:
            out.append(self._entity("switch", (cam, "detect"), f"{cam} detection", state_topic=t.detect_state(cam),
                                    command_topic=t.detect_set(cam), payload_on="ON", payload_off="OFF",
                                    state_on="ON", state_off="OFF", icon="mdi:motion-sensor"))
        else:
            out.append(self._entity("binary_sensor", (cam, "detect"), f"{cam} detection",
                                    state_topic=t.detect_state(cam), payload_on="ON", payload_off="OFF"))
        if self.cfg.mqtt.snapshots.enabled:
            out.append(self._entity("camera", (cam, "snapshot"), f"{cam} snapshot", topic=t.snapshot(cam)))
        for zone in c.zones:
            out.append(self._entity("binary_sensor", (cam, "zone", zone, "occupied"), f"{cam} {zone} occupied",
                                    state_topic=t.zone(cam, zone, "all"), device_class="occupancy",
                                    value_template="{{ 'ON' if (value | int(0)) > 0 else 'OFF' }}",
                                    payload_on="ON", payload_off="OFF"))
            out.append(self.zone_label(cam, zone, "all"))
            for label in self.state.zone_labels(cam, zone):
                out.append(self.zone_label(cam, zone, label))
        for line in c.lines:
            counts = self.state.lines.snapshot(cam, line)
            labels = set(self.state.line_labels(cam, line)) | {lb for by in counts.values() for lb in by}
            out += [self.line_label(cam, line, d, label) for d in ("in", "out") for label in sorted(labels)]
        return out

    def configs(self) -> dict[str, str]:
        """Every entity of the current config: config topic -> payload."""
        if not self.cfg.mqtt.homeassistant.enabled:
            return {}
        return dict(e for cam in self.cfg.cameras for e in self.camera_entities(cam))

    # ---- announcing
    def announce(self, cfg: Config) -> None:
        """Publish the configs of ``cfg`` and withdraw those announced before (this run or the last) that it no
        longer has; at start and after each reload."""
        self.cfg = cfg
        saved = read_json(self.path) or {}
        before = {str(t) for t in saved.get("announced", []) + saved.get("deleting", [])}
        now = self.configs()
        with self._lock:
            before |= set(self._announced)
            for topic, payload in now.items():
                self.state.retained.set(topic, payload)
            gone = before - set(now)
            for topic in gone:
                self.state.retained.delete(topic)
            self._announced = now
            self._deleting = (self._deleting | gone) - set(now)
        if gone:
            log.info("homeassistant: %d entities no longer configured: removed", len(gone))
        if now:
            log.info("homeassistant: %d entities announced under %s/", len(now),
                     cfg.mqtt.homeassistant.discovery_prefix)
        self.save()

    def add_label(self, cam: str, kind: str, name: str, label: str) -> None:
        """A label seen for the first time in a zone or on a line (camera worker's thread): its entities."""
        if not self.cfg.mqtt.homeassistant.enabled:
            return
        new = [self.zone_label(cam, name, label)] if kind == "zone" else \
            [self.line_label(cam, name, d, label) for d in ("in", "out")]
        with self._lock:
            for topic, payload in new:
                self._announced[topic] = payload
                self._deleting.discard(topic)
                self.state.retained.set(topic, payload)
        self.save()

    def save(self) -> None:
        """The announced list (and deletions not yet delivered) next to the spool."""
        with self._lock:
            self._deleting = {t for t in self._deleting if self.state.retained.get(t) == ""}  # sent: forgotten
            data = {"version": 1, "announced": sorted(self._announced), "deleting": sorted(self._deleting)}
        try:
            write_json_atomic(self.path, data)
        except OSError as e:
            log.error("homeassistant: cannot write %s: %s", self.path, e)
