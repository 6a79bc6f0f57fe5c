"""The publish time is written into a stored event's bytes on each send, with the same result as parsing the
payload and serialising it again (what the sender did before, once per send)."""
from __future__ import annotations

import json

from edgecv.publish.mqtt import stamp_publish_time
from edgecv.types import Event, ObjectInfo


def stored(event: Event) -> bytes:
    return json.dumps(event.to_payload(0.0), separators=(",", ":")).encode()


def reserialised(payload: bytes, now: float) -> bytes:
    data = json.loads(payload)
    data["published_at"] = round(now, 3)
    data["latency_ms"] = round(max(0.0, (now - data["captured_at"]) * 1000.0), 1)
    return json.dumps(data, separators=(",", ":")).encode()


def test_stamp_equals_parse_and_reserialise():
    obj = ObjectInfo(7, "person", 0, 0.91, (1.0, 2.5, 30.25, 80.0), (768, 576))
    events = [Event("zone.enter", "n1", "gate", 42, 1732440000.123, obj, {"zone": "door", "dwell_s": 1.5},
                    epoch="e", rule="door"),
              Event("object.new", "n1", "gate", 1, 1732440000.0, None, {}),
              Event("line.cross", "n1", "gate", 3, 5.5e-3, obj, {"line": "l", "direction": "in"})]
    for event in events:
        payload = stored(event)
        for now in (1732440000.171, 1732440000.0, 1732440100.98765, 1.0):
            stamped = stamp_publish_time(payload, now)
            assert stamped == reserialised(payload, now)
            data = json.loads(stamped)
            assert data["published_at"] == round(now, 3) and data["id"] == event.id


def test_a_payload_not_in_the_stored_form_is_stamped_by_parsing():
    payload = b'{"captured_at": 10.0, "type": "x"}'  # spaces: written by some other tool
    assert json.loads(stamp_publish_time(payload, 10.5)) == {"captured_at": 10.0, "type": "x",
                                                             "published_at": 10.5, "latency_ms": 500.0}
