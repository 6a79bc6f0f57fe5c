"""Video sources: one capture thread each, a one-slot newest-frame buffer, reconnects, a watchdog.

A `Source` owns its thread. Live sources (RTSP, V4L2, GStreamer, files in replay mode) keep only
the newest frame: when the consumer is slower, older frames are replaced and counted as dropped,
so latency never builds up. Offline file sources (`realtime: false`) block instead, so every
frame is processed.

Backend logs: each state change is logged once, in one line, with its reason. FFmpeg's own messages (one
per damaged macroblock of a corrupt file, one per refused connection attempt) and OpenCV's warnings would
bury those lines, so `quiet_native_logs()` (called at start-up) limits them to fatal errors unless the environment sets them:
`OPENCV_FFMPEG_LOGLEVEL=16` (FFmpeg errors, e.g. an RTSP 401) or `OPENCV_LOG_LEVEL=WARNING` when diagnosing.
"""
from __future__ import annotations

import logging
import os
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import cv2
import numpy as np

from ..config import CameraConfig, redact, redact_location
from ..types import Frame, LatencyWindow

log = logging.getLogger("edgecv.source")



def quiet_native_logs() -> None:
    """Limit FFmpeg's and OpenCV's own messages to fatal errors (see the module docstring), unless the
    environment sets their levels. Called once at start-up (`edgecv` commands), before any capture is opened:
    OpenCV reads `OPENCV_FFMPEG_LOGLEVEL` when its FFmpeg backend is first used."""
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "8")  # AV_LOG_FATAL
    if "OPENCV_LOG_LEVEL" not in os.environ:
        try:
            cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
        except AttributeError:  # an OpenCV build without the logging module
            pass


class FrameSlot:
    """A one-slot buffer holding the newest frame.

    `put` in drop mode replaces an unread frame (counted as dropped), unless ``merge(unread, new)`` is set: it
    returns the item to hold and how many frames that dropped (a gated camera: frames the detector skips ride along
    with the one waiting, see :func:`edgecv.models.merge_skipped`); in block mode it waits until the consumer took
    the previous frame (or the stop event is set).
    """

    def __init__(self, block: bool) -> None:
        self._block = block
        self._frame: Any = None
        self._cond = threading.Condition()
        self.dropped = 0
        self.closed = False
        self.merge: Optional[Callable[[Any, Any], tuple[Any, int]]] = None  # set by the pipeline (class docstring)
        self.stamp: Optional[Callable[[Any], float]] = None  # an item's capture time (monotonic; else the put time)
        self._since = 0.0  # when the frame that found the slot empty was captured (see take_waiting)

    def put(self, frame: Any, stop: threading.Event) -> bool:
        with self._cond:
            if self._block:
                while self._frame is not None and not stop.is_set():
                    self._cond.wait(0.1)
                if stop.is_set():
                    return False
            elif self._frame is not None and self.merge is not None:
                frame, dropped = self.merge(self._frame, frame)
                self.dropped += dropped
            elif self._frame is not None:
                self.dropped += 1
            if self._frame is None:
                self._since = self.stamp(frame) if self.stamp is not None else time.monotonic()
            self._frame = frame
            self._cond.notify_all()
            return True

    def take(self) -> Any:
        """The newest frame, or None when there is none (never blocks)."""
        return self.take_waiting()[0]

    def take_waiting(self) -> tuple[Any, float]:
        """``take``, and since when this camera has waited: the capture time of the frame that found the slot
        empty. A newer frame that replaced it does not reset it, so a camera that lost a frame while it waited is
        not taken for one that has just begun to wait."""
        with self._cond:
            f, since, self._frame = self._frame, self._since, None
            if f is not None:
                self._cond.notify_all()
            return f, since

    def peek(self) -> Any:
        """The frame held now, left in place (None: none); a snapshot, no lock taken."""
        return self._frame

    def wait(self, timeout: float) -> bool:
        """Wait until a frame is ready or the slot is closed."""
        with self._cond:
            if self._frame is None and not self.closed:
                self._cond.wait(timeout)
            return self._frame is not None

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    @property
    def ready(self) -> bool:
        return self._frame is not None

    @property
    def blocking(self) -> bool:
        """Block mode: the producer waits for the consumer (a replay with no drop), so nothing ever queues up."""
        return self._block


