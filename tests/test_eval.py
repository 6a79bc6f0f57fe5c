"""`edgecv eval`: tracking metrics against motmetrics called directly, event truth from gt tracks, event
matching, suites, variants and the command line's errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import edgecv_env

from edgecv.analytics.rules import LineRule, ZoneRule
from edgecv.evaluation.events import EventScore, match_events, reference_events
from edgecv.evaluation.metrics import identities, score
from edgecv.evaluation.mot import FrameBoxes, MotSequence, load_gt, load_results
from edgecv.evaluation.runner import RunSpec, evaluate
from edgecv.evaluation.variants import apply, generic_rules, read_clip, write_clip
from edgecv.types import Event, ObjectInfo

pytestmark = pytest.mark.integration

TUD = "media/mot/TUD-Campus"
PETS = "media/mot/PETS09-S3-MF1"


def _cli(assets: Path, tmp_path: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgecv.cli", *args], capture_output=True, text=True,
                          env=edgecv_env(assets, tmp_path), timeout=timeout, cwd=tmp_path)


def _motmetrics_direct(gt_file: Path, result_file: Path) -> dict[str, float]:
    """motmetrics on the two files, through its own loader and IoU distance (NumPy 2 lacks np.asfarray,
    which motmetrics 1.4 still calls: it is put back for this call only)."""
    import motmetrics as mm

    restore = getattr(np, "asfarray", None)
    np.asfarray = lambda a, dtype=np.float64: np.asarray(a, dtype=dtype)  # type: ignore[attr-defined]
    try:
        gt = mm.io.loadtxt(str(gt_file), fmt="mot15-2D", min_confidence=1)
        ts = mm.io.loadtxt(str(result_file), fmt="mot15-2D")
        acc = mm.utils.compare_to_groundtruth(gt, ts, "iou", distth=0.5)
        names = ["mota", "idf1", "num_switches", "num_false_positives", "num_misses", "precision", "recall",
                 "mostly_tracked", "mostly_lost"]
        summary = mm.metrics.create().compute(acc, metrics=names, name="x")
    finally:
        if restore is None:
            del np.asfarray  # type: ignore[attr-defined]
    return {n: float(summary[n].iloc[0]) for n in names}


def test_eval_figures_equal_motmetrics_on_the_same_files(assets: Path, tmp_path: Path) -> None:
    seq = assets / TUD
    mot = tmp_path / "tud.txt"
    r = _cli(assets, tmp_path, "track", str(seq / "video.mp4"), "--model", "models/yolox_nano.onnx",
             "--classes", "person", "--mot", str(mot))
    assert r.returncode == 0, r.stderr
    r = _cli(assets, tmp_path, "eval", str(seq / "video.mp4"), "--gt", str(seq / "gt.txt"),
             "--model", "models/yolox_nano.onnx", "--json")
    assert r.returncode == 0, r.stderr
    ours = json.loads(r.stdout)["sequences"][0]
    assert ours["sequence"] == "TUD-Campus" and ours["frames"] == 71
    direct = _motmetrics_direct(seq / "gt.txt", mot)
    assert ours["mota"] == pytest.approx(direct["mota"], abs=1e-4)
    assert ours["idf1"] == pytest.approx(direct["idf1"], abs=1e-4)
    assert ours["precision"] == pytest.approx(direct["precision"], abs=1e-4)
    assert ours["recall"] == pytest.approx(direct["recall"], abs=1e-4)
    assert (ours["id_switches"], ours["fp"], ours["fn"]) == (
        direct["num_switches"], direct["num_false_positives"], direct["num_misses"])
    assert (ours["mostly_tracked"], ours["mostly_lost"]) == (direct["mostly_tracked"], direct["mostly_lost"])
    assert 0.3 < ours["mota"] <= 1.0 and ours["gt_ids"] == 8

    # the same file scored through --results gives the same figures; a perturbed copy scores lower
    r = _cli(assets, tmp_path, "eval", "--gt", str(seq / "gt.txt"), "--results", str(mot), "--json")
    assert r.returncode == 0, r.stderr
    same = json.loads(r.stdout)["sequences"][0]
    assert same["mota"] == pytest.approx(ours["mota"]) and same["idf1"] == pytest.approx(ours["idf1"])
    rows = np.loadtxt(mot, delimiter=",", ndmin=2)
    rng = np.random.default_rng(1)
    bad = rows.copy()
    bad[:, 2:4] += rng.normal(0, 8, (len(rows), 2))  # boxes off by a few pixels
    flip = rows[:, 0] > 35
    bad[flip, 1] = bad[flip, 1] * 100  # every track changes id half way
    perturbed = tmp_path / "perturbed.txt"
    np.savetxt(perturbed, bad, delimiter=",", fmt="%.2f")
    r = _cli(assets, tmp_path, "eval", "--gt", str(seq / "gt.txt"), "--results", str(perturbed), "--json")
    worse = json.loads(r.stdout)["sequences"][0]
    assert worse["mota"] < ours["mota"] - 0.02
    assert worse["idf1"] < ours["idf1"] - 0.05
    assert worse["id_switches"] > ours["id_switches"]
    direct_bad = _motmetrics_direct(seq / "gt.txt", perturbed)
    assert worse["mota"] == pytest.approx(direct_bad["mota"], abs=1e-4)


def test_not_scored_gt_boxes_neither_count_nor_penalise(tmp_path: Path) -> None:
    gt = tmp_path / "gt.txt"
    gt.write_text("1,1,10,10,20,40,1,1,1\n1,2,100,10,20,40,0,1,1\n2,1,12,10,20,40,1,1,1\n2,3,200,10,20,40,1,8,1\n")
    res = tmp_path / "res.txt"
    res.write_text("1,5,10,10,20,40,0.9,-1,-1,-1\n1,6,100,10,20,40,0.9,-1,-1,-1\n"
                   "2,5,12,10,20,40,0.9,-1,-1,-1\n2,7,200,10,20,40,0.9,-1,-1,-1\n2,8,300,10,20,40,0.9,-1,-1,-1\n")
    m = score(load_gt(gt), load_results(res))
    # the boxes on the flag-0 row and the distractor (class 8) are dropped; only id 8 at x=300 is a false positive
    assert (m["fp"], m["fn"], m["id_switches"]) == (1, 0, 0)
    assert m["mota"] == pytest.approx(0.5)


def _event(kind: str, frame: int, box: tuple, rule: str, **fields: object) -> Event:
    return Event(kind, "n", "c", frame, 0.0, ObjectInfo(1, "person", 0, 1.0, box, (640, 480)), fields, rule=rule)


def test_reference_events_from_synthetic_gt_tracks() -> None:
    """Two walkers through a line at x=300 (drawn top to bottom, so `in` is right to left) and a zone x >= 380:
    A walks right for 40 frames, B walks left and leaves the view after frame 30."""
    frames: dict[int, FrameBoxes] = {}
    for f in range(1, 41):
        ax = 50 + 10 * f  # A's anchor x: 60 .. 450
        bx = 500 - 10 * f  # B's anchor x: 490 .. 200
        ids, boxes = [1], [[ax - 10, 200, ax + 10, 260]]
        if f <= 30:
            ids.append(2)
            boxes.append([bx - 10, 300, bx + 10, 360])
        frames[f] = FrameBoxes(np.array(ids), np.array(boxes, float))
    gt = MotSequence(frames)
    line = LineRule("door", [[300, 0], [300, 480]], min_frames=2)
    zone = ZoneRule("yard", [[380, 0], [640, 0], [640, 480], [380, 480]], min_frames=2)
    events = reference_events([line, zone], gt, 0, ["person"], 10.0, (640, 480), 40, lost_buffer=5)
    got = sorted((e.type, e.object.track_id, e.fields.get("direction"), e.frame) for e in events)
    assert got == sorted([
        # A is on the line at frame 25 and right of it from 26; the second frame there (min_frames=2) counts
        ("line.cross", 1, "out", 27),
        # B is on the line at frame 20, left of it from 21
        ("line.cross", 2, "in", 22),
        # B starts inside the zone (its first confirmed state: an enter) and is outside from frame 13 (x=370)
        ("zone.enter", 2, None, 2),
        ("zone.exit", 2, None, 14),
        # A reaches x=380 at frame 33
        ("zone.enter", 1, None, 34),
    ])
    # an object that leaves the view while inside the zone exits when the tracker would drop it
    frames = {f: FrameBoxes(np.array([7]), np.array([[500.0, 100.0, 520.0, 160.0]])) for f in range(1, 11)}
    zone = ZoneRule("yard", [[380, 0], [640, 0], [640, 480], [380, 480]], min_frames=2)
    events = reference_events([zone], MotSequence(frames), 0, ["person"], 10.0, (640, 480), 30, lost_buffer=5)
    assert [(e.type, e.frame, e.fields.get("reason")) for e in events] == [("zone.enter", 2, None),
                                                                          ("zone.exit", 16, "lost")]


def test_event_matching_pairs_within_tolerance_and_overlap() -> None:
    box = (100.0, 100.0, 140.0, 200.0)
    far = (400.0, 100.0, 440.0, 200.0)
    ref = [_event("line.cross", 10, box, "door", direction="in"), _event("line.cross", 50, box, "door", direction="in"),
           _event("zone.enter", 20, box, "yard")]
    pred = [_event("line.cross", 12, box, "door", direction="in"),  # matches the first, 2 frames late
            _event("line.cross", 70, box, "door", direction="in"),  # 20 frames off: too late
            _event("line.cross", 50, box, "door", direction="out"),  # wrong direction
            _event("zone.enter", 21, far, "yard")]  # right time, another object
    scores = {s.key: s for s in match_events(pred, ref, tolerance=5)}
    cin = scores[("line.cross", "door", "in")]
    assert (cin.truth, cin.predicted, cin.matched) == (2, 2, 1)
    assert cin.precision == 0.5 and cin.recall == 0.5 and cin.count_error == 0
    cout = scores[("line.cross", "door", "out")]
    assert (cout.truth, cout.predicted, cout.matched, cout.count_error) == (0, 1, 0, 1)
    assert scores[("zone.enter", "yard", "")].matched == 0
    total = scores[("all", "", "")]
    assert (total.truth, total.predicted, total.matched) == (3, 4, 1)
    assert total.f1 == pytest.approx(2 * (1 / 4) * (1 / 3) / (1 / 4 + 1 / 3))
    assert EventScore(("x", "", ""), 0, 0, 0).f1 == 1.0  # nothing to find and nothing found
    missed = EventScore(("x", "", ""), 2, 0, 0)
    assert (missed.precision, missed.recall, missed.f1, missed.count_error) == (0.0, 0.0, 0.0, -2)


def test_eval_with_a_config_scores_events_against_truth_from_gt(assets: Path, tmp_path: Path) -> None:
    seq = assets / PETS
    cfg = {
        "node_id": "evaltest",
        "mqtt": {"enabled": False},
        "console": {"enabled": False},
        "model": {"path": "models/yolox_nano.onnx", "conf": 0.3, "classes": ["person"]},
        "cameras": {"pets": {"source": str(seq / "video.mp4"),
                             "lines": {"middle": {"points": [[384, 0], [384, 576]], "min_frames": 2}},
                             "zones": {"right": {"polygon": [[500, 0], [768, 0], [768, 576], [500, 576]]}}}},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = _cli(assets, tmp_path, "eval", str(seq / "video.mp4"), "--gt", str(seq / "gt.txt"), "--config", str(path))
    assert r.returncode == 0, r.stderr
    assert "events of PETS09-S3-MF1" in r.stdout and "line.cross middle in" in r.stdout
    result = evaluate(str(seq / "video.mp4"), str(seq / "gt.txt"), RunSpec(config=str(path)))
    keys = {e.key for e in result.events}
    assert ("line.cross", "middle", "in") in keys and ("line.cross", "middle", "out") in keys
    total = result.events[-1]
    assert total.truth > 5  # people walk across the middle and into the right side
    assert 0.5 < total.f1 <= 1.0
    assert result.metrics["mota"] > 0.6


def test_synthetic_pan_keeps_an_identity_only_with_compensation(assets: Path, tmp_path: Path) -> None:
    """PETS09 seen through a window that pans fast: with compensation a walker keeps one id, without it the
    same walker's track breaks."""
    clip = apply(read_clip(assets / PETS), "fastpan")
    folder = write_clip(clip, tmp_path / "pets-pan")
    results = {}
    for method in ("auto", "off"):
        cfg = {"node_id": "pan", "mqtt": {"enabled": False}, "console": {"enabled": False},
               "model": {"path": "models/yolox_nano.onnx", "conf": 0.3, "classes": ["person"]},
               "tracker": {"motion_compensation": method},
               "cameras": {"pan": {"source": str(folder / "video.avi")}}}
        path = tmp_path / f"{method}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        results[method] = evaluate(str(folder / "video.avi"), str(folder / "gt.txt"), RunSpec(config=str(path)))
    gt = load_gt(folder / "gt.txt")
    with_cmc = identities(gt, results["auto"].tracks)
    without = identities(gt, results["off"].tracks)
    kept_only_with = [g for g in with_cmc if len(with_cmc[g]) == 1 and len(without.get(g, [])) > 1]
    assert kept_only_with, f"with: {with_cmc}, without: {without}"
    assert results["auto"].metrics["id_switches"] < results["off"].metrics["id_switches"]
    assert results["auto"].metrics["idf1"] > results["off"].metrics["idf1"]


