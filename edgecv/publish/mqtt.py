"""MQTT publisher (paho-mqtt v2 API) fed from the durable spool.

- retained `<prefix>/<node>/status`: `online` once the broker accepted the connection, `offline` as
  last-will and on clean shutdown;
- events are stored in the spool first, handed to paho by a sender thread only while connected
  (bounded in-flight window), and deleted from the spool when the broker acknowledges them (QoS >= 1);
- paho retransmits what it holds after a reconnect; what it never got stays in the spool and is sent
  in order afterwards, also after a restart of the daemon.
"""
from __future__ import annotations

import json
import logging
import ssl
import threading
import time
from pathlib import Path
from typing import Any, Optional

import paho.mqtt.client as mqtt

from ..config import MqttConfig
from ..types import Event
from .spool import Spool, SpoolItem
from .topics import Topics

log = logging.getLogger("edgecv.mqtt")

MAX_INFLIGHT = 100


class MqttPublisher:
    def __init__(self, cfg: MqttConfig, node: str, spool: Spool, tls_files: Optional[dict[str, Optional[Path]]] = None,
                 client_id: Optional[str] = None) -> None:
        self.cfg = cfg
        self.node = node
        self.topics = Topics(cfg.topic_prefix, node)
        self.spool = spool
        self.published = 0
        self.acked = 0
        self.state = "disconnected"
        self.last_error = ""
        self._connected = threading.Event()
        self._stop = threading.Event()
        self._wake = threading.Event()
        # sender-thread state only (paho callbacks never touch it: no lock-order issues with paho's mutexes)
        self._inflight: list[tuple[mqtt.MQTTMessageInfo, int]] = []  # handed to paho, not yet acknowledged
        self._sent_upto = 0  # highest spool seq handed to paho
        self._sender: Optional[threading.Thread] = None
        protocol = mqtt.MQTTv5 if cfg.protocol == "5" else mqtt.MQTTv311
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id or cfg.client_id or f"edgecv-{node}",
            protocol=protocol,
        )
        self.client.max_inflight_messages_set(MAX_INFLIGHT)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(min_delay=1, max_delay=30)
        if cfg.username is not None:
            self.client.username_pw_set(cfg.username, cfg.password)
        if cfg.tls is not None:
            files = tls_files or {}
            self.client.tls_set(
                ca_certs=str(files["ca_file"]) if files.get("ca_file") else None,
                certfile=str(files["cert_file"]) if files.get("cert_file") else None,
                keyfile=str(files["key_file"]) if files.get("key_file") else None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
            self.client.tls_insecure_set(cfg.tls.insecure)
        self.client.will_set(self.topics.status, "offline", qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_publish = self._on_publish

    # ---- paho callbacks (network thread)
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            self._set_state("refused", f"broker {self.cfg.host}:{self.cfg.port} refused the connection: {reason}")
            return
        client.publish(self.topics.status, "online", qos=1, retain=True)
        self._set_state("connected", f"connected to {self.cfg.host}:{self.cfg.port}")
        self._connected.set()
        self._wake.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self._connected.clear()
        if not self._stop.is_set():
            self._set_state("disconnected", f"lost connection to {self.cfg.host}:{self.cfg.port}: {reason}; retrying")

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        self._set_state("unreachable", f"broker {self.cfg.host}:{self.cfg.port} unreachable; retrying")

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        self._wake.set()  # the sender thread reaps acknowledged messages

    def _set_state(self, state: str, message: str) -> None:
        if state != self.state or (state == "refused" and message != self.last_error):
            (log.info if state == "connected" else log.warning)("mqtt: %s", message)
        self.state = state
        if state != "connected":
            self.last_error = message

    # ---- public API
    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self) -> None:
        self.client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive_s)
        self.client.loop_start()
        self._sender = threading.Thread(target=self._send_loop, name="mqtt-sender", daemon=True)
        self._sender.start()

    def submit(self, event: Event) -> None:
        """Store the event durably; the sender publishes it when the broker is reachable."""
        payload = json.dumps(event.to_payload(0.0), separators=(",", ":")).encode()
        self.spool.put(event.camera, event.id, self.topics.events(event.camera), payload)
        self._wake.set()

    def publish_raw(self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False) -> None:
        """Best-effort messages (stats, tracks, snapshots): dropped when not connected."""
        if self.connected:
            self.client.publish(topic, payload, qos=qos, retain=retain)

    def pending(self) -> int:
        """Events not yet acknowledged by the broker."""
        return self.spool.depth

    def _send_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(0.2)
            self._wake.clear()
            self._reap()
            if not self.connected:
                continue
            room = MAX_INFLIGHT - len(self._inflight)
            if room <= 0:
                continue
            for item in self.spool.next_items(self._sent_upto, room):
                if not self.connected:
                    break
                self._send(item)
        self._reap()

    def _reap(self) -> None:
        """Forget acknowledged events (QoS >= 1: PUBACK received; QoS 0: written to the socket)."""
        still: list[tuple[mqtt.MQTTMessageInfo, int]] = []
        for info, seq in self._inflight:
            if info.is_published():
                self.spool.ack(seq)
                self.acked += 1
            else:
                still.append((info, seq))
        self._inflight = still

    def _send(self, item: SpoolItem) -> None:
        now = time.time()
        data = json.loads(item.payload)
        data["published_at"] = round(now, 3)
        data["latency_ms"] = round(max(0.0, (now - data["captured_at"]) * 1000.0), 1)
        info = self.client.publish(item.topic, json.dumps(data, separators=(",", ":")), qos=self.cfg.qos)
        self._inflight.append((info, item.seq))
        self._sent_upto = item.seq
        self.published += 1

    def close(self, deadline_s: float = 5.0) -> int:
        """Deliver what is pending until the deadline, publish `offline`, disconnect.

        Returns the number of events left in the spool (delivered on the next start).
        """
        end = time.monotonic() + deadline_s
        while self.spool.depth > 0 and time.monotonic() < end and self.connected:
            self._wake.set()
            time.sleep(0.02)
        self._stop.set()
        self._wake.set()
        if self._sender is not None:
            self._sender.join(2.0)
        left = self.spool.depth
        if self.connected:
            info = self.client.publish(self.topics.status, "offline", qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=max(0.5, end - time.monotonic()))
            except (RuntimeError, ValueError):
                pass
        self.client.disconnect()
        self.client.loop_stop()
        if left:
            log.warning("mqtt: %d events not delivered yet; kept in the spool %s", left, self.spool.path)
        return left
