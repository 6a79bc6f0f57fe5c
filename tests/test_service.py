"""edgecv as a systemd service: the unit (systemd-analyze verify and security), `edgecv service install`, the
sd_notify protocol of `edgecv run` (READY, STATUS, WATCHDOG only while the pipeline makes progress, RELOADING,
STOPPING) on a real unix datagram socket, logs for journald, and progress reporting of long commands."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import pytest
import yaml
from broker import free_port
from conftest import REPO, StderrLog, edgecv_env, on_a_terminal, progress_lines, terminate

from edgecv import assets as assets_mod
from edgecv.service import unit_text

pytestmark = pytest.mark.integration

EDGECV = Path(sys.executable).parent / "edgecv"
SHIPPED = REPO / "deploy" / "edgecv.service"
SHIPPED_EXEC, SHIPPED_CONFIG = "/opt/edgecv/venv/bin/edgecv", "/etc/edgecv/edgecv.yaml"
needs_systemd_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                           reason="systemd-analyze is not installed (Debian: apt-get install systemd)")


# ---- the unit


def verify(unit: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)


def exposure(unit: Path) -> float:
    out = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)], capture_output=True,
                         text=True, timeout=60).stdout
    m = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", out)
    assert m, out
    return float(m.group(1))


def test_shipped_unit_is_what_service_install_writes():
    assert SHIPPED.read_text() == unit_text(SHIPPED_EXEC, SHIPPED_CONFIG), \
        "regenerate: edgecv service install (see deploy/README.md)"


@needs_systemd_analyze
def test_shipped_unit_verifies_and_is_rated_ok(tmp_path):
    # ExecStart must exist at verify time: the shipped unit with this virtualenv's real edgecv in its place
    text = SHIPPED.read_text()
    assert f"ExecStart={SHIPPED_EXEC} run {SHIPPED_CONFIG}\n" in text
    unit = tmp_path / "edgecv.service"
    unit.write_text(text.replace(f"ExecStart={SHIPPED_EXEC}", f"ExecStart={EDGECV}"))
    done = verify(unit)
    assert done.returncode == 0, done.stderr
    for line in ("Type=notify", "WatchdogSec=30s", "Restart=on-failure", "DynamicUser=yes", "StateDirectory=edgecv",
                 "ProtectSystem=strict", "NoNewPrivileges=yes", "CapabilityBoundingSet=\n", "SupplementaryGroups=video",
                 "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6", "DeviceAllow=char-video4linux rw",
                 "ExecReload=/bin/kill -HUP $MAINPID"):
        assert line in text, line
    assert exposure(unit) <= 2.5
    # and the check can fail: a missing binary is an error, an unhardened unit rates worse
    unit.write_text(text)
    assert verify(unit).returncode != 0
    bare = tmp_path / "bare.service"
    bare.write_text(f"[Service]\nType=notify\nExecStart={EDGECV} run {SHIPPED_CONFIG}\n")
    assert exposure(bare) > 5


@needs_systemd_analyze
def test_service_install_writes_a_unit_that_verifies(tmp_path):
    config = tmp_path / "my config%.yaml"  # a blank and a % in the path: quoted and escaped in ExecStart
    config.write_text((REPO / "configs" / "demo.yaml").read_text())
    out = tmp_path / "units"
    out.mkdir()
    done = subprocess.run([str(EDGECV), "service", "install", str(config), "--output", str(out)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    unit = out / "edgecv.service"
    text = unit.read_text()
    assert f'ExecStart={EDGECV} run "{str(config).replace("%", "%%")}"' in text
    assert "sudo systemctl daemon-reload" in done.stdout and "sudo systemctl enable --now edgecv.service" in done.stdout
    assert verify(unit).returncode == 0, verify(unit).stderr
    assert exposure(unit) <= 2.5

    user = subprocess.run([str(EDGECV), "service", "install", str(config), "--user", "--output", str(out / "u.service")],
                          capture_output=True, text=True, timeout=60)
    assert user.returncode == 0, user.stderr
    utext = (out / "u.service").read_text()
    assert "systemctl --user enable --now u.service" in user.stdout
    assert "User" not in utext and "DynamicUser" not in utext and "CapabilityBoundingSet" not in utext
    assert "WantedBy=default.target" in utext and "Type=notify" in utext

    bad = subprocess.run([str(EDGECV), "service", "install", str(config), "--output", str(tmp_path / "no" / "x")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1
    assert bad.stderr.startswith("edgecv: error: cannot write ") and bad.stderr.count("\n") == 1, bad.stderr
    assert "Traceback" not in bad.stderr


# ---- sd_notify from a running daemon


class NotifySocket:
    """The service manager's side: a bound unix datagram socket, every message kept with its arrival time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def lines(self, since: float = 0.0) -> list[str]:
        return [line for t, m in list(self.messages) if t >= since for line in m.split("\n")]

    def times(self, line: str, since: float = 0.0) -> list[float]:
        return [t for t, m in list(self.messages) if t >= since and line in m.split("\n")]

    def wait_for(self, line: str, since: float = 0.0, timeout: float = 60.0) -> float:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            found = self.times(line, since)
            if found:
                return found[0]
            time.sleep(0.05)
        raise AssertionError(f"no {line!r} within {timeout}s; got {self.lines(since)[-20:]}")

    def close(self) -> None:
        self._stop.set()
        self._t.join(2)
        self.sock.close()


