"""Unit tests for the analytics rules on synthetic tracks (no video, no model).

Every track is a box whose bottom-center anchor is the point we move; the stream runs at 4 fps
(t = frame / 4, exact in binary floating point) so stream-time thresholds are compared exactly.
"""
from __future__ import annotations

import json
import re
from typing import Optional, Sequence

import numpy as np
import pytest

from edgecv.analytics.driving import CollisionRule, MaskZoneRule
from edgecv.analytics.rules import Debounce, EventType, FrameContext, LineRule, ObjectRule, Removed, Rule, ZoneRule
from edgecv.config import (CameraConfig, CollisionConfig, DrivableZoneConfig, DrivingConfig, LineConfig,
                           ObjectEventsConfig, ZoneConfig)
from edgecv.pipeline import build_rules
from edgecv.types import EVENT_SCHEMA, Detections, Event, in_classes

FPS = 4.0
NAMES = ("person", "bicycle", "car")
PERSON, CAR = 0, 2
SQUARE = [[100, 100], [200, 100], [200, 200], [100, 200]]

# one object in one frame: (track_id, class_id, (anchor_x, anchor_y))
Obj = tuple[int, int, tuple[float, float]]


def ctx(frame: int, epoch: str = "run-1") -> FrameContext:
    return FrameContext(node="node-1", camera="cam", frame=frame, captured_at=1_700_000_000.0 + frame / FPS,
                        t=frame / FPS, frame_size=(640, 480), names=NAMES, epoch=epoch)


def box(x: float, y: float) -> list[float]:
    """A 20x40 box whose bottom-center is (x, y)."""
    return [x - 10, y - 40, x + 10, y]


def tracks(objs: Sequence[Obj]) -> Detections:
    if not objs:
        return Detections.empty(with_track_id=True)
    return Detections(np.array([box(*p) for _, _, p in objs], np.float32),
                      np.full(len(objs), 0.9, np.float32),
                      np.array([c for _, c, _ in objs], np.int32),
                      track_id=np.array([t for t, _, _ in objs], np.int64))


def removed(track_id: int, class_id: int = PERSON, at: tuple[float, float] = (150, 150)) -> Removed:
    return Removed(track_id, class_id, 0.8, tuple(box(*at)))  # type: ignore[arg-type]


def run(rule: Rule, frames: Sequence[Sequence[Obj]], removals: Optional[dict[int, list[Removed]]] = None,
        start: int = 0) -> list[tuple[int, Event]]:
    """Feed frames start, start+1, ... to the rule; returns (frame, event) for every event emitted."""
    out: list[tuple[int, Event]] = []
    removals = removals or {}
    for k, objs in enumerate(frames):
        f = start + k
        for ev in rule.update(ctx(f), tracks(objs), removals.get(f, [])):
            out.append((f, ev))
    return out


def path(track_id: int, points: Sequence[tuple[float, float]], class_id: int = PERSON) -> list[list[Obj]]:
    return [[(track_id, class_id, p)] for p in points]


def types(events: Sequence[tuple[int, Event]]) -> list[tuple[int, str]]:
    return [(f, e.type) for f, e in events]


# ------------------------------------------------------------------------------------------------
# zones

WALK_X = list(range(50, 260, 10))  # 50, 60, ..., 250 at y=150: inside (edges included) for 100..200


def test_zone_walk_through_emits_one_enter_after_min_frames_and_one_exit() -> None:
    rule = ZoneRule("plaza", SQUARE, min_frames=3)
    events = run(rule, path(7, [(x, 150) for x in WALK_X]))
    first_in = WALK_X.index(100)  # frame of the first anchor on the zone's edge
    first_out = WALK_X.index(210)
    assert types(events) == [(first_in + 2, "zone.enter"), (first_out + 2, "zone.exit")]
    enter, exit_ = events[0][1], events[1][1]
    assert enter.fields == {"zone": "plaza"}
    assert enter.object is not None and enter.object.track_id == 7 and enter.object.label == "person"
    assert exit_.fields["zone"] == "plaza"
    assert exit_.fields["dwell_s"] == pytest.approx((first_out - first_in) / FPS)
    assert "reason" not in exit_.fields


