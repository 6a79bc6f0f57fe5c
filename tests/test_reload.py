"""SIGHUP reloads the config: rule changes apply to the running camera without restarting its source;
an invalid new config is rejected with its errors and the old one keeps running."""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from broker import Subscriber
from conftest import REPO, StderrLog, edgecv_env

pytestmark = pytest.mark.integration


def write(path: Path, cfg: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(cfg))
    tmp.replace(path)  # atomic, as an editor or config management would


def zone_events(sub: Subscriber) -> list[dict]:
    return [m.json() for m in sub.snapshot() if m.topic.endswith("/events") and m.json()["type"].startswith("zone.")]


def test_sighup_applies_new_zones_and_rejects_a_broken_config(assets, broker, tmp_path):
    cfg = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    cfg["mqtt"] = {"host": "127.0.0.1", "port": broker.port, "stats_interval_s": 5}
    cfg["console"] = {"enabled": False}
    cfg["cameras"]["street"]["loop"] = True
    path = tmp_path / "live.yaml"
    write(path, cfg)
    sub = Subscriber(broker.port, ["edgecv/demo/#"])
    proc = subprocess.Popen([sys.executable, "-m", "edgecv.cli", "run", str(path)], env=edgecv_env(assets, tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = StderrLog(proc)
    try:
        assert log.wait_for("camera street: streaming"), "".join(log.lines)
        assert sub.wait_for(lambda ms: any(e["zone"] == "plaza" for e in zone_events(sub)), timeout=60)

        # 1. a new zone in place of the old one, the line removed, a tracker threshold changed
        cfg["cameras"]["street"]["zones"] = {"walkway": {"polygon": [[0, 150], [768, 150], [768, 576], [0, 576]],
                                                         "min_frames": 2}}
        cfg["cameras"]["street"]["lines"] = {}
        cfg["tracker"]["lost_buffer_s"] = 2.0
        write(path, cfg)
        proc.send_signal(signal.SIGHUP)
        assert log.wait_for("reload: applied cameras.street rules, tracker"), "".join(log.lines[-20:])
        assert sub.wait_for(lambda ms: any(e["zone"] == "walkway" for e in zone_events(sub)), timeout=30)
        msgs = [m.json() for m in sub.snapshot() if m.topic.endswith("/events")]
        first_new = next(i for i, e in enumerate(msgs) if e.get("zone") == "walkway")
        after = msgs[first_new:]
        assert not any(e.get("zone") == "plaza" for e in after), "old zone still active after the reload"
        assert not any(e["type"] == "line.cross" for e in after), "removed line still active after the reload"

        # 2. a broken config is rejected, naming the field, and the running one keeps working
        broken = dict(cfg, cameras={"street": dict(cfg["cameras"]["street"],
                                                   zones={"walkway": {"polygon": [[0, 0], [5, 5]]}})})
        write(path, broken)
        seen = len(zone_events(sub))
        proc.send_signal(signal.SIGHUP)
        assert log.wait_for("reload rejected: cameras.street.zones.walkway.polygon: needs at least 3 points")
        assert log.wait_for("reload rejected: keeping the running config")
        assert sub.wait_for(lambda ms: len(zone_events(sub)) > seen, timeout=60)
        assert all(e["zone"] == "walkway" for e in zone_events(sub)[seen:])
        assert proc.poll() is None, "the daemon must keep running"

        # 3. an unknown class name is rejected too; a new confidence threshold applies to the running model
        write(path, dict(cfg, model=dict(cfg["model"], classes=["persn"])))
        proc.send_signal(signal.SIGHUP)
        assert log.wait_for("unknown class 'persn'"), "".join(log.lines[-10:])
        write(path, dict(cfg, model=dict(cfg["model"], conf=0.5)))
        proc.send_signal(signal.SIGHUP)
        assert log.wait_for("reload: applied model thresholds"), "".join(log.lines[-10:])
        assert proc.poll() is None

        # the source was never restarted by any reload
        assert sum("camera street: streaming" in line for line in log.lines) == 1
        assert sum("camera street: connecting" in line for line in log.lines) == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
        sub.close()
    assert proc.returncode == 0
    assert not any("Traceback" in line for line in log.lines)
