"""A real Mosquitto broker started by the tests on a free port, and a real paho subscriber."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import paho.mqtt.client as mqtt


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll `predicate` until it is true (True) or `timeout` seconds passed (False)."""
    end = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if not found:
        raise RuntimeError("mosquitto is not installed (scripts/setup.sh installs it)")
    return found


def wait_port(port: int, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


class Mosquitto:
    """One broker process; stop() kills it (a fault), start() brings it back on the same port."""

    def __init__(self, workdir: Path, extra_conf: str = "", port: Optional[int] = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n{extra_conf}"
        )
        self.log = workdir / "mosquitto.log"
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> "Mosquitto":
        log = open(self.log, "ab")
        self.proc = subprocess.Popen([mosquitto_binary(), "-c", str(self.conf)], stdout=log, stderr=log)
        wait_port(self.port)
        return self

    def stop(self, clean: bool = False) -> None:
        """Kill the broker (a crash), or with ``clean`` stop it as a service manager does (SIGTERM: a persistent
        broker writes its sessions and queued messages to disk first)."""
        if self.proc is not None and self.proc.poll() is None:
            if clean:
                self.proc.terminate()
            else:
                self.proc.kill()
            self.proc.wait(10)
        self.proc = None


def mosquitto_with(workdir: Path, conf_text: str, port: Optional[int] = None) -> Mosquitto:
    """A broker whose config is ``conf_text`` after its listener (on a free port) and `allow_anonymous true`; its
    persistence database, when persistence is on, goes into ``workdir``. Not started."""
    workdir.mkdir(parents=True, exist_ok=True)
    broker = Mosquitto(workdir, port=port)
    # started as root, mosquitto runs as user mosquitto, which may not write into a test's folder
    user = "user root\n" if os.geteuid() == 0 else ""
    broker.conf.write_text(f"listener {broker.port} 127.0.0.1\nallow_anonymous true\n{user}"
                           f"persistence_location {workdir}/\n{conf_text}")
    return broker


@dataclass
class Message:
    topic: str
    payload: bytes
    retain: bool
    t: float

    def json(self) -> dict:
        return json.loads(self.payload)


class Subscriber:
    """A paho client that records every message on the given topic filters."""

    def __init__(self, port: int, topics: list[str], client_id: str = "", clean: bool = True,
                 configure: Optional[Callable[[mqtt.Client], None]] = None) -> None:
        """``configure`` sets the client up before it connects (TLS, credentials)."""
        self.messages: list[Message] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean)
        if configure is not None:
            configure(self.client)
        self.topics = topics
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.reconnect_delay_set(0.2, 1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise TimeoutError("subscriber did not get SUBACK")

    def _on_connect(self, client, userdata, flags, reason, properties) -> None:
        client.subscribe([(t, 1) for t in self.topics])

    def _on_message(self, client, userdata, msg) -> None:
        with self._lock:
            self.messages.append(Message(msg.topic, bytes(msg.payload), bool(msg.retain), time.time()))

    def snapshot(self) -> list[Message]:
        with self._lock:
            return list(self.messages)

    def wait_for(self, predicate, timeout: float = 10.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate(self.snapshot()):
                return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
