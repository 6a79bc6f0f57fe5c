"""MQTT publisher (paho-mqtt v2 API) fed from the durable spool.

- retained `<prefix>/<node>/status`: `online` once the broker accepted the connection, `offline` as
  last-will and on clean shutdown;
- events are stored in the spool first, handed to paho by a sender thread only while connected
  (bounded in-flight window), and deleted from the spool when the broker acknowledges them (QoS >= 1);
- paho retransmits what it holds after a reconnect; what it never got stays in the spool and is sent
  in order afterwards, also after a restart of the daemon;
- an event the spool cannot store (disk full, I/O error) is handed to paho directly while the broker is
  connected (kept in memory until acknowledged, possibly out of order) and counted as `unspooled`;
  when the broker is not connected either it is counted as `lost`. Each such event is logged in one line.

MQTT 5 (`mqtt.protocol`, the default): every event message carries the content type `application/json` and the
user properties `schema` and `event_id` (also when sent again from the spool); a broker that refuses MQTT 5
(CONNACK "unsupported protocol version") gets a 3.1.1 client instead, said in one log line.

Connection trouble is logged once per change of state, in one line that says why (refused with the
broker's reason, unreachable, TLS failure); paho retries with capped exponential backoff.

Message size: a broker drops the connection on a packet larger than its maximum packet size, and paho would
send the same event again after every reconnect, forever. So no message over the broker's limit is ever
handed to paho. The limit is `mqtt.max_packet_size` when set, the `Maximum Packet Size` an MQTT 5 broker
announces in CONNACK, or, with an MQTT 3.1.1 broker that announces nothing, learned from a message known to be
over it (logged, with the setting that would have said so). After a drop with events unacknowledged, the client
goes careful: a new paho client (paho would send everything it holds at once after the reconnect) and one event
in flight at a time, so when the broker drops the connection again right after an event was sent, larger than
any event it ever acknowledged, that event is the one it could not take. A stats, tracks or snapshot message sent just before
two drops, larger than any unacknowledged event, is over the limit too (the smaller of the two). The limit taken
is one byte under such a message, so it never falls below the broker's true limit and no event that fits is set
aside. The spool still has every unacknowledged event, sent again from the oldest (same ids). Careful mode ends
after a quiet while. An event over
the limit is moved to the spool's dead-letter table (counted, logged with its id) and the events behind it flow;
a stats, tracks or snapshot message over it is skipped (one log line per kind, counted).
"""
from __future__ import annotations

import collections
import fcntl
import json
import logging
import re
import socket
import ssl
import struct
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ..config import MqttConfig
from ..types import Event, LatencyWindow
from .spool import Spool, SpoolError, SpoolItem
from .topics import Topics

log = logging.getLogger("edgecv.mqtt")

MAX_INFLIGHT = 100
# MQTT 5 CONNECT Maximum Packet Size: the broker must not send us more (it drops a larger message). We subscribe
# only to commands (payloads of at most 1 KiB), so a hostile 200 MB "command" never reaches paho's memory: it had
# raised the daemon's peak RSS from 201 to 794 MB (README, Commands)
MAX_INCOMING_PACKET = 65536
# best-effort messages (QoS 0 stats, tracks, snapshots) are skipped while this many packets wait in paho's outgoing
# queue, unwritten: on a link slower than they come (a cellular uplink) they would otherwise pile up without bound
# and hold back the events queued behind them on the same connection
RAW_BACKLOG = 16
# ... and while more bytes than this wait unsent in the socket's kernel send queue (SIOCOUTQNSD, Linux): the kernel
# takes megabytes before paho's queue grows at all, and an event written after them waits until they are through
# (16 KiB: 0.13 s on a 1 Mbit/s uplink)
RAW_UNSENT_BYTES = 16384
SIOCOUTQNSD = 0x894B  # linux/sockios.h: bytes in a TCP socket's send queue not sent yet
RECONNECT_MIN_S = 1
RECONNECT_MAX_S = 30
PROMPT_DROP_S = 1.0  # a drop this soon after an event was sent: upon that event
CAREFUL_QUIET_S = 10.0  # careful mode (one event in flight) ends after this long without a drop
RAW_WINDOW_S = 1.0  # a stats, tracks or snapshot message sent this long before a drop may have caused it
RAW_MARGIN = 0.9  # best-effort messages keep to this share of a limit learned from one of them
MAX_TIMED = 65536  # events whose spool time is kept for the latency budget (older ones are forgotten)


def _varint_len(n: int) -> int:
    length = 1
    while n >= 128:
        n //= 128
        length += 1
    return length


