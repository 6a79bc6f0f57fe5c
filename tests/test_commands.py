"""Commands over MQTT with a real broker and two cameras: detect/set switches one camera's inference off and on,
snapshot/set yields a JPEG, random topics and payloads (hypothesis) each get a reply when they are in the command
namespace and never disturb the daemon; with commands disabled nothing is subscribed."""
from __future__ import annotations

import json
import logging
import time

import pytest
from broker import Subscriber
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mqtt_daemon import Daemon, Publisher, demo_config, events, module_broker, replies, stats, wait_reply, write_config

from edgecv.publish.commands import LOG_BURST, LOG_WINDOW_S, LogBudget

pytestmark = pytest.mark.integration

NODE = "edgecv/demo"


def command_like(topic: str) -> bool:
    """The documented command namespace: under edgecv/<node>/, 1 to 4 levels, the last one `set` or `reset`."""
    if not topic.startswith(NODE + "/"):
        return False
    levels = topic[len(NODE) + 1:].split("/")
    return 1 <= len(levels) <= 4 and levels[-1] in ("set", "reset")


def inferred(sub: Subscriber, camera: str) -> int:
    s = stats(sub)
    return s[-1]["cameras"][camera]["frames_inferred"] if s else 0


def next_stats(sub: Subscriber, n: int = 1, timeout: float = 10.0) -> None:
    """Wait until ``n`` more stats messages arrived."""
    have = len(stats(sub))
    assert sub.wait_for(lambda ms: len(stats(sub)) >= have + n, timeout)


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("commands-broker")
    b = module_broker(tmp, "log_type all\n")
    yield b
    b.stop()


@pytest.fixture(scope="module")
def running(assets, broker, tmp_path_factory):
    """Two looping real-time cameras (the demo clip twice), commands enabled, snapshots off."""
    tmp = tmp_path_factory.mktemp("commands")
    cfg = demo_config(broker.port, tmp / "state", commands={"enabled": True})
    street = dict(cfg["cameras"]["street"], loop=True)
    cfg["cameras"] = {"street": street, "other": dict(street)}
    path = write_config(tmp / "demo.yaml", cfg)
    sub = Subscriber(broker.port, [f"{NODE}/#"])
    pub = Publisher(broker.port)
    d = Daemon(assets, tmp, path)
    try:
        assert d.wait_log("camera street: streaming") and d.wait_log("camera other: streaming"), d.stderr
        assert sub.wait_for(lambda ms: inferred(sub, "street") > 0 and inferred(sub, "other") > 0, 20), d.stderr
        yield d, sub, pub
    finally:
        assert d.stop() == 0, d.stderr
        sub.close()
        pub.close()


def test_detect_off_stops_inference_on_that_camera_only(running):
    d, sub, pub = running
    pub.send(f"{NODE}/street/detect/set", "OFF")
    assert wait_reply(sub, f"{NODE}/street/detect/set") == {"topic": f"{NODE}/street/detect/set", "ok": True,
                                                            "error": None}
    assert sub.wait_for(lambda ms: any(m.topic == f"{NODE}/street/detect/state" and m.payload == b"OFF"
                                       for m in ms), 5)
    next_stats(sub)  # a frame inferred before the switch may still be counted in this one
    street, other = inferred(sub, "street"), inferred(sub, "other")
    next_stats(sub, 2)
    last = stats(sub)[-1]["cameras"]
    assert last["street"]["frames_inferred"] == street, "inference went on after detect/set OFF"
    assert last["other"]["frames_inferred"] > other, "the other camera must not be affected"
    assert last["street"]["frames_skipped_disabled"] > 0 and last["street"]["state"] == "streaming"

    pub.send(f"{NODE}/street/detect/set", " on ")
    assert wait_reply(sub, f"{NODE}/street/detect/set")["ok"] is True
    assert sub.wait_for(lambda ms: [m.payload for m in ms if m.topic == f"{NODE}/street/detect/state"][-1] == b"ON",
                        5)
    next_stats(sub, 2)
    assert inferred(sub, "street") > street, "inference did not resume after detect/set ON"


