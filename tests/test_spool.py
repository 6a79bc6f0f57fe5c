"""The durable event spool: order, acknowledgement, reopen, the size bound, failures (unusable folder,
full disk), and the accounting promise: every event is delivered, waiting in the spool, or counted (and
logged) as dropped, failed to be stored, or lost."""
from __future__ import annotations

import json
import logging
import os
import re
import resource
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest
import yaml
from broker import Mosquitto, Subscriber, free_port, wait_until
from conftest import REPO, edgecv_env

from edgecv.config import MqttConfig
from edgecv.publish.mqtt import MqttPublisher
from edgecv.publish.spool import Spool, SpoolError
from edgecv.types import Event, ObjectInfo

NODE = "sp"
EVENTS = f"edgecv/{NODE}/+/events"


def put_n(spool: Spool, n: int, start: int = 0, size: int = 100) -> list[int]:
    return [spool.put("cam", f"id{i}", f"edgecv/{NODE}/cam/events", json.dumps({"i": i, "pad": "x" * size}).encode())
            for i in range(start, start + n)]


def ids(spool: Spool) -> list[str]:
    return [it.event_id for it in spool.next_items(0, 10_000)]



# ---------------------------------------------------------------------------------------------------------
# the spool on its own


def test_events_come_out_in_order_and_an_ack_deletes_only_that_event(tmp_path):
    spool = Spool(tmp_path / "s.sqlite", 10**6)
    seqs = put_n(spool, 5)
    assert seqs == sorted(seqs) and len(set(seqs)) == 5
    assert ids(spool) == [f"id{i}" for i in range(5)]
    assert [it.event_id for it in spool.next_items(seqs[1], 2)] == ["id2", "id3"]  # after a seq, bounded
    spool.ack(seqs[2])
    spool.ack(seqs[2])  # a second acknowledgement (redelivery) is harmless
    assert ids(spool) == ["id0", "id1", "id3", "id4"]
    assert spool.depth == 4 and spool.stats()["depth"] == 4
    for s in seqs:
        spool.ack(s)
    assert spool.depth == 0 and spool.size_bytes == 0 and ids(spool) == []
    spool.close()


def test_dead_letter_sets_an_event_aside_counts_it_and_keeps_it_across_runs(tmp_path):
    spool = Spool(tmp_path / "s.sqlite", 10**6)
    seqs = [spool.put("cam", f"id{i}", "t", b"{}") for i in range(3)]
    assert spool.dead_letter(seqs[1], "600 bytes, over the broker's maximum packet size of 500 bytes")
    assert [it.event_id for it in spool.next_items(0, 10)] == ["id0", "id2"]  # the ones behind it flow
    assert spool.depth == 2 and spool.stats()["dead_letter"] == 1
    assert not spool.dead_letter(seqs[1], "again")  # gone from the queue: nothing to move
    spool.close()
    spool = Spool(tmp_path / "s.sqlite", 10**6)
    assert spool.stats()["dead_letter"] == 1 and spool.depth == 2
    assert spool.dead_lettered() == [("id1", "600 bytes, over the broker's maximum packet size of 500 bytes")]
    spool.close()


def test_a_second_spool_on_the_same_file_is_refused_until_the_first_closes(tmp_path):
    first = Spool(tmp_path / "s.sqlite", 10**6)
    with pytest.raises(SpoolError, match=rf"is in use by another edgecv daemon \(pid {os.getpid()}\)"):
        Spool(tmp_path / "s.sqlite", 10**6)
    first.close()
    Spool(tmp_path / "s.sqlite", 10**6).close()


def test_rows_survive_close_and_reopen_in_their_order(tmp_path, caplog):
    path = tmp_path / "state" / "s.sqlite"  # the folder is made
    spool = Spool(path, 10**6)
    seqs = put_n(spool, 6)
    spool.ack(seqs[0])
    size = spool.size_bytes
    spool.close()
    with caplog.at_level(logging.INFO, logger="edgecv.spool"):
        again = Spool(path, 10**6)
    assert again.depth == 5 and again.size_bytes == size
    assert ids(again) == [f"id{i}" for i in range(1, 6)]
    assert f"spool {path}: 5 events waiting from an earlier run" in caplog.text
    new = put_n(again, 1, start=6)[0]
    assert new > seqs[-1], "sequence numbers keep growing across runs (order is kept)"
    again.close()