# An event is stored with these placeholders (`Event.to_payload(0.0)`); each send writes the time into the bytes
# in their place, without parsing and re-serialising the whole payload.
_UNSTAMPED = b'"published_at":0.0,"latency_ms":0.0'
_CAPTURED_AT = re.compile(rb'"captured_at":(-?[0-9][0-9.eE+-]*)')


def stamp_publish_time(payload: bytes, now: Optional[float] = None) -> bytes:
    """The stored event ``payload`` with `published_at` (now) and `latency_ms` (now - captured_at) filled in."""
    now = time.time() if now is None else now
    captured = _CAPTURED_AT.search(payload)
    if _UNSTAMPED in payload and captured is not None:
        latency = round(max(0.0, (now - float(captured.group(1))) * 1000.0), 1)
        stamp = f'"published_at":{json.dumps(round(now, 3))},"latency_ms":{json.dumps(latency)}'.encode()
        return payload.replace(_UNSTAMPED, stamp, 1)
    data = json.loads(payload)  # not in the stored form (written by hand into a spool): parse it
    data["published_at"] = round(now, 3)
    data["latency_ms"] = round(max(0.0, (now - data["captured_at"]) * 1000.0), 1)
    return json.dumps(data, separators=(",", ":")).encode()


def unsent_bytes(sock: Any) -> int:
    """Bytes written to a TCP socket that the kernel has not sent yet (0 when unknown: no socket, not Linux)."""
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), SIOCOUTQNSD, b"\0\0\0\0"))[0]
    except (AttributeError, OSError, ValueError):
        return 0


def packet_size(topic: str, payload_bytes: int, qos: int, v5: bool, properties: Optional[Properties] = None) -> int:
    """Bytes of the PUBLISH packet paho sends for this message: what a broker's maximum packet size limits, not
    only the payload. MQTT 5 adds its properties (an empty set is one byte)."""
    props = (len(properties.pack()) if properties is not None else 1) if v5 else 0
    remaining = 2 + len(topic.encode("utf-8")) + (2 if qos else 0) + props + payload_bytes
    return 1 + _varint_len(remaining) + remaining


_SCHEMA = re.compile(rb'"schema":"([^"\\]*)"')
UNSUPPORTED_PROTOCOL = "Unsupported protocol version"  # paho's reason for a CONNACK refusing MQTT 5


def event_properties(event_id: str, payload: bytes) -> Properties:
    """MQTT 5 properties of an event message: content type `application/json` and the user properties `schema`
    (the payload's schema string) and `event_id`, so a consumer can route and de-duplicate without parsing."""
    props = Properties(PacketTypes.PUBLISH)
    props.ContentType = "application/json"
    found = _SCHEMA.search(payload)
    schema = found.group(1).decode() if found is not None else str(json.loads(payload).get("schema", ""))
    props.UserProperty = [("schema", schema), ("event_id", event_id)]
    return props


def _clean(text: object) -> str:
    """One line, without the `(_ssl.c:1006)` source locations of Python's ssl errors."""
    return re.sub(r"\s*\(_ssl\.c:\d+\)", "", " ".join(str(text).split()))


def describe_connect_error(e: BaseException, host: str) -> str:
    """One line saying why a connection attempt failed (no secrets: only socket and TLS errors)."""
    if isinstance(e, ssl.SSLCertVerificationError):
        why = _clean(e.verify_message or e.reason or e)
        return (f"the broker's certificate was rejected: {why} "
                f"(check mqtt.tls.ca_file, and that the certificate is valid for {host})")
    if isinstance(e, ssl.SSLError):
        return f"TLS handshake failed: {_clean(e)}"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, socket.gaierror):
        return f"cannot resolve {host}: {e.strerror or e}"
    if isinstance(e, (TimeoutError, socket.timeout)):
        return "timed out"
    return _clean(getattr(e, "strerror", None) or e) or type(e).__name__


class _Client(mqtt.Client):
    """paho's client, remembering why the last connection attempt failed.

    paho's `on_connect_fail` does not say why; `reconnect()` is what paho's network loop calls for
    every attempt, so the reason is caught here.
    """

    last_connect_error: Optional[BaseException] = None
    on_attempt: Any = None

    def reconnect(self) -> mqtt.MQTTErrorCode:
        if self.on_attempt is not None:
            self.on_attempt()
        try:
            rc = super().reconnect()
        except (OSError, ValueError) as e:
            self.last_connect_error = e
            raise
        self.last_connect_error = None
        return rc


