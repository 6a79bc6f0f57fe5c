"""The demo end to end: `edgecv run configs/demo.yaml` on the real clip and model, a real Mosquitto,
a real paho subscriber checking what arrives."""
from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import jsonschema
import pytest
from broker import Subscriber
from conftest import REPO, edgecv_env

from edgecv.schema import EVENT_JSON_SCHEMA

pytestmark = pytest.mark.integration


def run_demo(assets: Path, tmp_path: Path, port: int, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edgecv.cli", "run", str(REPO / "configs" / "demo.yaml"), *args],
        env=edgecv_env(assets, tmp_path, MQTT_PORT=str(port)), capture_output=True, text=True, timeout=timeout,
    )


def test_demo_publishes_valid_events_for_the_whole_clip(assets, broker, tmp_path):
    sub = Subscriber(broker.port, ["edgecv/demo/#"])
    proc = run_demo(assets, tmp_path, broker.port, "--fast")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "795 frames read, 795 processed" in proc.stderr
    assert sub.wait_for(lambda ms: any(m.topic == "edgecv/demo/status" and m.payload == b"offline" for m in ms))
    sub.close()
    msgs = sub.snapshot()

    status = [m.payload.decode() for m in msgs if m.topic == "edgecv/demo/status"]
    assert status[0] == "online" and status[-1] == "offline"
    events = [m.json() for m in msgs if m.topic == "edgecv/demo/street/events"]
    first_event = next(i for i, m in enumerate(msgs) if m.topic.endswith("/events"))
    first_online = next(i for i, m in enumerate(msgs) if m.topic.endswith("/status"))
    assert first_online < first_event, "online must come before any event"
    for ev in events:
        jsonschema.validate(ev, EVENT_JSON_SCHEMA)
        assert ev["node"] == "demo" and ev["camera"] == "street"
        assert ev["latency_ms"] >= 0 and ev["published_at"] >= ev["captured_at"]
        assert ev["object"]["label"] == "person"
        x1, y1, x2, y2 = ev["object"]["bbox"]
        assert 0 <= x1 < x2 <= 768 and 0 <= y1 < y2 <= 576
    ids = [ev["id"] for ev in events]
    assert len(ids) == len(set(ids)), "event ids must be unique"
    kinds = Counter(ev["type"] for ev in events)
    assert kinds["zone.enter"] >= 1 and kinds["zone.exit"] >= 1, kinds
    directions = Counter(ev["direction"] for ev in events if ev["type"] == "line.cross")
    assert directions["in"] >= 1 and directions["out"] >= 1, directions
    assert all(ev["zone"] == "plaza" for ev in events if ev["type"].startswith("zone."))
    # every event printed on the console also arrived over MQTT
    console = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(console) == len(events)

    late = Subscriber(broker.port, ["edgecv/demo/status"])
    assert late.wait_for(lambda ms: len(ms) >= 1)
    retained = late.snapshot()[0]
    late.close()
    assert retained.payload == b"offline" and retained.retain


def test_same_clip_gives_same_event_ids(assets, broker, tmp_path):
    """Event ids are deterministic: a consumer can de-duplicate redeliveries and reruns."""
    runs = []
    for i in range(2):
        sub = Subscriber(broker.port, ["edgecv/demo/+/events"])
        proc = run_demo(assets, tmp_path / f"run{i}", broker.port, "--fast", "--max-frames", "150")
        assert proc.returncode == 0, proc.stderr[-2000:]
        sub.wait_for(lambda ms, n=proc.stdout.count("\n"): len(ms) >= n, timeout=5)
        sub.close()
        runs.append([m.json()["id"] for m in sub.snapshot()])
    assert runs[0] and runs[0] == runs[1]


def test_replay_at_file_rate_reports_drops_and_latency(assets, broker, tmp_path):
    """Real-time replay: frames are paced at 10 fps; the run ends after --max-frames."""
    sub = Subscriber(broker.port, ["edgecv/demo/stats", "edgecv/demo/+/events"])
    proc = run_demo(assets, tmp_path, broker.port, "--max-frames", "40", timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "40 processed" in proc.stderr
    sub.close()
    stats = [m.json() for m in sub.snapshot() if m.topic.endswith("/stats")]
    assert stats, "the final stats message must be published"
    cam = stats[-1]["cameras"]["street"]
    assert cam["frames_processed"] == 40
    assert cam["frames_read"] >= 40
    assert cam["latency_ms"]["p50"] > 0


def test_track_lists_are_published_rate_limited(assets, broker, tmp_path):
    cfg = (REPO / "configs" / "demo.yaml").read_text().replace("  stats_interval_s: 5\n",
                                                              "  stats_interval_s: 5\n  publish_tracks: true\n"
                                                              "  tracks_max_hz: 2\n")
    path = tmp_path / "demo_tracks.yaml"
    path.write_text(cfg)
    sub = Subscriber(broker.port, ["edgecv/demo/street/tracks"])
    proc = subprocess.run([sys.executable, "-m", "edgecv.cli", "run", str(path), "--max-frames", "30"],
                          env=edgecv_env(assets, tmp_path, MQTT_PORT=str(broker.port)), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    sub.close()
    msgs = [m.json() for m in sub.snapshot()]
    # 30 frames at 10 fps = 3 s of replay, at most 2 messages a second
    assert 3 <= len(msgs) <= 8, len(msgs)
    assert all(m["camera"] == "street" and m["frame_size"] == [768, 576] for m in msgs)
    assert any(m["tracks"] for m in msgs)
    for m in msgs:
        for t in m["tracks"]:
            assert t["track_id"] >= 1 and t["label"] == "person" and len(t["bbox"]) == 4
