"""Broker outage and daemon crash: no event is lost, duplicated only as a QoS 1 redelivery, or reordered.

- outage: the demo clip replayed at a steady pace (`pace_fps`: every frame processed, so the events are
  the same as in a `--fast` reference run), the broker killed for more than 10 s mid-run and restarted on
  the same port; a subscriber with a persistent session gets exactly the reference events, in order;
- crash: broker down, the daemon spools events and is killed (SIGKILL); the next run delivers them.

The broker is killed at a moment when nothing is in transit (the daemon is briefly stopped with SIGSTOP
until every event it has printed reached the subscriber and its spool is empty), so the result does not
depend on luck: what the broker acknowledged before the kill was delivered already, and everything after
waits in the daemon's spool. The subscriber's session (subscription) is saved by the broker (SIGUSR1) before
the run, so messages the daemon sends after the restart are queued for it even before it reconnects.
"""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import pytest
import yaml
from broker import Mosquitto, Subscriber, wait_until
from conftest import REPO, edgecv_env

pytestmark = pytest.mark.integration

NODE = "out"
PACE_FPS = 20.0  # the whole clip (795 frames) takes ~40 s: room for a >= 10 s outage and the reconnect backoff
OUTAGE_S = 11.0
EVENTS_TOPIC = f"edgecv/{NODE}/street/events"



def write_config(path: Path, port: int, *, mqtt: bool = True, pace_fps: Optional[float] = None,
                 spool_dir: Optional[Path] = None) -> Path:
    """The demo config with JSON console lines (event ids), a given broker port and file pacing."""
    data = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    data["node_id"] = NODE
    data["mqtt"].update({"enabled": mqtt, "host": "127.0.0.1", "port": port, "stats_interval_s": 2})
    if spool_dir is not None:
        data["mqtt"]["spool"] = {"path": str(spool_dir)}
    data["console"] = {"enabled": True, "format": "json"}
    cam = data["cameras"]["street"]
    cam["realtime"] = False
    if pace_fps:
        cam["pace_fps"] = pace_fps
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


class Daemon:
    """`edgecv run` in a subprocess with stdout and stderr in files (complete at any moment, also when stopped)."""

    def __init__(self, tmp: Path, name: str, config: Path, *args: str, env: dict) -> None:
        self.out = tmp / f"{name}.stdout"
        self.err = tmp / f"{name}.stderr"
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "edgecv.cli", "run", str(config), *args],
                                         env=env, stdout=out, stderr=err)

    def events(self) -> list[dict]:
        """Events printed so far (complete lines only)."""
        text = self.out.read_text(errors="replace")
        lines = text.split("\n")[:-1]  # the last piece has no newline yet (or is empty)
        return [json.loads(line) for line in lines if line.startswith("{")]

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def spool_rows(path: Path) -> list[tuple[int, str, int]]:
    """(seq, event id, frame) of every event in the daemon's spool, read-only, in spool order."""
    if not path.exists():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1.0)
    try:
        rows = db.execute("SELECT seq, event_id, payload FROM events ORDER BY seq").fetchall()
    finally:
        db.close()
    return [(int(seq), eid, int(json.loads(payload)["frame"])) for seq, eid, payload in rows]


def spool_depth(path: Path) -> Optional[int]:
    try:
        return len(spool_rows(path))
    except sqlite3.Error:  # e.g. locked for a moment by the daemon: "not known now"
        return None


