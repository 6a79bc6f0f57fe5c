"""Hostile and absurd input against the real daemon and CLI (issue 8): configs that explode, secrets with every
awkward character, two daemons on one spool, signals from the first instant, and the small ones (outputs that
are not probabilities, command-line values that name nothing, a broker that never answers).

The config families with one-line outcomes (alias bombs, duplicate keys, bounds) are in tests/test_config.py's
table; here are the cases that need a running daemon, a subprocess's resources, or a broker."""
from __future__ import annotations

import contextlib
import logging
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import yaml
from broker import Mosquitto, Subscriber, free_port
from conftest import REPO, edgecv_env
from test_engine_plumbing import make_model, yolox_raw
from test_reload import StderrLog

from edgecv.engine.registry import build_detector

pytestmark = pytest.mark.integration

BOMB = "".join(f"{k}: &{k} [{', '.join([f'*{p}'] * 9) if p else ', '.join(['lol'] * 9)}]\n"
               for p, k in zip(["", *"abcdefgh"], "abcdefghi"))
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) +\S+: ")


def _demo(tmp_path: Path, port: int, **mqtt: object) -> Path:
    data = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    data["mqtt"].update({"host": "127.0.0.1", "port": port, "stats_interval_s": 1, **mqtt})
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _start(assets: Path, tmp_path: Path, config: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edgecv.cli", "run", str(config), *args], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=edgecv_env(assets, tmp_path, **(env or {})))


MEASURED = ("import sys\nfrom edgecv.cli import main\ncode = main(sys.argv[1:])\n"
            "hwm = next(ln for ln in open('/proc/self/status') if ln.startswith('VmHWM'))\n"
            "sys.stderr.write('@@ ' + hwm)\nsys.exit(code)\n")


@contextlib.contextmanager
def _running_demo(assets: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen, StderrLog, Path]]:
    """The demo daemon streaming against its own broker: (process, its stderr, its config file)."""
    broker = Mosquitto(tmp_path).start()
    proc = None
    try:
        config = _demo(tmp_path, broker.port)
        proc = _start(assets, tmp_path, config)
        log = StderrLog(proc)
        assert log.wait_for("camera street: streaming"), "".join(log.lines)
        yield proc, log, config
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        broker.stop()


def _run_measured(args: list[str], env: dict, timeout: float = 60) -> tuple[int, str, float, float]:
    """(exit code, stderr, seconds, peak RSS in MB) of one run of the CLI's main in a new process. The peak is
    the process's own VmHWM (its memory since exec: a child's rusage would count the memory of this test
    process it was forked from)."""
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", MEASURED, *args], capture_output=True, text=True, env=env,
                       timeout=timeout)
    seconds = time.monotonic() - t0
    lines = r.stderr.splitlines()
    kb = int(lines[-1].split()[2]) if lines and lines[-1].startswith("@@ VmHWM") else 10**9
    return r.returncode, "\n".join(lines[:-1]) + "\n", seconds, kb / 1024


# ---- 1. YAML that explodes

@pytest.mark.parametrize("name, content, message", [
    ("bomb", BOMB, "an alias bomb"),
    ("cycle", "a: &a [*a]\n", "a cycle"),
    ("huge", "node_id: x\ncameras: {c: {source: 0, zones: {z: {polygon: ["
     + ", ".join(f"[{i % 1000}, {i // 1000}]" for i in range(2_000_000)) + "]}}}}\n", "larger than 1024 KiB"),
])
def test_exploding_configs_are_rejected_fast_in_bounded_memory(assets: Path, tmp_path: Path, name: str,
                                                               content: str, message: str) -> None:
    path = tmp_path / f"{name}.yaml"
    path.write_text(content)
    for command in ("check", "run"):
        code, stderr, seconds, rss_mb = _run_measured([command, str(path)], edgecv_env(assets, tmp_path))
        assert code == 2, stderr
        assert message in stderr and "Traceback" not in stderr
        assert len([ln for ln in stderr.splitlines() if not LOG_LINE.match(ln)]) == 1, stderr
        assert seconds < 10 and rss_mb < 400, f"{command} {name}: {seconds:.1f} s, {rss_mb:.0f} MB"


def test_an_alias_bomb_swapped_in_before_sighup_is_rejected_and_sigterm_still_works(assets: Path,
                                                                                      tmp_path: Path) -> None:
    with _running_demo(assets, tmp_path) as (proc, log, config):
        config.write_text(BOMB)
        proc.send_signal(signal.SIGHUP)
        assert log.wait_for("reload rejected: ", timeout=10), "".join(log.lines[-10:])
        assert any("an alias bomb" in ln for ln in log.lines)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert time.monotonic() - t0 < 8
        assert not any("Traceback" in ln for ln in log.lines)


# ---- 2. secrets that never leak

AWKWARD = "p@ss/w:rd #?&=%40 'x\"y\\z@"
PIECES = ("p@ss", "w:rd", "#?&=", "%40", "'x\"y", "z@")  # no fragment of the password may show anywhere