def test_zone_occupancy_follows_confirmed_state() -> None:
    rule = ZoneRule("plaza", SQUARE, min_frames=2)
    run(rule, path(1, [(150, 150)] * 2) + [[(1, PERSON, (150, 150)), (2, PERSON, (150, 160))]] * 2)
    assert rule.occupancy == 2
    run(rule, [[(1, PERSON, (300, 150)), (2, PERSON, (150, 160))]] * 2, start=4)
    assert rule.occupancy == 1


def test_zone_track_appearing_inside_enters_once_confirmed() -> None:
    rule = ZoneRule("plaza", SQUARE, min_frames=3)
    events = run(rule, path(1, [(150, 150)] * 10))
    assert types(events) == [(2, "zone.enter")]


def test_zone_track_appearing_outside_emits_nothing() -> None:
    rule = ZoneRule("plaza", SQUARE, min_frames=3)
    assert run(rule, path(1, [(300, 150)] * 10)) == []
    assert rule.tracked == 1 and rule.occupancy == 0


def test_zone_flicker_across_edge_shorter_than_min_frames_is_debounced() -> None:
    rule = ZoneRule("plaza", SQUARE, min_frames=3)
    outside, inside = (95, 150), (105, 150)
    settle = [outside] * 4  # confirmed outside
    flicker = [inside, inside, outside, inside, outside, inside, inside, outside, outside, inside, outside]
    events = run(rule, path(1, settle + flicker + [outside] * 4))
    assert events == []
    assert rule.occupancy == 0
    # and the same rule does fire once the track really stays inside for min_frames
    events = run(rule, path(1, [inside] * 3), start=len(settle) + len(flicker) + 4)
    assert [e.type for _, e in events] == ["zone.enter"]


def test_zone_flicker_of_a_new_track_is_debounced() -> None:
    """A track's first confirmed state also needs min_frames agreeing observations."""
    rule = ZoneRule("plaza", SQUARE, min_frames=3)
    outside, inside = (95, 150), (105, 150)
    events = run(rule, path(1, [outside, outside, inside, outside, inside, inside, outside, inside, outside]))
    assert events == []
    assert rule.occupancy == 0


def test_zone_flicker_out_of_zone_does_not_exit() -> None:
    rule = ZoneRule("plaza", SQUARE, min_frames=3)
    outside, inside = (95, 150), (105, 150)
    events = run(rule, path(1, [inside] * 3 + [outside, outside, inside, outside, inside, outside, outside, inside]))
    assert types(events) == [(2, "zone.enter")]
    assert rule.occupancy == 1


def test_zone_class_filter_ignores_other_classes() -> None:
    walk = [(x, 150) for x in WALK_X]
    rule = ZoneRule("plaza", SQUARE, class_ids={PERSON}, min_frames=3)
    assert run(rule, path(5, walk, class_id=CAR)) == []
    assert rule.tracked == 0
    # the same walk by a person does trigger the zone
    events = run(rule, path(6, walk, class_id=PERSON), start=len(walk))
    assert [e.type for _, e in events] == ["zone.enter", "zone.exit"]
    # mixed frame: only the person is seen
    rule = ZoneRule("plaza", SQUARE, class_ids={PERSON}, min_frames=1)
    events = run(rule, [[(1, CAR, (150, 150)), (2, PERSON, (150, 150))]])
    assert [(e.type, e.object.track_id, e.object.label) for _, e in events] == [("zone.enter", 2, "person")]


