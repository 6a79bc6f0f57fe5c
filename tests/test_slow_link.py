"""A link to the broker slower than the best-effort traffic (a cellular uplink): stats, tracks and snapshots must not
pile up in paho's queue without bound, nor hold back the events behind them. The daemon talks to a real Mosquitto
through a relay that carries its bytes at a few kilobytes a second until released; a subscriber reads the broker
directly."""
from __future__ import annotations

import socket
import threading
import time

import pytest
from broker import Subscriber
from mqtt_daemon import Daemon, demo_config, events, module_broker, stats, write_config

pytestmark = pytest.mark.integration

NODE = "edgecv/demo"


class SlowRelay:
    """TCP relay to ``target`` whose client -> broker direction carries at most ``rate`` bytes a second (its
    receive buffer kept small, so the daemon's writes soon block) until :attr:`fast` is set."""

    def __init__(self, target: int, rate: float) -> None:
        self.target, self.rate = target, rate
        self.fast = threading.Event()
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen()
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, slow: bool) -> None:
        try:
            while True:
                data = src.recv(256 if slow and not self.fast.is_set() else 65536)
                if not data:
                    break
                dst.sendall(data)
                if slow and not self.fast.is_set():
                    time.sleep(len(data) / self.rate)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()
        for s in self.sockets:
            s.close()


@pytest.fixture()
def broker(tmp_path):
    b = module_broker(tmp_path)
    yield b
    b.stop()


def test_best_effort_messages_yield_to_events_on_a_slow_link(assets, broker, tmp_path):
    relay = SlowRelay(broker.port, rate=3000)
    cfg = demo_config(relay.port, tmp_path / "state", publish_tracks=True, tracks_max_hz=20,
                      snapshots={"enabled": True, "max_hz": 5})
    cfg["cameras"]["street"]["loop"] = True
    sub = Subscriber(broker.port, [f"{NODE}/#"])
    d = Daemon(assets, tmp_path, write_config(tmp_path / "demo.yaml", cfg))
    try:
        assert d.wait_log("mqtt: connected", 60), d.stderr[-3000:]
        # far more best-effort traffic than 3 kB/s: the queue fills, and they are skipped instead of piling up
        assert d.wait_log("stats, tracks and snapshots are skipped until they are out", 60), d.stderr[-3000:]
        assert d.proc.poll() is None
        # events still get through the slow link: one that happened after the backlog began arrives while it lasts
        # (before, they queued behind the best-effort messages: none captured after the first 20 s arrived in 60 s)
        since = time.time()
        assert sub.wait_for(lambda ms: any(e["captured_at"] > since for e in events(sub)), 60), d.stderr[-2000:]
        relay.fast.set()  # the link recovers: the backlog is written, best-effort messages go again
        assert d.wait_log("stats, tracks and snapshots go again", 60), d.stderr[-3000:]
        assert sub.wait_for(lambda ms: stats(sub) and stats(sub)[-1].get("mqtt_skipped_backlog", 0) > 0, 30)
        # no event was lost on the way: every event the daemon counted reaches the subscriber, once
        assert sub.wait_for(lambda ms: stats(sub)[-1]["cameras"]["street"]["events"] <= len(events(sub)), 60)
        ids = [e["id"] for e in events(sub)]
        assert len(ids) == len(set(ids)) and ids, "events duplicated or none"
    finally:
        relay.fast.set()
        d.stop()
        sub.close()
        relay.close()
    assert "Traceback" not in d.stderr
