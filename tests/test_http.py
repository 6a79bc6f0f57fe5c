"""The operator HTTP server (`http:`), used as an operator would: Prometheus scrapes, health and readiness checks,
the live preview in a real headless browser, MJPEG read by a real client. Two daemons for the module: `live` (the
street clip looping at its own 10 fps, a broker the tests kill and restart) and `piped` (a camera reading a
named pipe the test writes the clip into, then stops writing: a real capture freeze, and a quiescent point where
the events counter must equal what the MQTT subscriber received)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import cv2
import numpy as np
import pytest
import yaml
from broker import Mosquitto, Subscriber, free_port, wait_until
from conftest import ASSETS, edgecv_env
from prometheus_client.parser import text_string_to_metric_families

from edgecv.sources.gate import SKIP_REASONS

pytestmark = pytest.mark.integration

STREET = {"zones": {"plaza": {"polygon": [[440, 190], [680, 190], [740, 330], [440, 330]]}},
          "lines": {"crossing": {"points": [[300, 150], [300, 420]]}}}


def get(url: str, timeout: float = 10.0) -> tuple[int, bytes, dict]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def metrics(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of a scrape, parsed by prometheus_client: {(name, labels): value}."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def sample(m: dict, name: str, **labels: str) -> float:
    return m[(name, frozenset(labels.items()))]


def total(m: dict, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(v for (n, ls), v in m.items() if n == name and set(labels.items()) <= ls)


def write_config(path: Path, cameras: dict, **extra) -> Path:
    cfg = {"node_id": "http", "console": {"enabled": False},
           "model": {"path": "models/yolox_nano.onnx", "family": "yolox", "classes": ["person"]},
           "cameras": cameras, **extra}
    path.write_text(yaml.safe_dump(cfg))
    return path


@dataclass
class Daemon:
    proc: subprocess.Popen
    port: int
    broker: Mosquitto
    sub: Subscriber
    stderr: Path
    extra: dict = field(default_factory=dict)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def scrape(self) -> dict:
        code, body, headers = get(self.url("/metrics"))
        assert code == 200 and headers["Content-Type"].startswith("text/plain"), (code, body[:200])
        return metrics(body.decode())

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.sub.close()
        self.broker.stop()
        return self.stderr.read_text()


def start_daemon(tmp: Path, cameras: dict, **extra) -> Daemon:
    broker = Mosquitto(tmp).start()
    sub = Subscriber(broker.port, ["edgecv/http/+/events"])
    port = free_port()
    cfg = write_config(tmp / "http.yaml", cameras, http={"enabled": True, "port": port},
                       mqtt={"host": "127.0.0.1", "port": broker.port, "stats_interval_s": 1}, **extra)
    err = tmp / "stderr.log"
    proc = subprocess.Popen([sys.executable, "-m", "edgecv.cli", "run", str(cfg)], env=edgecv_env(ASSETS, tmp),
                            stdout=subprocess.DEVNULL, stderr=open(err, "w"))
    d = Daemon(proc, port, broker, sub, err)
    up = wait_until(lambda: proc.poll() is not None or _answers(d.url("/healthz")), 60, 0.2)
    if not up or proc.poll() is not None:
        d.stop()
        pytest.fail(f"the daemon did not serve http: {err.read_text()[-2000:]}")
    return d


def _answers(url: str) -> bool:
    try:
        return get(url, 1.0)[0] in (200, 503)
    except OSError:
        return False


@pytest.fixture(scope="module")
def live(tmp_path_factory, assets):
    tmp = tmp_path_factory.mktemp("live")
    d = start_daemon(tmp, {"street": {"source": "media/vtest.avi", "loop": True, **STREET}})
    assert wait_until(lambda: sample(d.scrape(), "edgecv_frames_processed_total", camera="street") >= 5, 30), \
        d.stderr.read_text()[-2000:]
    assert sample(d.scrape(), "edgecv_preview_frames_encoded_total") == 0  # no viewer yet: nothing drawn or encoded
    yield d
    err = d.stop()
    assert "Traceback" not in err, err[-3000:]


class PipeWriter:
    """Writes the street clip into a named pipe at about its own rate until told to freeze; then keeps the pipe
    open without writing (the daemon's read blocks) until closed."""

    def __init__(self, path: Path, data: bytes) -> None:
        self.path, self.data = path, data
        self.freeze = threading.Event()
        self.closed = threading.Event()
        self.written = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        fd = os.open(self.path, os.O_WRONLY)  # waits for the daemon to open it
        try:
            chunk = 20_000  # ~2 frames of the clip, every 0.2 s: about its 10 fps
            while not self.freeze.is_set() and self.written < len(self.data):
                self.written += os.write(fd, self.data[self.written:self.written + chunk])
                time.sleep(0.2)
            self.closed.wait(120)
        finally:
            os.close(fd)

    def close(self) -> None:
        self.freeze.set()
        self.closed.set()
        self._thread.join(5)


@pytest.fixture(scope="module")
def piped(tmp_path_factory, assets):
    tmp = tmp_path_factory.mktemp("piped")
    fifo = tmp / "camera.avi"
    os.mkfifo(fifo)
    writer = PipeWriter(fifo, (assets / "media" / "vtest.avi").read_bytes())
    d = start_daemon(tmp, {"pipe": {"source": str(fifo), "type": "stream", "read_timeout_s": 1, **STREET}},
                     stuck_after_s=2)
    d.extra["writer"] = writer
    yield d
    writer.close()  # the read ends (end of stream): the daemon stops as usual
    err = d.stop()
    assert "Traceback" not in err, err[-3000:]


# ---- metrics


def test_metrics_count_frames_inference_and_build(live):
    first = live.scrape()
    assert wait_until(lambda: sample(live.scrape(), "edgecv_frames_processed_total", camera="street")
                      >= sample(first, "edgecv_frames_processed_total", camera="street") + 5, 20)
    second = live.scrape()
    for name in ("edgecv_frames_read_total", "edgecv_frames_processed_total", "edgecv_frames_inferred_total"):
        assert sample(second, name, camera="street") > sample(first, name, camera="street"), name
    assert sample(second, "edgecv_frames_dropped_total", camera="street") >= 0
    for reason in SKIP_REASONS:  # every frame is inferred here (no detect section): each reason is there, at 0
        assert sample(second, "edgecv_frames_skipped_total", camera="street", reason=reason) == 0, reason
    assert sample(second, "edgecv_source_up", camera="street") == 1
    assert sample(second, "edgecv_source_reconnects_total", camera="street") == 0
    # the inference histogram has a sample per inferred frame, in seconds, its buckets cumulative
    count = sample(second, "edgecv_inference_seconds_count", model="yolox_nano")
    assert count >= sample(first, "edgecv_frames_inferred_total", camera="street") > 0
    assert 0 < sample(second, "edgecv_inference_seconds_sum", model="yolox_nano") / count < 2.0
    buckets = sorted((float(dict(ls)["le"]), v) for (n, ls), v in second.items() if n == "edgecv_inference_seconds_bucket")
    assert buckets[-1] == (float("inf"), count) and [v for _, v in buckets] == sorted(v for _, v in buckets)
    assert sample(second, "edgecv_pipeline_latency_seconds_count", camera="street") > 0
    assert sample(second, "edgecv_mqtt_connected") == 1
    assert ("edgecv_spool_depth", frozenset()) in second and ("edgecv_spool_dropped_total", frozenset()) in second
    info = [dict(ls) for (n, ls), v in second.items() if n == "edgecv_build_info" and v == 1]
    assert info and info[0]["backend"] == "onnxruntime" and info[0]["model"] == "yolox_nano.onnx" and info[0]["version"]
    assert total(second, "edgecv_events_total", camera="street", type="object.new") > 0


# ---- preview


def chromium() -> Optional[str]:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_preview_page_in_a_headless_browser_shows_the_live_annotated_camera(live, tmp_path):
    browser = chromium()
    if browser is None:
        pytest.skip("chromium is not installed (scripts/setup.sh installs it; apt-get install chromium)")
    shots = []
    for i in range(2):
        shot = tmp_path / f"page{i}.png"
        proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                               f"--user-data-dir={tmp_path / f'profile{i}'}", f"--screenshot={shot}",
                               "--window-size=800,700", "--virtual-time-budget=3000", live.url("/")],
                              capture_output=True, text=True, timeout=90)
        assert proc.returncode == 0 and shot.exists(), proc.stderr[-2000:]
        shots.append(cv2.imread(str(shot)))
        time.sleep(1.0)  # ten new frames of the clip
    a, b = shots
    # the camera's picture is there: a large, busy (photo-like) region, not the page's flat background
    changed = np.abs(a.astype(np.int16) - b.astype(np.int16)).max(axis=2) > 30
    ys, xs = np.nonzero(changed)
    assert changed.sum() > 5000, "the preview did not change between two screenshots a second apart"
    box = a[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    assert box.shape[0] > 150 and box.shape[1] > 200 and box.std() > 25, box.shape


def test_mjpeg_stream_yields_valid_jpeg_frames(live):
    with urllib.request.urlopen(live.url("/cameras/street/stream.mjpeg"), timeout=10) as r:
        assert r.headers["Content-Type"].startswith("multipart/x-mixed-replace; boundary=")
        boundary = r.headers["Content-Type"].split("boundary=")[1].encode()
        images = []
        while len(images) < 2:
            line = r.readline()
            assert line, "stream ended"
            if line.strip() != b"--" + boundary:
                continue
            headers = {}
            while (h := r.readline().strip()):
                k, v = h.decode().split(":", 1)
                headers[k.lower()] = v.strip()
            assert headers["content-type"] == "image/jpeg"
            data = r.read(int(headers["content-length"]))
            images.append(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR))
    for img in images:
        assert img is not None and img.shape == (576, 768, 3)
    assert np.abs(images[0].astype(np.int16) - images[1].astype(np.int16)).mean() > 0.1  # two different frames


