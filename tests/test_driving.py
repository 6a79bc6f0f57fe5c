"""Driving rules on synthetic tracks: time to contact from box growth, ego-path gating (drivable mask,
corridor polygon), the drivable-area zone, and the config / model checks of several models per camera."""
from __future__ import annotations

import copy
import math
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import jsonschema
import numpy as np
import pytest
import yaml
from conftest import REPO, edgecv_env

from edgecv.analytics.driving import CollisionRule, MaskZoneRule, box_scale, fit_ttc, mask_share_below
from edgecv.analytics.rules import FrameContext, ObjectRule, Removed
from edgecv.config import ConfigError, parse
from edgecv.models import load_models
from edgecv.schema import EVENT_JSON_SCHEMA
from edgecv.types import Detections, SemanticMasks

FPS = 10.0
W, H = 640, 480
NAMES = ("person", "bicycle", "car")
CAR = 2
ROAD_TOP = 300  # the synthetic drivable area: rows ROAD_TOP.. under columns 200..440
CORRIDOR = [[240, 250], [400, 250], [460, 479], [180, 479]]


def road(x0: int = 200, x1: int = 440) -> SemanticMasks:
    m = np.zeros((H, W), bool)
    m[ROAD_TOP:, x0:x1] = True
    return SemanticMasks({"drivable": m, "lane": np.zeros((H, W), bool)})


def ctx(frame: int, semantic: Optional[SemanticMasks] = None, mask_areas: Optional[dict] = None) -> FrameContext:
    return FrameContext("node-1", "dash", frame, 1_700_000_000.0 + frame / FPS, frame / FPS, (W, H), NAMES, "run-1",
                        semantic, mask_areas or {})


def car(track_id: int, cx: float, bottom: float, size: float, class_id: int = CAR) -> tuple:
    return track_id, class_id, (cx - size / 2, bottom - size, cx + size / 2, bottom)


def tracks(objs: Sequence[tuple]) -> Detections:
    if not objs:
        return Detections.empty(with_track_id=True)
    return Detections(np.array([b for _, _, b in objs], np.float32), np.full(len(objs), 0.9, np.float32),
                      np.array([c for _, c, _ in objs], np.int32), track_id=np.array([t for t, _, _ in objs], np.int64))


def approach(z0: float, v: float, frames: int, cx: float = 320, bottom: float = ROAD_TOP, tid: int = 1,
             focal: float = 2000.0) -> list[list[tuple]]:
    """A car at distance z0 - v t (metres), box size focal / Z pixels; one frame per 1/FPS s."""
    out = []
    for f in range(frames):
        z = z0 - v * f / FPS
        out.append([car(tid, cx, bottom, focal / z)] if z > 0 else [])
    return out


def run(rule, frames: list[list[tuple]], semantic: Optional[SemanticMasks] = None,
        removals: Optional[dict[int, list[Removed]]] = None) -> list[tuple[int, Any]]:
    out = []
    for f, objs in enumerate(frames):
        for ev in rule.update(ctx(f, semantic), tracks(objs), (removals or {}).get(f, [])):
            out.append((f, ev))
    return out


# -- TTC arithmetic -------------------------------------------------------------------------------


@pytest.mark.parametrize("z0, v, window", [(40, 10, 8), (30, 5, 8), (60, 20, 6), (25, 10, 4)])
def test_fit_ttc_of_a_constant_speed_approach(z0: float, v: float, window: int) -> None:
    """Box size ~ 1/Z with Z = z0 - v t: TTC at the newest frame is Z / v, within 2 %."""
    for end in range(window, 15):
        ts = [k / FPS for k in range(end - window, end)]
        sizes = [2000.0 / (z0 - v * t) for t in ts]
        ttc, growth = fit_ttc(ts, [math.log(s) for s in sizes])
        true = (z0 - v * ts[-1]) / v
        assert ttc == pytest.approx(true, rel=0.02), (end, ttc, true)
        assert growth == pytest.approx(sizes[-1] / sizes[0] - 1, rel=0.05)


