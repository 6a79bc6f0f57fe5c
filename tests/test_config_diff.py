"""config_diff: what a reload applies live and what needs a restart, section by section (pure, no daemon)."""
from __future__ import annotations

import copy

import pytest

from edgecv.config import parse
from edgecv.config_diff import applied, diff

BASE = {
    "node_id": "n1",
    "model": {"path": "yolox_nano.onnx", "conf": 0.3},
    "cameras": {
        "gate": {"source": "media/vtest.avi", "zones": {"door": {"polygon": [[0, 0], [10, 0], [10, 10]]}},
                 "lines": {"l1": {"points": [[0, 5], [10, 5]]}}},
        "yard": {"source": "media/vtest.avi"},
    },
}
TWO_MODELS = {**{k: v for k, v in BASE.items() if k != "model"},
              "models": [{"path": "twinlitenet.onnx", "family": "semseg"}, {"path": "yolox_nano.onnx", "name": "det"}]}


def cfg(data: dict, **edits):
    """A parsed config from ``data`` after setting dotted paths (``cameras.gate.max_fps=5``)."""
    data = copy.deepcopy(data)
    for dotted, value in edits.items():
        *path, last = dotted.split(".")
        node = data
        for key in path:
            node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
        node[last] = value
    return parse(data)


def edit(**edits):
    return cfg(BASE, **{k.replace("__", "."): v for k, v in edits.items()})


def test_no_change_is_empty():
    change = diff(edit(), edit(), "yolox_nano")
    assert (change.rules, change.tracker, change.detector, change.restart) == ((), False, None, ())
    assert change.live == []


@pytest.mark.parametrize("section,value", [
    ("cameras__gate__zones__door__min_frames", 7),
    ("cameras__gate__lines__l1__cooldown_s", 2.0),
    ("cameras__gate__objects__lost", False),
    ("cameras__gate__driving", {"collision": {"enabled": True, "ego_corridor": [[0, 0], [5, 0], [5, 5]]}}),
])
def test_rule_sections_apply_live_to_their_camera_only(section, value):
    old, new = edit(), edit(**{section: value})
    change = diff(old, new, "yolox_nano")
    assert change.rules == ("gate",) and change.restart == () and not change.tracker
    assert change.live == ["cameras.gate rules"]
    running = applied(old, new, change)
    assert running.cameras["gate"] == new.cameras["gate"] and running.cameras["yard"] == old.cameras["yard"]


@pytest.mark.parametrize("section,value", [
    ("cameras__gate__source", "media/mot/TUD-Campus/video.mp4"), ("cameras__gate__max_fps", 5.0), ("cameras__gate__loop", True),
    ("cameras__gate__reconnect__max_s", 9.0),
])
def test_source_settings_need_a_restart_and_keep_running_values(section, value):
    old, new = edit(), edit(**{section: value})
    change = diff(old, new, "yolox_nano")
    assert change.restart == ("cameras.gate source settings",) and change.rules == ()
    assert applied(old, new, change).cameras["gate"] == old.cameras["gate"]


def test_cameras_added_and_removed_need_a_restart():
    old = edit()
    data = copy.deepcopy(BASE)
    del data["cameras"]["yard"]
    data["cameras"]["dock"] = {"source": "media/vtest.avi"}
    new = parse(data)
    change = diff(old, new, "yolox_nano")
    assert change.restart == ("new camera dock", "removed camera yard")
    assert set(applied(old, new, change).cameras) == {"gate", "yard"}


def test_tracker_applies_live():
    old, new = edit(), edit(tracker__lost_buffer_s=3.0)
    change = diff(old, new, "yolox_nano")
    assert change.tracker and change.restart == () and change.live == ["tracker"]
    assert applied(old, new, change).tracker.lost_buffer_s == 3.0


@pytest.mark.parametrize("key,value", [("conf", 0.5), ("iou", 0.6), ("classes", ["person"])])
def test_detector_thresholds_apply_live(key, value):
    old, new = edit(), edit(**{f"model__{key}": value})
    change = diff(old, new, "yolox_nano")
    assert change.detector == "model" and change.restart == () and change.live == ["model thresholds"]
    assert getattr(applied(old, new, change).models[0], key) == value


@pytest.mark.parametrize("key,value", [("path", "yolov8n_int8.onnx"), ("backend", "onnxruntime"), ("threads", 2),
                                       ("family", "yolox")])
def test_other_model_settings_need_a_restart(key, value):
    old, new = edit(), edit(**{f"model__{key}": value})
    change = diff(old, new, "yolox_nano")
    assert change.restart == ("models",) and change.detector is None and change.models_changed
    assert applied(old, new, change).models == old.models


def test_only_the_detectors_thresholds_are_live_among_several_models():
    old = cfg(TWO_MODELS)
    new = cfg(TWO_MODELS, **{"models.0.conf": 0.9, "models.1.conf": 0.6})
    change = diff(old, new, "det")
    assert change.detector == "models[1]" and change.restart == ("models[0] thresholds",)
    running = applied(old, new, change)
    assert running.models[1].conf == 0.6 and running.models[0].conf == old.models[0].conf


@pytest.mark.parametrize("section,value", [("node_id", "n2"), ("log_level", "debug"), ("failure_limit", 9),
                                           ("console", {"format": "json"}), ("mqtt", {"port": 1999})])
def test_process_wide_sections_need_a_restart(section, value):
    old, new = edit(), edit(**{section: value})
    change = diff(old, new, "yolox_nano")
    assert change.restart == (section,) and change.live == []
    assert getattr(applied(old, new, change), section) == getattr(old, section)


def test_several_changes_at_once():
    old = edit()
    new = edit(tracker__min_hits=3, cameras__yard__objects__new=False, cameras__gate__max_fps=4.0, model__conf=0.4,
               log_level="warning")
    change = diff(old, new, "yolox_nano")
    assert change.rules == ("yard",) and change.tracker and change.detector == "model"
    assert change.restart == ("cameras.gate source settings", "log_level")


def test_a_retuned_detector_decodes_with_the_new_thresholds_and_leaves_the_shared_one(assets, vtest):
    """What a reload hands to each camera worker: a copy decoding with the new conf and classes."""
    import cv2

    from edgecv.engine.registry import build_detector
    from edgecv.models import ModelSet, retuned
    from edgecv.types import Frame

    detector = build_detector(assets / "models" / "yolox_nano.onnx", conf=0.3)
    models = ModelSet(detector)
    cap = cv2.VideoCapture(str(vtest))
    ok, image = cap.read()
    cap.release()
    assert ok
    prepared = models.prepare(Frame(camera="c", index=1, t_mono=0.0, t_wall=0.0, image=image))
    outputs, placements = models.infer(0, [prepared])
    before, _ = models.decode(placements, [outputs])
    strict = retuned(detector, cfg(BASE, **{"model.conf": 0.7, "model.classes": ["person"]}).models[0])
    after, _ = models.decode(placements, [outputs], strict)
    assert len(before) > len(after) > 0
    assert after.score.min() >= 0.7 and set(after.class_id.tolist()) == {0}
    assert before.score.min() < 0.7 and detector.conf == 0.3 and detector.class_filter is None
