"""Shared fixtures: the assets folder (EDGECV_ASSETS, default ../shared)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


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