@dataclass
class SourceStats:
    read: int = 0
    dropped: int = 0
    skipped: int = 0  # frames discarded by max_fps throttling
    reconnects: int = 0


class OpenError(Exception):
    """The source could not be opened (one line, credentials redacted).

    `fatal`: retrying cannot help (e.g. the OpenCV build lacks the backend), so the source fails.
    """

    def __init__(self, message: str, fatal: bool = False) -> None:
        super().__init__(message)
        self.fatal = fatal


class Source:
    """Capture thread for one camera. Subclasses implement `_open` (and may override `_read`)."""

    live = True  # reconnect forever on failure; files override

    def __init__(self, name: str, cfg: CameraConfig, location: str,
                 on_state: Optional[Callable[[str, str, str], None]] = None) -> None:
        self.name = name
        self.cfg = cfg
        self.location = location
        # a GStreamer pipeline is free text with a URL somewhere in it; any other source is one location
        self.display = redact(location) if cfg.kind == "gstreamer" else redact_location(location)
        self.slot = FrameSlot(block=self._blocking())
        self.stats = SourceStats()
        self.state = "stopped"
        self.reason = ""
        self.fps: float = 0.0
        self.frame_size: Optional[tuple[int, int]] = None
        self._on_state = on_state
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._cap: Optional[cv2.VideoCapture] = None
        self._last_frame_mono = 0.0
        self._read_since = 0.0  # monotonic time the current blocking read began (0: not in a read)
        self._open_since = 0.0  # monotonic time the current open began (0: not opening)
        self.read_ms = LatencyWindow()  # each frame's read + decode (live streams: waiting for the camera too)
        self._stuck_warned = False
        self._next_index = 1
        self._reconnect_request = threading.Event()
        self._fail_reason = ""  # set by fail(): the capture loop ends in state `failed`
        # set by the pipeline: turns a Frame into what the consumer wants (e.g. model input made on this
        # thread), and an event set whenever a new item is in the slot
        self.prepare: Optional[Callable[[Frame], Any]] = None
        self.notify: Optional[threading.Event] = None
        self.on_exit: Optional[Callable[[], None]] = None  # called on the capture thread as it ends (CPU meter)
        self.on_open: Optional[Callable[[], None]] = None  # called each time the source (re)opens, before its frames

    # ---- lifecycle
    def _blocking(self) -> bool:
        return False

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"capture-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def fail(self, reason: str) -> None:
        """Give up on this camera (its frames cannot be processed): state `failed` with ``reason``, capture ends."""
        self._fail_reason = reason
        self._set_state("failed", reason)
        self._stop.set()

    def join(self, timeout: float = 5.0) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def finished(self) -> bool:
        """The thread has ended (end of file, failed, or stopped) and no frame is waiting."""
        return self._thread is not None and not self._thread.is_alive() and not self.slot.ready

    def _set_state(self, state: str, reason: str = "", warn: bool = False) -> None:
        """Record and log a state change (a warning when ``warn``, or when stalled or failed; else info)."""
        if self._fail_reason and state != "failed":
            return  # given up (fail()): the capture thread winding down does not change that
        reason = redact(reason, self.location)  # an error may quote the location, credentials and all
        if state == self.state and reason == self.reason:
            return
        self.state, self.reason = state, reason
        msg = f"camera {self.name}: {state}" + (f" ({reason})" if reason else "")
        (log.warning if warn or state in ("stalled", "failed") else log.info)(msg)
        if self._on_state:
            self._on_state(self.name, state, reason)

    # ---- watchdog (called from the pipeline's monitor thread)
    def check_stall(self, now: Optional[float] = None) -> bool:
        """Mark a streaming source stalled when no frame arrived for stall_timeout_s; ask it to reconnect."""
        now = time.monotonic() if now is None else now
        if self.live and self.state == "streaming" and now - self._last_frame_mono > self.cfg.stall_timeout_s:
            self._set_state("stalled", f"no frame for {now - self._last_frame_mono:.1f}s")
            self._reconnect_request.set()
            return True
        since = self._read_since
        if (self.live and self.state == "stalled" and since and not self._stuck_warned
                and now - since > self.cfg.stall_timeout_s + self.cfg.read_timeout_s + 5.0):
            # the backend ignores its read timeout (e.g. some GStreamer pipelines): say so once, the thread
            # cannot be interrupted from here
            self._stuck_warned = True
            log.warning("camera %s: capture blocked in a read for %.0fs; the %s backend ignores the read timeout",
                        self.name, now - since, type(self).__name__)
        return False

    def read_blocked_s(self, now: Optional[float] = None) -> float:
        """How long the capture thread has been in its current read (0: not in a read)."""
        since = self._read_since
        return ((time.monotonic() if now is None else now) - since) if since else 0.0

    def open_blocked_s(self, now: Optional[float] = None) -> float:
        """How long the capture thread has been opening the source (0: not opening)."""
        since = self._open_since
        return ((time.monotonic() if now is None else now) - since) if since else 0.0

    # ---- the capture loop
    def _open(self) -> cv2.VideoCapture:
        raise NotImplementedError

    def _read(self, cap: cv2.VideoCapture) -> Optional[np.ndarray]:
        ok, img = cap.read()
        return img if ok and img is not None and img.size else None

    def _release(self) -> None:
        if self._cap is not None:
            try:
                self._cap.release()
            except cv2.error:
                pass
            self._cap = None

    def _sleep(self, seconds: float) -> bool:
        """Sleep unless stopped; True when stopped."""
        return self._stop.wait(seconds)

    def _run(self) -> None:
        try:
            if self._capture_loop() and not self._fail_reason:
                self._set_state("stopped", "shutdown")
        except Exception as e:  # a capture thread must never die silently
            log.exception("camera %s: capture thread crashed", self.name)
            self._set_state("failed", f"capture error: {type(e).__name__}: {e}")
        finally:
            self._release()
            self.slot.close()
            if self.on_exit is not None:
                self.on_exit()

    def _capture_loop(self) -> bool:
        """Open, stream, reopen until the end. True when stopped (shutdown, or stop() during a back-off), False
        when the source ended on its own (failed, or a file's end)."""
        delay = self.cfg.reconnect.initial_s
        attempts = 0
        while not self._stop.is_set():
            self._set_state("connecting", self.reason if self.state in ("stalled", "connecting") else "")
            self._open_since = time.monotonic()
            try:
                self._cap = self._open()
            except OpenError as e:
                attempts += 1
                ended = self._open_failed(e, attempts, delay)
                if ended is not None:
                    return ended
                delay = min(delay * 2, self.cfg.reconnect.max_s)
                continue
            finally:
                self._open_since = 0.0
            attempts = 0
            read_before = self.stats.read
            outcome = self._stream_opened()
            if outcome == "stop":
                return True
            if outcome == "eof":
                if self.cfg.loop and self.stats.read > 0:
                    continue
                self._set_state("stopped", *self._eof_reason())
                return False
            if outcome == "fail":
                return False
            # "lost": reconnect with backoff (from the start again when the stream had delivered frames)
            delay = self._lost(delay, read_before)
            if delay is None:
                return True
        return True

    def _open_failed(self, e: OpenError, attempts: int, delay: float) -> Optional[bool]:
        """An open failed: None to try again after the back-off; else how the capture loop ends (see there)."""
        if not self.live or e.fatal:
            self._set_state("failed", str(e))
            return False
        self._set_state("connecting", f"{e}; attempt {attempts}, retry in {delay:.1f}s")
        if self._sleep(delay * random.uniform(0.9, 1.1)):
            return True
        return None

    def _stream_opened(self) -> str:
        """Stream the capture just opened (its frame rate read first), then release it; the outcome of _stream."""
        fps = self._cap.get(cv2.CAP_PROP_FPS)
        self.fps = float(fps) if fps and 0 < fps < 1000 else 0.0
        if self.on_open is not None:
            self.on_open()
        outcome = self._stream()
        self._release()
        return outcome

    def _lost(self, delay: float, read_before: int) -> Optional[float]:
        """The stream was lost: wait before reconnecting. The next back-off, or None when stopped meanwhile."""
        self.stats.reconnects += 1
        if read_before != self.stats.read:
            delay = self.cfg.reconnect.initial_s
        if self._sleep(min(delay, self.cfg.reconnect.max_s)):
            return None
        return min(delay * 2, self.cfg.reconnect.max_s)

    def _stream(self) -> str:
        """Read frames until end/stall/stop. Returns 'eof', 'lost', 'stop' or 'fail'."""
        assert self._cap is not None
        min_dt = 1.0 / self.cfg.max_fps if self.cfg.max_fps else 0.0
        pace = self._pace()
        t0 = time.monotonic()
        n0 = 0
        last_emit = -1e9
        self._last_frame_mono = time.monotonic()
        self._reconnect_request.clear()
        while not self._stop.is_set():
            img = self._read_timed()
            now = time.monotonic()
            if img is None:
                return self._on_read_failure()
            if self._reconnect_request.is_set():
                return "lost"
            index = self._count_frame(img, now)
            if pace > 0:  # replay a file at its own frame rate
                n0 += 1
                now = self._wait_until(t0 + n0 / pace, now)
                if now is None:
                    return "stop"
            if min_dt and now - last_emit < min_dt * 0.999:
                self.stats.skipped += 1
                continue
            last_emit = now
            if not self._hand_over(Frame(self.name, index, now, time.time(), img)):
                return "stop"
        return "stop"

    def _read_timed(self) -> Optional[np.ndarray]:
        """One read, its start time visible to the watchdog while it lasts."""
        self._read_since = start = time.monotonic()
        try:
            return self._read(self._cap)
        finally:
            self._read_since = 0.0
            self.read_ms.add((time.monotonic() - start) * 1000)

    def _count_frame(self, img: np.ndarray, now: float) -> int:
        """A frame was read at ``now``: streaming (said once, with its size), counted; its index."""
        if self.state != "streaming":
            self._stuck_warned = False
            h, w = img.shape[:2]
            self.frame_size = (w, h)
            self._set_state("streaming", f"{w}x{h}" + (f" @ {self.fps:.1f} fps" if self.fps else ""))
        index = self._next_index
        self._next_index += 1
        self.stats.read += 1
        self._last_frame_mono = now
        return index

    def _wait_until(self, due: float, now: float) -> Optional[float]:
        """Sleep until ``due`` (monotonic) when it is later than ``now``; the time after, or None when stopped."""
        if due > now and self._sleep(due - now):
            return None
        return time.monotonic()

    def _hand_over(self, frame: Frame) -> bool:
        """Put the frame (made into the consumer's item by ``prepare``) in the slot; False when stopped."""
        item = self.prepare(frame) if self.prepare is not None else frame
        if not self.slot.put(item, self._stop):
            return False
        if self.notify is not None:
            self.notify.set()
        self.stats.dropped = self.slot.dropped
        return True

    def _pace(self) -> float:
        """Frames per second to replay at (0: as fast as the source delivers)."""
        return 0.0

    def _eof_reason(self) -> tuple[str, bool]:
        """Why the stream ended at its end, and whether that deserves a warning (it ended early)."""
        return "end of file", False

    def _on_read_failure(self) -> str:
        if self.state != "stalled":  # else the watchdog said so already, with how long it waited
            self._set_state("stalled", "read failed or stream ended")
        return "lost"


def ffmpeg_capture_options(transport_tcp: bool) -> None:
    """OpenCV's FFmpeg backend reads its demuxer options from this variable when opening."""
    if transport_tcp and "OPENCV_FFMPEG_CAPTURE_OPTIONS" not in os.environ:
        os.environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"] = "rtsp_transport;tcp"