def test_fit_ttc_is_none_for_receding_static_and_degenerate_samples() -> None:
    ts = [k / FPS for k in range(8)]
    receding = [math.log(2000 / (20 + 5 * t)) for t in ts]
    assert fit_ttc(ts, receding) is None
    assert fit_ttc(ts, [math.log(50.0)] * 8) is None
    assert fit_ttc([1.0, 1.0, 1.0], [0.0, 0.1, 0.2]) is None  # no time spread
    assert fit_ttc([1.0], [0.0]) is None


def test_fit_ttc_uses_all_samples_not_the_end_points() -> None:
    """Jitter on single samples barely moves a least-squares fit over the window."""
    ts = [k / FPS for k in range(8)]
    clean = [math.log(2000 / (30 - 10 * t)) for t in ts]
    noisy = list(clean)
    noisy[-1] += 0.03  # a 3 % jump on the newest box
    a, _ = fit_ttc(ts, clean)
    b, _ = fit_ttc(ts, noisy)
    two_point = (ts[-1] - ts[-2]) / (math.exp(noisy[-1] - noisy[-2]) - 1)
    assert abs(b - a) / a < 0.12
    assert abs(two_point - a) / a > 0.3  # the naive two-frame estimate is thrown far off


def test_box_scale_measures() -> None:
    xyxy = np.array([[10, 20, 30, 60]], np.float32)  # 20 x 40
    assert box_scale(xyxy, "sqrt_area")[0] == pytest.approx(math.sqrt(800))
    assert box_scale(xyxy, "height")[0] == 40 and box_scale(xyxy, "width")[0] == 20
    with pytest.raises(ValueError, match="scale: expected one of"):
        box_scale(xyxy, "diagonal")


# -- the collision rule ---------------------------------------------------------------------------


def test_approaching_car_on_the_road_warns_once_with_its_ttc() -> None:
    rule = CollisionRule(ttc_s=2.0, window=8, min_frames=4, min_growth=0.05, cooldown_s=10.0)
    frames = approach(z0=40, v=10, frames=35)  # TTC(t) = 4 - t
    events = run(rule, frames, road())
    assert len(events) == 1, events
    f, ev = events[0]
    true = 4.0 - f / FPS
    assert ev.type == "collision.warning" and ev.object.track_id == 1 and ev.object.label == "car"
    assert ev.fields["ttc_s"] <= 2.0 and ev.fields["ttc_s"] == pytest.approx(true, rel=0.03, abs=0.02)
    assert 19 <= f <= 21  # when the true TTC reaches 2 s
    payload = ev.to_payload(1_700_000_010.0)
    jsonschema.validate(payload, EVENT_JSON_SCHEMA)
    assert payload["ttc_s"] == ev.fields["ttc_s"]


def test_cooldown_allows_a_second_warning_later() -> None:
    rule = CollisionRule(ttc_s=3.0, window=8, min_frames=4, cooldown_s=0.5)
    events = run(rule, approach(z0=40, v=10, frames=35), road())
    frames = [f for f, _ in events]
    assert len(frames) >= 3 and all(b - a >= 5 for a, b in zip(frames, frames[1:]))  # 0.5 s at 10 fps
    ttcs = [ev.fields["ttc_s"] for _, ev in events]
    assert ttcs == sorted(ttcs, reverse=True)


@pytest.mark.parametrize("case", ["receding", "static", "jitter", "slow"])
def test_no_warning_without_an_approach(case: str) -> None:
    rng = np.random.default_rng(1)
    if case == "receding":
        frames = [[car(1, 320, ROAD_TOP, 2000 / (10 + 10 * f / FPS))] for f in range(40)]
    elif case == "static":
        frames = [[car(1, 320, ROAD_TOP, 80)] for _ in range(40)]
    elif case == "jitter":  # +-1 px of detector noise on a 60 px box
        frames = [[car(1, 320 + rng.uniform(-1, 1), ROAD_TOP + rng.uniform(-1, 1), 60 + rng.uniform(-1, 1))]
                  for _ in range(40)]
    else:  # closing in at 1 m/s from 100 m: TTC 100 s
        frames = approach(z0=100, v=1, frames=40)
    rule = CollisionRule(ttc_s=2.0, window=8, min_frames=4, min_growth=0.05)
    assert run(rule, frames, road()) == []