def test_zone_exit_on_lost_when_a_track_inside_is_removed() -> None:
    rule = ZoneRule("plaza", SQUARE, min_frames=2, exit_on_lost=True)
    events = run(rule, path(3, [(150, 150)] * 4) + [[]], removals={4: [removed(3, at=(150, 150))]})
    assert types(events) == [(1, "zone.enter"), (4, "zone.exit")]
    lost = events[1][1]
    assert lost.fields["reason"] == "lost"
    assert lost.fields["zone"] == "plaza"
    assert lost.fields["dwell_s"] == pytest.approx((4 - 1) / FPS)
    assert lost.object is not None and lost.object.track_id == 3
    assert rule.tracked == 0 and rule.occupancy == 0


def test_zone_no_exit_on_lost_when_disabled_or_outside() -> None:
    rule = ZoneRule("plaza", SQUARE, min_frames=2, exit_on_lost=False)
    events = run(rule, path(3, [(150, 150)] * 4) + [[]], removals={4: [removed(3)]})
    assert types(events) == [(1, "zone.enter")]
    assert rule.tracked == 0
    rule = ZoneRule("plaza", SQUARE, min_frames=2, exit_on_lost=True)
    events = run(rule, path(3, [(300, 150)] * 4) + [[]], removals={4: [removed(3, at=(300, 150))]})
    assert events == []
    assert rule.tracked == 0


def test_zone_loiter_once_after_loiter_s_of_stream_time() -> None:
    rule = ZoneRule("plaza", SQUARE, min_frames=3, loiter_s=2.0)
    events = run(rule, path(9, [(150, 150)] * 40))
    enter_frame = 2
    loiter_frame = enter_frame + int(2.0 * FPS)
    assert types(events) == [(enter_frame, "zone.enter"), (loiter_frame, "zone.loiter")]
    loiter = events[1][1]
    assert loiter.fields == {"zone": "plaza", "dwell_s": 2.0}
    assert loiter.object is not None and loiter.object.track_id == 9


def test_zone_loiter_rearms_after_a_new_enter() -> None:
    rule = ZoneRule("plaza", SQUARE, min_frames=1, loiter_s=1.0)
    frames = path(9, [(150, 150)] * 6 + [(300, 150)] * 2 + [(150, 150)] * 6)
    assert [e.type for _, e in run(rule, frames)] == ["zone.enter", "zone.loiter", "zone.exit",
                                                      "zone.enter", "zone.loiter"]


def test_zone_cooldown_suppresses_a_repeated_enter() -> None:
    inside, outside = (150, 150), (300, 150)
    back_and_forth = [inside] * 3 + [outside] * 3 + [inside] * 3 + [outside] * 3  # 12 frames = 3 s

    without = ZoneRule("plaza", SQUARE, min_frames=3, cooldown_s=0)
    assert [e.type for _, e in run(without, path(1, back_and_forth))].count("zone.enter") == 2

    rule = ZoneRule("plaza", SQUARE, min_frames=3, cooldown_s=10.0)
    events = run(rule, path(1, back_and_forth))
    assert types(events) == [(2, "zone.enter"), (5, "zone.exit")]
    # after the cooldown has passed, the next enter is emitted again
    later = int(20 * FPS)
    events = run(rule, path(1, [inside] * 3), start=later)
    assert types(events) == [(later + 2, "zone.enter")]


def test_zone_cooldown_never_leaves_an_unpaired_exit() -> None:
    """An enter suppressed by the cooldown must not be followed by a lone exit (nor a lost exit)."""
    inside, outside = (150, 150), (300, 150)
    rule = ZoneRule("plaza", SQUARE, min_frames=1, cooldown_s=2.0)
    # enter t=0, exit t=0.25, enter again t=0.5 (suppressed), stay 3 s, leave at t=3.5
    frames = path(1, [inside, outside] + [inside] * 12 + [outside])
    assert types(run(rule, frames)) == [(0, "zone.enter"), (1, "zone.exit")]
    # suppressed visit ended by track loss: no exit either
    rule = ZoneRule("plaza", SQUARE, min_frames=1, cooldown_s=2.0)
    frames = path(1, [inside, outside] + [inside] * 12) + [[]]
    assert types(run(rule, frames, removals={14: [removed(1)]})) == [(0, "zone.enter"), (1, "zone.exit")]
    # every visit announced once the cooldown has passed between enters
    rule = ZoneRule("plaza", SQUARE, min_frames=1, cooldown_s=2.0)
    frames = path(1, [inside, outside] + [outside] * 8 + [inside, outside])
    assert [e.type for _, e in run(rule, frames)] == ["zone.enter", "zone.exit", "zone.enter", "zone.exit"]


