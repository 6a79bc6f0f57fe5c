"""JSON Schema of the event payload (`edgecv.event/1`), for consumers and tests."""
from __future__ import annotations

from typing import Any

from .types import EVENT_SCHEMA

_NUMBER = {"type": "number"}
_OBJECT: dict[str, Any] = {
    "type": "object",
    "required": ["track_id", "label", "class_id", "score", "bbox", "frame_size"],
    "additionalProperties": False,
    "properties": {
        "track_id": {"type": "integer", "minimum": 1},
        "label": {"type": "string", "minLength": 1},
        "class_id": {"type": "integer", "minimum": 0},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "bbox": {"type": "array", "items": _NUMBER, "minItems": 4, "maxItems": 4},
        "frame_size": {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 2, "maxItems": 2},
        "mask_area": {"type": "number", "minimum": 0},
    },
}

EVENT_JSON_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": EVENT_SCHEMA,
    "type": "object",
    "required": ["schema", "id", "type", "node", "camera", "frame", "captured_at", "published_at", "latency_ms"],
    "properties": {
        "schema": {"const": EVENT_SCHEMA},
        "id": {"type": "string", "pattern": "^[0-9a-f]{24}$"},
        "type": {"type": "string", "pattern": r"^[a-z]+\.[a-z_]+$"},
        "node": {"type": "string", "minLength": 1},
        "camera": {"type": "string", "minLength": 1},
        "frame": {"type": "integer", "minimum": 1},
        "captured_at": {"type": "number", "exclusiveMinimum": 0},
        "published_at": {"type": "number", "exclusiveMinimum": 0},
        "latency_ms": {"type": "number", "minimum": 0},
        "object": _OBJECT,
        "zone": {"type": "string"},
        "line": {"type": "string"},
        "direction": {"enum": ["in", "out"]},
        "dwell_s": {"type": "number", "minimum": 0},
        "reason": {"type": "string"},
        "ttc_s": {"type": "number", "minimum": 0},
    },
    "allOf": [
        {"if": {"properties": {"type": {"const": "line.cross"}}},
         "then": {"required": ["object", "line", "direction"]}},
        {"if": {"properties": {"type": {"pattern": "^zone\\."}}},
         "then": {"required": ["object", "zone"]}},
        {"if": {"properties": {"type": {"pattern": "^object\\."}}},
         "then": {"required": ["object"]}},
        {"if": {"properties": {"type": {"const": "collision.warning"}}},
         "then": {"required": ["object", "ttc_s"]}},
    ],
}