def test_min_frames_holds_back_a_young_track() -> None:
    frames = approach(z0=15, v=10, frames=10)  # TTC 1.5 s from the first frame
    early = run(CollisionRule(ttc_s=2.0, window=8, min_frames=2, cooldown_s=60), frames, road())
    late = run(CollisionRule(ttc_s=2.0, window=8, min_frames=6, cooldown_s=60), frames, road())
    assert [f for f, _ in early] == [1] and [f for f, _ in late] == [5]


@pytest.mark.parametrize("where, expected", [("on_road", 1), ("beside_road", 0), ("no_mask", 0)])
def test_drivable_mask_gates_the_warning(where: str, expected: int) -> None:
    cx = {"on_road": 320, "beside_road": 560, "no_mask": 320}[where]
    semantic = None if where == "no_mask" else road()
    rule = CollisionRule(ttc_s=2.0, window=8, min_frames=4, cooldown_s=60)
    assert len(run(rule, approach(z0=40, v=10, frames=35, cx=cx), semantic)) == expected


def test_drivable_share_is_measured_under_the_box() -> None:
    m = road()["drivable"]
    boxes = np.array([[280, 200, 360, 300],  # bottom on the road's top edge: strip fully drivable
                      [160, 200, 240, 300],  # half over the road (middle half of the width: 180..220 -> 0.5)
                      [280, 100, 360, 200],  # far above the road
                      [280, 380, 360, 480]], np.float32)  # at the frame's bottom: no strip
    share = mask_share_below(m, boxes)
    assert share.tolist() == pytest.approx([1.0, 0.5, 0.0, 0.0])


@pytest.mark.parametrize("ego_path, cx, semantic, expected", [
    ("corridor", 320, None, 1),  # anchor (320, 300) inside the corridor, no mask needed
    ("corridor", 520, road(), 0),  # outside the corridor; the mask is not consulted
    ("auto", 520, road(), 0),  # auto = corridor when one is given
    ("either", 320, None, 1),
    ("either", 210, road(200, 260), 1),  # outside the corridor but on the drivable area
    ("both", 210, road(200, 260), 0),
    ("both", 320, road(), 1),
])
def test_ego_corridor_gating(ego_path: str, cx: float, semantic: Optional[SemanticMasks], expected: int) -> None:
    rule = CollisionRule(ttc_s=2.0, window=8, min_frames=4, cooldown_s=60, ego_path=ego_path, ego_corridor=CORRIDOR)
    assert len(run(rule, approach(z0=40, v=10, frames=35, cx=cx), semantic)) == expected


def test_class_filter_and_state_is_dropped_with_the_track() -> None:
    frames = approach(z0=40, v=10, frames=35)
    persons_only = CollisionRule(ttc_s=2.0, class_ids={0})
    assert run(persons_only, frames, road()) == []
    rule = CollisionRule(ttc_s=2.0, window=8, min_frames=4, cooldown_s=60)
    run(rule, frames[:10], road())
    assert rule.tracked == 1
    rule.update(ctx(10, road()), tracks([]), [Removed(1, CAR, 0.9, (0, 0, 1, 1))])
    assert rule.tracked == 0


def test_collision_rule_rejects_inconsistent_settings() -> None:
    with pytest.raises(ValueError, match="needs an ego_corridor"):
        CollisionRule(ego_path="corridor")
    with pytest.raises(ValueError, match=r"min_frames \(9\) must be <= window \(8\)"):
        CollisionRule(window=8, min_frames=9)


# -- drivable-area zone ---------------------------------------------------------------------------


