"""`edgecv bench capacity` and `edgecv bench latency`: how many cameras one node holds, and where a frame's time goes.

Both run the daemon in this process (`edgecv.daemon.Daemon`, the console sink off) on a generated config of looping
file cameras (`--video`, default media/vtest.avi, replayed at its own rate, `max_fps` when `--fps` is lower) with
event-rich rules (five counting lines and three zones placed by frame size), against a private Mosquitto on a free
port and a subscriber (a process of its own) that stamps each event's receipt: capture -> subscriber latency
includes the spool and the publish path. Without a `mosquitto` binary, capacity runs with MQTT off (said so) and
latency cannot run.

capacity: model-only throughput first (inference on a pre-made input, `engine.bench.bench_model`), then for each
camera count N a warm-up, the latency windows cleared, a measured window (`--duration`), and one table row: the worst
camera's processed fps and drop % (the daemon's own `frames_dropped` over `frames_read` in the window), frame latency
(capture -> processed, the worst camera's p50/p99), event latency (capture -> subscriber, p50/p99 over every camera's
events), CPU % of the daemon's process (CPU time / wall / cores; the subscriber and Mosquitto are other processes).
N holds when every camera keeps its rate (processed >= 98 % of it), drops <= 1 % and both p99 <= 200 ms; the
largest N that holds is printed with its ratio to L = model-only fps / --fps, the camera count the model alone
could serve.

latency: one camera, the latency budget stage by stage (`latency_budget_ms` in the stats) and capture -> subscriber
latency against one inference measured in the same run. Speed figures are printed, never asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, TextIO

import cv2
import numpy as np
import paho.mqtt.client as mqtt

from . import EdgecvError, assets
from .config import ConfigError, parse
from .daemon import Daemon
from .engine.backend import default_threads, parallel_limit
from .engine.bench import bench_model, bench_parallel
from .engine.registry import build_detector
from .evaluation.variants import read_frames
from .progress import Progress

MAX_P99_MS = 200.0  # a camera count holds when frame and event p99 stay within this
MAX_DROP_PCT = 1.0  # ... and each camera drops at most this share of its frames
MIN_RATE = 0.98  # ... and processes at least this share of its frame rate


def _say(message: str, stream: TextIO = sys.stderr) -> None:
    """Progress: one plain line on stderr (stdout holds the tables)."""
    print(f"edgecv bench: {message}", file=stream, flush=True)


# ---- a private broker and a subscriber

def mosquitto_binary() -> Optional[str]:
    return shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalBroker:
    """Mosquitto on a free local port, its config and log in ``workdir``; stop() ends it."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.port = _free_port()
        conf = workdir / "mosquitto.conf"
        conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        self._log = open(workdir / "mosquitto.log", "ab")
        self.proc = subprocess.Popen([binary, "-c", str(conf)], stdout=self._log, stderr=self._log)
        end = time.monotonic() + 10.0
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                if time.monotonic() > end or self.proc.poll() is not None:
                    self.stop()
                    raise EdgecvError(f"mosquitto did not start on port {self.port} (log: {workdir})") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


@dataclass
class Received:
    camera: str
    captured_at: float  # wall clock, from the event
    received_at: float  # wall clock, when the subscriber got it


