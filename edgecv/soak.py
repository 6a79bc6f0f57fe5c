"""`edgecv bench soak CONFIG --duration S`: run the daemon for a long time and watch for leaks.

The daemon runs in this process (the config's file cameras forced to `loop: true`, so the demo never ends;
the console sink off, so stdout holds the table: events still go to MQTT through the spool) while a
sampler thread reads, every `--interval` seconds, the process's resident memory, thread count and open
file descriptors from /proc, and the daemon's own figures (spool depth, frames processed, events,
camera states, MQTT state). Each sample is printed as a table row (and written to `--out` as CSV).

Verdict: growth between the first sample after the warm-up (`--warmup`, default a quarter of the
duration, at most 120 s: model arenas, caches and the broker connection settle first) and the last sample.
The run fails (exit 1) when a growth exceeds its bound, when the daemon stopped before the end, or when no
frame was processed after the warm-up. Default bounds: RSS +50 MB, threads +2, open fds +10.
"""
from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Optional, TextIO

from . import EdgecvError
from .config import Config, load
from .daemon import Daemon, Signals, setup_logging
from .progress import Progress

log = logging.getLogger("edgecv.soak")

DEFAULT_MAX_RSS_MB = 50.0
DEFAULT_MAX_THREADS = 2
DEFAULT_MAX_FDS = 10


@dataclass
class ProcSample:
    rss_mb: float
    threads: int
    fds: int


def proc_sample(pid: int | str = "self") -> ProcSample:
    """Resident memory (MB), thread count and open file descriptors of a process, from /proc (Linux)."""
    rss_kb, threads = 0, 0
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss_kb = int(line.split()[1])
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return ProcSample(round(rss_kb / 1024.0, 1), threads, fds)


@dataclass
class SoakSample:
    t_s: float
    rss_mb: float
    threads: int
    fds: int
    spool_depth: int
    frames_processed: int
    events: int
    cameras: str
    mqtt: str


@dataclass
class Bounds:
    rss_mb: float = DEFAULT_MAX_RSS_MB
    threads: int = DEFAULT_MAX_THREADS
    fds: int = DEFAULT_MAX_FDS


@dataclass
class Verdict:
    ok: bool
    text: str


COLUMNS = [("t_s", 8), ("rss_mb", 8), ("threads", 7), ("fds", 5), ("spool_depth", 11), ("frames_processed", 16),
           ("events", 7), ("mqtt", 12), ("cameras", 0)]


def format_row(values: dict[str, Any]) -> str:
    return " ".join(f"{str(values[k]):>{w}}" if w else str(values[k]) for k, w in COLUMNS)


def verdict(samples: list[SoakSample], warmup_s: float, bounds: Bounds,
            stopped_early: Optional[str] = None) -> Verdict:
    """Growth between the first sample at or after the warm-up and the last sample, against the bounds."""
    after = [s for s in samples if s.t_s >= warmup_s]
    if len(after) < 2:
        why = f"{stopped_early}; " if stopped_early else ""
        return Verdict(False, f"soak verdict: FAIL: {why}fewer than 2 samples after the {warmup_s:.0f} s warm-up "
                              f"({len(samples)} in all); run longer or sample more often")
    first, last = after[0], after[-1]
    growth = {"rss_mb": last.rss_mb - first.rss_mb, "threads": last.threads - first.threads,
              "fds": last.fds - first.fds}
    over = [stopped_early] if stopped_early else []
    over += [f"{k} {growth[k]:+g} > +{getattr(bounds, k):g}" for k in ("rss_mb", "threads", "fds")
             if growth[k] > getattr(bounds, k)]
    processed = last.frames_processed - first.frames_processed
    if processed <= 0:
        over.append("no frame processed after the warm-up")
    span = last.t_s - first.t_s
    text = (f"RSS {first.rss_mb:.1f} -> {last.rss_mb:.1f} MB ({growth['rss_mb']:+.1f}, bound +{bounds.rss_mb:g}), "
            f"threads {first.threads} -> {last.threads} ({growth['threads']:+d}, bound +{bounds.threads}), "
            f"fds {first.fds} -> {last.fds} ({growth['fds']:+d}, bound +{bounds.fds}), "
            f"spool depth max {max(s.spool_depth for s in after)}, last {last.spool_depth}; "
            f"{processed} frames processed over {span:.0f} s after a {first.t_s:.0f} s warm-up")
    if over:
        return Verdict(False, f"soak verdict: FAIL ({'; '.join(over)}): {text}")
    return Verdict(True, f"soak verdict: PASS: {text}")


class _Probe:
    """Reads the daemon's own figures; tolerant of a daemon whose layout differs (several pipelines)."""

    def __init__(self, daemon: Any) -> None:
        self.daemon = daemon

    def _pipelines(self) -> list[Any]:
        d = self.daemon
        many = getattr(d, "pipelines", None)
        if many:
            return list(many.values()) if isinstance(many, dict) else list(many)
        one = getattr(d, "pipeline", None)
        return [one] if one is not None else []

    def figures(self) -> dict[str, Any]:
        processed = events = 0
        states: list[str] = []
        for p in self._pipelines():
            for name, cam in p.stats().get("cameras", {}).items():
                processed += int(cam.get("frames_processed", 0))
                events += int(cam.get("events", 0))
                states.append(f"{name}={cam.get('state', '?')}")
        publisher = getattr(self.daemon, "publisher", None)
        depth = int(publisher.spool.depth) if publisher is not None else 0
        mqtt = str(publisher.state) if publisher is not None else "off"
        return {"spool_depth": depth, "frames_processed": processed, "events": events,
                "cameras": ",".join(states), "mqtt": mqtt}