def test_drivable_zone_enter_exit_and_exit_on_lost() -> None:
    rule = MaskZoneRule("drivable", min_frames=3)
    on, off = car(7, 320, ROAD_TOP, 60), car(7, 560, ROAD_TOP, 60)
    frames = [[off]] * 4 + [[on]] * 5 + [[off]] * 4 + [[on]] * 4
    removals = {len(frames): [Removed(7, CAR, 0.8, on[2])]}
    events = run(rule, frames + [[]], road(), removals)
    kinds = [(f, ev.type, ev.fields.get("reason")) for f, ev in events]
    assert kinds == [(6, "zone.enter", None), (11, "zone.exit", None), (15, "zone.enter", None),
                     (17, "zone.exit", "lost")]
    for _, ev in events:
        assert ev.fields["zone"] == "drivable"
        jsonschema.validate(ev.to_payload(1_700_000_010.0), EVENT_JSON_SCHEMA)
    assert rule.tracked == 0


def test_drivable_zone_debounces_flicker() -> None:
    rule = MaskZoneRule("drivable", min_frames=3)
    on, off = car(3, 320, ROAD_TOP, 60), car(3, 560, ROAD_TOP, 60)
    frames = [[off]] * 3 + [[on], [on], [off], [on], [on], [off]] * 3
    assert run(rule, frames, road()) == []


# -- mask area on events ---------------------------------------------------------------------------


def test_mask_area_travels_into_the_event_object() -> None:
    rule = ObjectRule()
    (ev,) = rule.update(ctx(1, mask_areas={5: 1234.0}), tracks([car(5, 100, 100, 40)]), [])
    payload = ev.to_payload(1_700_000_010.0)
    assert payload["object"]["mask_area"] == 1234
    jsonschema.validate(payload, EVENT_JSON_SCHEMA)
    (ev,) = ObjectRule().update(ctx(1), tracks([car(6, 100, 100, 40)]), [])
    assert "mask_area" not in ev.to_payload(1_700_000_010.0)["object"]


# -- config: several models, driving section ------------------------------------------------------

BASE: dict[str, Any] = {
    "node_id": "vehicle",
    "models": [
        {"name": "det", "path": "models/yolox_nano.onnx", "family": "yolox", "classes": ["car", "person"]},
        {"name": "lanes", "path": "models/twinlitenet.onnx", "family": "semseg"},
    ],
    "cameras": {"front": {"source": "media/driving/bdd_clip1.gif", "driving": {
        "collision": {"ttc_s": 2.0, "window": 8, "min_frames": 4, "classes": ["car"]},
        "drivable_zone": {"enabled": True, "min_frames": 3}}}},
}


def changed(path: Sequence[Any], value: Any = None, delete: bool = False) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    node = data
    for key in path[:-1]:
        node = node[key]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return data