def test_snapshot_command_yields_a_jpeg(running):
    d, sub, pub = running
    pub.send(f"{NODE}/other/snapshot/set", "please")
    assert wait_reply(sub, f"{NODE}/other/snapshot/set")["ok"] is True
    assert sub.wait_for(lambda ms: any(m.topic == f"{NODE}/other/snapshot" for m in ms), 10), d.stderr
    jpeg = next(m.payload for m in sub.snapshot() if m.topic == f"{NODE}/other/snapshot")
    assert jpeg[:2] == b"\xff\xd8" and jpeg[-2:] == b"\xff\xd9"


def test_rejected_commands_get_an_error_reply(running):
    d, sub, pub = running
    cases = {
        f"{NODE}/nowhere/detect/set": ("ON", "unknown camera"),
        f"{NODE}/street/detect/set": ("maybe", "payload must be ON or OFF"),
        f"{NODE}/street/lines/nope/reset": ("", "unknown line"),
        f"{NODE}/street/zoom/set": ("1", "unknown command topic"),
    }
    for topic, (payload, _) in cases.items():
        pub.send(topic, payload)
    pub.send(f"{NODE}/other/snapshot/set", b"x" * 1025)
    pub.send(f"{NODE}/other/snapshot/set", b"\xff\xfe\x00garbage")
    assert sub.wait_for(lambda ms: len([r for r in replies(sub) if not r["ok"]]) >= 6, 10)
    errors = [r for r in replies(sub) if not r["ok"]]
    for topic, (_, why) in cases.items():
        assert any(r["topic"] == topic and why in r["error"] for r in errors), (topic, errors)
    assert any("at most 1024" in r["error"] for r in errors) and any("not UTF-8" in r["error"] for r in errors)
    assert "Traceback" not in d.stderr


LEVELS = st.one_of(st.sampled_from(["street", "other", "nowhere", "detect", "snapshot", "lines", "crossing",
                                    "zones", "set", "reset", "state", "command", "result", ""]),
                   # any text a broker takes in a topic: no wildcards, no control characters or non-characters
                   st.text(st.characters(blacklist_characters="+#/", blacklist_categories=("Cs", "Cc", "Cn")),
                           max_size=8))
CAMERAS = st.one_of(st.sampled_from(["street", "other", "nowhere"]), LEVELS)
SHAPED = st.one_of(  # command-shaped: real and unknown cameras, verbs and lines
    st.tuples(CAMERAS, st.sampled_from(["detect", "snapshot", "zoom"]), st.sampled_from(["set", "reset"])),
    st.tuples(CAMERAS, st.just("lines"), st.sampled_from(["crossing", "nope"]), st.sampled_from(["reset", "set"])))
TOPICS = st.one_of(st.lists(LEVELS, min_size=1, max_size=5), SHAPED).map(lambda levels: "/".join([NODE, *levels]))
PAYLOADS = st.one_of(
    st.just(b""), st.sampled_from([b"ON", b"OFF", b"on", b"toggle"]), st.binary(max_size=64),
    st.text(max_size=40).map(str.encode), st.binary(min_size=1025, max_size=1100),
    st.sampled_from([json.dumps(v).encode() for v in ([1, 2], {"state": "ON"}, None, 3.5, {"a": [{}]})]))