def test_zone_cooldown_is_per_track() -> None:
    rule = ZoneRule("plaza", SQUARE, min_frames=1, cooldown_s=60.0)
    events = run(rule, [[(1, PERSON, (150, 150))], [(2, PERSON, (150, 150))]])
    assert [(e.type, e.object.track_id) for _, e in events] == [("zone.enter", 1), ("zone.enter", 2)]


def test_zone_state_is_deleted_on_removal() -> None:
    rule = ZoneRule("plaza", SQUARE, min_frames=1, cooldown_s=100.0)
    run(rule, [[(1, PERSON, (150, 150)), (2, PERSON, (300, 150)), (3, PERSON, (150, 120))]])
    assert rule.tracked == 3
    run(rule, [[(3, PERSON, (150, 120))]], removals={1: [removed(1), removed(2, at=(300, 150))]}, start=1)
    assert rule.tracked == 1
    run(rule, [[]], removals={2: [removed(3)]}, start=2)
    assert rule.tracked == 0 and rule.occupancy == 0
    # removing an unknown track is harmless
    assert run(rule, [[]], removals={3: [removed(42)]}, start=3) == []


def test_zone_anchor_selects_the_point_tested() -> None:
    # box bottom-center at (150, 230): below the square; its top (y=190) is inside
    assert run(ZoneRule("z", SQUARE, min_frames=1), path(1, [(150, 230)])) == []
    events = run(ZoneRule("z", SQUARE, anchor="top_center", min_frames=1), path(1, [(150, 230)]))
    assert [e.type for _, e in events] == ["zone.enter"]


# ------------------------------------------------------------------------------------------------
# lines

VERTICAL = [[300, 100], [300, 400]]  # drawn top to bottom
HORIZONTAL = [[100, 300], [500, 300]]  # drawn left to right


def test_line_docstring_states_the_direction_convention() -> None:
    doc = " ".join((LineRule.__doc__ or "").split())
    assert "for a line drawn top to bottom, `in` is moving from right to left" in doc
    assert "for a line drawn left to right, `in` is moving down the image" in doc


def test_line_vertical_right_to_left_is_in() -> None:
    rule = LineRule("crossing", VERTICAL, min_frames=3)
    xs = list(range(400, 190, -10))
    events = run(rule, path(4, [(x, 250) for x in xs]))
    assert types(events) == [(xs.index(290) + 2, "line.cross")]
    ev = events[0][1]
    assert ev.fields == {"line": "crossing", "direction": "in"}
    assert ev.object is not None and ev.object.track_id == 4
    assert rule.counts == {"in": 1, "out": 0}


def test_line_vertical_left_to_right_is_out() -> None:
    rule = LineRule("crossing", VERTICAL, min_frames=3)
    events = run(rule, path(4, [(x, 250) for x in range(200, 410, 10)]))
    assert [e.fields["direction"] for _, e in events] == ["out"]
    assert rule.counts == {"in": 0, "out": 1}


def test_line_horizontal_drawn_left_to_right_moving_down_is_in() -> None:
    rule = LineRule("gate", HORIZONTAL, min_frames=2)
    down = run(rule, path(1, [(300, y) for y in range(250, 360, 10)]))
    up = run(rule, path(2, [(300, y) for y in range(350, 240, -10)]), start=20)
    assert [e.fields["direction"] for _, e in down] == ["in"]
    assert [e.fields["direction"] for _, e in up] == ["out"]
    assert rule.counts == {"in": 1, "out": 1}