def _secretless(text: str) -> None:
    for piece in PIECES:
        assert piece not in text, f"{piece!r} leaked: " + text[max(0, text.find(piece) - 200):text.find(piece) + 50]


def test_rtsp_password_with_every_awkward_character_is_never_shown(assets: Path, tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path).start()
    sub = Subscriber(broker.port, ["edgecv/#"])
    try:
        data = yaml.safe_load(_demo(tmp_path, broker.port).read_text())
        dead = free_port()  # nothing listens: the camera retries, logging each attempt's reason
        data["cameras"]["street"] = {"source": f"rtsp://admin:${{CAM_PASS}}@127.0.0.1:{dead}/stream1",
                                     "open_timeout_s": 1, "reconnect": {"initial_s": 0.2, "max_s": 0.4}}
        config = tmp_path / "rtsp.yaml"
        config.write_text(yaml.safe_dump(data))
        proc = _start(assets, tmp_path, config, env={"CAM_PASS": AWKWARD})
        log = StderrLog(proc)
        assert log.wait_for("attempt 3", timeout=30), "".join(log.lines)
        time.sleep(2.5)  # a stats message or two with the camera's state and reason
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        out = "".join(log.lines) + proc.stdout.read()
        assert "rtsp://admin:***@127.0.0.1" in out
        _secretless(out)
        payloads = [m.payload.decode(errors="replace") for m in sub.snapshot()]
        assert any("stats" in m.topic for m in sub.snapshot())
        _secretless("\n".join(payloads))
    finally:
        sub.close()
        broker.stop()


@pytest.mark.parametrize("source", [
    "rstp://admin:{pw}@cam.local:554/stream1",  # a mistyped scheme: taken for a file that is not found
    "rtsp:/admin:{pw}@cam.local:554/stream1",
    "admin:{pw}@cam.local:554/stream1",
])
def test_check_of_a_mistyped_url_does_not_echo_the_password(assets: Path, tmp_path: Path, source: str) -> None:
    data = {"node_id": "x", "model": {"path": "models/yolox_nano.onnx"},
            "cameras": {"c": {"source": source.replace("{pw}", "${CAM_PASS}")}}}
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(data))
    for command in ("check", "run"):
        r = subprocess.run([sys.executable, "-m", "edgecv.cli", command, str(config)], capture_output=True, text=True,
                           env=edgecv_env(assets, tmp_path, CAM_PASS=AWKWARD), timeout=60)
        assert r.returncode == 2
        assert "cameras.c.source: file not found: " in r.stderr and "admin:***@cam.local:554/stream1" in r.stderr
        _secretless(r.stdout + r.stderr)


# ---- 4. two daemons on one spool

def test_a_second_daemon_on_the_same_spool_exits_naming_the_first(assets: Path, tmp_path: Path) -> None:
    with _running_demo(assets, tmp_path) as (first, _, config):
        second = subprocess.run([sys.executable, "-m", "edgecv.cli", "run", str(config)], capture_output=True,
                                text=True, env=edgecv_env(assets, tmp_path), timeout=60)
        assert second.returncode == 1
        errors = [ln for ln in second.stderr.splitlines() if not LOG_LINE.match(ln)]
        assert errors == [f"edgecv: error: spool {tmp_path / 'state' / 'demo.spool.sqlite'} is in use by another "
                          f"edgecv daemon (pid {first.pid}); one daemon per spool (set mqtt.spool.path or node_id "
                          "to run a second one)"], second.stderr
        assert first.poll() is None  # the first one is not disturbed
        first.send_signal(signal.SIGTERM)
        assert first.wait(15) == 0
        # once the first has gone, the spool is free again
        third = _start(assets, tmp_path, config, "--max-frames", "5")
        assert third.wait(60) == 0, third.stderr.read()


# ---- 5. signals from the first instant

def _driving(tmp_path: Path) -> Path:
    """Two models to load (a longer start-up than the demo's)."""
    data = yaml.safe_load((REPO / "configs" / "driving.yaml").read_text())
    data["mqtt"] = {"enabled": False}
    data["console"] = {"enabled": False}
    path = tmp_path / "driving.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_sighup_during_start_up_is_deferred_and_sigterm_exits_0(assets: Path, tmp_path: Path) -> None:
    config = _driving(tmp_path)
    proc = _start(assets, tmp_path, config)
    log = StderrLog(proc)
    assert log.wait_for("starting (pid"), "".join(log.lines)
    proc.send_signal(signal.SIGHUP)  # lands while the config and the two models load
    assert log.wait_for("received SIGHUP during start-up", timeout=10), "".join(log.lines)
    assert log.wait_for("reloading", timeout=60), "".join(log.lines)  # done once start-up is over
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0, "".join(log.lines)
    assert not any("Traceback" in ln for ln in log.lines)