def subscribe(port: int, prefix: str = "edgecv", out: TextIO = sys.stdout) -> None:
    """The subscriber process: every event of ``prefix`` as one line `camera<TAB>captured_at<TAB>received_at`
    (receipt stamped on arrival, wall clock of this machine), after a line `subscribed`; runs until killed."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"edgecv-bench-{os.getpid()}")

    def on_message(c: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.time()
        try:
            data = json.loads(msg.payload)
            print(f"{data['camera']}\t{float(data['captured_at'])!r}\t{now!r}", file=out, flush=True)
        except (ValueError, KeyError, TypeError):
            pass

    client.on_connect = lambda c, *_: c.subscribe(f"{prefix}/+/+/events", qos=1)
    client.on_subscribe = lambda *_: print("subscribed", file=out, flush=True)
    client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.loop_forever()


class Receiver:
    """The subscriber (:func:`subscribe`) in a process of its own, so that it never waits for the daemon's threads
    (one interpreter lock) to stamp a receipt; its lines are read here."""

    def __init__(self, port: int, prefix: str = "edgecv") -> None:
        self.events: list[Received] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        code = "import sys; from edgecv.capacity import subscribe; subscribe(int(sys.argv[1]), sys.argv[2])"
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(port), prefix], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        self._reader = threading.Thread(target=self._read, name="bench-subscriber", daemon=True)
        self._reader.start()
        if not self._subscribed.wait(30):
            self.close()
            raise EdgecvError(f"the benchmark's subscriber got no SUBACK from 127.0.0.1:{port}")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            parts = line.rstrip("\n").split("\t")
            if parts == ["subscribed"]:
                self._subscribed.set()
            elif len(parts) == 3:
                with self._lock:
                    self.events.append(Received(parts[0], float(parts[1]), float(parts[2])))

    def latencies_ms(self, since: float, until: float) -> np.ndarray:
        """Capture -> receipt (ms) of the events captured between ``since`` and ``until`` (wall clock)."""
        time.sleep(0.2)  # the last lines on their way through the pipe
        with self._lock:
            values = [(e.received_at - e.captured_at) * 1000 for e in self.events if since <= e.captured_at <= until]
        return np.asarray(values, np.float64)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)
        self._reader.join(5)


# ---- the generated config

def _rules(width: int, height: int) -> dict[str, Any]:
    """Event-rich rules placed by frame size: five vertical counting lines, three zones side by side."""
    top, bottom = round(0.15 * height), round(0.95 * height)
    lines = {f"x{int(f * 100)}": {"points": [[round(f * width), top], [round(f * width), bottom]], "min_frames": 2}
             for f in (0.2, 0.35, 0.5, 0.65, 0.8)}
    zones = {}
    for i, (a, b) in enumerate(((0.0, 0.33), (0.33, 0.66), (0.66, 1.0))):
        x0, x1 = round(a * (width - 1)), round(b * (width - 1))
        zones[f"z{i + 1}"] = {"polygon": [[x0, top], [x1, top], [x1, bottom], [x0, bottom]], "min_frames": 2}
    return {"lines": lines, "zones": zones}


@dataclass
class Setup:
    """What every run of one benchmark shares."""

    model: Path
    video: Path
    video_fps: float
    frame_size: tuple[int, int]
    fps: float = 10.0
    every_n: Optional[int] = None
    motion_gate: bool = False
    threads: Optional[int] = None
    parallel: Optional[int] = None  # model.parallel (None: auto)
    defer: bool = True  # detect.defer_when_busy (with every_n above 1)
    port: Optional[int] = None  # the broker's (None: MQTT off)
    workdir: Path = field(default_factory=lambda: Path(tempfile.gettempdir()))

    def camera(self) -> dict[str, Any]:
        """One camera's section: the video looping at its own rate (throttled to --fps when that is lower)."""
        cam: dict[str, Any] = {"source": str(self.video), "loop": True, "realtime": True,
                               **_rules(*self.frame_size)}
        if self.fps < self.video_fps * 0.999:
            cam["max_fps"] = self.fps
        detect: dict[str, Any] = {}  # cameras.<n>.detect: frame skipping and the motion gate, where the config has it
        if self.every_n:
            detect["every_n"] = self.every_n
            if not self.defer:
                detect["defer_when_busy"] = False
        if self.motion_gate:
            detect["motion_gate"] = {"enabled": True}
        if detect:
            cam["detect"] = detect
        return cam

    def config(self, node: str, cameras: int) -> dict[str, Any]:
        mqtt_section: dict[str, Any] = {"enabled": False}
        if self.port is not None:
            mqtt_section = {"host": "127.0.0.1", "port": self.port, "qos": 1, "stats_interval_s": 5,
                            "spool": {"path": str(self.workdir / "spool")}}
        model: dict[str, Any] = {"path": str(self.model), "conf": 0.35, "classes": ["person"]}
        if self.threads:
            model["threads"] = self.threads
        if self.parallel:
            model["parallel"] = self.parallel
        return {"node_id": node, "log_level": "warning", "mqtt": mqtt_section, "console": {"enabled": False},
                "model": model, "cameras": {f"cam{i + 1}": self.camera() for i in range(cameras)}}