def test_line_reversed_points_reverse_the_direction() -> None:
    rule = LineRule("crossing", VERTICAL[::-1], min_frames=3)  # drawn bottom to top
    events = run(rule, path(4, [(x, 250) for x in range(400, 190, -10)]))
    assert [e.fields["direction"] for _, e in events] == ["out"]


def test_line_counts_accumulate_over_tracks_and_directions() -> None:
    rule = LineRule("crossing", VERTICAL, min_frames=2)
    run(rule, path(1, [(x, 250) for x in range(400, 190, -20)]))
    run(rule, path(2, [(x, 200) for x in range(400, 190, -20)]), start=20)
    run(rule, path(3, [(x, 300) for x in range(200, 410, 20)]), start=40)
    assert rule.counts == {"in": 2, "out": 1}
    snapshot = rule.counts
    snapshot["in"] = 100  # a copy: the rule's own counts are read-only
    assert rule.counts == {"in": 2, "out": 1}
    with pytest.raises(AttributeError):
        rule.counts = {"in": 0, "out": 0}  # type: ignore[misc]


def test_line_passing_around_the_end_gives_nothing() -> None:
    rule = LineRule("crossing", VERTICAL, min_frames=3)
    # below the segment's lower end (y=400), right to left across the infinite line x=300
    events = run(rule, path(1, [(x, 450) for x in range(400, 190, -10)]))
    # above the upper end (y=100), left to right
    events += run(rule, path(2, [(x, 60) for x in range(200, 410, 10)]), start=30)
    assert events == []
    assert rule.counts == {"in": 0, "out": 0}


def test_line_jitter_shorter_than_min_frames_gives_nothing() -> None:
    rule = LineRule("crossing", VERTICAL, min_frames=3)
    right, left = (305, 250), (295, 250)
    jitter = [right] * 3 + [left, left, right, left, right, right, left, left, right] * 3
    events = run(rule, path(1, jitter))
    assert events == []
    assert rule.counts == {"in": 0, "out": 0}
    # a real crossing afterwards is still counted exactly once
    events = run(rule, path(1, [left] * 5), start=len(jitter))
    assert [(e.fields["direction"]) for _, e in events] == ["in"]
    assert rule.counts == {"in": 1, "out": 0}


def test_line_points_exactly_on_the_line_carry_no_information() -> None:
    rule = LineRule("crossing", VERTICAL, min_frames=2)
    events = run(rule, path(1, [(320, 250)] * 2 + [(300, 250)] * 5 + [(280, 250)] * 2))
    assert [e.fields["direction"] for _, e in events] == ["in"]


def test_line_class_filter_and_cooldown() -> None:
    rule = LineRule("crossing", VERTICAL, class_ids={CAR}, min_frames=1, cooldown_s=30.0)
    xs = [320, 280, 320, 280]  # in, out, in (suppressed: cooldown for 'in'), ...
    assert run(rule, path(1, [(x, 250) for x in xs], class_id=PERSON)) == []
    assert rule.tracked == 0
    events = run(rule, path(2, [(x, 250) for x in xs], class_id=CAR), start=10)
    assert [e.fields["direction"] for _, e in events] == ["in", "out"]
    assert rule.counts == {"in": 1, "out": 1}


def test_line_state_is_deleted_on_removal() -> None:
    rule = LineRule("crossing", VERTICAL, min_frames=1)
    run(rule, [[(1, PERSON, (320, 250)), (2, PERSON, (280, 250))]])
    assert rule.tracked == 2
    run(rule, [[(2, PERSON, (280, 250))]], removals={1: [removed(1)]}, start=1)
    assert rule.tracked == 1
    run(rule, [[]], removals={2: [removed(2)]}, start=2)
    assert rule.tracked == 0
    # a new track with a reused id starts from scratch: its first side is not a crossing
    assert run(rule, path(1, [(280, 250)]), start=3) == []