def test_fuzzed_commands_each_get_a_reply_and_do_no_harm(running):
    d, sub, pub = running
    before = len(replies(sub))
    sent: list[str] = []

    @settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(topic=TOPICS, payload=PAYLOADS)
    def publish(topic: str, payload: bytes) -> None:
        if topic.endswith("/reload/set"):
            topic += "x"  # a reload per example would only slow the run down; reload/set is tested elsewhere
        pub.send(topic, payload, wait=False)
        sent.append(topic)

    t0, log_start = time.monotonic(), len(d.stderr)
    publish()
    commands = sorted(t for t in sent if command_like(t))
    assert len(commands) >= 60, "the strategy should hit the command namespace often"
    ok = sub.wait_for(lambda ms: len(replies(sub)) - before >= len(commands), 20)
    got = sorted(r["topic"] for r in replies(sub)[before:])
    assert ok and got == commands, (len(got), len(commands))
    elapsed = time.monotonic() - t0
    assert elapsed < 30
    # the flood did not flood the log: at most LOG_BURST command lines a window, one more to count the rest
    logged = [ln for ln in d.stderr[log_start:].splitlines() if "edgecv.commands" in ln]
    bound = (elapsed // LOG_WINDOW_S + 2) * (LOG_BURST + 1)  # the windows the fuzzing touched
    assert len(logged) <= bound, (len(logged), len(commands))
    assert len(commands) <= bound or len(logged) < len(commands)
    # whatever was switched off, the daemon still runs: switch both cameras on, events keep coming
    for cam in ("street", "other"):
        pub.send(f"{NODE}/{cam}/detect/set", "ON")
    n = len(events(sub))
    assert sub.wait_for(lambda ms: len(events(sub)) > n + 3, 30), d.stderr[-3000:]
    assert d.proc.poll() is None and "Traceback" not in d.stderr


def peak_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def test_a_huge_command_never_reaches_the_daemon(running):
    """MQTT 5's Maximum Packet Size (sent on CONNECT): the broker drops a command too large for us instead of
    sending it, so a 50 MB payload costs the daemon nothing (before: paho read it whole, a few copies of it, and
    the reply said it was too long). A 2 KB one still gets its reply, and the one before it none."""
    d, sub, pub = running
    topic = f"{NODE}/other/snapshot/set"

    def answers() -> list[dict]:
        return [r for r in replies(sub) if r["topic"] == topic]

    before, peak = len(answers()), peak_rss_kb(d.proc.pid)
    pub.send(topic, b"x" * 50_000_000, wait=True)
    pub.send(topic, b"y" * 2000)
    assert sub.wait_for(lambda ms: len(answers()) > before, 20)  # (a reply to the huge one would have come first)
    assert [r["error"] for r in answers()[before:]] == ["payload of 2000 bytes, at most 1024 are allowed"], \
        "the huge command reached the daemon"
    assert peak_rss_kb(d.proc.pid) - peak < 25_000, "the daemon's peak memory grew by half the payload or more"


def test_reload_command_is_a_sighup(running):
    d, sub, pub = running
    pub.send(f"{NODE}/reload/set", "")
    assert wait_reply(sub, f"{NODE}/reload/set")["ok"] is True
    assert d.wait_log("reloading"), d.stderr[-2000:]


def test_commands_disabled_subscribes_nothing(assets, broker, running, tmp_path):
    cfg = demo_config(broker.port, tmp_path / "state")
    cfg["node_id"] = "quiet"
    path = write_config(tmp_path / "quiet.yaml", cfg)
    sub = Subscriber(broker.port, ["edgecv/quiet/#"])
    pub = Publisher(broker.port)
    d = Daemon(assets, tmp_path, path, "--max-frames", "30")
    try:
        assert d.wait_log("camera street: streaming"), d.stderr
        pub.send("edgecv/quiet/street/detect/set", "OFF")
        assert d.wait(60) == 0, d.stderr
    finally:
        d.stop()
        pub.close()
        sub.close()
    assert not [m for m in sub.snapshot() if m.topic == "edgecv/quiet/command/result"]
    assert stats(sub)[-1]["cameras"]["street"]["frames_skipped_disabled"] == 0
    log = broker.log.read_text(errors="replace")
    assert "Received SUBSCRIBE from edgecv-demo" in log, "the broker log should show the enabled daemon's SUBSCRIBE"
    assert "Received SUBSCRIBE from edgecv-quiet" not in log


def test_a_flood_of_commands_is_logged_in_bounded_lines_and_counted(caplog):
    """At most LOG_BURST command lines a window; the lines left out are counted and said once, when the next
    window opens (a fake clock: no sleeping)."""
    now = [100.0]
    budget = LogBudget(burst=3, window_s=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="edgecv.commands"):
        for i in range(50):  # one window: 3 logged, 47 left out
            budget.log(logging.WARNING, "command %s rejected: %s", f"t{i}", "why")
        now[0] += 10.0
        budget.log(logging.INFO, "command %s: %s", "next", "done")  # the next window: the count, then the line
    lines = [r.getMessage() for r in caplog.records if r.name == "edgecv.commands"]
    assert lines[:3] == [f"command t{i} rejected: why" for i in range(3)]
    assert lines[3].startswith("47 more command log lines left out in the last 10 s")
    assert lines[4:] == ["command next: done"] and budget.suppressed == 0
