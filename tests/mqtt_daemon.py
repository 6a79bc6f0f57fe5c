"""Helpers of the MQTT consumer tests (state topics, Home Assistant, commands): a module-wide broker, the daemon as a
subprocess with its stderr collected, a demo config and a publishing client."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import paho.mqtt.client as mqtt
import yaml
from broker import Message, Mosquitto, Subscriber, wait_until
from conftest import REPO, edgecv_env


def demo_config(port: int, state_dir: Path, **mqtt_extra) -> dict:
    """configs/demo.yaml on the test broker, console off, the spool (and counters) in ``state_dir``."""
    cfg = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    cfg["mqtt"] = {"host": "127.0.0.1", "port": port, "stats_interval_s": 1, "spool": {"path": str(state_dir)},
                   **mqtt_extra}
    cfg["console"] = {"enabled": False}
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(cfg))
    tmp.replace(path)
    return path


class Daemon:
    """`edgecv run CONFIG [args]` in a subprocess; stderr collected line by line."""

    def __init__(self, assets: Path, tmp: Path, config: Path, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "edgecv.cli", "run", str(config), *args],
                                     env=edgecv_env(assets, tmp), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        self.lines: list[str] = []
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def wait_log(self, text: str, timeout: float = 60.0) -> bool:
        return wait_until(lambda: any(text in line for line in self.lines), timeout)

    def wait(self, timeout: float = 60.0) -> int:
        rc = self.proc.wait(timeout)
        self._t.join(5)
        return rc

    def hup(self) -> None:
        self.proc.send_signal(signal.SIGHUP)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(30)


def retained(port: int, topics: list[str], settle: float = 1.0) -> dict[str, bytes]:
    """The retained messages on ``topics`` now (a fresh subscriber; empty payloads left out)."""
    sub = Subscriber(port, topics)
    time.sleep(settle)
    sub.close()
    return {m.topic: m.payload for m in sub.snapshot() if m.retain and m.payload}


def last_values(messages: list[Message]) -> dict[str, str]:
    out: dict[str, str] = {}
    for m in messages:
        out[m.topic] = m.payload.decode()
    return out


class Publisher:
    """A plain paho client that publishes (commands, fuzz)."""

    def __init__(self, port: int) -> None:
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        self.client.max_inflight_messages_set(1000)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def send(self, topic: str, payload: bytes | str = b"", wait: bool = True) -> None:
        info = self.client.publish(topic, payload, qos=1)
        if wait:
            info.wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def replies(sub: Subscriber, node: str = "demo") -> list[dict]:
    return [m.json() for m in sub.snapshot() if m.topic == f"edgecv/{node}/command/result"]


def wait_reply(sub: Subscriber, topic: str, timeout: float = 10.0) -> Optional[dict]:
    found: list[dict] = []

    def got(_ms) -> bool:
        found[:] = [r for r in replies(sub) if r["topic"] == topic]
        return bool(found)

    sub.wait_for(got, timeout)
    return found[-1] if found else None


def events(sub: Subscriber) -> list[dict]:
    return [m.json() for m in sub.snapshot() if m.topic.endswith("/events")]


def stats(sub: Subscriber) -> list[dict]:
    return [json.loads(m.payload) for m in sub.snapshot() if m.topic.endswith("/stats")]


def module_broker(workdir: Path, extra_conf: str = "") -> Mosquitto:
    workdir.mkdir(parents=True, exist_ok=True)
    return Mosquitto(workdir, extra_conf).start()