def test_bound_drops_the_oldest_counts_logs_and_keeps_the_count_across_runs(tmp_path, caplog):
    path = tmp_path / "s.sqlite"
    one = len(json.dumps({"i": 0, "pad": "x" * 100})) + len(f"edgecv/{NODE}/cam/events") + len("id0") + 64
    bound = 10 * one + one // 2  # room for 10 events
    with caplog.at_level(logging.WARNING, logger="edgecv.spool"):
        spool = Spool(path, bound)
        put_n(spool, 25)
        assert spool.size_bytes <= bound
        kept = ids(spool)
        assert kept == [f"id{i}" for i in range(25 - len(kept), 25)], "the newest are kept, the oldest dropped"
        assert spool.dropped == 25 - len(kept) > 0
        assert spool.stats() == {"depth": len(kept), "bytes": spool.size_bytes, "dropped": spool.dropped, "failed": 0,
                                 "dead_letter": 0}
        spool.close()  # logs what the rate limit held back
    logged = [int(m) for m in re.findall(r"dropped the (\d+) oldest events", caplog.text)]
    assert sum(logged) == 25 - len(kept), caplog.text
    assert len(logged) <= 2, "drops are summarised, not one line per event"
    again = Spool(path, bound)
    assert again.dropped == 25 - len(kept) and again.depth == len(kept)
    again.close()


def test_an_event_larger_than_the_bound_is_kept(tmp_path):
    spool = Spool(tmp_path / "s.sqlite", 100)
    put_n(spool, 3, size=500)
    assert spool.depth == 1 and ids(spool) == ["id2"] and spool.dropped == 2
    spool.close()


def test_a_full_database_fails_the_write_with_one_line_and_recovers_when_space_is_freed(tmp_path):
    path = tmp_path / "s.sqlite"
    spool = Spool(path, 10**9)
    seqs = put_n(spool, 3)
    pages = spool._db.execute("PRAGMA page_count").fetchone()[0]
    spool._db.execute(f"PRAGMA max_page_count={pages}")  # "the disk is full" from SQLite's point of view
    with pytest.raises(SpoolError) as err:
        put_n(spool, 50, start=3, size=3000)
    message = str(err.value)
    assert message.startswith(f"spool {path}: cannot write: ") and "full" in message and "\n" not in message
    assert spool.failed == 1
    assert ids(spool)[:3] == ["id0", "id1", "id2"], "what was stored is intact"
    depth = spool.depth
    for s in spool.next_items(0, 1000):
        spool.ack(s.seq)
    assert spool.depth == 0
    put_n(spool, 1, start=99, size=100)  # freed pages are used again
    assert ids(spool) == ["id99"] and depth >= len(seqs)
    spool.close()


@pytest.mark.parametrize("kind", ["parent is a file", "not a database", "a folder in the way"])
def test_an_unusable_spool_path_is_one_line_naming_it(tmp_path, kind):
    if kind == "parent is a file":
        (tmp_path / "afile").write_text("x")
        path = tmp_path / "afile" / "s.sqlite"  # fails for root too (chmod would not)
    elif kind == "not a database":
        path = tmp_path / "s.sqlite"
        path.write_bytes(b"this is no SQLite database\n" * 200)
    else:
        path = tmp_path / "s.sqlite"
        path.mkdir()
    with pytest.raises(SpoolError) as err:
        Spool(path, 10**6)
    message = str(err.value)
    assert message.startswith(f"spool {path}: cannot open: ") and "\n" not in message, message


# ---------------------------------------------------------------------------------------------------------
# the publisher when the spool cannot store an event


def make_event(i: int) -> Event:
    obj = ObjectInfo(track_id=i, label="person", class_id=0, score=0.9, bbox=(1.0, 2.0, 30.0, 60.0),
                     frame_size=(768, 576))
    return Event(type="object.new", node=NODE, camera="cam", frame=i, captured_at=time.time(), object=obj,
                 epoch="test")