def test_sigterm_during_start_up_exits_0_at_once(assets: Path, tmp_path: Path) -> None:
    config = _driving(tmp_path)
    proc = _start(assets, tmp_path, config)
    log = StderrLog(proc)
    assert log.wait_for("starting (pid"), "".join(log.lines)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0, "".join(log.lines)
    assert time.monotonic() - t0 < 5
    text = "".join(log.lines)
    assert "received SIGTERM: stopping start-up and exiting" in text
    assert "edgecv node" not in text  # it never started running
    assert "Traceback" not in text


# ---- 8. smaller ones

def test_outputs_that_are_not_probabilities_are_clamped_and_said_once(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    rows = {64 + 2 * 4 + 1: [0.5, 0.5, 0.0, 0.0, 3.0, 2.0, 0.0],  # objectness 3 x class 2: a score of 6
            3: [float("nan"), 0.0, 0.0, 0.0, 0.9, 0.9, 0.0]}  # a NaN coordinate
    det = build_detector(make_model(tmp_path / "raw.onnx", yolox_raw(rows)), family="yolox", conf=0.3)
    with caplog.at_level(logging.WARNING, logger="edgecv"):
        for _ in range(3):
            out = det.detect([np.zeros((64, 64, 3), np.uint8)])[0]
            assert len(out) == 1 and out.score.max() <= 1.0 and np.isfinite(out.xyxy).all()
    said = [r.getMessage() for r in caplog.records if "not probabilities" in r.getMessage()]
    assert len(said) == 1 and "scores up to 6" in said[0] and "1 candidate boxes with NaN" in said[0]


@pytest.mark.parametrize("args, message, code", [
    (["--classes", ",,"], "--classes: no class name given", 2),
    (["--max-frames", "0"], "--max-frames: expected a positive number, got 0", 2),
    (["--conf", "1.5"], "--conf: Input should be less than or equal to 1", 2),
    (["--threads", "0"], "--threads: Input should be greater than or equal to 1", 2),
    (["--mot", "/nonexistent/folder/out.txt"], "--mot: folder not found: /nonexistent/folder", 2),
])
def test_track_arguments_that_name_nothing_are_one_line_errors(assets: Path, tmp_path: Path, args: list[str],
                                                                message: str, code: int) -> None:
    mot = [] if "--mot" in args else ["--mot", str(tmp_path / "o.txt")]
    r = subprocess.run([sys.executable, "-m", "edgecv.cli", "track", str(assets / "media" / "vtest.avi"),
                        "--model", "models/yolox_nano.onnx", *mot, *args], capture_output=True, text=True,
                       env=edgecv_env(assets, tmp_path), timeout=60)
    assert r.returncode == code
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and message in r.stderr
    assert not (tmp_path / "o.txt").exists() or "--max-frames" not in args


def test_a_broker_that_never_answers_is_named_as_such(assets: Path, tmp_path: Path) -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    held: list[socket.socket] = []
    threading.Thread(target=lambda: [held.append(silent.accept()[0]) for _ in range(8)], daemon=True).start()
    try:
        config = _demo(tmp_path, silent.getsockname()[1], keepalive_s=5)
        proc = _start(assets, tmp_path, config)
        log = StderrLog(proc)
        assert log.wait_for("did not answer the MQTT CONNECT within 5 s", timeout=30), "".join(log.lines)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert not any("closed the connection" in ln for ln in log.lines)
    finally:
        for s in held:
            s.close()
        silent.close()


def test_numeric_warnings_and_odd_outputs_are_one_formatted_line_each(assets: Path, tmp_path: Path) -> None:
    """A model whose box sizes overflow exp() and whose scores exceed 1, through `edgecv track`: NumPy's
    RuntimeWarning and edgecv's own notice are log lines like every other, once each; no raw stderr."""
    rows = {64 + 2 * 4 + 1: [0.5, 0.5, 0.0, 0.0, 3.0, 2.0, 0.0],
            64 + 1 * 4 + 1: [0.5, 0.5, 1000.0, 0.0, 0.9, 0.9, 0.0]}  # exp(1000): an infinite width
    model = make_model(tmp_path / "odd.onnx", yolox_raw(rows))
    r = subprocess.run([sys.executable, "-m", "edgecv.cli", "track", str(assets / "media" / "vtest.avi"), "--model",
                        str(model), "--family", "yolox", "--max-frames", "20", "--mot", str(tmp_path / "o.txt")],
                       capture_output=True, text=True, env=edgecv_env(assets, tmp_path), timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines and all(LOG_LINE.match(ln) for ln in lines), r.stderr
    assert sum("RuntimeWarning: overflow encountered in exp" in ln for ln in lines) == 1, r.stderr
    assert sum("not probabilities" in ln for ln in lines) == 1, r.stderr
    rows_out = np.loadtxt(tmp_path / "o.txt", delimiter=",", ndmin=2)
    assert len(rows_out) and (rows_out[:, 6] <= 1.0).all() and np.isfinite(rows_out[:, 2:6]).all()