class _Sampler:
    """The sampler thread's work: every ``interval_s`` a sample, printed as a row (and written to the CSV); the
    daemon is stopped once ``duration_s`` is reached, or when sampling fails. ``progress`` (set by the caller):
    moved to the seconds run every second."""

    def __init__(self, daemon: Any, probe: _Probe, t0: float, duration_s: float, interval_s: float,
                 stream: TextIO, csv_file: Optional[TextIO]) -> None:
        self.daemon = daemon
        self.probe = probe
        self.t0 = t0
        self.duration_s = duration_s
        self.interval_s = interval_s
        self.stream = stream
        self.csv_file = csv_file
        self.samples: list[SoakSample] = []
        self.progress: Optional[Progress] = None
        self.writer = csv.DictWriter(csv_file, [f.name for f in fields(SoakSample)]) if csv_file else None
        if self.writer:
            self.writer.writeheader()
        self.done = threading.Event()

    def take(self) -> None:
        p = proc_sample()
        s = SoakSample(t_s=round(time.monotonic() - self.t0, 1), rss_mb=p.rss_mb, threads=p.threads, fds=p.fds,
                       **self.probe.figures())
        self.samples.append(s)
        if self.progress is not None:  # the row above the bar on a terminal
            self.progress.write(format_row(asdict(s)), file=self.stream)
        else:
            print(format_row(asdict(s)), file=self.stream, flush=True)
        if self.writer:
            self.writer.writerow(asdict(s))
            self.csv_file.flush()

    def run(self) -> None:
        t0, interval_s, duration_s = self.t0, self.interval_s, self.duration_s
        try:
            next_t = t0 + interval_s
            while not self.done.wait(max(0.0, min(1.0, next_t - time.monotonic()))):
                if self.progress is not None:
                    self.progress.update(max(0.0, min(round(time.monotonic() - t0), duration_s) - self.progress.n))
                if time.monotonic() < next_t - 1e-3:
                    continue
                self.take()
                if time.monotonic() - t0 >= duration_s - 1e-3:
                    self.daemon.stop_event.set()
                    return
                next_t = min(next_t + interval_s, t0 + duration_s)
        except Exception as e:  # never leave the daemon running unobserved
            log.error("soak sampler failed: %s: %s", type(e).__name__, e)
            self.daemon.stop_event.set()


def _soak_config(config: str) -> Config:
    """The config with its file cameras looping and the console sink off (the sample table owns stdout: events
    still go to MQTT and the spool)."""
    cfg = load(config)
    cams = {n: (c.model_copy(update={"loop": True}) if c.kind == "file" else c) for n, c in cfg.cameras.items()}
    return cfg.model_copy(update={"cameras": cams, "console": cfg.console.model_copy(update={"enabled": False})})


def _check_args(duration_s: float, interval_s: float) -> None:
    if duration_s <= 0 or interval_s <= 0:
        raise EdgecvError("--duration and --interval: expected positive numbers of seconds")
    if not os.path.isdir("/proc/self/fd"):
        raise EdgecvError("soak: needs Linux /proc to read memory, threads and file descriptors")


def _stopped_early(elapsed: float, duration_s: float, code: int) -> Optional[str]:
    if elapsed < duration_s - 1.0:
        return f"the daemon stopped after {elapsed:.0f} s of {duration_s:.0f} s (exit {code})"
    return None


def soak(config: str, duration_s: float, interval_s: float = 10.0, warmup_s: Optional[float] = None,
         out: Optional[str] = None, bounds: Optional[Bounds] = None, stream: TextIO = sys.stdout) -> int:

    _check_args(duration_s, interval_s)
    bounds = bounds or Bounds()
    warmup = min(120.0, duration_s / 4) if warmup_s is None else warmup_s
    cfg = _soak_config(config)
    setup_logging(cfg.log_level)
    signals = Signals().install(reload=False)
    daemon = Daemon(cfg, signals=signals)
    signals.starting = False
    probe = _Probe(daemon)
    t0 = time.monotonic()
    csv_file = open(out, "w", newline="", encoding="utf-8") if out else None
    sampler = _Sampler(daemon, probe, t0, duration_s, interval_s, stream, csv_file)

    print(f"edgecv bench soak: {config} for {duration_s:.0f} s, sample every {interval_s:g} s, warm-up "
          f"{warmup:.0f} s, bounds RSS +{bounds.rss_mb:g} MB, threads +{bounds.threads}, fds +{bounds.fds}"
          + (f", CSV {out}" if out else ""), file=stream, flush=True)
    print(format_row({k: k for k, _ in COLUMNS}), file=stream, flush=True)
    with Progress("soak", total=duration_s, unit="s") as sampler.progress:
        thread = threading.Thread(target=sampler.run, name="soak-sampler", daemon=True)
        thread.start()
        try:
            code = daemon.run()
        finally:
            sampler.done.set()
            thread.join(5)
            if csv_file:
                csv_file.close()
    elapsed = time.monotonic() - t0
    v = verdict(sampler.samples, warmup, bounds, _stopped_early(elapsed, duration_s, code))
    print(v.text, file=stream, flush=True)
    return 0 if v.ok else 1


def run_soak(args: argparse.Namespace) -> int:
    if not args.config:
        raise EdgecvError("bench soak: expected a config file: edgecv bench soak CONFIG --duration SECONDS")
    if not Path(args.config).is_file():
        raise EdgecvError(f"bench soak: config not found: {args.config}")
    return soak(args.config, args.duration, args.interval, args.warmup, args.out,
                Bounds(args.max_rss_mb, args.max_threads, args.max_fds))
