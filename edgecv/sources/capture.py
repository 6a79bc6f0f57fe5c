"""Concrete sources: video files, RTSP/network streams (FFmpeg), V4L2 devices, GStreamer pipelines."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Optional

import cv2

from ..config import CameraConfig
from .base import OpenError, Source, ffmpeg_capture_options


def _open_capture(location, api: int, params: Optional[list[int]] = None) -> cv2.VideoCapture:
    cap = cv2.VideoCapture(location, api, params or [])
    if not cap.isOpened():
        cap.release()
        return None
    return cap


def decode_threads_param(setting: int | str, auto: int | str) -> list[int]:
    """OpenCV open parameters for FFmpeg's decoding threads (``cameras.<name>.decode_threads``; ``auto``: what
    "auto" means for this kind of source, "auto" again for FFmpeg's own choice). No parameter on an OpenCV without the
    property (before 4.7): it would refuse an open with a parameter it does not know."""
    threads = auto if setting == "auto" else setting
    prop = getattr(cv2, "CAP_PROP_N_THREADS", None)
    return [] if threads == "auto" or prop is None else [prop, int(threads)]


class FileSource(Source):
    """A video file: replayed at its own frame rate (`realtime: true`) or as fast as possible (no drops)."""

    live = False
    _announced = 0  # frame count the container announces (0: unknown)
    _read_at_open = 0  # stats.read when the file was (re)opened

    def _blocking(self) -> bool:
        return not self.cfg.realtime

    def _open(self) -> cv2.VideoCapture:
        path = Path(self.location)
        if not path.is_file():
            raise OpenError(f"video file not found: {path}")
        cap = _open_capture(str(path), cv2.CAP_FFMPEG, decode_threads_param(self.cfg.decode_threads, "auto"))
        if cap is None:
            raise OpenError(f"cannot open video file {path}: not a video or unsupported format")
        count = cap.get(cv2.CAP_PROP_FRAME_COUNT)
        self._announced = int(count) if count and 0 < count < 1e9 else 0
        self._read_at_open = self.stats.read
        return cap

    def _eof_reason(self) -> tuple[str, bool]:
        """End of file; says so, as a warning, when the file ended well before the frame count its container
        announced (``edgecv track`` and ``eval``, which log only warnings, then say it too)."""
        got, want = self.stats.read - self._read_at_open, self._announced
        if want and got < want * 0.95 and want - got > 2:
            return f"end of file after {got} of {want} frames: the file is truncated or damaged", True
        return "end of file", False

    def _pace(self) -> float:
        if not self.cfg.realtime:
            return self.cfg.pace_fps or 0.0  # paced but blocking: every frame is processed
        return self.fps or 25.0

    def _on_read_failure(self) -> str:
        if self.stats.read == 0:
            self._set_state("failed", f"no decodable video frames in {self.display}")
            return "fail"
        return "eof"


class RtspSource(Source):
    """RTSP over TCP through FFmpeg, with open and read timeouts.

    A read blocks inside FFmpeg and cannot be interrupted from the watchdog's thread, so the read timeout
    is at most `stall_timeout_s`: a silent stream (hung camera, dead network path with the TCP connection
    still open) is given up and reconnected when the watchdog calls it stalled, not later. Decoded on one
    thread unless `decode_threads` says otherwise: FFmpeg's frame threads hold a frame back each.
    """

    def read_timeout_s(self) -> float:
        return min(self.cfg.read_timeout_s, self.cfg.stall_timeout_s)

    def _open(self) -> cv2.VideoCapture:
        ffmpeg_capture_options(transport_tcp=True)
        params = [
            cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(self.cfg.open_timeout_s * 1000),
            cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(self.read_timeout_s() * 1000),
            # one thread unless told: FFmpeg's frame threads each hold a frame back (config decode_threads)
            *decode_threads_param(self.cfg.decode_threads, 1),
        ]
        cap = _open_capture(self.location, cv2.CAP_FFMPEG, params)
        if cap is None:
            raise OpenError(f"cannot open {self.display}")
        return cap


class StreamSource(RtspSource):
    """Other network streams FFmpeg understands (HTTP/MJPEG, RTMP, UDP, SRT)."""


class V4l2Source(Source):
    """A local camera through Video4Linux2 (/dev/videoN or an index)."""

    def _open(self) -> cv2.VideoCapture:
        loc = self.location
        m = re.fullmatch(r"(?:/dev/video)?(\d+)", str(loc))
        target = int(m.group(1)) if m else loc
        cap = _open_capture(target, cv2.CAP_V4L2)
        if cap is None:
            raise OpenError(f"cannot open V4L2 device {loc}")
        return cap


def gstreamer_available() -> bool:
    info = cv2.getBuildInformation()
    m = re.search(r"GStreamer:\s*(\S+)", info)
    return bool(m and m.group(1).upper().startswith("YES"))


class GStreamerSource(Source):
    """A GStreamer pipeline string ending in appsink (Jetson CSI `nvarguscamerasrc`, hardware decode)."""

    def _open(self) -> cv2.VideoCapture:
        if not gstreamer_available():
            raise OpenError(
                "this OpenCV build has no GStreamer support; install an OpenCV built with GStreamer "
                "(JetPack's python3-opencv) or use an rtsp:// or file source",
                fatal=True,
            )
        pipeline = self.location if "appsink" in self.location else f"{self.location} ! appsink drop=true max-buffers=1"
        cap = _open_capture(pipeline, cv2.CAP_GSTREAMER)
        if cap is None:
            raise OpenError(f"GStreamer pipeline did not start: {self.display}")
        return cap


SOURCE_TYPES: dict[str, type[Source]] = {
    "file": FileSource,
    "rtsp": RtspSource,
    "stream": StreamSource,
    "v4l2": V4l2Source,
    "gstreamer": GStreamerSource,
}


def make_source(name: str, cfg: CameraConfig, location: str,
                on_state: Optional[Callable[[str, str, str], None]] = None) -> Source:
    return SOURCE_TYPES[cfg.kind](name, cfg, location, on_state)
