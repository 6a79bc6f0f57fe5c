"""Log line formats: text (a timestamp of its own unless stderr is the journal) or JSON, one object per line.

Under systemd, ``$JOURNAL_STREAM`` names the journal's stream ("device:inode"); when stderr is that stream,
journald timestamps every line itself, so text lines leave their own timestamp out.
"""
from __future__ import annotations

import json
import logging
import os
import re
import sys
from datetime import datetime, timezone
from typing import Optional, TextIO

TEXT_FORMAT = "%(levelname)-7s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
# "camera NAME: ..." / "camera NAME (...)": how most per-camera lines start
CAMERA_RE = re.compile(r"camera ([A-Za-z0-9_-]+)[: (]")


def stderr_is_journal(stream: Optional[TextIO] = None) -> bool:
    """Whether ``stream`` (default stderr) is the journal stream named by ``$JOURNAL_STREAM``."""
    stream = sys.stderr if stream is None else stream
    want = os.environ.get("JOURNAL_STREAM", "")
    if not want:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return want == f"{st.st_dev}:{st.st_ino}"


def record_camera(record: logging.LogRecord, message: str) -> Optional[str]:
    """The camera a record is about: its ``extra={"camera": ...}``, else a leading "camera NAME:" in it."""
    camera = getattr(record, "camera", None)
    if camera:
        return str(camera)
    m = CAMERA_RE.match(message)
    return m.group(1) if m else None


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (ISO 8601, UTC), level, logger, camera (when there is one), message."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message = f"{message}\n{self.formatException(record.exc_info)}"
        body = {"time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
                "level": record.levelname.lower(), "logger": record.name}
        camera = record_camera(record, message)
        if camera:
            body["camera"] = camera
        body["message"] = message
        return json.dumps(body, ensure_ascii=False)


def formatter(fmt: str = "text", stream: Optional[TextIO] = None) -> logging.Formatter:
    """The formatter of ``fmt`` (text or json) for lines written to ``stream`` (default stderr)."""
    if fmt == "json":
        return JsonFormatter()
    if stderr_is_journal(stream):
        return logging.Formatter(TEXT_FORMAT)
    return logging.Formatter("%(asctime)s " + TEXT_FORMAT, DATE_FORMAT)