# ------------------------------------------------------------------------------------------------
# objects


def test_object_new_once_per_track_and_lost_on_removal() -> None:
    rule = ObjectRule()
    frames = [[(1, PERSON, (100, 100))], [(1, PERSON, (110, 100)), (2, CAR, (300, 300))],
              [(1, PERSON, (120, 100)), (2, CAR, (310, 300))], [(2, CAR, (320, 300))], []]
    events = run(rule, frames, removals={3: [removed(1)], 4: [removed(2, CAR)]})
    assert [(f, e.type, e.object.track_id) for f, e in events] == [
        (0, "object.new", 1), (1, "object.new", 2), (3, "object.lost", 1), (4, "object.lost", 2)]
    assert events[1][1].object.label == "car"
    assert rule.tracked == 0


def test_object_class_filter() -> None:
    rule = ObjectRule(class_ids={PERSON})
    frames = [[(1, PERSON, (100, 100)), (2, CAR, (300, 300))]] * 3 + [[]]
    events = run(rule, frames, removals={3: [removed(1), removed(2, CAR)]})
    assert [(e.type, e.object.track_id) for _, e in events] == [("object.new", 1), ("object.lost", 1)]
    assert rule.tracked == 0


def test_object_new_and_lost_switches() -> None:
    frames = [[(1, PERSON, (100, 100))], []]
    only_lost = run(ObjectRule(new=False), frames, removals={1: [removed(1)]})
    only_new = run(ObjectRule(lost=False), frames, removals={1: [removed(1)]})
    assert [e.type for _, e in only_lost] == ["object.lost"]
    assert [e.type for _, e in only_new] == ["object.new"]


def test_object_lost_needs_a_seen_track() -> None:
    assert run(ObjectRule(), [[]], removals={0: [removed(99)]}) == []


# ------------------------------------------------------------------------------------------------
# event payloads


def _all_rule_events(epoch: str = "run-1") -> list[Event]:
    zone = ZoneRule("plaza", SQUARE, min_frames=2, loiter_s=1.0)
    line = LineRule("crossing", VERTICAL, min_frames=2)
    obj = ObjectRule()
    frames = path(1, [(x, 150) for x in range(350, 80, -10)])
    out: list[Event] = []
    for f, objs in enumerate(frames + [[]]):
        rem = [removed(1, at=(90, 150))] if f == len(frames) else []
        c = FrameContext("node-1", "cam", f, 1_700_000_000.0 + f / FPS, f / FPS, (640, 480), NAMES, epoch)
        for rule in (zone, line, obj):
            out.extend(rule.update(c, tracks(objs), rem))
    return out


def test_every_event_serializes_to_the_schema() -> None:
    events = _all_rule_events()
    assert sorted({e.type for e in events}) == ["line.cross", "object.lost", "object.new", "zone.enter",
                                                "zone.exit", "zone.loiter"]
    for ev in events:
        published = ev.captured_at + 0.05
        p = ev.to_payload(published)
        assert json.loads(json.dumps(p)) == p  # plain JSON types only
        assert p["schema"] == EVENT_SCHEMA == "edgecv.event/1"
        assert p["id"] == ev.id and re.fullmatch(r"[0-9a-f]{24}", p["id"])
        assert p["type"] == ev.type and p["node"] == "node-1" and p["camera"] == "cam"
        assert p["frame"] == ev.frame
        assert p["captured_at"] == pytest.approx(ev.captured_at, abs=1e-3)
        assert p["published_at"] == pytest.approx(published, abs=1e-3)
        assert p["latency_ms"] == pytest.approx(50.0, abs=0.2)
        o = p["object"]
        assert set(o) == {"track_id", "label", "class_id", "score", "bbox", "frame_size"}
        assert o["track_id"] == 1 and o["label"] == "person" and o["class_id"] == PERSON
        assert 0 < o["score"] <= 1 and len(o["bbox"]) == 4 and o["frame_size"] == [640, 480]
        for k, v in ev.fields.items():
            assert p[k] == v
        if ev.type.startswith("zone."):
            assert p["zone"] == "plaza"
        if ev.type == "line.cross":
            assert p["line"] == "crossing" and p["direction"] == "in"


