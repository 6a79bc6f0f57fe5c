"""Retained state topics (edgecv.publish.state) on the demo clip with a real broker: zone occupancy follows the zone
events (enter minus exit per label, at every point), line counters equal the line.cross events per direction and
label, continue across a restart (same spool folder) and go back to 0 on the reset command."""
from __future__ import annotations

import json
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import pytest
from broker import Subscriber
from mqtt_daemon import Daemon, Publisher, demo_config, module_broker, retained, wait_reply, write_config

from edgecv.config import ConfigError, load
from edgecv.publish.state import last_daily

pytestmark = pytest.mark.integration

BASE = "edgecv/demo/street"
FRAMES = "300"


def is_subsequence(seq: list[int], of: list[int]) -> bool:
    it = iter(of)
    return all(any(v == w for w in it) for v in seq)


def crossings(evs: list[dict]) -> Counter:
    return Counter((e["direction"], e["object"]["label"]) for e in evs if e["type"] == "line.cross")


def line_values(messages, live_only: bool = True) -> dict[tuple[str, str], list[int]]:
    """(direction, label) -> the values published on the crossing line's topics, in order."""
    out: dict[tuple[str, str], list[int]] = {}
    for m in messages:
        if m.topic.startswith(f"{BASE}/lines/crossing/") and m.payload and not (live_only and m.retain):
            d, label = m.topic.split("/")[-2:]
            out.setdefault((d, label), []).append(int(m.payload))
    return out


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory):
    """Three daemon runs on one spool folder: two of 300 frames (--fast), then a short real-time one whose line
    counters are reset by command."""
    tmp = tmp_path_factory.mktemp("state")
    broker = module_broker(tmp / "broker")
    cfg = demo_config(broker.port, tmp / "state", commands={"enabled": True})
    path = write_config(tmp / "demo.yaml", cfg)
    out = {"port": broker.port, "state": tmp / "state"}
    try:
        for name in ("first", "second"):
            sub = Subscriber(broker.port, ["edgecv/demo/#"])
            d = Daemon(assets, tmp, path, "--fast", "--max-frames", FRAMES)
            assert d.wait(120) == 0, d.stderr
            time.sleep(0.5)
            sub.close()
            out[name] = (sub.snapshot(), d.stderr)
        sub = Subscriber(broker.port, ["edgecv/demo/#"])
        pub = Publisher(broker.port)
        d = Daemon(assets, tmp, path, "--max-frames", "40")
        assert d.wait_log("camera street: streaming"), d.stderr
        pub.send(f"{BASE}/lines/crossing/reset", b"")
        out["reset_reply"] = wait_reply(sub, f"{BASE}/lines/crossing/reset")
        assert d.wait(60) == 0, d.stderr
        time.sleep(0.5)
        sub.close()
        pub.close()
        out["third"] = (sub.snapshot(), d.stderr)
        out["final"] = retained(broker.port, [f"{BASE}/lines/#"])
        yield out
    finally:
        broker.stop()


def test_zone_occupancy_follows_enter_minus_exit(runs):
    messages, stderr = runs["first"]
    evs = [e for e in events_of(messages) if e["type"] in ("zone.enter", "zone.exit") and e["zone"] == "plaza"]
    assert len(evs) >= 4, "the demo clip should have people entering and leaving the plaza"
    running: dict[str, list[int]] = {"all": [0]}
    for e in evs:
        step = 1 if e["type"] == "zone.enter" else -1
        label = e["object"]["label"]
        running.setdefault(label, [0]).append(running[label][-1] + step)
        running["all"].append(running["all"][-1] + step)
    published: dict[str, list[int]] = {}
    for m in messages:
        if m.topic.startswith(f"{BASE}/zones/plaza/") and not m.retain:
            published.setdefault(m.topic.rsplit("/", 1)[1], []).append(int(m.payload))
    assert set(published) == set(running), (published.keys(), running.keys())
    for label, values in published.items():
        assert min(values) >= 0
        # every value published is the count after some frame: enter minus exit events up to that point, in order
        assert is_subsequence(values, running[label]), (label, values, running[label])
        assert values[-1] == running[label][-1], f"{label}: final occupancy {values[-1]} != {running[label][-1]}"
    assert max(published["all"]) > 0


def events_of(messages) -> list[dict]:
    return [json.loads(m.payload) for m in messages if m.topic == f"{BASE}/events"]


def test_line_counters_equal_the_crossings_and_survive_a_restart(runs):
    first, _ = runs["first"]
    counted = crossings(events_of(first))
    assert sum(counted.values()) >= 3, "the demo clip should have line crossings"
    published = line_values(first)
    assert {k: v[-1] for k, v in published.items() if v[-1]} == dict(counted)
    for values in published.values():
        assert values == sorted(values), "a running count never goes down without a reset"

    second, stderr = runs["second"]
    again = line_values(second)
    # the second run starts from the persisted counts and adds its own crossings
    assert {k: v[0] for k, v in again.items()} == {k: counted.get(k, 0) for k in again}, stderr
    expected = counted + crossings(events_of(second))
    assert {k: v[-1] for k, v in again.items() if v[-1]} == dict(expected)


def test_reset_command_zeroes_the_counters_and_is_persisted(runs):
    assert runs["reset_reply"] == {"topic": f"{BASE}/lines/crossing/reset", "ok": True, "error": None}
    third, stderr = runs["third"]
    values = line_values(third)
    assert values, stderr
    before = crossings(events_of(runs["first"][0])) + crossings(events_of(runs["second"][0]))
    for key, seq in values.items():
        assert seq[0] == before.get(key, 0), "the run started from the persisted counts"
        assert 0 in seq, f"{key}: the reset published no 0 ({seq})"
    final = {tuple(t.split("/")[-2:]): int(v) for t, v in runs["final"].items()}
    crossed = crossings(events_of(third))
    for key, n in final.items():
        assert n <= crossed.get(key, 0), f"{key}: {n} after the reset, more than the {crossed.get(key, 0)} crossings"
    saved = json.loads((runs["state"] / "demo.lines.json").read_text())["counts"]["street"]["crossing"]
    assert {(d, lb): n for d, by in saved.items() for lb, n in by.items()} == final
    assert "command edgecv/demo/street/lines/crossing/reset: line crossing counters reset" in stderr


def test_daily_reset_config(tmp_path: Path):
    assert last_daily("daily@03:00", datetime(2024, 5, 2, 10, 0)) == datetime(2024, 5, 2, 3, 0)
    assert last_daily("daily@23:30", datetime(2024, 5, 2, 10, 0)) == datetime(2024, 5, 1, 23, 30)
    cfg = demo_config(1883, tmp_path)
    cfg["cameras"]["street"]["lines"]["crossing"]["reset"] = "daily@25:00"
    with pytest.raises(ConfigError) as e:
        load(str(write_config(tmp_path / "bad.yaml", cfg)))
    assert "cameras.street.lines.crossing.reset" in str(e.value)