def test_suite_runs_every_sequence_and_prints_the_mean(assets: Path, tmp_path: Path) -> None:
    suite = tmp_path / "suite"
    for name, spec in (("a", "drop3"), ("b", "half+drop3")):
        write_clip(apply(read_clip(assets / TUD), spec), suite / name)
    r = _cli(assets, tmp_path, "eval", "--suite", str(suite), "--model", "models/yolox_nano.onnx")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:3] == ["sequence", "MOTA", "IDF1"]
    assert [ln.split()[0] for ln in lines[2:]] == ["a", "b", "mean"]
    assert "events" not in r.stdout.split("events F1")[1]  # no rules: no event table
    # a sequence folder's rules.yaml adds event accuracy; the suite's events are pooled over sequences
    for name in ("a", "b"):
        (suite / name / "rules.yaml").write_text(yaml.safe_dump(generic_rules(read_clip(suite / name).size)))
    r = _cli(assets, tmp_path, "eval", "--suite", str(suite), "--model", "models/yolox_nano.onnx", "--json")
    data = json.loads(r.stdout)
    assert [s["sequence"] for s in data["sequences"]] == ["a", "b"]
    assert data["mean"]["mota"] == pytest.approx((data["sequences"][0]["mota"] + data["sequences"][1]["mota"]) / 2,
                                                 abs=1e-3)
    total = [e for e in data["events"] if e["type"] == "all"][0]
    per_seq = [[e for e in s["events"] if e["type"] == "all"][0] for s in data["sequences"]]
    assert total["truth"] == sum(e["truth"] for e in per_seq) > 0
    assert total["matched"] == sum(e["matched"] for e in per_seq)
    assert data["mean"]["event_f1"] == total["f1"]


