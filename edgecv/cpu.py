"""CPU time by pipeline stage, read from the kernel's per-thread accounting (Linux ``/proc/self/task``).

Each stage of the pipeline runs on threads of its own, so the CPU time of a stage is the CPU time of its threads:
Python threads are known by name (``capture-<camera>``: read, decode and preprocessing; ``inference``: the
call into the model runtime; ``worker-<camera>``: decoding boxes, NMS, tracking and rules; ``mqtt-sender`` and
paho's thread: publishing). Threads the native libraries start themselves are counted together as
``native_threads``: the inference runtime's thread pool (ONNX Runtime runs a model on ``threads`` threads, the
calling one included) and the video decoder's threads (FFmpeg starts its own). Both appear lazily (at the first
read, the first inference), so no rule tells them apart. Reading costs one small file per thread; it is done when
stats are made and twice a second in offline runs, never per frame.
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Optional

ROLES = ("capture", "inference", "native_threads", "workers", "publish", "main", "other")
"""The stages, in the order a frame goes through them."""

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_TASKS = Path("/proc/self/task")


def thread_cpu_s() -> dict[int, float]:
    """CPU seconds (user + system) of every thread of this process by thread id; empty where /proc is missing."""
    out: dict[int, float] = {}
    try:
        tasks = list(_TASKS.iterdir())
    except OSError:
        return out
    for task in tasks:
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the thread ended meanwhile
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / _TICK
    return out


def _role(name: str) -> str:
    if name.startswith("capture-"):
        return "capture"
    if name.startswith("worker-"):
        return "workers"
    if name == "inference" or name.startswith("inference-"):
        return "inference"
    if name == "mqtt-sender" or name.startswith("paho-mqtt"):
        return "publish"
    if name == "MainThread":
        return "main"
    return "other"


class CpuMeter:
    """CPU time by role since the meter was made. Call :meth:`sample` now and then: a thread's time is counted up
    to its last sample, or to its end where it calls :meth:`thread_ended`."""

    def __init__(self) -> None:
        self._base = thread_cpu_s()
        self._last: dict[int, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def sample(self) -> None:
        names: dict[Optional[int], str] = {t.native_id: t.name for t in threading.enumerate()}
        now = thread_cpu_s()
        with self._lock:
            for tid, cpu in now.items():
                role = _role(names[tid]) if tid in names else "native_threads"
                self._last[tid] = (role, cpu - self._base.get(tid, 0.0))

    def thread_ended(self) -> None:
        """Called by a thread as it ends: its CPU time so far is counted (its own clock, ``time.thread_time``).
        Without it, a thread that ends between two samples loses what it used since the last one, all of it
        for one shorter than the interval (the inference threads of a short offline run)."""
        t = threading.current_thread()
        used = max(0.0, time.thread_time() - self._base.get(t.native_id or 0, 0.0))
        with self._lock:
            self._last[t.native_id or 0] = (_role(t.name), used)

    def seconds(self) -> dict[str, float]:
        """CPU seconds by role (every role of :data:`ROLES`, 0 when none ran), as of the last sample."""
        totals = dict.fromkeys(ROLES, 0.0)
        with self._lock:
            for role, cpu in self._last.values():
                totals[role] += cpu
        return totals

    def per_frame_ms(self, frames: int) -> dict[str, float]:
        """CPU milliseconds per frame by role, and their ``total``."""
        per = {role: round(s * 1000 / frames, 3) if frames else 0.0 for role, s in self.seconds().items()}
        per["total"] = round(sum(per.values()), 3)
        return per