class PersistentBroker(Mosquitto):
    """Mosquitto that saves its sessions to disk only when told (SIGUSR1), so a restart after a kill
    always comes back with exactly the state saved then: the subscriber's session and subscription."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.store = workdir / "mosquitto-db"
        self.store.mkdir()
        user = "user root\n" if os.geteuid() == 0 else ""  # as root mosquitto would switch to a user that
        self.conf.write_text(                               # cannot write into the test's folder
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\n{user}"
            f"persistence true\npersistence_location {self.store}/\nautosave_interval 0\n")

    def save(self) -> None:
        db = self.store / "mosquitto.db"
        before = db.stat().st_mtime_ns if db.exists() else 0
        assert self.proc is not None
        self.proc.send_signal(signal.SIGUSR1)
        assert wait_until(lambda: db.exists() and db.stat().st_mtime_ns != before, 10), "broker did not save"


def unique_in_order(messages: list[dict]) -> list[dict]:
    seen: set[str] = set()
    out = []
    for m in messages:
        if m["id"] not in seen:
            seen.add(m["id"])
            out.append(m)
    return out


def without(event: dict, keys: tuple[str, ...]) -> dict:
    return {k: v for k, v in event.items() if k not in keys}


def assert_duplicates_are_redeliveries(events: list[dict], rerun: bool = False) -> int:
    """Every repeated id is the same event again: a QoS 1 redelivery differs only in its publish time; an
    event of a re-run of the same frames (`rerun`) also in its capture time."""
    skip = ("published_at", "latency_ms") + (("captured_at",) if rerun else ())
    first: dict[str, dict] = {}
    dups = 0
    for ev in events:
        if ev["id"] in first:
            dups += 1
            assert without(ev, skip) == without(first[ev["id"]], skip), "a duplicate id must be the same event"
        else:
            first[ev["id"]] = ev
    return dups


def quiesce_and_kill_broker(daemon: Daemon, broker: Mosquitto, spool: Path, received: Callable[[], set[str]],
                            timeout: float = 60) -> float:
    """Kill the broker at a moment when no event is in transit; returns the time of the kill.

    The daemon is stopped (SIGSTOP); when every event it printed has reached the subscriber and its spool is
    empty, the broker is killed; the daemon continues (SIGCONT) in any case.
    """
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        os.kill(daemon.proc.pid, signal.SIGSTOP)
        try:
            def quiet() -> bool:
                return spool_depth(spool) == 0 and {e["id"] for e in daemon.events()} <= received()

            if wait_until(quiet, 1.5):
                broker.stop()
                return time.monotonic()
        finally:
            os.kill(daemon.proc.pid, signal.SIGCONT)
        wait_until(lambda: spool_depth(spool) == 0, 2.0)
    raise AssertionError("the daemon never had all its events delivered at once")


def test_broker_outage_mid_run_loses_no_event(assets, tmp_path):
    env = edgecv_env(assets, tmp_path)
    broker = PersistentBroker(tmp_path).start()
    try:
        # reference: the same clip and config, every frame, no broker involved
        ref_cfg = write_config(tmp_path / "reference.yaml", broker.port, mqtt=False)
        ref = Daemon(tmp_path, "reference", ref_cfg, "--fast", env=env)
        assert ref.wait(240) == 0, ref.stderr()[-2000:]
        reference = ref.events()
        assert len(reference) >= 30, "the clip gives a few dozen events"

        sub = Subscriber(broker.port, [EVENTS_TOPIC], client_id="outage-subscriber", clean=False)
        broker.save()  # the subscriber's session survives the kill below

        spool = tmp_path / "spool"
        cfg = write_config(tmp_path / "paced.yaml", broker.port, pace_fps=PACE_FPS, spool_dir=spool)
        spool_file = spool / f"{NODE}.spool.sqlite"
        t_start = time.monotonic()
        run = Daemon(tmp_path, "paced", cfg, env=env)

        def received_msgs() -> list[dict]:
            return [m.json() for m in sub.snapshot() if m.topic == EVENTS_TOPIC]

        def received_ids() -> set[str]:
            return {e["id"] for e in received_msgs()}

        # the broker goes away once events flow
        assert wait_until(lambda: len(received_msgs()) >= 5 or run.proc.poll() is not None, 90), run.stderr()
        assert run.proc.poll() is None, run.stderr()
        t_kill = quiesce_and_kill_broker(run, broker, spool_file, received_ids)
        delivered_before = len(received_ids())
        printed_before = len(run.events())

        # >= 10 s without a broker; events pile up in the spool
        max_depth = 0
        while time.monotonic() - t_kill < OUTAGE_S:
            max_depth = max(max_depth, spool_depth(spool_file) or 0)
            time.sleep(0.1)
        assert run.proc.poll() is None, "the run must outlast the outage: " + run.stderr()[-2000:]
        assert "lost the connection" in run.stderr()
        outage_s = time.monotonic() - t_kill
        n_before_restart = len(sub.snapshot())
        broker.start()
        t_restart, t_restart_wall = time.monotonic(), time.time()

        # everything arrives: the spooled events after the restart, then the rest of the clip
        ref_ids = [e["id"] for e in reference]
        assert wait_until(lambda: set(ref_ids) <= received_ids(), 90), (
            f"missing {len(set(ref_ids) - received_ids())} events; daemon log:\n{run.stderr()[-3000:]}")
        after_restart = [m for m in sub.snapshot()[n_before_restart:] if m.topic == EVENTS_TOPIC]
        after_restart_events = [m.json() for m in after_restart]
        ids_before_restart = {m.json()["id"] for m in sub.snapshot()[:n_before_restart]}
        recovery_s = after_restart[0].t - t_restart_wall
        assert run.wait(120) == 0, run.stderr()[-3000:]
        t_end = time.monotonic()
        assert t_restart - t_start > 0
        sub.close()
        log = run.stderr()

        messages = received_msgs()
        unique = unique_in_order(messages)
        assert [e["id"] for e in unique] == ref_ids, "the same events, in the same order as the reference run"
        frames = [e["frame"] for e in unique]
        assert frames == sorted(frames), "per camera, events arrive in frame order"
        duplicates = assert_duplicates_are_redeliveries(messages)
        assert [e["id"] for e in run.events()] == ref_ids, "paced replay processes every frame like --fast"
        assert spool_depth(spool_file) == 0

        # the outage and the recovery are each one line; no retry noise, no traceback
        mqtt_lines = [line for line in log.splitlines() if "edgecv.mqtt:" in line]
        assert len([ln for ln in mqtt_lines if "lost the connection" in ln]) == 1, mqtt_lines
        assert len([ln for ln in mqtt_lines if "reconnected to" in ln]) == 1, mqtt_lines
        assert len([ln for ln in mqtt_lines if "unreachable" in ln]) <= 1, mqtt_lines
        assert "Traceback" not in log
        reconnect_line = next(ln for ln in mqtt_lines if "reconnected to" in ln)
        lost_line = next(ln for ln in mqtt_lines if "lost the connection" in ln)

        delivered_after = len({e["id"] for e in after_restart_events} - ids_before_restart)
        print(f"\noutage: {outage_s:.1f} s (broker killed {t_kill - t_start:.1f} s into the run); "
              f"{delivered_before} events delivered before, {printed_before} printed; "
              f"spool depth during the outage up to {max_depth}; {delivered_after} events delivered after the "
              f"restart; first event {recovery_s:.1f} s after the restart; {duplicates} duplicates; "
              f"run {t_end - t_start:.1f} s; daemon:\n  {lost_line.split('edgecv.mqtt: ')[-1]}\n  "
              f"{reconnect_line.split('edgecv.mqtt: ')[-1]}")
        assert outage_s >= 10.0 and max_depth >= 1 and delivered_after >= max_depth
    finally:
        broker.stop()


def test_daemon_killed_with_spooled_events_delivers_them_on_the_next_start(assets, tmp_path):
    env = edgecv_env(assets, tmp_path)
    broker = Mosquitto(tmp_path)  # not started: the port is free, the broker is down
    spool = tmp_path / "spool"
    spool_file = spool / f"{NODE}.spool.sqlite"
    cfg = write_config(tmp_path / "crash.yaml", broker.port, spool_dir=spool)

    first = Daemon(tmp_path, "first", cfg, "--fast", env=env)
    try:
        assert wait_until(lambda: (spool_depth(spool_file) or 0) >= 10 or first.proc.poll() is not None, 120), \
            first.stderr()
        assert first.proc.poll() is None, "the run ended before it spooled 10 events: " + first.stderr()[-2000:]
    finally:
        first.kill()  # SIGKILL: no shutdown, no flush
    assert first.proc.returncode == -signal.SIGKILL
    rows = spool_rows(spool_file)
    spooled = [eid for _, eid, _ in rows]
    printed = [e["id"] for e in first.events()]
    assert len(spooled) >= 10
    # every event printed was stored before the kill (but possibly the very last: printed, then killed)
    assert spooled in (printed, printed[:-1]), (len(spooled), len(printed))
    assert "unreachable" in first.stderr()

    broker.start()
    try:
        sub = Subscriber(broker.port, [EVENTS_TOPIC])
        second = Daemon(tmp_path, "second", cfg, "--fast", "--max-frames", "1", env=env)
        assert second.wait(120) == 0, second.stderr()[-2000:]
        assert wait_until(lambda: set(spooled) <= {m.json()["id"] for m in sub.snapshot()}, 30), second.stderr()
        sub.close()
        log = second.stderr()
        assert f"{len(spooled)} events waiting from an earlier run" in log
        assert "Traceback" not in log and "not delivered" not in log
        messages = [m.json() for m in sub.snapshot()]
        unique = unique_in_order(messages)
        assert [e["id"] for e in unique[:len(spooled)]] == spooled, "spooled events first, in their order"
        frames = [e["frame"] for e in unique[:len(spooled)]]
        assert frames == sorted(frames)
        assert_duplicates_are_redeliveries(messages, rerun=True)  # frame 1 of the second run repeats the first's
        assert spool_depth(spool_file) == 0
        print(f"\ncrash: {len(spooled)} events spooled before SIGKILL (frames {frames[0]}..{frames[-1]}), "
              f"all delivered by the next run")
    finally:
        broker.stop()


def test_an_event_handed_over_as_the_connection_drops_is_delivered_after_the_reconnect(tmp_path):
    """paho gives a message published while its socket is gone an error code (and sends it after the reconnect);
    the sender must neither die on that code nor forget the event."""
    from edgecv.config import MqttConfig
    from edgecv.publish.mqtt import MqttPublisher
    from edgecv.publish.spool import Spool
    from edgecv.types import Event

    broker = PersistentBroker(tmp_path).start()
    try:
        sub = Subscriber(broker.port, [f"edgecv/{NODE}/+/events"], client_id="race-subscriber", clean=False)
        broker.save()  # the subscription survives the broker's restart
        spool = Spool(tmp_path / "s.sqlite", 10**6)
        pub = MqttPublisher(MqttConfig(host="127.0.0.1", port=broker.port), NODE, spool)
        pub.start()
        assert wait_until(lambda: pub.connected, 10)
        broker.stop()
        assert wait_until(lambda: not pub.connected and pub.state != "connected", 10)
        pub._connected.set()  # the race: the sender believes it is connected while paho's socket is gone
        events = [Event(type="object.new", node=NODE, camera="cam", frame=i, captured_at=time.time(), epoch="race")
                  for i in range(3)]
        for ev in events:
            assert pub.submit(ev)
        assert wait_until(lambda: pub.published == 3, 10), "the sender handed the events to paho"
        pub._connected.clear()
        time.sleep(0.5)  # several sender cycles reaping messages whose info carries MQTT_ERR_NO_CONN
        assert pub._sender is not None and pub._sender.is_alive()
        assert spool.depth == 3
        broker.start()
        # paho reconnects (backoff: up to a few seconds) and sends what it holds; the broker acknowledges it
        assert wait_until(lambda: spool.depth == 0, 40), (pub.state, spool.depth)
        assert pub._sender.is_alive()
        assert sub.wait_for(lambda ms: {m.json()["id"] for m in ms} == {e.id for e in events}, 10)
        pub.close(2.0)
        spool.close()
        sub.close()
    finally:
        broker.stop()


def test_an_event_goes_to_paho_on_the_submitting_thread_while_the_sender_is_idle(broker, tmp_path):
    """The sender thread can only run once the submitting thread lets it: while it is idle, `submit` hands the event
    to paho itself (no wake-up on the way to the broker). Each event still arrives exactly once, in order, and the
    spool empties."""
    import threading

    from edgecv.config import MqttConfig
    from edgecv.publish.mqtt import MqttPublisher
    from edgecv.publish.spool import Spool
    from edgecv.types import Event

    sub = Subscriber(broker.port, [f"edgecv/{NODE}/+/events"])
    spool = Spool(tmp_path / "s.sqlite", 10**6)
    pub = MqttPublisher(MqttConfig(host="127.0.0.1", port=broker.port), NODE, spool)
    pub.start()
    try:
        assert wait_until(lambda: pub.connected, 10)
        time.sleep(0.3)  # the sender's start-up cycle is over
        handed: list[str] = []  # the thread that handed each event to paho
        publish = pub.client.publish

        def recording(topic, *args, **kwargs):
            if topic.endswith("/events"):
                handed.append(threading.current_thread().name)
            return publish(topic, *args, **kwargs)

        pub.client.publish = recording  # type: ignore[method-assign]
        events = [Event(type="object.new", node=NODE, camera="cam", frame=i, captured_at=time.time(), epoch="idle")
                  for i in range(20)]

        def submit_all() -> None:
            for ev in events:
                assert pub.submit(ev)
                time.sleep(0.01)  # a camera's next event comes later: the sender is idle again by then

        worker = threading.Thread(target=submit_all, name="worker-cam")
        worker.start()
        worker.join(30)
        assert wait_until(lambda: spool.depth == 0, 10), spool.depth
        assert sub.wait_for(lambda ms: len(ms) >= len(events), 10)
        time.sleep(0.2)  # a duplicate would arrive meanwhile
        assert [m.json()["id"] for m in sub.snapshot()] == [e.id for e in events]
        assert len(handed) == len(events), handed
        assert handed.count("worker-cam") >= len(events) // 2, handed
    finally:
        pub.close(2.0)
        spool.close()
        sub.close()
