"""`mqtt.protocol: 5` (the default) against a broker that speaks only MQTT 3.1.1: edgecv falls back to 3.1.1, says so
in one log line, and its events arrive (without MQTT 5 properties).

The broker is aedes (npm, installed by scripts/aedes.sh into .node-aedes/): a real MQTT 3.1.1 broker that answers an
MQTT 5 CONNECT with CONNACK return code 1, "unacceptable protocol version" (Mosquitto cannot be made to refuse 5).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from broker import Subscriber, free_port, wait_port
from conftest import REPO, edgecv_env

pytestmark = pytest.mark.integration

AEDES = REPO / ".node-aedes" / "node_modules"


@pytest.fixture()
def aedes(tmp_path: Path):
    node = shutil.which("node")
    if node is None or not (AEDES / "aedes").is_dir():
        pytest.fail("aedes is not installed: run scripts/aedes.sh (needs Node.js and npm)")
    port = free_port()
    log = open(tmp_path / "aedes.log", "wb")
    proc = subprocess.Popen([node, str(REPO / "tests" / "aedes_broker.js"), str(port)], stdout=log, stderr=log,
                            env={"NODE_PATH": str(AEDES), "PATH": "/usr/bin:/bin"})
    try:
        wait_port(port)
        yield port
    finally:
        proc.terminate()
        proc.wait(5)


def test_v5_refused_falls_back_to_311_once_and_events_arrive(assets: Path, tmp_path: Path, aedes: int) -> None:
    data = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    data["mqtt"].update({"host": "127.0.0.1", "port": aedes, "spool": {"path": str(tmp_path / "spool")}})
    assert "protocol" not in data["mqtt"]  # the default: 5
    data["console"] = {"enabled": True, "format": "json"}
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(data, sort_keys=False))
    sub = Subscriber(aedes, ["edgecv/demo/+/events"])
    try:
        r = subprocess.run([sys.executable, "-m", "edgecv.cli", "run", str(cfg), "--fast", "--max-frames", "200"],
                           env=edgecv_env(assets, tmp_path), capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
        printed = [json.loads(line)["id"] for line in r.stdout.splitlines() if line.startswith("{")]
        assert len(printed) >= 3
        assert sub.wait_for(lambda ms: [m.json()["id"] for m in ms] == printed, 15), \
            "the events did not arrive over MQTT 3.1.1\n" + r.stderr[-3000:]
        fallback = [ln for ln in r.stderr.splitlines() if "falling back to MQTT 3.1.1" in ln]
        assert len(fallback) == 1, r.stderr[-3000:]
        assert "refused MQTT 5 (Unsupported protocol version)" in fallback[0]
        assert "refused the connection" not in r.stderr  # the refusal of 5 is not reported as a connection problem
        assert "Traceback" not in r.stderr
    finally:
        sub.close()