def start_daemon(cfg: dict, tmp_path: Path, assets: Path, **env: str) -> tuple[subprocess.Popen, NotifySocket, StderrLog]:
    path = tmp_path / "edgecv.yaml"
    path.write_text(yaml.safe_dump(cfg))
    notify = NotifySocket(tmp_path / "notify.sock")
    environ = edgecv_env(assets, tmp_path, NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="1000000", **env)
    proc = subprocess.Popen([str(EDGECV), "run", str(path)], env=environ, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    return proc, notify, StderrLog(proc)


def demo_config(assets: Path, **mqtt) -> dict:
    """configs/demo.yaml, vtest.avi looping in real time, no console."""
    cfg = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    cfg["mqtt"] = {"host": "127.0.0.1", "stats_interval_s": 5, **mqtt}
    cfg["console"] = {"enabled": False}
    cfg["cameras"]["street"]["loop"] = True
    cfg["cameras"]["street"]["source"] = str(assets / "media" / "vtest.avi")
    cfg["model"]["path"] = str(assets / "models" / "yolox_nano.onnx")
    return cfg


def healthz(port: int) -> tuple[int, list[str]]:
    """GET /healthz of the operator HTTP server: the status code and the problems it names."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            return r.status, json.loads(r.read()).get("problems", [])
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()).get("problems", [])


def fps_status(line: str) -> float:
    """The frame rate of a "STATUS=1 camera: 1 streaming; mqtt connected; 9.8 fps" line (-1: not one)."""
    m = re.fullmatch(r"STATUS=1 camera: 1 streaming; mqtt connected; (\d+\.\d) fps", line)
    return float(m.group(1)) if m else -1.0


def test_run_speaks_sd_notify_ready_status_watchdog_reload_stopping(assets, broker, tmp_path):
    cfg = demo_config(assets, port=broker.port)
    state = tmp_path / "systemd-state"
    state.mkdir()
    proc, notify, err = start_daemon(cfg, tmp_path, assets, STATE_DIRECTORY=str(state), EDGECV_STATE_DIR="")
    try:
        ready = notify.wait_for("READY=1")
        assert err.wait_for("camera street: streaming", 10), err.text()
        # pings every WATCHDOG_USEC/2 = 0.5 s while the pipeline makes progress
        t0 = time.monotonic()
        time.sleep(2.6)
        pings = notify.times("WATCHDOG=1", t0)
        assert 3 <= len(pings) <= 7, pings
        # STATUS= follows the state, with the frame rate (refreshed every 5 s)
        end = time.monotonic() + 8
        while time.monotonic() < end and not any(fps_status(s) > 5 for s in notify.lines()):
            time.sleep(0.1)
        assert any(fps_status(s) > 5 for s in notify.lines()), notify.lines()
        assert ready > notify.times("STATUS=starting: loading the models")[0]

        # SIGHUP: RELOADING=1 (with MONOTONIC_USEC), then READY=1 again
        t1 = time.monotonic()
        proc.send_signal(signal.SIGHUP)
        reloading = notify.wait_for("RELOADING=1", t1, 20)
        msg = next(m for t, m in notify.messages if t == reloading)
        assert re.search(r"^MONOTONIC_USEC=\d+$", msg, re.M), msg
        assert notify.wait_for("READY=1", reloading, 20) >= reloading
        assert err.wait_for("reload: applied", 10), err.text()
        notify.wait_for("WATCHDOG=1", reloading, 5)

        # the spool lives in systemd's StateDirectory
        assert (state / "demo.spool.sqlite").exists(), list(state.iterdir())

        t2 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, err.text()
        notify.wait_for("STOPPING=1", t2, 1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()


def mjpeg_frames(video: Path, n: int) -> list[bytes]:
    cap = cv2.VideoCapture(str(video))
    frames = []
    while len(frames) < n:
        ok, img = cap.read()
        assert ok
        frames.append(cv2.imencode(".jpg", img)[1].tobytes())
    cap.release()
    return frames


def test_watchdog_pings_stop_when_the_capture_read_blocks(assets, tmp_path):
    """A real freeze: the camera reads a named pipe that stops delivering while it stays open, so FFmpeg's read
    blocks for good (its read timeout does not apply to a pipe). Pipeline.health() reports the blocked read after
    stuck_after_s + read_timeout_s and the WATCHDOG=1 pings stop; systemd would kill and restart the service."""
    fifo = tmp_path / "camera.mjpeg"
    os.mkfifo(fifo)
    frames = mjpeg_frames(assets / "media" / "vtest.avi", 40)
    stop_writing = threading.Event()
    release = threading.Event()

    def camera() -> None:
        with open(fifo, "wb") as out:  # blocks until the daemon opens the pipe
            for jpg in frames:
                out.write(jpg)
                out.flush()
                time.sleep(0.1)
            stop_writing.set()
            release.wait(120)  # the pipe stays open: the reader waits for more

    writer = threading.Thread(target=camera, daemon=True)
    writer.start()
    cfg = demo_config(assets, enabled=False)
    cfg["stuck_after_s"] = 1.0
    cfg["cameras"] = {"pipe": {"source": str(fifo), "type": "stream", "read_timeout_s": 1.0, "stall_timeout_s": 60}}
    http_port = free_port()
    cfg["http"] = {"enabled": True, "port": http_port}  # /healthz reads the same health check
    # FFmpeg probes 5 MB of a pipe before it opens; 200 kB are a few frames
    proc, notify, err = start_daemon(cfg, tmp_path, assets, OPENCV_FFMPEG_CAPTURE_OPTIONS="probesize;200000")
    try:
        notify.wait_for("READY=1")
        assert stop_writing.wait(30), "the daemon did not read the pipe"
        frozen = time.monotonic()
        pings_while_streaming = notify.times("WATCHDOG=1")
        assert len(pings_while_streaming) >= 3, notify.lines()
        assert healthz(http_port) == (200, [])
        # blocked for stuck_after_s (1) past read_timeout_s (1): then no more pings
        assert err.wait_for("systemd watchdog pings stop", 15), err.text()
        stopped = time.monotonic()
        assert "capture blocked in one read" in err.text()
        time.sleep(3.0)
        late = notify.times("WATCHDOG=1", stopped)
        assert late == [], f"pings went on after the health check failed: {late}"
        assert len(notify.times("WATCHDOG=1", frozen)) <= 6  # at most until the check (2 s + a 1 s margin)
        assert any(line.startswith("STATUS=") and "stuck: camera pipe: capture blocked" in line
                   for line in notify.lines(frozen)), notify.lines(frozen)
        assert err.text().count("systemd watchdog pings stop") == 1  # said once
        code, problems = healthz(http_port)  # while the pings stay away, /healthz says why
        assert code == 503 and any("camera pipe: capture blocked in one read" in p for p in problems), problems
    finally:
        release.set()
        try:
            terminate(proc, 30)
        finally:
            notify.close()


# ---- logs for journald


def short_run(cfg: dict, tmp_path: Path, assets: Path, journal: bool = False) -> list[str]:
    """`edgecv run --fast --max-frames 5` with stderr in a file (under systemd: the journal's stream, named by
    JOURNAL_STREAM); its stderr lines."""
    path = tmp_path / "short.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = tmp_path / "stderr.log"
    with open(log, "w") as err:
        st = os.fstat(err.fileno())
        env = edgecv_env(assets, tmp_path)
        env.pop("JOURNAL_STREAM", None)
        if journal:
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        done = subprocess.run([str(EDGECV), "run", str(path), "--fast", "--max-frames", "5"], env=env,
                              stdout=subprocess.DEVNULL, stderr=err, timeout=120)
    lines = log.read_text().splitlines()
    assert done.returncode == 0, lines
    return lines


def test_log_format_json_lines_carry_time_level_logger_camera(assets, tmp_path):
    cfg = demo_config(assets, enabled=False)
    cfg["log_format"] = "json"
    lines = short_run(cfg, tmp_path, assets)
    first = next(i for i, line in enumerate(lines) if line.startswith("{"))
    assert first <= 1, lines  # at most the start-up line, written before the config is read
    records = [json.loads(line) for line in lines[first:]]  # every line from then on is one JSON object
    assert all({"time", "level", "logger", "message"} <= r.keys() for r in records), records
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", r["time"]) for r in records)
    streaming = next(r for r in records if r["message"].startswith("camera street: streaming"))
    assert streaming["camera"] == "street" and streaming["level"] == "info" and streaming["logger"].startswith("edgecv")
    assert any(r.get("camera") is None and "camera" not in r for r in records)  # lines about no camera have none


def test_text_logs_leave_the_timestamp_to_journald(assets, tmp_path):
    cfg = demo_config(assets, enabled=False)
    stamp = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")
    journal = short_run(cfg, tmp_path, assets, journal=True)
    assert any("camera street: streaming" in line for line in journal), journal
    assert journal and not any(stamp.match(line) for line in journal), journal
    assert all(re.match(r"^(INFO|WARNING|ERROR|DEBUG) +edgecv", line) for line in journal), journal
    plain = short_run(cfg, tmp_path, assets)  # not the journal: each line has its own timestamp
    assert plain and all(stamp.match(line) for line in plain), plain


# ---- progress of long work


def track_cmd(assets: Path, tmp_path: Path) -> list[str]:
    return [str(EDGECV), "track", str(assets / "media" / "vtest.avi"), "--model", str(assets / "models" / "yolox_nano.onnx"),
            "--mot", str(tmp_path / "out.txt"), "--max-frames", "20"]


def test_track_progress_is_log_lines_when_stderr_is_not_a_terminal(assets, tmp_path):
    done = subprocess.run(track_cmd(assets, tmp_path), capture_output=True, text=True, timeout=120,
                          env=edgecv_env(assets, tmp_path))
    assert done.returncode == 0, done.stderr
    lines = progress_lines(done.stderr, "track: ")
    assert len(lines) >= 5, done.stderr  # every 10 %
    assert re.fullmatch(r"track: \d+/20 frames \(\d+ %\), \d+\.\d fps", lines[0]), lines
    assert re.fullmatch(r"track: 20/20 frames \(100 %\), \d+\.\d fps, done in \d+\.\d s", lines[-1]), lines
    assert "\r" not in done.stderr and "\x1b" not in done.stderr


def test_track_progress_is_a_bar_on_a_terminal(assets, tmp_path):
    code, text, _ = on_a_terminal(track_cmd(assets, tmp_path), edgecv_env(assets, tmp_path))
    assert code == 0
    assert "\rtrack:" in text and "20/20" in text and "100%|" in text, repr(text)
    assert not re.search(r"^track: \d+/20 frames", text, re.M), repr(text)  # no log lines on a terminal


def test_asset_download_reports_bytes(tmp_path, capsys):
    served = tmp_path / "served"
    served.mkdir()
    blob = os.urandom(3 << 20)
    (served / "model.onnx").write_bytes(blob)
    handler = lambda *a, **k: SimpleHTTPRequestHandler(*a, directory=str(served), **k)  # noqa: E731
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/model.onnx"
        asset = assets_mod.KnownAsset("models/test.onnx", hashlib.sha256(blob).hexdigest(), url, "test")
        path = assets_mod.fetch(asset, dest_root=tmp_path / "cache")
    finally:
        server.shutdown()
    assert path.read_bytes() == blob
    err = capsys.readouterr().err
    lines = progress_lines(err, "test.onnx: ")
    assert len(lines) >= 3, err
    assert re.fullmatch(r"test\.onnx: 3\.0 MiB/3\.0 MiB \(100 %\), [\d.]+ [KMG]?i?B/s, done in \d+\.\d s", lines[-1]), lines