def test_grid_draws_source_pixel_lines_and_unknown_camera_is_404(live):
    def image(query: str) -> np.ndarray:
        code, body, headers = get(live.url(f"/cameras/street/latest.jpg{query}"))
        assert code == 200 and headers["Content-Type"] == "image/jpeg"
        return cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_GRAYSCALE)

    encoded = sample(live.scrape(), "edgecv_preview_frames_encoded_total")
    plain, grid = image(""), image("?grid=1")
    # drawn on request, at most once per frame (the plain one may come from the cache of an earlier viewer)
    assert encoded + 1 <= sample(live.scrape(), "edgecv_preview_frames_encoded_total") <= encoded + 2
    assert plain.shape == grid.shape == (576, 768)
    # the grid's lines every 50 px (x = 100 and y = 200 among them) are white across the picture
    assert grid[:, 100].mean() > 235 and grid[200, :].mean() > 235
    assert plain[:, 100].mean() < 200 and plain[200, :].mean() < 200
    code, body, _ = get(live.url("/cameras/nope/latest.jpg"))
    assert code == 404 and body.decode().count("\n") == 1 and "nope" in body.decode()
    assert get(live.url("/cameras/nope/stream.mjpeg"))[0] == 404


# ---- readiness: the broker down and back


def test_readyz_is_503_while_the_broker_is_down_and_200_once_it_is_back(live):
    def ready() -> tuple[int, dict]:
        code, body, _ = get(live.url("/readyz"))
        return code, json.loads(body)

    assert wait_until(lambda: ready() == (200, {"status": "ok", "problems": []}), 20), ready()
    live.broker.stop()  # killed
    assert wait_until(lambda: ready()[0] == 503, 10), ready()
    code, body = ready()
    assert body["status"] == "unhealthy" and any(p.startswith("mqtt: not connected") for p in body["problems"]), body
    assert get(live.url("/healthz"))[0] == 200  # alive all the same
    live.broker.start()  # the same port
    assert wait_until(lambda: ready()[0] == 200, 30), ready()