class MqttPublisher:
    def __init__(self, cfg: MqttConfig, node: str, spool: Spool, tls_files: Optional[dict[str, Optional[Path]]] = None,
                 client_id: Optional[str] = None) -> None:
        self.cfg = cfg
        self.node = node
        self._client_id = client_id or cfg.client_id or f"edgecv-{node}"
        self._tls_files = tls_files or {}
        self._v5 = cfg.protocol == "5"
        self.topics = Topics(cfg.topic_prefix, node)
        self.spool = spool
        self.hostport = f"{cfg.host}:{cfg.port}"
        self.published = 0  # events handed to paho from the spool
        self.acked = 0  # ... and acknowledged by the broker
        self.unspooled = 0  # events the spool could not store, handed to paho directly
        self.lost = 0  # events the spool could not store while the broker was not connected
        # connecting, connected, disconnected, unreachable, refused, tls_failed, closed, no_answer
        self.state = "connecting"
        self.last_error = ""
        self._connected = threading.Event()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._ever_connected = False
        self._disconnected_at: Optional[float] = None
        # per connection attempt (paho's network thread only)
        self._attempt_accepted = False
        self._attempt_refused = False
        self._attempt_log_error = ""
        self._attempt_started = 0.0
        self._attempt_ended = False
        # the sender's state: the sender thread's, or a submitting thread's while the sender is idle, one at a time
        # (_send_lock; paho callbacks never touch it: no lock-order issues with paho's mutexes)
        self._send_lock = threading.Lock()
        self._inflight: list[tuple[mqtt.MQTTMessageInfo, int]] = []  # handed to paho, not yet acknowledged
        self._sent_upto = 0  # highest spool seq handed to paho
        # message ids paho reported complete (on_publish: PUBACK for QoS 1) and when (monotonic); appended by
        # paho's thread, drained by the sender into a bounded recent set
        self._completed_mids: collections.deque[tuple[int, float]] = collections.deque()
        self._recent_mids: collections.OrderedDict[int, float] = collections.OrderedDict()
        # the latency budget per camera: spool write, stored -> handed to paho, stored -> acknowledged
        self._timing_lock = threading.Lock()
        self._budget: dict[str, dict[str, LatencyWindow]] = {}
        self._stored_at: dict[int, tuple[str, float]] = {}  # spool seq -> (camera, monotonic time stored)
        self._sender: Optional[threading.Thread] = None
        # events published without the spool, not yet acknowledged (worker threads append, sender reaps)
        self._direct: list[mqtt.MQTTMessageInfo] = []
        self._direct_lock = threading.Lock()
        # the broker's maximum packet size (None: not known), where it came from, and what the learning needs
        self.max_packet: Optional[int] = cfg.max_packet_size
        self._limit_source = "mqtt.max_packet_size" if cfg.max_packet_size else ""
        # what learning the limit needs (paho's thread reads, the sender and publishing threads write)
        self._sends_lock = threading.Lock()
        self._unacked: dict[int, tuple[int, float]] = {}  # spool seq -> (packet bytes, time sent), not acknowledged
        self._max_acked = 0  # largest event packet the broker acknowledged: within its limit
        self._careful_since: Optional[float] = None  # one event in flight at a time, since (monotonic)
        self._raw_sends: collections.deque[tuple[float, int]] = collections.deque(maxlen=64)  # (time, bytes), QoS 0
        self._suspect_raw: Optional[int] = None  # bytes of the stats/tracks/snapshot message suspected at a drop
        self._raw_margin = False  # learned from such a message: they keep RAW_MARGIN under the limit
        self._accepted_at = 0.0
        self._renew = threading.Event()  # the sender thread makes a new paho client (drops paho's resend queue)
        self.skipped = 0  # stats, tracks and snapshot messages not sent: over the limit
        self.skipped_backlog = 0  # best-effort messages not sent: the link was behind (RAW_BACKLOG, RAW_UNSENT_BYTES)
        self._backlogged = False  # skipping for the backlog now (logged when it starts and when it ends)
        self._skipped_kinds: set[str] = set()
        # consumers (publish.state, publish.commands): topic filters subscribed (QoS 1) on every connection, the
        # handler of their messages and hooks run after each accepted connection, all on paho's thread (quick)
        self.subscriptions: list[str] = []
        self.on_message: Optional[Callable[[mqtt.MQTTMessage], None]] = None
        self.on_connected: list[Callable[[], None]] = []
        self.client = self._make_client()

    def _make_client(self) -> _Client:
        cfg = self.cfg
        protocol = mqtt.MQTTv5 if self._v5 else mqtt.MQTTv311
        client = _Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self._client_id,
            protocol=protocol,
        )
        client.on_attempt = self._on_attempt
        client.suppress_exceptions = True  # an error in a callback is logged (_on_log), never kills paho's thread
        client.max_inflight_messages_set(MAX_INFLIGHT)
        client.max_queued_messages_set(0)
        client.reconnect_delay_set(min_delay=RECONNECT_MIN_S, max_delay=RECONNECT_MAX_S)
        if cfg.username is not None:
            client.username_pw_set(cfg.username, cfg.password)
        if cfg.tls is not None:
            files = self._tls_files
            client.tls_set(
                ca_certs=str(files["ca_file"]) if files.get("ca_file") else None,
                certfile=str(files["cert_file"]) if files.get("cert_file") else None,
                keyfile=str(files["key_file"]) if files.get("key_file") else None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
            client.tls_insecure_set(cfg.tls.insecure)
        client.will_set(self.topics.status, "offline", qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = self._on_connect_fail
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_log = self._on_log
        return client

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        handler = self.on_message
        if client is self.client and handler is not None:
            handler(msg)  # the handler answers errors itself; anything it lets through is logged by _on_log

    # ---- paho callbacks (network thread)
    def _on_attempt(self) -> None:
        self._attempt_accepted = self._attempt_refused = self._attempt_ended = False
        self._attempt_log_error = ""
        self._attempt_started = time.monotonic()

    def _on_log(self, client: mqtt.Client, userdata: Any, level: int, buf: str) -> None:
        if level == mqtt.MQTT_LOG_ERR:
            self._attempt_log_error = _clean(buf)
            if buf.startswith("Caught exception in"):
                log.error("mqtt: %s", _clean(buf))

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if client is not self.client:
            return  # a client being replaced
        if reason.is_failure:
            self._attempt_refused = True
            if not self._fell_back(reason):
                self._refused(reason)
            return
        self._attempt_accepted = True
        self._accepted_at = time.monotonic()
        announced = getattr(properties, "MaximumPacketSize", None) if properties is not None else None
        if announced and (self.max_packet is None or announced < self.max_packet):
            self._set_limit(int(announced), "announced by the broker")
        client.publish(self.topics.status, "online", qos=1, retain=True)
        if not self._ever_connected:
            message = f"connected to {self.hostport}"
        else:
            away = time.monotonic() - self._disconnected_at if self._disconnected_at is not None else 0.0
            message = (f"reconnected to {self.hostport} after {away:.1f} s without a connection; "
                       f"{self.spool.depth} events waiting in the spool")
        self._ever_connected = True
        self._disconnected_at = None
        self._consumers_connected(client)
        self._set_state("connected", message)
        self._connected.set()
        self._wake.set()

    def _consumers_connected(self, client: mqtt.Client) -> None:
        """A connection was accepted: the consumers' subscriptions again (a clean session has none) and hooks."""
        if self.subscriptions:
            client.subscribe([(t, 1) for t in self.subscriptions])
        for hook in self.on_connected:
            hook()

    def _refused(self, reason: Any) -> None:
        hint = ""
        if str(reason) in ("Bad user name or password", "Not authorized"):
            hint = " (check mqtt.username and mqtt.password)"
        self._set_state("refused", f"broker {self.hostport} refused the connection: {reason}{hint}; "
                                   f"retrying with backoff (at most every {RECONNECT_MAX_S} s)")

    def _fell_back(self, reason: Any) -> bool:
        """A broker that refuses MQTT 5 (an MQTT 3.1.1 broker): the next client speaks 3.1.1, logged once. The sender
        thread makes it (paho's thread cannot stop its own loop)."""
        if not self._v5 or str(reason) != UNSUPPORTED_PROTOCOL:
            return False
        self._v5 = False
        log.warning("mqtt: broker %s refused MQTT 5 (%s): falling back to MQTT 3.1.1 (events carry no MQTT 5 "
                    "properties; set mqtt.protocol: \"3.1.1\" to say so)", self.hostport, reason)
        self._renew.set()
        self._wake.set()
        return True

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if client is not self.client or self._attempt_ended:
            return  # a client being replaced, or a second report of the same drop
        self._attempt_ended = True
        self._connected.clear()
        if self._stop.is_set():
            return
        if self._attempt_accepted:
            self._attempt_accepted = False
            self._disconnected_at = time.monotonic()
            self._suspect_drop()
            why = self._attempt_log_error or (
                f"{reason}" if getattr(flags, "is_disconnect_packet_from_server", False) else "connection closed")
            self._set_state("disconnected", f"lost the connection to {self.hostport} ({why}); "
                                            f"{self.spool.depth} events waiting in the spool; retrying with backoff")
        elif not self._attempt_refused and not self._attempt_log_error and (
                time.monotonic() - self._attempt_started >= 0.9 * self.cfg.keepalive_s):
            # the TCP connection stood, but nothing answered CONNECT: paho gives up after the keep-alive interval
            self._set_state("no_answer", f"broker {self.hostport} took the TCP connection but did not answer the MQTT "
                                         f"CONNECT within {self.cfg.keepalive_s} s (is an MQTT broker listening on "
                                         f"that port{', without TLS' if self.cfg.tls is None else ', with TLS'}?); "
                                         "retrying with backoff")
        elif not self._attempt_refused:
            # the broker closed the connection before answering CONNECT (e.g. it rejected the TLS client
            # certificate after the handshake)
            why = self._attempt_log_error or "connection closed"
            hint = " (is the client certificate accepted by the broker?)" if self.cfg.tls is not None else ""
            self._set_state("closed", f"broker {self.hostport} closed the connection before accepting it: "
                                      f"{why}{hint}; retrying with backoff")

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        if client is not self.client:
            return
        e = getattr(client, "last_connect_error", None)
        why = describe_connect_error(e, self.cfg.host) if e is not None else "connection failed"
        if isinstance(e, ssl.SSLError):
            self._set_state("tls_failed", f"TLS connection to broker {self.hostport} failed: {why}; "
                                          f"retrying with backoff (at most every {RECONNECT_MAX_S} s)")
        else:
            self._set_state("unreachable", f"broker {self.hostport} unreachable: {why}; "
                                           f"retrying with backoff (at most every {RECONNECT_MAX_S} s)")

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        if client is not self.client:
            return
        self._completed_mids.append((mid, time.monotonic()))
        self._wake.set()  # the sender thread reaps acknowledged messages

    # ---- the broker's maximum packet size
    def _set_limit(self, limit: int, source: str) -> None:
        self.max_packet, self._limit_source = limit, source
        log.warning("mqtt: the broker takes messages of at most %d bytes (%s): larger events are set aside in the "
                    "spool's dead-letter table, larger stats, tracks and snapshots are skipped", limit, source)

    def _suspect_drop(self) -> None:
        """The connection dropped (paho's network thread): does it show a message over the broker's limit?"""
        now = time.monotonic()
        with self._sends_lock:
            head = min(self._unacked) if self._unacked else None
            head_size, head_sent = self._unacked[head] if head is not None else (0, 0.0)
            largest_event = max((size for size, _ in self._unacked.values()), default=0)
            raw = max((size for t, size in self._raw_sends if now - t <= RAW_WINDOW_S), default=0)
        if raw > largest_event:
            # the largest message the broker may have choked on is a stats, tracks or snapshot message
            if self._suspect_raw is None:
                self._suspect_raw = raw
                return
            size, self._suspect_raw = min(self._suspect_raw, raw), None
            self._raw_margin = True  # stats grow by a few bytes now and then: keep them well under what was learned
            self._learn(size, f"the broker closed the connection twice right after a message of {size} bytes or "
                              "more, larger than any event it had not acknowledged")
            return
        if head is None:
            return
        if self._careful_since is not None and now - head_sent <= PROMPT_DROP_S and head_size > self._max_acked:
            self._learn(head_size, f"the broker closed the connection right after an event of {head_size} bytes, "
                                   "sent alone, larger than any it acknowledged")
        # from now on one event at a time, so that the next drop names the event that caused it; a new client,
        # because paho would send every event it holds again at once after the reconnect
        self._careful_since = now
        self._renew.set()
        self._wake.set()

    def _learn(self, oversize: int, why: str) -> None:
        """``oversize`` bytes were too many for the broker: take one byte less as its limit (only ever lower)."""
        if self.max_packet is not None and oversize > self.max_packet:
            return
        self._set_limit(oversize - 1, f"learned: {why}; MQTT 3.1.1 brokers do not announce their limit, set "
                                      "mqtt.max_packet_size or use protocol 5 to say it")

    def _renew_client(self) -> None:
        """A new paho client (sender thread): paho's queue of unacknowledged messages goes with the old one; the
        spool still holds every unacknowledged event, sent again from the oldest (same ids)."""
        old = self.client
        self.client = self._make_client()
        self._connected.clear()
        try:
            old.disconnect()
        finally:
            old.loop_stop()
        self._inflight = []
        self._sent_upto = 0
        # the new client numbers its messages from 1 again: a completion seen on the old one (an event's, or a
        # retained state message's) must not be taken for the new client's message of the same number
        self._completed_mids.clear()
        self._recent_mids.clear()
        with self._sends_lock:
            self._unacked.clear()
        self._connect_async()
        self.client.loop_start()

    def _connect_async(self) -> None:
        """Connect in the background (paho reconnects with the same settings); MQTT 5 also says how large a packet
        the broker may send us (``MAX_INCOMING_PACKET``)."""
        props = None
        if self._v5:
            props = Properties(PacketTypes.CONNECT)
            props.MaximumPacketSize = MAX_INCOMING_PACKET
        self.client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive_s, properties=props)

    def _over_limit(self, topic: str, payload_bytes: int, qos: int,
                    properties: Optional[Properties] = None) -> Optional[int]:
        """The packet's size when it is over the broker's known limit, else None."""
        size = packet_size(topic, payload_bytes, qos, self._v5, properties)
        return size if self.max_packet is not None and size > self.max_packet else None

    def _set_state(self, state: str, message: str) -> None:
        """Log a change of state (or of its reason) once, in one line; repeated retries stay quiet."""
        if state != self.state or (state != "connected" and message != self.last_error):
            (log.info if state == "connected" else log.warning)("mqtt: %s", message)
        self.state = state
        self.last_error = "" if state == "connected" else message

    # ---- public API
    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self) -> None:
        self._connect_async()
        self.client.loop_start()
        self._sender = threading.Thread(target=self._send_loop, name="mqtt-sender", daemon=True)
        self._sender.start()

    def submit(self, event: Event) -> bool:
        """Store the event durably; the sender publishes it when the broker is reachable.

        Returns False when the spool could not store it: then it is published directly if the broker
        is connected (`unspooled`), else counted as `lost`; either way one line is logged.
        """
        payload = json.dumps(event.to_payload(0.0), separators=(",", ":")).encode()
        topic = self.topics.events(event.camera)
        began = time.monotonic()
        try:
            seq = self.spool.put(event.camera, event.id, topic, payload)
        except SpoolError as e:
            direct = stamp_publish_time(payload)
            props = event_properties(event.id, payload) if self._v5 else None
            over = self._over_limit(topic, len(direct), self.cfg.qos, props)
            if over is not None:
                with self._direct_lock:
                    self.lost += 1
                log.error("%s; event %s %s lost: %d bytes, over the broker's maximum packet size of %d bytes",
                          e, event.type, event.id, over, self.max_packet)
            elif self.connected:
                info = self.client.publish(topic, direct, qos=self.cfg.qos, properties=props)
                with self._direct_lock:
                    self._direct.append(info)
                    self.unspooled += 1
                log.error("%s; event %s %s published without the spool", e, event.type, event.id)
            else:
                with self._direct_lock:
                    self.lost += 1
                log.error("%s; event %s %s lost: the broker is not connected either (%d lost in all)",
                          e, event.type, event.id, self.lost)
            return False
        self._stored(event.camera, seq, began)
        self._send_now()
        self._wake.set()
        return True

    def _send_now(self) -> None:
        """Hand the spool's next events to paho on this (the submitting) thread when the sender is idle, so that an
        event does not wait for the sender to wake up (`edgecv bench latency`, send_wait: 0.4-0.5 ms -> 0.2 ms on a
        2-core machine). When the sender is busy it sends them itself (it is woken after this); a failure here is
        left to it too (it says why once, and the event is in the spool)."""
        if not self._send_lock.acquire(blocking=False):
            return
        try:
            self._send_new()
        except Exception as e:
            log.debug("mqtt: sending on the submitting thread failed (%s: %s); left to the sender", type(e).__name__, e)
        finally:
            self._send_lock.release()

    def _stored(self, camera: str, seq: int, began: float) -> None:
        """The latency budget: event ``seq`` of ``camera`` was stored in the spool, the write began at ``began``."""
        now = time.monotonic()
        with self._timing_lock:
            self._windows(camera)["spool_write"].add((now - began) * 1000)
            self._stored_at[seq] = (camera, now)
            if len(self._stored_at) > MAX_TIMED:  # dropped past the spool's bound, set aside, or never acknowledged
                del self._stored_at[next(iter(self._stored_at))]

    def _windows(self, camera: str) -> dict[str, LatencyWindow]:
        windows = self._budget.get(camera)
        if windows is None:
            windows = self._budget[camera] = {k: LatencyWindow() for k in ("spool_write", "send_wait", "broker_ack")}
        return windows

    def _timed(self, seq: int, stage: str, at: float, done: bool = False) -> None:
        """The latency budget: stored event ``seq`` reached ``stage`` at ``at`` (monotonic); ``done``: its last."""
        with self._timing_lock:
            stored = self._stored_at.pop(seq, None) if done else self._stored_at.get(seq)
            if stored is not None:  # else stored by an earlier run, or forgotten
                self._windows(stored[0])[stage].add(max(0.0, at - stored[1]) * 1000)

    def latency_windows(self, camera: str) -> dict[str, LatencyWindow]:
        """Camera ``camera``'s part of the latency budget: writing an event to the spool, from stored to handed to
        paho (the sender's wake-up), from stored to the broker's acknowledgement (PUBACK, QoS >= 1)."""
        with self._timing_lock:
            return dict(self._windows(camera))

    def latency_budget(self, camera: str) -> dict[str, dict[str, float]]:
        """p50 and p99 (ms) of each stage of :meth:`latency_windows`."""
        return {stage: window.budget() for stage, window in self.latency_windows(camera).items()}

    def publish_raw(self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False) -> None:
        """Best-effort messages (stats, tracks, snapshots): dropped when not connected, skipped when over the
        broker's maximum packet size (counted; one log line per kind)."""
        if not self.connected:
            return
        data = payload.encode("utf-8") if isinstance(payload, str) else payload
        size = packet_size(topic, len(data), qos, self._v5)
        limit = self.max_packet
        if limit is not None and self._raw_margin and self._limit_source.startswith("learned"):
            limit = int(limit * RAW_MARGIN)
        if limit is not None and size > limit:
            self.skipped += 1
            kind = topic.rsplit("/", 1)[-1]
            if kind not in self._skipped_kinds:
                self._skipped_kinds.add(kind)
                log.warning("mqtt: a %s message of %d bytes is over the broker's maximum packet size of %d bytes (%s):"
                            " skipped, and so are the next ones over it (counted in stats as mqtt_skipped)",
                            kind, size, limit, self._limit_source)
            return
        if not qos and self._skip_for_backlog():
            return
        if not qos:
            with self._sends_lock:
                self._raw_sends.append((time.monotonic(), size))
        self.client.publish(topic, data, qos=qos, retain=retain)

    def _skip_for_backlog(self) -> bool:
        """Whether a best-effort message is skipped because ``RAW_BACKLOG`` packets wait to be written, or more than
        ``RAW_UNSENT_BYTES`` wait unsent in the socket (counted; a log line when skipping starts and one when it
        ends). The queue is paho's own deque (paho 2.x, pinned below 3), read without its lock: ``len`` of a deque
        is atomic; a paho without it is not counted."""
        waiting, unsent = len(getattr(self.client, "_out_packet", ())), unsent_bytes(self.client.socket())
        if waiting >= RAW_BACKLOG or unsent > RAW_UNSENT_BYTES:
            self.skipped_backlog += 1
            if not self._backlogged:
                self._backlogged = True
                log.warning("mqtt: %d messages and %d bytes wait to be sent to %s (a slow link?): stats, tracks and "
                            "snapshots are skipped until they are out; events still go, in order (counted in stats "
                            "as mqtt_skipped_backlog)", waiting, unsent, self.hostport)
            return True
        if self._backlogged:
            self._backlogged = False
            log.info("mqtt: the backlog to %s is written: stats, tracks and snapshots go again (%d skipped so far)",
                     self.hostport, self.skipped_backlog)
        return False

    def publish_retained(self, topic: str, payload: bytes | str) -> bool:
        """Retained state (QoS 1): handed to paho when connected (True), else dropped (False; publish it again after
        the next connection, see ``on_connected``). An empty payload deletes the topic's retained message."""
        if not self.connected:
            return False
        self.publish_raw(topic, payload, qos=1, retain=True)
        return True

    def pending(self) -> int:
        """Events not yet acknowledged by the broker."""
        with self._direct_lock:
            direct = len(self._direct)
        return self.spool.depth + direct

    def _send_loop(self) -> None:
        failure = ""
        while not self._stop.is_set():
            self._wake.wait(0.2)
            self._wake.clear()
            try:
                with self._send_lock:
                    self._send_some()
            except Exception as e:  # the sender must outlive any one failure: events wait in the spool meanwhile
                why = f"{type(e).__name__}: {e}"
                if why != failure:
                    log.exception("mqtt: sending failed (%s); the events stay in the spool, trying again", why)
                failure = why
                self._stop.wait(1.0)
        with self._send_lock:
            self._reap()

    def _send_some(self) -> None:
        if self._renew.is_set():
            self._renew.clear()
            self._renew_client()
        since = self._careful_since
        if since is not None and self.connected and time.monotonic() - since > CAREFUL_QUIET_S:
            self._careful_since = None
        self._send_new()  # first: a new event never waits for the deletion of acknowledged ones (a disk write)
        if self._reap():
            self._send_new()  # the room the acknowledgements freed

    def _send_new(self) -> None:
        """Hand the spool's next events to paho, as many as the in-flight window has room for."""
        if not self.connected:
            return
        room = (1 if self._careful_since is not None else MAX_INFLIGHT) - len(self._inflight)
        if room <= 0:
            return
        for item in self.spool.next_items(self._sent_upto, room):
            if not self.connected:
                break
            self._send(item)

    def _done(self, info: mqtt.MQTTMessageInfo) -> bool:
        """Whether paho completed the message (QoS >= 1: PUBACK received; QoS 0: written to the socket).

        A message handed to paho just as the connection dropped keeps an error code in its info (is_published()
        raises) although paho holds it and sends it after the reconnect: its completion is seen by its mid.
        """
        if self._recent_mids.pop(info.mid, None) is not None:
            return True
        try:
            return info.is_published()
        except (RuntimeError, ValueError):
            return self.cfg.qos == 0  # QoS 0 is at most once: paho does not keep it

    def _reap(self) -> int:
        """Forget acknowledged events: delete them from the spool (one transaction); how many."""
        while self._completed_mids:
            mid, at = self._completed_mids.popleft()
            self._recent_mids[mid] = at
        while len(self._recent_mids) > 4096:  # mids of other messages (status, stats) that match no event
            self._recent_mids.popitem(last=False)
        still: list[tuple[mqtt.MQTTMessageInfo, int]] = []
        acked: list[int] = []
        for info, seq in self._inflight:
            acked_at = self._recent_mids.get(info.mid)  # PUBACK's time (paho's thread), if seen by its mid
            if self._done(info):
                self._timed(seq, "broker_ack", acked_at or time.monotonic(), done=True)
                acked.append(seq)
            else:
                still.append((info, seq))
        self._inflight = still
        self.spool.ack_many(acked)
        self.acked += len(acked)
        with self._sends_lock:
            for seq in acked:
                size, _ = self._unacked.pop(seq, (0, 0.0))
                self._max_acked = max(self._max_acked, size)
        with self._direct_lock:
            if self._direct:
                self._direct = [info for info in self._direct if not self._done(info)]
        return len(acked)

    def _send(self, item: SpoolItem) -> None:
        payload = stamp_publish_time(item.payload)
        self._sent_upto = item.seq
        props = event_properties(item.event_id, item.payload) if self._v5 else None  # replays carry them too
        over = self._over_limit(item.topic, len(payload), self.cfg.qos, props)
        if over is not None:
            reason = (f"{over} bytes, over the broker's maximum packet size of {self.max_packet} bytes "
                      f"({self._limit_source})")
            if self.spool.dead_letter(item.seq, reason):
                log.error("mqtt: event %s is %s: set aside in the spool's dead-letter table (%d there in all)",
                          item.event_id, reason, self.spool.dead_letters)
            return
        size = packet_size(item.topic, len(payload), self.cfg.qos, self._v5, props)
        if self.cfg.qos:
            with self._sends_lock:
                self._unacked[item.seq] = (size, time.monotonic())
        self._timed(item.seq, "send_wait", time.monotonic())
        info = self.client.publish(item.topic, payload, qos=self.cfg.qos, properties=props)
        self._inflight.append((info, item.seq))
        self.published += 1

    def flush(self, deadline_s: float) -> int:
        """Wait until every event is acknowledged, the deadline passes, or the broker is (known to be) away.

        While the first connection attempt is still under way it is waited for. Returns the events left.
        """
        end = time.monotonic() + deadline_s
        while self.pending() > 0 and time.monotonic() < end:
            if not self.connected and self.state != "connecting":
                break
            self._wake.set()
            time.sleep(0.02)
        return self.pending()

    def close(self, deadline_s: float = 5.0) -> int:
        """Deliver what is pending until the deadline, publish `offline`, disconnect.

        Returns the number of events left in the spool (delivered on the next start).
        """
        end = time.monotonic() + deadline_s
        self.flush(deadline_s)
        self._stop.set()
        self._wake.set()
        if self._sender is not None:
            self._sender.join(2.0)
        with self._send_lock:
            self._reap()
        left = self.spool.depth
        if self.connected:
            info = self.client.publish(self.topics.status, "offline", qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=max(0.5, end - time.monotonic()))
            except (RuntimeError, ValueError):
                pass
        self.client.disconnect()
        self.client.loop_stop()
        with self._direct_lock:
            unacked = len(self._direct)
            self._direct = []
            self.lost += unacked
        if unacked:
            log.error("mqtt: %d events published without the spool were not acknowledged before shutdown: lost "
                      "(%d lost in all)", unacked, self.lost)
        if left:
            log.warning("mqtt: %d events not delivered yet; kept in the spool %s", left, self.spool.path)
        return left