@pytest.mark.parametrize("args, message", [
    (["--gt", "nope.txt", "--results", "nope.txt"], "--gt: file not found: nope.txt"),
    (["x.mp4"], "--gt GT.txt is required"),
    (["--suite", "nosuch"], "--suite: not a folder: nosuch"),
    (["VIDEO", "--gt", "GT"], "give --config CONFIG or --model MODEL"),
])
def test_eval_errors_are_one_line(assets: Path, tmp_path: Path, args: list[str], message: str) -> None:
    if "VIDEO" in args:
        args = [str(assets / TUD / "video.mp4"), "--gt", str(assets / TUD / "gt.txt")]
    if args[:1] == ["--suite"]:
        args += ["--model", "models/yolox_nano.onnx"]
    r = _cli(assets, tmp_path, "eval", *args)
    assert r.returncode in (1, 2)
    assert message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_eval_rejects_a_malformed_gt_file_and_an_unknown_camera(assets: Path, tmp_path: Path) -> None:
    bad = tmp_path / "gt.txt"
    bad.write_text("1,1,10,10,20,40,1,1,1\n2,1,ten,10,20,40\n")
    r = _cli(assets, tmp_path, "eval", str(assets / TUD / "video.mp4"), "--gt", str(bad),
             "--model", "models/yolox_nano.onnx")
    assert r.returncode == 1 and f"--gt: {bad}:2: expected numbers" in r.stderr
    for rows in ("", "1,1,10,10,20,40,0,1,1\n"):  # nothing to score: empty, or every box flagged "not scored"
        bad.write_text(rows)
        r = _cli(assets, tmp_path, "eval", str(assets / TUD / "video.mp4"), "--gt", str(bad),
                 "--model", "models/yolox_nano.onnx")
        assert r.returncode == 1 and f"--gt: {bad}: no box to score against" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "-inf" not in r.stdout
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"node_id": "x", "model": {"path": "models/yolox_nano.onnx"},
                                   "cameras": {"front": {"source": str(assets / TUD / "video.mp4")}}}))
    r = _cli(assets, tmp_path, "eval", str(assets / TUD / "video.mp4"), "--gt", str(assets / TUD / "gt.txt"),
             "--config", str(cfg), "--camera", "back")
    assert r.returncode == 1 and "--camera: no camera 'back' in the config (cameras: front)" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_variants_command_writes_sequences_with_shifted_gt(assets: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "TUD").mkdir(parents=True)
    for f in ("video.mp4", "gt.txt", "seqinfo.ini"):
        (src / "TUD" / f).symlink_to(assets / TUD / f)
    r = _cli(assets, tmp_path, "variants", str(src), str(tmp_path / "out"), "--variants", "pan,drop2,half", "--rules")
    assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["TUD", "TUD~drop2", "TUD~half", "TUD~pan"]
    rules = yaml.safe_load((tmp_path / "out" / "TUD~half" / "rules.yaml").read_text())
    assert rules["lines"]["vertical"]["points"] == [[160.0, 0], [160.0, 239]]  # placed by the half frame size
    base, half = load_gt(tmp_path / "out" / "TUD" / "gt.txt"), load_gt(tmp_path / "out" / "TUD~half" / "gt.txt")
    assert np.allclose(half.frames[5].xyxy, base.frames[5].xyxy / 2, atol=0.01)
    drop = load_gt(tmp_path / "out" / "TUD~drop2" / "gt.txt")
    assert drop.last_frame == 36 and np.allclose(drop.frames[2].xyxy, base.frames[3].xyxy, atol=0.01)
    assert "frameRate=12.5" in (tmp_path / "out" / "TUD~drop2" / "seqinfo.ini").read_text()
    r = _cli(assets, tmp_path, "variants", str(src), str(tmp_path / "o2"), "--variants", "spin")
    assert r.returncode == 1 and "--variants: unknown variant 'spin'" in r.stderr


