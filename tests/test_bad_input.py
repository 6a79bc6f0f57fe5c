"""Bad inputs as a user meets them: damaged videos, files that are not models, models of the wrong family,
and one broken camera among good ones. Each gives its one-line message, no traceback, the README's exit code.

(A text file or an empty file as the video: tests/test_daemon.py::test_unreadable_video_fails_the_camera_with_one_line.)
"""
from __future__ import annotations

import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from broker import Subscriber
from conftest import edgecv_env

pytestmark = pytest.mark.integration

VTEST_FRAMES = 795


def write_config(path: Path, cameras: dict, model: dict | None = None, mqtt: dict | None = None) -> Path:
    cfg = {
        "node_id": "t1",
        "mqtt": mqtt or {"enabled": False},
        "console": {"enabled": False},
        "model": model or {"path": "models/yolox_nano.onnx", "classes": ["person"]},
        "cameras": cameras,
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def edgecv(args: list[str], assets: Path, tmp_path: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgecv.cli", *args], env=edgecv_env(assets, tmp_path),
                          capture_output=True, text=True, timeout=timeout)


def no_traceback(proc: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr


def problem_lines(stderr: str) -> list[str]:
    """stderr without the daemon's informational log lines."""
    return [ln for ln in stderr.strip().splitlines() if not re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO ", ln)]


def state_lines(stderr: str, camera: str) -> list[str]:
    return re.findall(rf"camera {camera}: (?:connecting|streaming|stalled|stopped|failed)\b.*", stderr)


def processed(stderr: str, camera: str) -> int:
    m = re.search(rf"camera {camera}: (\d+) frames read, (\d+) processed", stderr)
    assert m, stderr
    return int(m.group(2))


def damaged_copy(vtest: Path, out: Path, start: int, length: int, seed: int = 7) -> Path:
    data = bytearray(vtest.read_bytes())
    data[start:start + length] = random.Random(seed).randbytes(length)
    out.write_bytes(bytes(data))
    return out


# ---- videos

@pytest.mark.parametrize("kb, code, last_state", [
    # the AVI headers cut short: nothing to open
    (2, 1, r"failed \(cannot open video file .*truncated\.avi: not a video or unsupported format\)"),
    # headers and about 100 frames: those are played, then the end says the file is short
    (1024, 0, r"stopped \(end of file after (\d+) of 795 frames: the file is truncated or damaged\)"),
])
def test_truncated_video_plays_what_it_can_then_ends_clearly(assets, vtest, tmp_path, kb, code, last_state):
    video = tmp_path / "truncated.avi"
    video.write_bytes(vtest.read_bytes()[:kb * 1024])
    cfg = write_config(tmp_path / "c.yaml", {"cam": {"source": str(video), "realtime": False}})
    proc = edgecv(["run", str(cfg)], assets, tmp_path)
    no_traceback(proc)
    assert proc.returncode == code, proc.stderr
    states = state_lines(proc.stderr, "cam")
    m = re.fullmatch(f"camera cam: {last_state}", states[-1])
    assert m, states
    assert len(states) == len(set(states)), f"each state change is logged once: {states}"
    if m.groups():
        played = int(m.group(1))
        assert 50 < played < VTEST_FRAMES and processed(proc.stderr, "cam") == played, proc.stderr
        assert "streaming (768x576" in states[1]
    # only our one-line messages: no FFmpeg decoder chatter about the damaged tail
    noise = [ln for ln in proc.stderr.splitlines() if not re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", ln)]
    assert not noise, noise


def test_track_on_a_truncated_video_warns_that_it_ended_early(assets, vtest, tmp_path):
    """`edgecv track` (and `eval`) log only warnings: a short file must still say it was short, once, while
    the whole video ending says nothing."""
    video = tmp_path / "truncated.avi"
    video.write_bytes(vtest.read_bytes()[:1024 * 1024])
    proc = edgecv(["track", str(video), "--model", "models/yolox_nano.onnx", "--mot", str(tmp_path / "t.txt"),
                   "--classes", "person"], assets, tmp_path)
    no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    warned = re.findall(r"WARNING .*camera video: stopped \(end of file after (\d+) of 795 frames: "
                        r"the file is truncated or damaged\)", proc.stderr)
    played = int(re.search(r"(\d+) frames processed", proc.stdout + proc.stderr).group(1))
    assert warned == [str(played)] and 50 < played < VTEST_FRAMES, proc.stderr
    whole = edgecv(["track", str(assets / "media" / "mot" / "TUD-Campus" / "video.mp4"), "--model",
                    "models/yolox_nano.onnx", "--mot", str(tmp_path / "w.txt"), "--classes", "person"], assets, tmp_path)
    assert whole.returncode == 0 and "71 frames processed" in whole.stdout + whole.stderr, whole.stderr
    assert "WARNING" not in whole.stderr, whole.stderr


def test_garbage_bytes_named_avi_fail_the_camera_in_one_line(assets, tmp_path):
    video = tmp_path / "garbage.avi"
    video.write_bytes(random.Random(1).randbytes(300_000))
    cfg = write_config(tmp_path / "c.yaml", {"cam": {"source": str(video), "realtime": False}})
    proc = edgecv(["run", str(cfg)], assets, tmp_path)
    no_traceback(proc)
    assert proc.returncode == 1  # every camera failed
    assert state_lines(proc.stderr, "cam")[-1] == \
        f"camera cam: failed (cannot open video file {video}: not a video or unsupported format)"
    assert [ln for ln in proc.stderr.splitlines() if "ERROR" in ln] == \
        [ln for ln in proc.stderr.splitlines() if f"ERROR   edgecv: camera cam: cannot open video file {video}" in ln]


def test_video_damaged_in_the_middle_plays_through(assets, vtest, tmp_path):
    video = damaged_copy(vtest, tmp_path / "damaged.avi", start=2_000_000, length=400_000)
    cfg = write_config(tmp_path / "c.yaml", {"cam": {"source": str(video), "realtime": False}})
    proc = edgecv(["run", str(cfg)], assets, tmp_path)
    no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    states = state_lines(proc.stderr, "cam")
    assert states[-1].startswith("camera cam: stopped (end of file"), states
    assert processed(proc.stderr, "cam") > 600  # decoding resumes after the damaged stretch


# ---- models

def _not_onnx(kind: str, tmp_path: Path, assets: Path) -> Path:
    path = tmp_path / f"{kind}.onnx"
    if kind == "random":
        path.write_bytes(random.Random(3).randbytes(50_000))
    elif kind == "truncated":
        path.write_bytes((assets / "models" / "yolox_nano.onnx").read_bytes()[:200_000])
    else:
        path.write_text("not a model\n")
    return path


@pytest.mark.parametrize("kind", ["random", "truncated", "text"])
@pytest.mark.parametrize("command, code, prefix", [
    ("check", 2, "model.path: "),  # a config problem naming the field, the same for check and run
    ("run", 2, "model.path: "),
])
def test_model_that_is_not_onnx_gives_one_line(assets, vtest, tmp_path, kind, command, code, prefix):
    model = _not_onnx(kind, tmp_path, assets)
    cfg = write_config(tmp_path / "c.yaml", {"cam": {"source": str(vtest)}}, model={"path": str(model)})
    proc = edgecv([command, str(cfg)], assets, tmp_path, timeout=120)
    no_traceback(proc)
    assert proc.returncode == code, proc.stderr
    lines = problem_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"{prefix}model {model}: expected an ONNX model"), lines[0]


@pytest.mark.parametrize("model, expected", [
    # a two-output segmentation model is not a one-output detector
    ("twinlitenet.onnx", r"family 'yolox' expects 1 output, got 2 \(da, ll\)"),
    # a YOLOv8 head is (1, 4+C, N); YOLOX's is (1, N, 5+C)
    ("yolov8n_int8.onnx", r"family 'yolox' expects output \(1, N, 5\+C\), got \(1, 84, 8400\)"),
])
@pytest.mark.parametrize("command, code, prefix", [("check", 2, "model.path: "), ("run", 2, "model.path: ")])
def test_model_of_another_family_names_model_and_expected_vs_actual_output(
        assets, vtest, tmp_path, model, expected, command, code, prefix):
    cfg = write_config(tmp_path / "c.yaml", {"cam": {"source": str(vtest)}},
                       model={"path": f"models/{model}", "family": "yolox"})
    proc = edgecv([command, str(cfg)], assets, tmp_path, timeout=120)
    no_traceback(proc)
    assert proc.returncode == code, proc.stderr
    lines = problem_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert re.fullmatch(rf"{re.escape(prefix)}model \S*/{re.escape(model)}: {expected}", lines[0]), lines[0]


# ---- one bad camera among good ones

def test_a_corrupt_camera_fails_while_the_good_one_processes_and_publishes(assets, vtest, broker, tmp_path):
    bad = tmp_path / "corrupt.avi"
    bad.write_bytes(random.Random(5).randbytes(200_000))
    frames = 150
    cfg = write_config(tmp_path / "two.yaml", {
        "good": {"source": str(vtest), "realtime": False},
        "bad": {"source": str(bad), "realtime": False},
    }, mqtt={"host": "127.0.0.1", "port": broker.port, "spool": {"path": str(tmp_path / "spool")}})
    sub = Subscriber(broker.port, ["edgecv/t1/+/events", "edgecv/t1/stats"])
    try:
        proc = edgecv(["run", str(cfg), "--max-frames", str(frames)], assets, tmp_path)
        no_traceback(proc)
        assert proc.returncode == 0, proc.stderr  # 0 unless every camera failed
        bad_states = state_lines(proc.stderr, "bad")
        assert bad_states[-1] == f"camera bad: failed (cannot open video file {bad}: not a video or unsupported format)"
        assert f"ERROR   edgecv: camera bad: cannot open video file {bad}" in proc.stderr
        assert processed(proc.stderr, "good") == frames, proc.stderr
        n_events = int(re.search(r"camera good: \d+ frames read, \d+ processed, \d+ dropped, (\d+) events",
                                 proc.stderr).group(1))
        assert n_events > 0
        assert sub.wait_for(lambda ms: len([m for m in ms if m.topic.endswith("/events")]) >= n_events, 30), \
            f"{len(sub.snapshot())} messages"
        events = [m.json() for m in sub.snapshot() if m.topic.endswith("/events")]
        assert {e["camera"] for e in events} == {"good"}
        assert len({e["id"] for e in events}) == n_events and max(e["frame"] for e in events) <= frames
        assert sub.wait_for(lambda ms: any(m.topic.endswith("/stats") for m in ms), 10)
        stats = [m.json() for m in sub.snapshot() if m.topic.endswith("/stats")][-1]
        assert stats["cameras"]["bad"]["state"] == "failed"
        assert stats["cameras"]["good"]["frames_processed"] == frames
    finally:
        sub.close()


def test_every_camera_failing_exits_1_naming_each(assets, tmp_path):
    cams = {}
    for name, content in (("a", random.Random(8).randbytes(100_000)), ("b", b"\x00" * 100_000)):
        p = tmp_path / f"{name}.avi"
        p.write_bytes(content)
        cams[name] = {"source": str(p), "realtime": False}
    cfg = write_config(tmp_path / "c.yaml", cams)
    proc = edgecv(["run", str(cfg)], assets, tmp_path)
    no_traceback(proc)
    assert proc.returncode == 1
    for name in cams:
        assert state_lines(proc.stderr, name)[-1].startswith(f"camera {name}: failed (cannot open video file")
        assert f"ERROR   edgecv: camera {name}: cannot open video file" in proc.stderr