def make_setup(args: argparse.Namespace, workdir: Path) -> Setup:
    """The model and video found (assets), the video's rate and size read, the options checked."""
    model, video = assets.resolve(args.model), assets.resolve(args.video)
    if model is None:
        raise EdgecvError(f"--model: file not found: {args.model}")
    if video is None:
        raise EdgecvError(f"--video: file not found: {args.video}")
    cap = cv2.VideoCapture(str(video), cv2.CAP_FFMPEG)
    try:
        ok, image = cap.read()
        rate = cap.get(cv2.CAP_PROP_FPS)
    finally:
        cap.release()
    if not ok:
        raise EdgecvError(f"--video: no decodable frame in {video}")
    video_fps = float(rate) if rate and 0 < rate < 1000 else 25.0
    if not 0 < args.fps <= 1000:
        raise EdgecvError(f"--fps: expected a positive rate, got {args.fps:g}")
    if args.fps > video_fps * 1.001:
        _say(f"{video.name} plays at {video_fps:g} fps: cameras replay it at that rate, not at --fps {args.fps:g}")
    every_n = getattr(args, "every_n", None)
    if every_n is not None and every_n < 1:
        raise EdgecvError(f"--every-n: expected a positive number, got {every_n}")
    return Setup(model, video, video_fps, (image.shape[1], image.shape[0]), min(args.fps, video_fps), every_n,
                 bool(getattr(args, "motion_gate", False)), args.threads, workdir=workdir,
                 defer=not getattr(args, "no_defer", False), parallel=getattr(args, "parallel", None))


# ---- one run of the daemon

@dataclass
class Window:
    """The daemon's figures over the measured window (after the warm-up)."""

    seconds: float
    cameras: dict[str, dict[str, Any]]  # per camera: processed, read, dropped (in the window), stats at the end
    stats: dict[str, Any]  # the last stats message
    events_ms: np.ndarray  # capture -> subscriber of the events captured in the window
    cpu_s: float
    cpu_ms: dict[str, float] = field(default_factory=dict)  # CPU ms per processed frame by stage, in the window


def window_cpu_ms(first: dict[str, Any], last: dict[str, Any]) -> dict[str, float]:
    """CPU milliseconds per processed frame by stage over the window between two stats messages (their
    ``cpu_ms_per_frame`` count from the daemon's start: taken apart by the frames processed at each)."""
    def frames(stats: dict[str, Any]) -> int:
        return sum(cam.get("frames_processed", 0) for cam in stats["cameras"].values())

    before, after = first.get("cpu_ms_per_frame", {}), last.get("cpu_ms_per_frame", {})
    n0, n1 = frames(first), frames(last)
    if n1 <= n0:
        return {}
    # (each figure is rounded to the microsecond: a stage with no CPU in the window may come out a hair below 0)
    return {role: max(0.0, (ms * n1 - before.get(role, 0.0) * n0) / (n1 - n0)) for role, ms in after.items()}