def test_event_ids_are_deterministic_and_distinct() -> None:
    first, second = _all_rule_events(), _all_rule_events()
    assert [e.id for e in first] == [e.id for e in second]
    assert len({e.id for e in first}) == len(first)  # no two events of a run share an id
    other_epoch = _all_rule_events(epoch="run-2")
    assert not {e.id for e in first} & {e.id for e in other_epoch}


def test_event_id_depends_on_frame_track_and_rule() -> None:
    c = ctx(10)
    obj = c.obj(5, PERSON, 0.9, box(150, 150))
    base = c.event("zone.enter", obj, "plaza", zone="plaza")
    same = ctx(10).event("zone.enter", ctx(10).obj(5, PERSON, 0.9, box(150, 150)), "plaza", zone="plaza")
    assert base.id == same.id
    assert ctx(11).event("zone.enter", obj, "plaza", zone="plaza").id != base.id
    assert c.event("zone.enter", c.obj(6, PERSON, 0.9, box(150, 150)), "plaza", zone="plaza").id != base.id
    assert c.event("zone.enter", obj, "door", zone="door").id != base.id
    assert c.event("zone.exit", obj, "plaza", zone="plaza").id != base.id


def test_event_types_reach_events_as_plain_strings() -> None:
    c = ctx(3)
    obj = c.obj(5, PERSON, 0.9, box(150, 150))
    by_enum = c.event(EventType.ZONE_ENTER, obj, "plaza", zone="plaza")
    by_str = c.event("zone.enter", obj, "plaza", zone="plaza")
    assert type(by_enum.type) is str and by_enum == by_str and by_enum.id == by_str.id
    assert json.dumps(by_enum.to_payload(1.0)) == json.dumps(by_str.to_payload(1.0))
    events = _all_rule_events()
    assert all(type(e.type) is str for e in events)
    assert {e.type for e in events} <= {t.value for t in EventType}


# ------------------------------------------------------------------------------------------------
# debounce, rules from their config


def test_debounce_confirms_a_value_after_min_frames_agreeing_observations() -> None:
    d: Debounce[bool] = Debounce()
    assert [d.observe(v, 2) for v in (True, False, True, True, True)] == [None, None, None, True, None]
    assert (d.confirmed, d.candidate, d.streak) == (True, None, 0)
    # an observation of the confirmed value breaks the streak of the candidate
    assert [d.observe(v, 2) for v in (False, True, False, False)] == [None, None, None, False]
    assert Debounce().observe(False, 1) is False  # the first value is confirmed like any later one


class _Detector:
    names = list(NAMES)

    def class_ids(self, names: Sequence[str]) -> list[int]:
        return [self.names.index(n) for n in names]


