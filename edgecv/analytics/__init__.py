"""Rules that turn confirmed tracks into events (``rules``: objects, zones, lines; ``driving``: dash-cam rules)."""
from edgecv.analytics.driving import CollisionRule, MaskZoneRule
from edgecv.analytics.rules import (Debounce, EventType, FrameContext, LineRule, ObjectRule, Removed, Rule,
                                    ZoneRule)

__all__ = [
    "CollisionRule",
    "Debounce",
    "EventType",
    "FrameContext",
    "LineRule",
    "MaskZoneRule",
    "ObjectRule",
    "Removed",
    "Rule",
    "ZoneRule",
]
