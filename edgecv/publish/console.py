"""Console sink: one line per event on standard output."""
from __future__ import annotations

import json
import sys
import threading
import time
from typing import TextIO

from ..types import Event


class ConsoleSink:
    def __init__(self, fmt: str = "text", stream: TextIO | None = None) -> None:
        self.fmt = fmt
        self.stream = stream or sys.stdout
        self._lock = threading.Lock()

    def format(self, event: Event) -> str:
        if self.fmt == "json":
            return json.dumps(event.to_payload(time.time()), separators=(",", ":"))
        stamp = time.strftime("%H:%M:%S", time.localtime(event.captured_at)) + f".{int(event.captured_at * 1000) % 1000:03d}"
        parts = [stamp, event.camera, f"{event.type:<14}"]
        o = event.object
        if o is not None:
            parts.append(f"{o.label}#{o.track_id} {o.score:.2f}")
        for k, v in event.fields.items():
            parts.append(f"{k}={v}")
        parts.append(f"frame={event.frame}")
        return "  ".join(parts)

    def emit(self, event: Event) -> None:
        line = self.format(event)
        with self._lock:
            try:
                self.stream.write(line + "\n")
                self.stream.flush()
            except (OSError, ValueError):
                pass  # a closed stdout must not stop the daemon
