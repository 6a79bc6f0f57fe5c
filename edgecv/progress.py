"""Progress of long work (engine builds, benchmarks, evaluation, offline tracking, downloads).

On a terminal: a tqdm bar on stderr. Elsewhere (journald, CI, a pipe): a line every 10 % or every 10 s,
whichever comes first, and one at the end, e.g. ``eval: 340/795 frames (43 %), 12.1 fps``, logged (logger
``edgecv.progress``) in the command's log format when its logging is set up, so that stderr stays one format.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Optional, TextIO

from tqdm import tqdm

log = logging.getLogger("edgecv.progress")
log.setLevel(logging.INFO)  # shown although commands log at warning: progress is what they are asked to show

LOG_EVERY_S = 10.0
LOG_EVERY_FRACTION = 0.1


def _amount(n: float, unit: str) -> str:
    if unit == "B":
        for size, name in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
            if n >= size:
                return f"{n / size:.1f} {name}"
        return f"{int(n)} B"
    return f"{n:.0f}" if float(n).is_integer() else f"{n:.1f}"


class Progress:
    """``with Progress("eval", total=795, unit="frames") as p: ... p.update()``; ``total`` None: unknown.
    ``unit="B"``: bytes (shown in KiB/MiB). ``tty``: force the bar (True) or the lines (False)."""

    def __init__(self, label: str, total: Optional[float] = None, unit: str = "frames",
                 stream: Optional[TextIO] = None, tty: Optional[bool] = None, interval_s: float = LOG_EVERY_S,
                 leave: bool = True) -> None:
        self.label, self.total, self.unit = label, total, unit
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self._isatty() if tty is None else tty
        self.interval_s = interval_s
        self.n = 0.0
        self.t0 = time.monotonic()
        self._last_t = self.t0
        self._last_step = 0
        self._closed = False
        self.bar: Optional[Any] = None
        if self.tty:
            self.bar = tqdm(total=total, desc=label, unit=unit if unit != "frames" else " frames", file=self.stream,
                            unit_scale=unit == "B", unit_divisor=1024 if unit == "B" else 1000, leave=leave,
                            **self._width())

    def _isatty(self) -> bool:
        try:
            return self.stream.isatty()
        except (AttributeError, ValueError):
            return False

    def _width(self) -> dict[str, Any]:
        """Follow the terminal's size; one that reports none (a bare pty: tqdm would draw nothing) is 80x24."""
        try:
            size = os.get_terminal_size(self.stream.fileno())
        except (AttributeError, ValueError, OSError):
            size = os.terminal_size((0, 0))
        return {"dynamic_ncols": True} if size.columns and size.lines else {"ncols": 80, "nrows": 24}

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None and self.bar is None:
            self._closed = True  # failed, not done: no closing line (the error says what happened)
        self.close()

    def set_total(self, total: Optional[float]) -> None:
        self.total = total
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

    def update(self, n: float = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        step = int(self.n / self.total / LOG_EVERY_FRACTION) if self.total else 0
        if step > self._last_step or now - self._last_t >= self.interval_s:
            self._last_step, self._last_t = step, now
            if not (self.total and self.n >= self.total):  # the end is said by close()
                self._line()

    def line(self) -> str:
        """``eval: 340/795 frames (43 %), 12.1 fps`` (the rate in the unit's own terms)."""
        elapsed = max(1e-6, time.monotonic() - self.t0)
        done = _amount(self.n, self.unit)
        text = f"{self.label}: {done}/{_amount(self.total, self.unit)}" if self.total else f"{self.label}: {done}"
        text += f" {self.unit}" if self.unit != "B" else ""
        if self.total:
            text += f" ({100 * self.n / self.total:.0f} %)"
        rate = self.n / elapsed
        if self.unit == "frames":
            text += f", {rate:.1f} fps"
        elif self.unit != "s":  # seconds of a clock (soak, capacity windows) have no rate to tell
            text += f", {_amount(rate, self.unit)}/s" if self.unit == "B" else f", {rate:.2f} {self.unit}/s"
        return text

    def write(self, text: str, file: Optional[TextIO] = None) -> None:
        """A line of output (``file``, default the progress stream) that leaves the bar whole on a terminal."""
        if self.bar is not None:
            tqdm.write(text, file=file if file is not None else self.stream)
        else:
            print(text, file=file if file is not None else self.stream, flush=True)

    def _line(self, suffix: str = "") -> None:
        text = self.line() + suffix
        if any(getattr(h, "_edgecv", False) and getattr(h, "stream", None) is self.stream
               for h in logging.getLogger().handlers):
            log.info(text)  # the command's log handler writes to this stream: its format, one format on stderr
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.bar is not None:
            self.bar.close()
            return
        self._line(f", done in {time.monotonic() - self.t0:.1f} s")
