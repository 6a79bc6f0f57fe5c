"""Shared fixtures: the assets folder (EDGECV_ASSETS, default ../shared)."""
from __future__ import annotations

import os
import pty
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _assets_dir() -> Path:
    env = os.environ.get("EDGECV_ASSETS")
    if env:
        return Path(env)
    return REPO.parent / "shared"


ASSETS = _assets_dir()


@pytest.fixture(scope="session")
def assets() -> Path:
    if not (ASSETS / "models").is_dir():
        pytest.fail(f"assets not found at {ASSETS}: set EDGECV_ASSETS to a folder with models/ and media/")
    return ASSETS


@pytest.fixture(scope="session")
def vtest(assets: Path) -> Path:
    return assets / "media" / "vtest.avi"


@pytest.fixture()
def broker(tmp_path: Path):
    """A real Mosquitto on a free port, killed at the end of the test."""
    from broker import Mosquitto

    b = Mosquitto(tmp_path).start()
    yield b
    b.stop()


def edgecv_env(assets: Path, tmp_path: Path, **extra: str) -> dict:
    """Environment for running the edgecv CLI in a subprocess."""
    env = dict(os.environ)
    env.update({"EDGECV_ASSETS": str(assets), "EDGECV_STATE_DIR": str(tmp_path / "state"), "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def terminate(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM to ``proc`` (still running), then wait up to ``timeout`` s for it (``TimeoutExpired`` raised as
    ``wait`` raises it); killed in any case if it still runs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def progress_lines(stderr: str, prefix: str) -> list[str]:
    """The progress messages starting with ``prefix`` in a command's stderr: logged lines (`... edgecv.progress:
    MESSAGE`, the command's log format) or bare ones (no logging set up)."""
    messages = [line.split("edgecv.progress: ", 1)[1] if "edgecv.progress: " in line else line
                for line in stderr.splitlines()]
    return [m for m in messages if m.startswith(prefix)]


def on_a_terminal(cmd: list[str], env: dict) -> tuple[int, str, str]:
    """``cmd`` with stderr on a pty (stdout a pipe): (exit code, what the terminal got, stdout)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=slave, env=env)
    os.close(slave)
    term = b""
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        term += data
    os.close(master)
    stdout = proc.stdout.read().decode() if proc.stdout else ""
    return proc.wait(120), term.decode(errors="replace"), stdout


class StderrLog:
    """A subprocess's stderr lines, read on a thread as they come."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(iter(proc.stderr.readline, "")), daemon=True).start()

    def wait_for(self, text: str, timeout: float = 60.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if any(text in line for line in self.lines):
                return True
            time.sleep(0.05)
        return False

    def text(self) -> str:
        return "".join(self.lines)
