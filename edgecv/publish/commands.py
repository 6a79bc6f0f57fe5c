"""Commands over MQTT (``mqtt.commands.enabled``; the broker's ACLs decide who may publish them).

The command namespace: every topic under ``<prefix>/<node>/`` whose last level is ``set`` or ``reset``, 1 to 4 levels
deep (``Topics.command_filters``, the only topics subscribed). Each message there gets one log line and one reply on
``<prefix>/<node>/command/result``: ``{"topic": ..., "ok": true|false, "error": null|"..."}``. Commands:

- ``<camera>/detect/set`` ``ON``/``OFF`` (case and surrounding spaces ignored): the detector stops or resumes on that
  camera; its source keeps streaming (frames counted as ``frames_skipped_disabled``); ``<camera>/detect/state``
  follows;
- ``<camera>/snapshot/set`` (any payload): an annotated JPEG of the camera's next processed frame on
  ``<camera>/snapshot`` (also when ``mqtt.snapshots`` is off);
- ``<camera>/lines/<line>/reset`` (any payload): that line's counters back to 0 (the zeros are published);
- ``reload/set`` (any payload): the same as SIGHUP (the reply says the reload was asked for; its outcome is logged).

Rejected with a reply naming the reason: another topic in the namespace, an unknown camera or line, a payload over
1 KiB or not UTF-8, a detect payload other than ON/OFF. A retained message (delivered because it was left on the
broker) is ignored with a log line and no reply: a command acts once, when it is sent. paho calls :meth:`handle` on
its network thread: every command is a flag or a dict update, and nothing escapes it.

A flood of commands (a client in a loop, a fuzzer) must not flood the log: at most ``LOG_BURST`` command lines are
logged in ``LOG_WINDOW_S`` seconds; past that, one line per window says how many were left out. Every command
still gets its reply.
"""
from __future__ import annotations

import json
import logging
import re
import threading
import time
from typing import Any, Callable, Optional

from .state import StateService

log = logging.getLogger("edgecv.commands")

MAX_PAYLOAD = 1024
LOG_BURST = 20  # command log lines per window at most (module docstring)
LOG_WINDOW_S = 10.0
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class CommandError(Exception):
    """A command that is rejected: the reply's error."""


def printable(text: str, limit: int = 200) -> str:
    """``text`` on one line, control characters escaped, at most ``limit`` characters (for the log)."""
    text = _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)
    return text if len(text) <= limit else text[:limit] + "..."


class LogBudget:
    """At most ``burst`` lines per ``window_s`` seconds. The lines left out are counted, and the count is logged in one
    line when the next window opens: just before the first command line logged after the window."""

    def __init__(self, burst: int = LOG_BURST, window_s: float = LOG_WINDOW_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.burst, self.window_s, self.clock = burst, window_s, clock
        self._start = -float("inf")
        self._used = 0
        self.suppressed = 0  # in the current window
        self._lock = threading.Lock()

    def log(self, level: int, msg: str, *args: Any) -> None:
        with self._lock:
            now = self.clock()
            if now - self._start >= self.window_s:
                if self.suppressed:
                    log.warning("%d more command log lines left out in the last %.0f s (a flood of commands? each "
                                "still got its reply)", self.suppressed, now - self._start)
                self._start, self._used, self.suppressed = now, 0, 0
            if self._used >= self.burst:
                self.suppressed += 1
                return
            self._used += 1
        log.log(level, msg, *args)


class CommandHandler:
    """Parses, checks and carries out commands; installs itself on the publisher (subscriptions, message handler)."""

    def __init__(self, publisher: Any, state: StateService, reload: threading.Event) -> None:
        self.publisher = publisher
        self.topics = publisher.topics
        self.state = state
        self.reload = reload
        self.handled = 0  # commands answered
        self.log = LogBudget()
        publisher.subscriptions.extend(self.topics.command_filters)
        publisher.on_message = self.handle

    def handle(self, msg: Any) -> None:
        """paho's ``on_message`` (its network thread): never raises."""
        try:
            topic = msg.topic
        except UnicodeDecodeError:  # a broker checks topics are UTF-8; this one did not
            topic = bytes(getattr(msg, "_topic", b"")).decode("utf-8", "replace")
        try:
            if self.topics.command_path(topic) is None or topic in self.state.retained.topics():
                return  # not a command (one of our own topics matching a filter)
            if msg.retain:
                self.log.log(logging.WARNING, "command %s ignored: a retained message left on the broker (commands "
                             "are not retained)", printable(topic))
                return
            self._reply(topic, self._run(topic, bytes(msg.payload)))
        except Exception as e:  # a defect: still one line and a reply, never paho's thread
            log.error("command %s failed: %s: %s", printable(topic), type(e).__name__, printable(str(e)))
            self._reply(topic, f"internal error: {type(e).__name__}")

    def _reply(self, topic: str, error: Optional[str]) -> None:
        try:
            body = json.dumps({"topic": topic, "ok": error is None, "error": error}, separators=(",", ":"))
            self.publisher.publish_raw(self.topics.command_result, body, qos=1)
            self.handled += 1
        except Exception as e:
            log.error("command %s: the reply could not be sent: %s: %s", printable(topic), type(e).__name__, e)

    def _run(self, topic: str, payload: bytes) -> Optional[str]:
        """Carry the command out; None when done, else why not (both logged, one line)."""
        try:
            done = self._dispatch(topic, payload)
        except CommandError as e:
            self.log.log(logging.WARNING, "command %s rejected: %s", printable(topic), e)
            return str(e)
        self.log.log(logging.INFO, "command %s: %s", printable(topic), done)
        return None

    def _dispatch(self, topic: str, payload: bytes) -> str:
        if len(payload) > MAX_PAYLOAD:
            raise CommandError(f"payload of {len(payload)} bytes, at most {MAX_PAYLOAD} are allowed")
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            raise CommandError("payload is not UTF-8 text") from None
        levels = self.topics.command_path(topic) or []
        if levels == ["reload", "set"]:
            self.reload.set()
            return "config reload requested"
        commands: dict[tuple[int, str], Callable[[list[str], str], str]] = {
            (3, "detect/set"): self._detect, (3, "snapshot/set"): self._snapshot, (4, "lines/reset"): self._reset}
        key = (len(levels), "/".join(levels[1:2] + levels[-1:]) if len(levels) == 4 else "/".join(levels[1:]))
        run = commands.get(key)
        if run is None:
            raise CommandError("unknown command topic (commands: <camera>/detect/set, <camera>/snapshot/set, "
                               "<camera>/lines/<line>/reset, reload/set)")
        if levels[0] not in self.state.cfg.cameras:
            raise CommandError(f"unknown camera {printable(levels[0], 64)!r}")
        return run(levels, text)

    def _detect(self, levels: list[str], text: str) -> str:
        value = text.strip().upper()
        if value not in ("ON", "OFF"):
            raise CommandError(f"payload must be ON or OFF, got {printable(text, 32)!r}")
        self.state.set_detect(levels[0], value == "ON")
        return f"detection {value}"

    def _snapshot(self, levels: list[str], text: str) -> str:
        self.state.request_snapshot(levels[0])
        return "snapshot of the next processed frame requested"

    def _reset(self, levels: list[str], text: str) -> str:
        cam, line = levels[0], levels[2]
        if line not in self.state.cfg.cameras[cam].lines:
            raise CommandError(f"unknown line {printable(line, 64)!r} of camera {cam}")
        self.state.reset_line(cam, line)
        return f"line {line} counters reset"
