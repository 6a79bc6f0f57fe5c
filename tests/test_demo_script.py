"""The README's first command, `scripts/demo.sh`, as a user runs it (shortened with --max-frames)."""
from __future__ import annotations

import os
import subprocess

import pytest
from conftest import REPO

pytestmark = pytest.mark.integration


def test_demo_script_shows_events_on_the_console_and_over_mqtt_and_ends(assets, tmp_path):
    env = dict(os.environ, EDGECV_ASSETS=str(assets), XDG_CACHE_HOME=str(tmp_path / "cache"))
    proc = subprocess.run(["bash", str(REPO / "scripts" / "demo.sh"), "--fast", "--max-frames", "120"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    mqtt_events = [ln for ln in lines if ln.startswith("mqtt> edgecv/demo/street/events {")]
    console = [ln for ln in lines if not ln.startswith("mqtt>") and "  street  " in ln]
    assert console and len(mqtt_events) == len(console)
    assert any("zone.enter" in ln for ln in console)
    status = [ln.split()[-1] for ln in lines if ln.startswith("mqtt> edgecv/demo/status")]
    assert status[0] == "online" and status[-1] == "offline"
    assert "Traceback" not in proc.stderr