def test_rules_file_errors_name_the_field(assets: Path, tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"lines": {"door": {"points": [[1, 2]]}}}))
    r = _cli(assets, tmp_path, "eval", str(assets / TUD / "video.mp4"), "--gt", str(assets / TUD / "gt.txt"),
             "--model", "models/yolox_nano.onnx", "--rules", str(rules))
    assert r.returncode == 2  # a command-line value that cannot be used, like an invalid config
    assert "--rules: lines.door.points: needs exactly 2 points, got 1" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    rules.write_text("cameras: {}\n")
    r = _cli(assets, tmp_path, "eval", str(assets / TUD / "video.mp4"), "--gt", str(assets / TUD / "gt.txt"),
             "--model", "models/yolox_nano.onnx", "--rules", str(rules))
    assert r.returncode in (1, 2) and "expected a mapping with only `zones` and `lines`" in r.stderr


def _kitti_suite(assets: Path, tmp_path: Path) -> Path:
    suite = tmp_path / "kitti"
    for name in ("KITTI-tracking-0003-f000-015", "KITTI-tracking-0005-f000-015"):
        (suite / name).mkdir(parents=True)
        for f in ("video.mp4", "gt.txt", "seqinfo.ini"):
            (suite / name / f).symlink_to(assets / "media" / "mot" / name / f)
    return suite


