"""Shared fixtures: the assets folder (EDGECV_ASSETS, default ../shared)."""
from __future__ import annotations

import os
import sys
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


def progress_lines(stderr: str, prefix: str) -> list[str]:
    """The progress messages starting with ``prefix`` in a command's stderr: logged lines (`... edgecv.progress:
    MESSAGE`, the command's log format) or bare ones (no logging set up)."""
    messages = [line.split("edgecv.progress: ", 1)[1] if "edgecv.progress: " in line else line
                for line in stderr.splitlines()]
    return [m for m in messages if m.startswith(prefix)]
