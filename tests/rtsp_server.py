#!/usr/bin/python3
"""A real RTSP server for the tests: GStreamer's gst-rtsp-server through PyGObject.

Serves a video file as RTP/JPEG at rtsp://127.0.0.1:PORT/PATH, paced at the file's own frame rate (the
server's sinks sync to the clock). Each client gets its own pipeline, so a reconnecting client starts
the file again. Prints one line `READY <port>` on stdout once it listens; SIGTERM/SIGINT stop it.

PyGObject (`gi`) and GStreamer are system packages (scripts/setup.sh installs python3-gi,
gir1.2-gst-rtsp-server-1.0 and the GStreamer plugins with the test extras), so this runs with the
system interpreter (/usr/bin/python3), not the virtual environment. The tests import `RtspServer`
from this module (it needs no `gi`): it starts this script as a subprocess, cuts it and restarts it.

    /usr/bin/python3 tests/rtsp_server.py media/vtest.avi --port 8554 --path /vtest
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

SYSTEM_PYTHON = "/usr/bin/python3"


class RtspServer:
    """This script as a child process on a fixed port: start(), kill() (a cut), freeze() (a silent stream)."""

    def __init__(self, video: Path, port: int, path: str = "/vtest", python: str = SYSTEM_PYTHON) -> None:
        self.video = Path(video)
        self.port = port
        self.path = path
        self.python = python
        self.proc: Optional[subprocess.Popen] = None
        self.stderr_lines: list[str] = []

    @property
    def url(self) -> str:
        return f"rtsp://127.0.0.1:{self.port}{self.path}"

    def start(self, timeout: float = 30.0) -> float:
        """Start the server; returns time.monotonic() when it accepts connections."""
        import socket

        self.proc = subprocess.Popen([self.python, os.path.abspath(__file__), str(self.video), "--port",
                                      str(self.port), "--path", self.path],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        proc = self.proc
        threading.Thread(target=lambda: self.stderr_lines.extend(proc.stderr), daemon=True).start()
        ready: list[str] = []
        reader = threading.Thread(target=lambda: ready.append(proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if not ready or not ready[0].startswith("READY"):
            self.kill()
            raise RuntimeError(f"RTSP server did not start on port {self.port}: {''.join(self.stderr_lines)}")
        deadline = time.monotonic() + timeout
        while True:  # READY is printed once the socket listens; check it anyway
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.5).close()
                return time.monotonic()
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def freeze(self) -> None:
        """SIGSTOP: connections stay open but no byte flows (a hung camera or a dead network path)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def kill(self) -> None:
        """SIGKILL (works on a frozen server too): the stream's TCP connection is closed by the kernel."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    stop = kill


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("video", help="video file to serve (any format GStreamer's decodebin reads)")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", default="/vtest", help="mount point, e.g. /vtest")
    p.add_argument("--quality", type=int, default=80, help="JPEG quality of the re-encoded frames")
    args = p.parse_args()

    video = Path(args.video).resolve()
    if not video.is_file():
        print(f"rtsp_server: video not found: {video}", file=sys.stderr)
        return 2
    try:
        import gi

        gi.require_version("Gst", "1.0")
        gi.require_version("GstRtspServer", "1.0")
        from gi.repository import GLib, Gst, GstRtspServer
    except (ImportError, ValueError) as e:
        print(f"rtsp_server: GStreamer RTSP server bindings missing ({e}); "
              "install python3-gi gir1.2-gst-rtsp-server-1.0 (scripts/setup.sh cpu,dev)", file=sys.stderr)
        return 3

    Gst.init(None)
    missing = [e for e in ("filesrc", "decodebin", "videoconvert", "jpegenc", "rtpjpegpay")
               if Gst.ElementFactory.find(e) is None]
    if missing:
        print(f"rtsp_server: GStreamer elements missing: {', '.join(missing)} "
              "(gstreamer1.0-plugins-base/-good, gstreamer1.0-libav)", file=sys.stderr)
        return 3

    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    factory = GstRtspServer.RTSPMediaFactory()
    location = str(video).replace("\\", "\\\\").replace('"', '\\"')
    factory.set_launch(
        f'( filesrc location="{location}" ! decodebin ! videoconvert ! video/x-raw,format=I420 '
        f'! jpegenc quality={args.quality} ! rtpjpegpay name=pay0 pt=26 )'
    )
    factory.set_shared(False)
    server.get_mount_points().add_factory(args.path, factory)
    if server.attach(None) == 0:
        print(f"rtsp_server: cannot listen on 127.0.0.1:{args.port}", file=sys.stderr)
        return 4

    loop = GLib.MainLoop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, sig, loop.quit)
    print(f"READY {server.get_bound_port()}", flush=True)
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