# ---- a real freeze; the events counter at a quiescent point


def test_healthz_turns_503_naming_the_blocked_capture_when_its_pipe_stops(piped):
    def health() -> tuple[int, dict]:
        code, body, _ = get(piped.url("/healthz"))
        return code, json.loads(body)

    assert wait_until(lambda: sample(piped.scrape(), "edgecv_frames_processed_total", camera="pipe") >= 10, 30), \
        piped.stderr.read_text()[-2000:]
    assert health() == (200, {"status": "ok", "problems": []})
    piped.extra["writer"].freeze.set()  # the pipe stays open, nothing more comes: the capture read blocks
    assert wait_until(lambda: health()[0] == 503, 15), health()
    code, body = health()
    assert body["status"] == "unhealthy"
    assert any(p.startswith("camera pipe: capture blocked in one read for") for p in body["problems"]), body
    assert get(piped.url("/readyz"))[0] == 503


def test_events_counter_equals_the_events_the_subscriber_received(piped):
    # some events first (run alone, this test would freeze the pipe before any), then the freeze (the test above,
    # or here): the pipeline is quiescent, no frame, so no event, comes
    assert wait_until(lambda: total(piped.scrape(), "edgecv_events_total", camera="pipe") > 0, 30)
    piped.extra["writer"].freeze.set()
    assert wait_until(lambda: get(piped.url("/healthz"))[0] == 503, 15)
    counted = total(piped.scrape(), "edgecv_events_total", camera="pipe")
    assert counted > 0

    def received() -> int:
        return len([m for m in piped.sub.snapshot() if m.topic == "edgecv/http/pipe/events"])

    wait_until(lambda: received() >= counted, 15)
    time.sleep(0.5)  # nothing more arrives
    assert received() == counted
    assert total(piped.scrape(), "edgecv_events_total", camera="pipe") == counted
    by_type = {}
    for m in piped.sub.snapshot():
        by_type[m.json()["type"]] = by_type.get(m.json()["type"], 0) + 1
    m = piped.scrape()
    assert {t: total(m, "edgecv_events_total", camera="pipe", type=t) for t in by_type} == by_type