def test_rules_are_made_from_their_config_sections() -> None:
    zone = ZoneRule.from_config("plaza", ZoneConfig(polygon=SQUARE, anchor="center", classes=["person"], min_frames=5,
                                                    cooldown_s=1.5, loiter_s=3.0, exit_on_lost=False), {PERSON})
    assert (zone.name, zone.anchor, zone.class_ids, zone.min_frames, zone.cooldown_s, zone.loiter_s,
            zone.exit_on_lost) == ("plaza", "center", {PERSON}, 5, 1.5, 3.0, False)
    assert zone.polygon.reshape(-1, 2).tolist() == SQUARE
    line = LineRule.from_config("door", LineConfig(points=VERTICAL, anchor="top_center", min_frames=2,
                                                   cooldown_s=4.0), None)
    assert (line.name, line.anchor, line.class_ids, line.min_frames, line.cooldown_s) == ("door", "top_center",
                                                                                          None, 2, 4.0)
    assert [line.a.tolist(), line.b.tolist()] == VERTICAL
    obj = ObjectRule.from_config(ObjectEventsConfig(new=False), {CAR})
    assert (obj.class_ids, obj.emit_new, obj.emit_lost) == ({CAR}, False, True)
    corridor = [[0, 200], [640, 200], [640, 480]]
    col = CollisionRule.from_config(CollisionConfig(ttc_s=3.0, window=10, min_frames=5, min_growth=0.1,
                                                    scale="height", cooldown_s=1.0, ego_path="both",
                                                    ego_corridor=corridor, anchor="center", min_drivable=0.4), {CAR})
    assert (col.ttc_s, col.window, col.min_frames, col.min_growth, col.scale, col.cooldown_s, col.class_ids,
            col.ego_path, col.min_drivable, col.mask) == (3.0, 10, 5, 0.1, "height", 1.0, {CAR}, "both", 0.4,
                                                          "drivable")
    assert col.corridor is not None and col.corridor.anchor == "center"
    assert col.corridor.polygon.reshape(-1, 2).tolist() == corridor
    mask = MaskZoneRule.from_config(DrivableZoneConfig(mask="road", min_drivable=0.3, min_frames=2, cooldown_s=2.0,
                                                       exit_on_lost=False), None)
    assert (mask.name, mask.mask, mask.min_share, mask.min_frames, mask.cooldown_s, mask.exit_on_lost) == (
        "road", "road", 0.3, 2, 2.0, False)
    with pytest.raises(TypeError):
        ZoneRule("plaza", SQUARE, "center")  # type: ignore[misc]  # settings are keyword-only


def test_build_rules_makes_the_rules_of_a_camera_in_order() -> None:
    cam = CameraConfig(source="street.mp4", objects=ObjectEventsConfig(lost=False),
                       zones={"a": ZoneConfig(polygon=SQUARE, classes=["car"]), "b": ZoneConfig(polygon=SQUARE)},
                       lines={"door": LineConfig(points=VERTICAL, classes=["person", "car"])},
                       driving=DrivingConfig(collision=CollisionConfig(classes=["car"]),
                                             drivable_zone=DrivableZoneConfig(enabled=False)))
    rules = build_rules(cam, _Detector())  # type: ignore[arg-type]
    assert [(type(r).__name__, r.name, r.class_ids) for r in rules] == [
        ("ObjectRule", "", None), ("ZoneRule", "a", {CAR}), ("ZoneRule", "b", None),
        ("LineRule", "door", {PERSON, CAR}), ("CollisionRule", "collision", {CAR})]
    assert not rules[0].emit_lost  # type: ignore[attr-defined]


def test_in_classes_is_np_isin_and_select_keeps_only_the_rules_classes() -> None:
    rng = np.random.default_rng(3)
    for n, k in [(0, 1), (5, 0), (1, 1), (12, 1), (12, 2), (40, 5), (300, 80)]:
        ids = rng.integers(0, 80, n).astype(np.int64)
        wanted = rng.choice(80, k, replace=False).astype(np.int32)
        if k and n:
            ids[0] = wanted[0]  # at least one hit
        assert np.array_equal(in_classes(ids, wanted), np.isin(ids, wanted)), (n, k)
    tracks = Detections(np.tile([[0, 0, 10, 10]], (4, 1)), [0.9] * 4, [0, 2, 0, 1], track_id=[1, 2, 3, 4])
    assert Rule("r", class_ids={0, 1}).select(tracks).track_id.tolist() == [1, 3, 4]
    assert Rule("r", class_ids={0, 1, 2}).select(tracks) is tracks  # all of them: the same (read-only) tracks
    assert len(Rule("r", class_ids={5}).select(tracks)) == 0
