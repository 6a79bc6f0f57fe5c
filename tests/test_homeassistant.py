"""Home Assistant MQTT discovery with a real broker: one retained config per entity, valid against HA's required
keys, unique ids stable across two runs, the topics they name carry values, and a zone removed by a reload
(SIGHUP) takes its entities with it (empty retained configs)."""
from __future__ import annotations

import json
import re
import time

import pytest
from broker import Subscriber
from mqtt_daemon import Daemon, Publisher, demo_config, module_broker, retained, wait_reply, write_config

pytestmark = pytest.mark.integration

# From Home Assistant's MQTT integration docs (sensor.mqtt, binary_sensor.mqtt, switch.mqtt, camera.mqtt): the keys
# each component requires, plus what discovery with a device needs (unique_id; device identifiers or connections)
REQUIRED = {
    "sensor": {"state_topic"},
    "binary_sensor": {"state_topic"},
    "switch": {"command_topic"},
    "camera": {"topic"},
}
COMMON = {"unique_id", "device", "name"}
CONFIG_TOPIC = re.compile(r"^homeassistant/(sensor|binary_sensor|switch|camera)/[A-Za-z0-9_-]+/[A-Za-z0-9_-]+/config$")
BASE = "edgecv/demo/street"


def configs(messages) -> dict[str, dict]:
    """The latest config per topic (an empty payload: deleted, left out)."""
    out: dict[str, dict] = {}
    for m in messages:
        if m.payload:
            out[m.topic] = json.loads(m.payload)
        else:
            out.pop(m.topic, None)
    return out


@pytest.fixture(scope="module")
def ha(assets, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ha")
    broker = module_broker(tmp / "broker")
    cfg = demo_config(broker.port, tmp / "state", homeassistant={"enabled": True}, commands={"enabled": True},
                      snapshots={"enabled": True})
    cfg["cameras"]["street"]["loop"] = True
    path = write_config(tmp / "demo.yaml", cfg)
    out: dict = {"port": broker.port}
    try:
        # run 1: the configs, the topics they name, the switch and the camera
        sub = Subscriber(broker.port, ["homeassistant/#", "edgecv/demo/#"])
        d = Daemon(assets, tmp, path)
        assert d.wait_log("entities announced"), d.stderr
        assert d.wait_log("camera street: streaming"), d.stderr
        time.sleep(1.0)
        out["first"] = configs(m for m in sub.snapshot() if m.topic.startswith("homeassistant/"))
        topics = sorted({c.get("state_topic") for c in out["first"].values()} - {None})
        out["state_values"] = retained(broker.port, topics + ["edgecv/demo/status"])
        pub = Publisher(broker.port)
        switch = next(c for c in out["first"].values() if "command_topic" in c)
        for value in ("OFF", "ON"):
            pub.send(switch["command_topic"], value)
            out[f"reply_{value}"] = wait_reply(sub, switch["command_topic"])
            assert sub.wait_for(lambda ms, v=value: any(m.topic == switch["state_topic"] and m.payload == v.encode()
                                                        and not m.retain for m in ms), 10)
        camera = next(c for c in out["first"].values() if "topic" in c)
        pub.send(f"{BASE}/snapshot/set", b"")
        assert sub.wait_for(lambda ms: any(m.topic == camera["topic"] for m in ms), 15), d.stderr
        out["jpeg"] = next(m.payload for m in sub.snapshot() if m.topic == camera["topic"])
        assert d.stop() == 0, d.stderr
        sub.close()

        # run 2: the same ids; then the zone is removed and the config reloaded
        sub = Subscriber(broker.port, ["homeassistant/#"])
        d = Daemon(assets, tmp, path)
        assert d.wait_log("entities announced"), d.stderr
        time.sleep(1.0)
        out["second"] = configs(sub.snapshot())
        del cfg["cameras"]["street"]["zones"]["plaza"]
        write_config(path, cfg)
        d.hup()
        assert d.wait_log("reload: applied"), d.stderr
        assert d.wait_log("no longer configured: removed"), d.stderr
        time.sleep(1.0)
        out["reloaded"] = sub.snapshot()
        out["after"] = retained(broker.port, ["homeassistant/#"])
        assert d.stop() == 0, d.stderr
        sub.close()
        pub.close()
        out["stderr"] = d.stderr
        yield out
    finally:
        broker.stop()


def test_one_valid_retained_config_per_entity(ha):
    first = ha["first"]
    components = sorted(t.split("/")[1] for t in first)
    # per camera: 2 zone sensors (person, all) + occupancy, 2 line sensors (in/out person), fps, state, switch, camera
    assert components.count("sensor") == 6 and components.count("binary_sensor") == 1, components
    assert components.count("switch") == 1 and components.count("camera") == 1, components
    for topic, c in first.items():
        component = topic.split("/")[1]
        assert CONFIG_TOPIC.match(topic), topic
        missing = (REQUIRED[component] | COMMON) - set(c)
        assert not missing, f"{topic}: missing {missing}"
        assert c["device"]["identifiers"] and c["device"]["name"] and c["device"]["sw_version"]
        assert c["availability"] == [{"topic": "edgecv/demo/status", "payload_available": "online",
                                      "payload_not_available": "offline"}]
        assert topic.split("/")[3] == c["unique_id"] == c["object_id"]
    ids = [c["unique_id"] for c in first.values()]
    assert len(ids) == len(set(ids)), "unique_id must be unique"
    zone = next(c for t, c in first.items() if t.startswith("homeassistant/binary_sensor/"))
    assert zone["device_class"] == "occupancy" and zone["state_topic"] == f"{BASE}/zones/plaza/all"
    lines = [c for c in first.values() if "/lines/" in c.get("state_topic", "")]
    assert {c["state_class"] for c in lines} == {"total_increasing"}


def test_named_topics_carry_values(ha):
    values = ha["state_values"]
    assert values.pop("edgecv/demo/status") == b"online"
    named = {c["state_topic"] for c in ha["first"].values() if "state_topic" in c}
    assert set(values) == named, f"no retained value on {named - set(values)}"
    for topic, payload in values.items():
        text = payload.decode()
        if topic.endswith("/state") and not topic.endswith("/detect/state"):
            assert json.loads(text)["state"] in ("streaming", "connecting", "stalled", "failed", "disabled")
        elif topic.endswith("/detect/state"):
            assert text in ("ON", "OFF")
        else:
            assert float(text) >= 0, (topic, text)
    for value in ("OFF", "ON"):
        assert ha[f"reply_{value}"]["ok"] is True, ha[f"reply_{value}"]
    assert ha["jpeg"][:2] == b"\xff\xd8", "the camera entity's topic carries a JPEG"


def test_unique_ids_stable_and_removed_zone_deleted(ha):
    assert {c["unique_id"] for c in ha["first"].values()} == {c["unique_id"] for c in ha["second"].values()}
    plaza = {t for t, c in ha["second"].items() if "plaza" in c["unique_id"]}
    assert len(plaza) == 3
    deleted = {m.topic for m in ha["reloaded"] if not m.payload and not m.retain}
    assert plaza <= deleted, f"not deleted: {plaza - deleted}"
    assert not plaza & set(ha["after"]), "the removed zone's configs are still retained"
    assert set(ha["after"]) == set(ha["second"]) - plaza