def _deltas(first: dict[str, Any], last: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, cam in last["cameras"].items():
        before = first["cameras"][name]
        out[name] = {k: cam.get(f"frames_{k}", 0) - before.get(f"frames_{k}", 0)
                     for k in ("read", "processed", "dropped", "inferred")}
        out[name]["stats"] = cam
    return out


def _clear_latency(daemon: Daemon) -> None:
    """Forget the warm-up's latencies (model start-up, first frames): the stats tell the window only."""
    pipe = daemon.pipeline
    for name, worker in pipe.workers.items():
        worker.latency.clear()
        for window in pipe.latency_windows(name).values():
            window.clear()
        if daemon.publisher is not None:
            for window in daemon.publisher.latency_windows(name).values():
                window.clear()


def _tick(daemon: Daemon, until: float, progress: Progress, start: float) -> bool:
    """Wait until ``until`` (monotonic), ``progress`` moved to the seconds since ``start`` every second; True: the
    daemon stopped first."""
    while not daemon.stop_event.wait(min(1.0, max(0.0, until - time.monotonic()))):
        now = time.monotonic()
        progress.update(max(0.0, min(round(now - start), progress.total or 0.0) - progress.n))  # whole seconds
        if now >= until - 1e-3:
            return False
    return True


def _watch(daemon: Daemon, warmup_s: float, duration_s: float, progress: Progress, out: dict[str, Any]) -> None:
    """The controller thread: warm-up, the measured window (``progress`` in seconds), then stop the daemon."""
    try:
        start = time.monotonic()
        if _tick(daemon, start + warmup_s, progress, start):
            return
        _clear_latency(daemon)
        first, t0, cpu0, wall0 = daemon.publish_stats(), time.monotonic(), time.process_time(), time.time()
        _tick(daemon, t0 + duration_s, progress, start)
        last, seconds, cpu = daemon.publish_stats(), time.monotonic() - t0, time.process_time() - cpu0
        out.update(first=first, last=last, seconds=seconds, cpu=cpu, wall=(wall0, time.time()))
    except Exception as e:  # never leave the daemon running unobserved
        out["error"] = f"{type(e).__name__}: {e}"
    finally:
        daemon.stop_event.set()


def run_window(setup: Setup, node: str, cameras: int, warmup_s: float, duration_s: float,
               receiver: Optional[Receiver], label: str) -> Window:
    """The daemon with ``cameras`` cameras: warm-up, then ``duration_s`` measured."""
    try:
        cfg = parse(setup.config(node, cameras), f"{label} config")
    except ConfigError as e:
        raise EdgecvError("; ".join(e.problems)) from None
    daemon = Daemon(cfg)
    out: dict[str, Any] = {}
    with Progress(f"{label} ({warmup_s:g} s warm-up + {duration_s:g} s measured)", total=warmup_s + duration_s,
                  unit="s") as progress:
        watcher = threading.Thread(target=_watch, args=(daemon, warmup_s, duration_s, progress, out),
                                   name="bench-watch", daemon=True)
        watcher.start()
        code = daemon.run()  # stops when the watcher says so; delivers the last events before returning
        watcher.join(5)
    if "error" in out or "last" not in out:
        raise EdgecvError(f"{label}: {out.get('error') or f'the daemon stopped before the end (exit {code})'}")
    since, until = out["wall"]
    events = receiver.latencies_ms(since, until) if receiver is not None else np.zeros(0)
    return Window(out["seconds"], _deltas(out["first"], out["last"]), out["last"], events, out["cpu"],
                  window_cpu_ms(out["first"], out["last"]))


def model_only(setup: Setup, runs: int, at_once: bool = True) -> dict[str, Any]:
    """Inference on a pre-made input (engine.bench.bench_model, ``runs`` timed) on the video's first frame; with
    the daemon inferring several frames at once (``model.parallel``), also the frames per second of that many
    at once (``parallel_fps``, ``lanes``; not with ``at_once`` False). ``fps``: the larger, what the model alone
    serves on this machine."""
    first = read_frames(setup.video, 1)
    image = first[0] if first else None
    detector = build_detector(setup.model, threads=setup.threads)
    with Progress("model only", unit="runs") as progress:
        infer = bench_model(detector, n=runs, image=image, progress=progress)
    infer["lanes"] = lanes = parallel_limit(detector.backend, setup.parallel or "auto")
    infer["fps"] = infer["infer_fps"]
    if lanes > 1 and at_once:
        with Progress(f"model only, {lanes} at once", unit="runs") as progress:
            infer["parallel_fps"] = round(bench_parallel(detector, lanes, n=max(runs, 2 * lanes), image=image,
                                                         progress=progress), 1)
        infer["fps"] = max(infer["fps"], infer["parallel_fps"])
    return infer


# ---- capacity

def _pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


@dataclass
class Row:
    cameras: int
    worst_fps: float
    drop_pct: float
    frame_p50: float
    frame_p99: float
    event_p50: float
    event_p99: float
    events: int
    cpu_pct: float
    holds: bool
    inferred_pct: float = 100.0  # frames the detector ran on, of those processed (every_n, motion gate, deferrals)


def capacity_row(n: int, fps: float, w: Window, with_events: bool) -> Row:
    cams = w.cameras.values()
    worst_fps = min(c["processed"] / w.seconds for c in cams)
    drop = max(100.0 * c["dropped"] / c["read"] if c["read"] else 100.0 for c in cams)
    frame_p50 = max(c["stats"]["latency_ms"]["p50"] for c in cams)
    frame_p99 = max(c["stats"]["latency_ms"]["p99"] for c in cams)
    ev50, ev99 = _pct(w.events_ms, 50), _pct(w.events_ms, 99)
    cpu = 100.0 * w.cpu_s / w.seconds / (os.cpu_count() or 1)
    holds = (worst_fps >= MIN_RATE * fps and drop <= MAX_DROP_PCT and frame_p99 <= MAX_P99_MS
             and (not with_events or (len(w.events_ms) > 0 and ev99 <= MAX_P99_MS)))
    processed = sum(c["processed"] for c in cams)
    inferred = 100.0 * sum(c.get("inferred", c["processed"]) for c in cams) / processed if processed else 0.0
    return Row(n, worst_fps, drop, frame_p50, frame_p99, ev50, ev99, len(w.events_ms), cpu, holds, inferred)


CAPACITY_COLUMNS = ("cameras", "worst fps", "drop %", "frame p50 ms", "frame p99 ms", "event p50 ms", "event p99 ms",
                    "events", "inferred %", "CPU %", "holds")


def _cells(r: Row) -> list[str]:
    return [str(r.cameras), f"{r.worst_fps:.2f}", f"{r.drop_pct:.1f}", f"{r.frame_p50:.0f}", f"{r.frame_p99:.0f}",
            f"{r.event_p50:.0f}", f"{r.event_p99:.0f}", str(r.events), f"{r.inferred_pct:.0f}", f"{r.cpu_pct:.0f}",
            "yes" if r.holds else "NO"]


def grid(header: tuple[str, ...] | list[str], rows: list[list[str]]) -> str:
    """A plain text table: a header, a rule, right-aligned cells (the first column left-aligned)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]

    def line(cells: list[str] | tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _camera_counts(text: str) -> list[int]:
    try:
        counts = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise EdgecvError(f"--cameras: expected camera counts like 4,8,12,16, got {text!r}")
    return counts


def _runs(args: argparse.Namespace) -> int:
    """Timed model-only runs: ``--frames``, 20 to 200 (as `edgecv bench model`)."""
    return max(20, min(getattr(args, "frames", 100) or 100, 200))


def _durations(args: argparse.Namespace) -> tuple[float, float]:
    duration = args.duration
    warmup = args.warmup if args.warmup is not None else min(10.0, max(2.0, duration / 4))
    if duration <= 0 or warmup < 0:
        raise EdgecvError("--duration and --warmup: expected positive numbers of seconds")
    return warmup, duration


def _model_line(setup: Setup, infer: dict[str, Any]) -> str:
    """The model-only figures and L (from the larger: one at a time or ``lanes`` at once)."""
    lanes = infer.get("lanes", 1)
    at_once = f", {infer['parallel_fps']:.1f} fps {lanes} at once (model.parallel)" if lanes > 1 else ""
    return (f"model only: {infer['infer_ms']:.2f} ms median = {1000.0 / infer['infer_ms']:.1f} fps one at a time"
            f"{at_once} ({infer['backend']}, {infer['device']}, threads {setup.threads or f'auto ({default_threads()})'}); "
            f"L = model-only fps / {setup.fps:g} = {infer['fps'] / setup.fps:.1f} cameras")


def _capacity_header(setup: Setup, infer: dict[str, Any], broker: Optional[LocalBroker], per_n: float) -> str:
    mode = [f"every_n {setup.every_n}"] if setup.every_n else []
    mode += ["motion gate on"] if setup.motion_gate else []
    return "\n".join([
        f"edgecv bench capacity: {setup.model.name} on {setup.video.name} {setup.frame_size[0]}x{setup.frame_size[1]}, "
        f"looping cameras at {setup.fps:g} fps" + (f" ({', '.join(mode)})" if mode else "") + f", {os.cpu_count()} cores",
        _model_line(setup, infer),
        f"publish path: {'Mosquitto on 127.0.0.1:%d, QoS 1, spool on disk' % broker.port if broker else 'MQTT off (no mosquitto binary): event latency not measured'}",
        f"each count: {per_n:.0f} s warm-up, then the measured window; holds: every camera >= {MIN_RATE:.0%} of its "
        f"rate, drops <= {MAX_DROP_PCT:g} %, frame and event p99 <= {MAX_P99_MS:g} ms",
    ])


def _verdict(rows: list[Row], model_fps: float, fps: float) -> str:
    held = [r.cameras for r in rows if r.holds]
    limit = model_fps / fps
    if not held:
        return f"largest camera count that holds: none of {', '.join(str(r.cameras) for r in rows)} (L = {limit:.1f})"
    best = max(held)
    return f"largest camera count that holds: {best} = {best / limit:.2f} of L ({limit:.1f})"


def bench_capacity(args: argparse.Namespace, stream: TextIO = sys.stdout) -> int:
    counts = _camera_counts(args.cameras)
    warmup, duration = _durations(args)
    with tempfile.TemporaryDirectory(prefix="edgecv-capacity-") as tmp:
        setup = make_setup(args, Path(tmp))
        binary = mosquitto_binary()
        if binary is None:
            _say("no mosquitto binary: running with MQTT off (frame latency only, no publish path)")
        broker = LocalBroker(binary, Path(tmp)) if binary else None
        receiver = None
        try:
            if broker is not None:
                setup.port = broker.port
                receiver = Receiver(broker.port)
            _say("model-only throughput ...")
            infer = model_only(setup, _runs(args))
            print(_capacity_header(setup, infer, broker, warmup), file=stream, flush=True)
            rows, cpu_lines = [], []
            for n in counts:
                _say(f"{n} cameras: {warmup:.0f} s warm-up, {duration:.0f} s measured")
                w = run_window(setup, f"capacity{n}", n, warmup, duration, receiver, f"{n} cameras")
                rows.append(capacity_row(n, setup.fps, w, receiver is not None))
                cpu_lines.append(cpu_line(n, w.cpu_ms))
                _say(f"{n} cameras: " + ", ".join(f"{h} {c}" for h, c in zip(CAPACITY_COLUMNS[1:], _cells(rows[-1])[1:])))
        finally:
            if receiver is not None:
                receiver.close()
            if broker is not None:
                broker.stop()
    print(grid(CAPACITY_COLUMNS, [_cells(r) for r in rows]), file=stream)
    print("CPU ms per processed frame, by stage (the measured window):", file=stream)
    print("\n".join(cpu_lines), file=stream)
    print(_verdict(rows, infer["fps"], setup.fps), file=stream, flush=True)
    return 0


def cpu_line(cameras: int, cpu_ms: dict[str, float]) -> str:
    """One count's CPU per processed frame by stage (:mod:`edgecv.cpu` roles), the total last."""
    if not cpu_ms:
        return f"  {cameras} cameras: no frame processed in the window"
    parts = [f"{role} {ms:.2f}" for role, ms in sorted(cpu_ms.items(), key=lambda kv: -kv[1]) if role != "total"]
    return f"  {cameras} cameras: " + ", ".join(parts) + f"; total {cpu_ms.get('total', sum(cpu_ms.values())):.2f}"


# ---- latency

BUDGET_STAGES = ("capture", "preprocess", "queue_inference", "inference", "queue_worker", "decode_nms", "track_rules",
                 "spool_write", "send_wait", "broker_ack")


def latency_rows(w: Window, infer: dict[str, Any]) -> tuple[list[list[str]], list[list[str]]]:
    """(summary rows, budget rows) of one latency run: the event latency against one inference, both as
    `edgecv bench model` measures it (back to back) and as it ran in the pipeline (a frame every 1/fps s)."""
    cam = next(iter(w.cameras.values()))["stats"]
    budget = cam.get("latency_budget_ms", {})
    model = infer["infer_ms"]
    run = budget.get("inference", {"p50": float("nan"), "p99": float("nan")})
    pipeline = run["p50"] or float("nan")
    ev50, ev99 = _pct(w.events_ms, 50), _pct(w.events_ms, 99)
    frame = cam["latency_ms"]
    summary = [
        ["one inference: model only (median, back to back)", f"{model:.1f} ms"],
        ["one inference: in the pipeline (p50 / p99)", f"{run['p50']:.1f} / {run['p99']:.1f} ms"],
        ["frame: capture -> processed (p50 / p99)", f"{frame['p50']:.1f} / {frame['p99']:.1f} ms"],
        ["event: capture -> subscriber (p50 / p99)", f"{ev50:.1f} / {ev99:.1f} ms ({len(w.events_ms)} events)"],
        ["event p50 / one inference (model only, pipeline)", f"{ev50 / model:.2f}, {ev50 / pipeline:.2f}"],
        ["event p99 / one inference (model only, pipeline)", f"{ev99 / model:.2f}, {ev99 / pipeline:.2f}"],
    ]
    stages = [[s, f"{budget[s]['p50']:.2f}", f"{budget[s]['p99']:.2f}"] for s in BUDGET_STAGES if s in budget]
    return summary, stages


def bench_latency(args: argparse.Namespace, stream: TextIO = sys.stdout) -> int:
    warmup, duration = _durations(args)
    binary = mosquitto_binary()
    if binary is None:
        raise EdgecvError("bench latency: needs the mosquitto binary (capture -> subscriber goes through a broker)")
    with tempfile.TemporaryDirectory(prefix="edgecv-latency-") as tmp:
        setup = make_setup(args, Path(tmp))
        broker = LocalBroker(binary, Path(tmp))
        setup.port = broker.port
        receiver = None
        try:
            receiver = Receiver(broker.port)
            _say("model-only inference ...")
            infer = model_only(setup, _runs(args), at_once=False)
            _say(f"1 camera: {warmup:.0f} s warm-up, {duration:.0f} s measured")
            w = run_window(setup, "latency", 1, warmup, duration, receiver, "latency")
        finally:
            if receiver is not None:
                receiver.close()
            broker.stop()
    summary, stages = latency_rows(w, infer)
    print(f"edgecv bench latency: 1 camera, {setup.video.name} at {setup.fps:g} fps, {setup.model.name}, "
          f"Mosquitto on 127.0.0.1, QoS 1, {w.seconds:.0f} s after a {warmup:.0f} s warm-up, {os.cpu_count()} cores",
          file=stream)
    print(grid(("", "value"), summary), file=stream)
    print(file=stream)
    print(grid(("stage (ms)", "p50", "p99"), stages), file=stream, flush=True)
    return 0


RUNNERS: dict[str, Callable[[argparse.Namespace], int]] = {"capacity": bench_capacity, "latency": bench_latency}