# ---- bad input


def test_port_in_use_is_one_line_and_exit_1(assets, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = write_config(tmp_path / "c.yaml", {"street": {"source": "media/vtest.avi"}},
                           mqtt={"enabled": False}, http={"enabled": True, "port": port})
        proc = subprocess.run([sys.executable, "-m", "edgecv.cli", "run", str(cfg)], env=edgecv_env(assets, tmp_path),
                              capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert errors == [f"edgecv: error: http: cannot listen on 127.0.0.1:{port}: address in use"], proc.stderr


@pytest.mark.parametrize("host, allow_remote, code", [("0.0.0.0", False, 2), ("192.0.2.7", False, 2),
                                                       ("0.0.0.0", True, 0), ("localhost", False, 0),
                                                       ("::1", False, 0)])
def test_non_loopback_host_needs_allow_remote(assets, tmp_path, host, allow_remote, code):
    cfg = write_config(tmp_path / "c.yaml", {"street": {"source": "media/vtest.avi"}}, mqtt={"enabled": False},
                       http={"enabled": True, "host": host, "allow_remote": allow_remote})
    proc = subprocess.run([sys.executable, "-m", "edgecv.cli", "check", "--no-model", str(cfg)],
                          env=edgecv_env(assets, tmp_path), capture_output=True, text=True, timeout=60)
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    if code == 2:
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("http.host: ") and "allow_remote" in lines[0], lines


def test_idle_and_excess_connections_cost_a_bounded_number_of_threads(monkeypatch):
    """A client that opens connections without end, or holds them open without a request, gets at most
    MAX_CONNECTIONS threads of the daemon; the rest are closed at once, the idle ones dropped after the socket
    timeout, and then the server answers again."""
    from edgecv.config import HttpConfig
    from edgecv.web import server

    monkeypatch.setattr(server, "MAX_CONNECTIONS", 4)
    monkeypatch.setattr(server, "SOCKET_TIMEOUT_S", 3.0)
    srv = server.OperatorServer(HttpConfig(port=free_port()))
    srv.start()
    try:
        threads = threading.active_count()
        idle = [socket.create_connection(("127.0.0.1", srv.port), timeout=5) for _ in range(12)]
        assert wait_until(lambda: srv.httpd.refused == 8, 2.5), (srv.httpd.active, srv.httpd.refused)
        assert srv.httpd.active == 4
        assert threading.active_count() - threads <= 4
        closed = 0
        for s in idle:  # the refused ones are closed by the server: end of stream, no reply
            s.settimeout(0.2)
            try:
                closed += s.recv(1) == b""
            except (socket.timeout, ConnectionResetError):
                pass
        assert closed >= 8
        assert wait_until(lambda: srv.httpd.active == 0, 8), "idle connections were not dropped after the timeout"
        for s in idle:
            s.close()
        with pytest.raises(urllib.error.HTTPError) as answer:  # no pipeline attached: 503 "starting"
            urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/healthz", timeout=5)
        assert answer.value.code == 503 and answer.value.read() == b"starting\n"
    finally:
        srv.stop()