def test_bench_trackers_runs_the_peers_on_edgecv_detections(assets: Path, tmp_path: Path) -> None:
    """The roboflow trackers (installed by scripts/peers.sh into .venv-peers) on the detections edgecv's
    pipeline made; edgecv's own row is what `edgecv eval` gives."""
    from conftest import REPO

    peers = REPO / ".venv-peers" / "bin" / "python"
    if not peers.exists():
        pytest.fail("the peer trackers are not installed: run scripts/peers.sh (scripts/test.sh does)")
    suite = _kitti_suite(assets, tmp_path)
    r = _cli(assets, tmp_path, "bench", "trackers", "--suite", str(suite))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for name in ("bytetrack", "ocsort", "botsort", "cbiou", "mcbyte"):
        assert len([ln for ln in out.splitlines() if ln.split()[:1] == [name] or f" {name} " in ln]) == 2
    assert "at or above on both" in out and "mean / count (2)" in out
    r = _cli(assets, tmp_path, "eval", "--suite", str(suite), "--model", "models/yolox_nano.onnx", "--json")
    ours = {s["sequence"]: s for s in json.loads(r.stdout)["sequences"]}
    for name, seq in ours.items():
        row = next(ln for ln in out.splitlines() if ln.startswith(name) and "edgecv" in ln).split()
        assert float(row[2]) == pytest.approx(seq["mota"], abs=6e-4)  # the table rounds to 3 digits, JSON to 4
        assert float(row[3]) == pytest.approx(seq["idf1"], abs=6e-4)
    r = _cli(assets, tmp_path, "bench", "trackers", "--suite", str(suite), "--peers-python", "/nonexistent/python")
    assert r.returncode == 1 and "run scripts/peers.sh" in r.stderr and len(r.stderr.strip().splitlines()) == 1