@pytest.mark.parametrize("data, expected", [
    (changed(["models", 1, "path"], "models/nope.onnx"), "models[1].path: file not found: models/nope.onnx"),
    (changed(["model"], {"path": "models/yolox_nano.onnx"}), "models: give either `model` or `models`, not both"),
    (changed(["models"], delete=True), "model: required field is missing (or give `models`"),
    (changed(["models", 1, "name"], "det"), "models[1].name: duplicate model name 'det' (also models[0])"),
    (changed(["models", 1], {"path": "models/yolov8n_int8.onnx", "family": "yolov8"}),
     "models[1].family: only one detector model is tracked (models[0] is one)"),
    (changed(["models", 0, "family"], "semseg"), "models: needs one detector model (yolox, yolov8, yolov8-seg)"),
    (changed(["models", 1, "family"], "unet"), "models[1].family: Input should be"),
    (changed(["models", 1, "pth"], "x"), "models[1].pth: unknown key (did you mean 'path'?)"),
    (changed(["cameras", "front", "driving", "collision", "min_frames"], 9),
     "cameras.front.driving.collision: min_frames (9) must be <= window (8)"),
    (changed(["cameras", "front", "driving", "collision", "ego_path"], "corridor"),
     "cameras.front.driving.collision: ego_path 'corridor' needs an ego_corridor polygon"),
    (changed(["cameras", "front", "driving", "collision", "ego_corridor"], [[0, 0], [1, 1]]),
     "cameras.front.driving.collision.ego_corridor: needs at least 3 points, got 2"),
    (changed(["cameras", "front", "driving", "collision", "ttc_s"], 0), "cameras.front.driving.collision.ttc_s:"),
    (changed(["cameras", "front", "driving", "drivable_zon"], {}),
     "cameras.front.driving.drivable_zon: unknown key (did you mean 'drivable_zone'?)"),
    (changed(["mqtt"], {"snapshots": {"max_hz": 0}}), "mqtt.snapshots.max_hz: Input should be greater than 0"),
])
def test_models_and_driving_config_problems_name_the_field(assets: Path, data: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        parse(data, base_dir=assets)
    assert any(p.startswith(expected) for p in excinfo.value.problems), excinfo.value.problems


def test_single_model_section_still_works(assets: Path) -> None:
    data = changed(["models"], delete=True)
    data["model"] = {"path": "models/yolox_nano.onnx", "classes": ["car"]}
    del data["cameras"]["front"]["driving"]
    cfg = parse(data, base_dir=assets)
    assert [k for k, _ in cfg.model_sections] == ["model"]
    models = load_models(cfg)
    assert models.names == ["yolox_nano"] and models.segmenters == []


@pytest.mark.parametrize("edit, expected", [
    (lambda d: d["models"].pop(1), "cameras.front.driving.collision: ego_path 'auto' needs the 'drivable' mask"),
    (lambda d: d["models"][1].update(classes=["lane"]),
     "cameras.front.driving.drivable_zone.mask: no model gives mask 'drivable' (masks: lane)"),
    (lambda d: d["models"][1].update(classes=["road"]), "models[1].classes: unknown mask 'road'"),
    (lambda d: d["cameras"]["front"]["driving"]["collision"].update(classes=["tram"]),
     "cameras.front.driving.collision.classes: unknown class 'tram'"),
    (lambda d: d["models"][0].update(family="auto", path="models/twinlitenet.onnx", name="seg2"),
     "models: expected exactly one detector model (tracked), got 0"),
])
def test_models_are_checked_against_the_config(assets: Path, edit, expected: str) -> None:
    data = copy.deepcopy(BASE)
    edit(data)
    cfg = parse(data, base_dir=assets)
    with pytest.raises(ConfigError) as excinfo:
        load_models(cfg)
    assert any(p.startswith(expected) for p in excinfo.value.problems), excinfo.value.problems


def test_collision_with_corridor_only_needs_no_segmenter(assets: Path) -> None:
    data = copy.deepcopy(BASE)
    data["models"].pop(1)
    data["cameras"]["front"]["driving"] = {"collision": {"ego_corridor": CORRIDOR}}
    models = load_models(parse(data, base_dir=assets))
    assert models.names == ["det"] and not models.segmenters


def test_check_cli_names_the_model_field(assets: Path, tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(changed(["models", 1, "path"], "models/nope.onnx")))
    proc = subprocess.run([sys.executable, "-m", "edgecv.cli", "check", str(path)], capture_output=True, text=True,
                          env=edgecv_env(assets, tmp_path), timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("models[1].path: file not found: models/nope.onnx"), proc.stderr
    bad_family = changed(["models", 1, "family"], "yolov8")
    bad_family["models"][1]["name"] = "x"
    bad_family["models"][0]["family"] = "auto"
    path.write_text(yaml.safe_dump(bad_family))
    proc = subprocess.run([sys.executable, "-m", "edgecv.cli", "check", str(path)], capture_output=True, text=True,
                          env=edgecv_env(assets, tmp_path), timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("models[1].path: model "), proc.stderr
    assert "family 'yolov8' expects" in proc.stderr and proc.stderr.count("\n") == 1


def test_bench_driving_default_is_the_example_config(assets):
    """`edgecv bench driving` without --config runs what configs/driving.yaml describes (the installed package
    has no configs/ folder, so the default is built in)."""
    from edgecv.bench import DRIVING_CONFIG
    from edgecv.config import load, parse

    example = load(REPO / "configs" / "driving.yaml")
    built_in = parse(DRIVING_CONFIG, "built-in")
    assert built_in.models == example.models and built_in.tracker == example.tracker
    assert list(built_in.cameras) == list(example.cameras)
    for name, cam in built_in.cameras.items():
        assert (cam.source, cam.driving) == (example.cameras[name].source, example.cameras[name].driving)