def test_publisher_publishes_what_the_full_spool_cannot_store_and_counts_what_it_loses(tmp_path, caplog):
    broker = Mosquitto(tmp_path).start()
    try:
        sub = Subscriber(broker.port, [EVENTS])
        spool = Spool(tmp_path / "s.sqlite", 10**9)
        cfg = MqttConfig(host="127.0.0.1", port=broker.port)
        pub = MqttPublisher(cfg, NODE, spool)
        pub.start()
        assert wait_until(lambda: pub.connected, 10)
        events = [make_event(i) for i in range(230)]
        with caplog.at_level(logging.INFO):
            for ev in events[:5]:
                assert pub.submit(ev)
            pages = spool._db.execute("PRAGMA page_count").fetchone()[0]
            spool._db.execute(f"PRAGMA max_page_count={pages}")
            stored = [pub.submit(ev) for ev in events[5:130]]  # fills the free pages, then fails
            assert not all(stored)
            failed = stored.count(False)
            assert wait_until(lambda: {m.json()["id"] for m in sub.snapshot()} == {e.id for e in events[:130]}, 20)
            assert spool.failed == failed and pub.unspooled == failed and pub.lost == 0
            assert pub.flush(10) == 0

            broker.stop()  # broker down as well: what cannot be stored is lost, and counted
            assert wait_until(lambda: not pub.connected, 10)
            lost = [pub.submit(ev) for ev in events[130:]].count(False)
            assert lost >= 1 and pub.lost == lost and spool.failed == failed + lost
            pub.close(1.0)
        spool.close()
        sub.close()
        lines = [r.getMessage() for r in caplog.records if "cannot write" in r.getMessage()]
        assert len(lines) == failed + lost, "one line per event that could not be stored"
        assert sum("published without the spool" in ln for ln in lines) == failed
        assert sum(" lost: " in ln for ln in lines) == lost
        for ln in lines:  # the line names the spool and the event
            assert str(tmp_path / "s.sqlite") in ln and re.search(r"object\.new [0-9a-f]{24}", ln)
        # accounting: every event submitted is delivered, waiting, or counted as lost
        delivered = {m.json()["id"] for m in sub.snapshot()}
        waiting = spool.depth
        assert len(delivered) + waiting + pub.lost == len(events)
    finally:
        broker.stop()


# ---------------------------------------------------------------------------------------------------------
# the daemon


def write_config(path: Path, port: int, spool_dir: Path, max_mb: Optional[float] = None) -> Path:
    data = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    data["node_id"] = NODE
    data["mqtt"].update({"host": "127.0.0.1", "port": port, "stats_interval_s": 1,
                         "spool": {"path": str(spool_dir), **({"max_mb": max_mb} if max_mb else {})}})
    data["console"] = {"enabled": True, "format": "json"}
    data["cameras"]["street"]["realtime"] = False
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run(config: Path, env: dict, *args: str, timeout: float = 240, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgecv.cli", "run", str(config), *args], env=env,
                          capture_output=True, text=True, timeout=timeout, **kw)


def console_ids(stdout: str) -> list[str]:
    return [json.loads(line)["id"] for line in stdout.splitlines() if line.startswith("{")]


def spool_ids(path: Path) -> list[str]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return [r[0] for r in db.execute("SELECT event_id FROM events ORDER BY seq")]
    finally:
        db.close()


@pytest.mark.integration
def test_run_with_an_unusable_spool_folder_exits_1_with_one_line(assets, tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    folder = tmp_path / "afile" / "spool"
    cfg = write_config(tmp_path / "c.yaml", free_port(), folder)
    proc = run(cfg, edgecv_env(assets, tmp_path), "--fast", "--max-frames", "5", timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("edgecv: error:")]
    assert len(errors) == 1 and f"spool {folder / (NODE + '.spool.sqlite')}: cannot open:" in errors[0], proc.stderr


@pytest.mark.integration
def test_bounded_spool_drops_the_oldest_and_the_stats_report_depth_bytes_dropped(assets, tmp_path):
    """Broker down: a small spool keeps the newest events and counts the dropped ones; the next run (broker up)
    delivers the rest and its stats report depth, bytes and the dropped count kept from the first run."""
    port = free_port()
    folder = tmp_path / "spool"
    env = edgecv_env(assets, tmp_path)
    first = run(write_config(tmp_path / "small.yaml", port, folder, max_mb=0.005), env, "--fast",
                "--max-frames", "300")
    assert first.returncode == 0, first.stderr[-2000:]
    assert "Traceback" not in first.stderr
    printed = console_ids(first.stdout)
    kept = spool_ids(folder / f"{NODE}.spool.sqlite")
    dropped_logged = sum(int(m) for m in re.findall(r"dropped the (\d+) oldest events", first.stderr))
    assert kept and dropped_logged > 0
    assert kept == printed[-len(kept):], "the newest events are kept, in order"
    assert len(kept) + dropped_logged == len(printed), "every event is waiting or counted as dropped"
    assert re.search(rf"{len(kept)} events not delivered yet; kept in the spool", first.stderr)

    broker = Mosquitto(tmp_path).start()
    try:
        sub = Subscriber(broker.port, [EVENTS, f"edgecv/{NODE}/stats"])
        # a larger bound now (no more drops); one frame: the spool goes first, then that frame's events
        second = run(write_config(tmp_path / "big.yaml", broker.port, folder), env, "--fast", "--max-frames", "1")
        assert second.returncode == 0, second.stderr[-2000:]
        assert sub.wait_for(lambda ms: any(m.topic.endswith("/stats") and m.json()["spool"]["depth"] == 0
                                           for m in ms), 15)
        sub.close()
        msgs = sub.snapshot()
        delivered = [m.json()["id"] for m in msgs if m.topic.endswith("/events")]
        assert delivered[:len(kept)] == kept
        assert len(delivered) == len(kept) + len(console_ids(second.stdout))
        final = [m.json() for m in msgs if m.topic.endswith("/stats")][-1]["spool"]
        assert final == {"depth": 0, "bytes": 0, "dropped": dropped_logged, "failed": 0, "unspooled": 0, "lost": 0,
                         "dead_letter": 0}
    finally:
        broker.stop()


def _limit_file_size(limit: int):
    def apply() -> None:  # in the child: files it writes cannot grow past `limit` bytes (EFBIG, no signal:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))  # Python ignores SIGXFSZ)
    return apply


@pytest.mark.integration
def test_full_disk_the_daemon_keeps_running_publishing_and_counting(assets, tmp_path):
    """The spool's files cannot grow past 96 KiB (as on a full disk): writes fail, one line per event; the
    daemon keeps processing and publishes those events directly while the broker is connected."""
    broker = Mosquitto(tmp_path).start()
    try:
        sub = Subscriber(broker.port, [EVENTS, f"edgecv/{NODE}/stats"])
        folder = tmp_path / "spool"
        cfg = write_config(tmp_path / "full.yaml", broker.port, folder)
        proc = run(cfg, edgecv_env(assets, tmp_path), "--fast", "--max-frames", "300",
                   preexec_fn=_limit_file_size(96 * 1024))
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
        assert "300 processed" in proc.stderr, "the camera kept running"
        printed = console_ids(proc.stdout)
        failures = [ln for ln in proc.stderr.splitlines() if "cannot write" in ln]
        assert failures, "the size limit must have been hit: " + proc.stderr[-2000:]
        assert all("published without the spool" in ln for ln in failures)
        assert sub.wait_for(lambda ms: {m.json()["id"] for m in ms if m.topic.endswith("/events")} >= set(printed), 15)
        assert sub.wait_for(lambda ms: any(m.topic.endswith("/stats") and m.json()["spool"]["failed"] == len(failures)
                                           for m in ms), 15)
        sub.close()
        final = [m.json() for m in sub.snapshot() if m.topic.endswith("/stats")][-1]["spool"]
        assert final["failed"] == final["unspooled"] == len(failures) and final["lost"] == 0
        print(f"\nfull disk: {len(printed)} events, {len(failures)} not stored (published without the spool), "
              f"all delivered")
    finally:
        broker.stop()
