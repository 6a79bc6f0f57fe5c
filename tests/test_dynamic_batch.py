"""Cross-camera batching: `edgecv model dynamic-batch` (a fixed-batch ONNX model rewritten to a dynamic batch,
checked on real frames), what it refuses, `model.batch` (the inference thread's chunk size) and `edgecv bench batch`.

The shared detectors are rewritten once per module; every frame's outputs at batch 1 and 4 are compared with the
original model's on that frame alone, here independently of the tool's own check."""
from __future__ import annotations

import contextlib
import io
import logging
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_models import save_graph

from edgecv import EdgecvError
from edgecv.cli import main
from edgecv.config import ConfigError, parse
from edgecv.engine.onnx_batch import (
    BATCH_DIM,
    check_batching,
    make_dynamic,
    sample_frames,
)
from edgecv.engine.registry import build_detector
from edgecv.models import load_models
from edgecv.pipeline import Pipeline
from edgecv.types import Event

DETECTORS = ["yolox_nano.onnx", "yolov8n_int8.onnx"]


def cpu_session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def rewritten(assets: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    """Each shared detector rewritten by the command: (the new model, what the command printed)."""
    out = tmp_path_factory.mktemp("dynamic")
    made = {}
    for name in DETECTORS:
        dst = out / name
        argv = ["model", "dynamic-batch", str(assets / "models" / name), str(dst),
                "--video", str(assets / "media" / "vtest.avi")]
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            assert main(argv) == 0
        made[name] = (dst, printed.getvalue())
    return made


@pytest.mark.parametrize("name", DETECTORS)
def test_shared_detector_outputs_at_batch_1_and_4_equal_the_original(name: str, assets: Path, vtest: Path,
                                                                    rewritten: dict) -> None:
    src = assets / "models" / name
    dst, printed = rewritten[name]
    model = onnx.load(str(dst))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == BATCH_DIM
    assert all(o.type.tensor_type.shape.dim[0].dim_param == BATCH_DIM for o in model.graph.output)
    assert "fixed batch 1" in printed and "batch 1: max abs diff" in printed and "batch 4: max abs diff" in printed
    assert f"wrote {dst}" in printed
    adapter = build_detector(src, backend="onnxruntime")
    frames = sample_frames(vtest, 4)
    x = np.stack([adapter.preprocess(f)[0] for f in frames])
    assert len({hash(t.tobytes()) for t in x}) == 4  # four different frames
    original, dynamic = cpu_session(src), cpu_session(dst)
    feed = original.get_inputs()[0].name
    reference = [original.run(None, {feed: x[i:i + 1]}) for i in range(4)]
    stacked = dynamic.run(None, {feed: x})
    for i in range(4):
        alone = dynamic.run(None, {feed: x[i:i + 1]})
        for ref, one, many in zip(reference[i], alone, stacked):
            assert one.shape == ref.shape and many.shape == (4, *ref.shape[1:])
            np.testing.assert_allclose(one, ref, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(many[i:i + 1], ref, rtol=1e-5, atol=1e-5)


def test_int8_model_gets_its_quantization_range_per_frame(rewritten: dict) -> None:
    """yolov8n_int8 quantizes activations with one range over the whole tensor (DynamicQuantizeLinear): batched
    as it is, a frame's result would depend on the other frames; the rewrite makes the range per frame."""
    _, printed = rewritten["yolov8n_int8.onnx"]
    assert "DynamicQuantizeLinear: quantization range per frame" in printed
    assert "Reshape '/model.22/dfl/Reshape': shape (1, 4, 16, 8400) -> (0, 4, 16, 8400)" in printed


def edgecv(*args: str, setup: str = "") -> subprocess.CompletedProcess:
    """The command line in a child process (``setup``: Python run before it)."""
    code = f"import sys; {setup or 'pass'}; from edgecv.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], check=False, capture_output=True, text=True, timeout=600)


def test_an_already_dynamic_model_is_said_so_checked_and_copied(rewritten: dict, tmp_path: Path, vtest: Path) -> None:
    src, _ = rewritten["yolox_nano.onnx"]
    dst = tmp_path / "again.onnx"
    proc = edgecv("model", "dynamic-batch", str(src), str(dst), "--video", str(vtest), "--batch", "3")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "already dynamic" in out and "nothing to rewrite" in out and "batch 3: max abs diff 0" in out
    assert dst.read_bytes() == src.read_bytes()


# --------------------------------------------------------------------------------------------------------------
# Tiny graphs: what is rewritten, what is refused.

def tiny(nodes: list, out_shape: list, inits: tuple = (), shape: tuple = (1, 3, 8, 8)) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("images", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, out_shape)],
                              initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in inits])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def const_node(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value)))


FIXABLE = {
    "reshape shape from a Constant node": (
        [const_node("s", np.array([1, 3, -1], np.int64)), helper.make_node("Reshape", ["images", "s"], ["r"]),
         helper.make_node("Relu", ["r"], ["out"])], [1, 3, 64], ()),
    "reshape shape concatenated from constants": (
        [helper.make_node("Concat", ["a", "b"], ["s"], axis=0), helper.make_node("Reshape", ["images", "s"], ["out"])],
        [1, 192], (("a", np.array([1], np.int64)), ("b", np.array([-1], np.int64)))),
    "resize to sizes naming the batch": (
        [helper.make_node("Resize", ["images", "", "", "sizes"], ["out"], mode="nearest")], [1, 3, 16, 16],
        (("sizes", np.array([1, 3, 16, 16], np.int64)),)),
    "slice of the batch axis up to the fixed batch": (
        [helper.make_node("Slice", ["images", "st", "en", "ax"], ["out"])], [1, 3, 8, 4],
        (("st", np.array([0, 0], np.int64)), ("en", np.array([1, 4], np.int64)), ("ax", np.array([0, 3], np.int64)))),
    "expand of a batched tensor": (
        [helper.make_node("Expand", ["images", "shape"], ["out"])], [1, 3, 8, 8],
        (("shape", np.array([1, 3, 8, 8], np.int64)),)),
}


@pytest.mark.parametrize("case", sorted(FIXABLE))
def test_constants_that_name_the_batch_are_rewritten_and_checked(case: str, tmp_path: Path) -> None:
    nodes, out_shape, inits = FIXABLE[case]
    original = tmp_path / "original.onnx"
    onnx.save(tiny(nodes, out_shape, inits), str(original))
    model, report = make_dynamic(onnx.load(str(original)))
    assert not report.already_dynamic and report.batch == 1
    if case != "expand of a batched tensor":  # Expand to a batch of 1 broadcasts: nothing to change
        assert report.changes, case
    dynamic = tmp_path / "dynamic.onnx"
    onnx.save(model, str(dynamic))
    x = np.random.default_rng(0).normal(size=(3, 3, 8, 8)).astype(np.float32)
    check = check_batching(original, dynamic, x)
    assert check.frames == 3 and check.max_abs_diff == {1: 0.0, 3: 0.0}


REFUSED = {
    "a constant of batch 1 joined to the frames": (
        [helper.make_node("Concat", ["images", "coords"], ["out"], axis=1)], [1, 4, 8, 8],
        (("coords", np.zeros((1, 1, 8, 8), np.float32)),), "joins the frames' tensors with 'coords'"),
    "a reshape merging the batch": (
        [helper.make_node("Reshape", ["images", "s"], ["r"]), helper.make_node("Reshape", ["r", "back"], ["out"])],
        [1, 3, 8, 8], (("s", np.array([3, 64], np.int64)), ("back", np.array([1, 3, 8, 8], np.int64))),
        "reshapes (1, 3, 8, 8) to (3, 64): the batch would mix"),
    "a reduction over every axis": (
        [helper.make_node("ReduceMean", ["images"], ["m"], keepdims=1),
         helper.make_node("Sub", ["images", "m"], ["out"])],
        [1, 3, 8, 8], (), "reduces over every axis, the batch included"),
    "a transpose moving the batch": (
        [helper.make_node("Transpose", ["images"], ["out"], perm=[1, 0, 2, 3])], [3, 1, 8, 8], (),
        "moves the batch axis"),
    "a tile of the batch": (
        [helper.make_node("Tile", ["images", "rep"], ["out"])], [2, 3, 8, 8],
        (("rep", np.array([2, 1, 1, 1], np.int64)),),
        "repeats the batch 2 times"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_graph_that_bakes_the_batch_in_is_refused_naming_the_node(case: str) -> None:
    nodes, out_shape, inits, why = REFUSED[case]
    with pytest.raises(EdgecvError, match="node '") as e:
        make_dynamic(tiny(nodes, out_shape, inits))
    assert why in str(e.value) and "\n" not in str(e.value)


def mixing_segmenter(path: Path) -> Path:
    """A semantic 'segmenter' (1, 3, 8, 8) -> (1, 3, 8, 8) whose output divides by the input's element count: the
    batch's size leaks into every frame's values through Size, which no rule sees; only the check can."""
    nodes = [helper.make_node("Size", ["images"], ["n"]), helper.make_node("Cast", ["n"], ["nf"], to=TensorProto.FLOAT),
             helper.make_node("Div", ["images", "nf"], ["out"])]
    return save_graph(tiny(nodes, [1, 3, 8, 8]).graph, path)


def dql_matmul(path: Path) -> Path:
    """Dynamic quantization feeding MatMulInteger: one range over the batch that cannot be made per frame."""
    nodes = [helper.make_node("Reshape", ["images", "s"], ["flat"]),
             helper.make_node("DynamicQuantizeLinear", ["flat"], ["q", "qs", "qz"]),
             helper.make_node("MatMulInteger", ["q", "w", "qz"], ["mi"]),
             helper.make_node("Cast", ["mi"], ["mf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["mf", "qs"], ["m"]),
             helper.make_node("Reshape", ["m", "back"], ["out"])]
    inits = (("s", np.array([1, 3, 64], np.int64)), ("w", np.ones((64, 64), np.uint8)),
             ("back", np.array([1, 3, 8, 8], np.int64)))
    return save_graph(tiny(nodes, [1, 3, 8, 8], inits).graph, path)


@pytest.mark.parametrize("make,why", [
    (mixing_segmenter, "check failed: output 'out' of frame 1 at batch 4 differs from the original model's"),
    (dql_matmul, "(DynamicQuantizeLinear) quantizes the whole batch with one range"),
])
def test_the_command_refuses_in_one_line_and_writes_nothing(make, why: str, tmp_path: Path, vtest: Path) -> None:
    src = make(tmp_path / "model.onnx")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = edgecv("model", "dynamic-batch", str(src), str(out_dir / "model.onnx"), "--video", str(vtest))
    err = proc.stderr.strip()
    assert proc.returncode == 1, err
    assert len(err.splitlines()) == 1 and err.startswith("edgecv: error: model.onnx: ") and why in err, err
    assert "Traceback" not in err
    assert list(out_dir.iterdir()) == []  # no output, no temporary file


def test_without_onnx_the_command_names_the_extra(assets: Path, tmp_path: Path) -> None:
    proc = edgecv("model", "dynamic-batch", str(assets / "models" / "yolox_nano.onnx"), str(tmp_path / "m.onnx"),
                  setup="sys.modules['onnx'] = None")  # `import onnx` raises ImportError
    err = proc.stderr.strip()
    assert proc.returncode == 1 and err == "edgecv: error: edgecv model dynamic-batch needs the onnx package: " \
                                "pip install 'edgecv[tools]'"
    assert not (tmp_path / "m.onnx").exists()


def test_command_line_mistakes_exit_2(assets: Path, tmp_path: Path) -> None:
    model = str(assets / "models" / "yolox_nano.onnx")
    proc = edgecv("model", "dynamic-batch", model, str(tmp_path / "m.onnx"), "--batch", "1")
    assert (proc.returncode, proc.stderr.strip()) == (2, "edgecv: error: --batch: expected 2 to 16, got 1")
    proc = edgecv("model", "dynamic-batch", model, str(tmp_path / "nowhere" / "m.onnx"))
    expected = f"edgecv: error: OUTPUT: folder not found: {tmp_path / 'nowhere'}"
    assert (proc.returncode, proc.stderr.strip()) == (2, expected)


# --------------------------------------------------------------------------------------------------------------
# model.batch: the inference thread's chunks.

def test_model_batch_setting() -> None:
    for good in ("auto", 1, 2, 64):
        problems = _problems({"path": "models/yolox_nano.onnx", "batch": good})
        assert not [p for p in problems if "batch" in p], problems
    for bad in (0, 65, "two", True, 1.5):
        problems = _problems({"path": "models/yolox_nano.onnx", "batch": bad})
        assert f"model.batch: expected auto or a number 1 to 64, got {bad!r}" in problems


def _problems(model: dict) -> list[str]:
    try:
        parse({"node_id": "n", "model": model, "cameras": {"a": {"source": "media/vtest.avi"}}}, "test")
    except ConfigError as e:
        return e.problems
    return []


def write_clip(path: Path, vtest: Path, start: int, frames: int) -> Path:
    cap = cv2.VideoCapture(str(vtest))
    cap.set(cv2.CAP_PROP_POS_FRAMES, start)
    writer = None
    for _ in range(frames):
        ok, image = cap.read()
        assert ok
        if writer is None:
            h, w = image.shape[:2]
            writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (w, h))
        writer.write(image)
    cap.release()
    writer.release()
    return path


class Collect:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def emit(self, event: Event) -> None:
        self.events.append(event)


FRAMES = 8


def run_two_cameras(model: Path, batch: object, clips: tuple[Path, Path], tmp_path: Path) -> tuple[dict, dict, dict]:
    """Both cameras offline (realtime false, no drop); the inference thread starts once both cameras have a frame
    waiting, so that its first chunk holds both. Returns the stats, the events and the detections per camera."""
    cfg = parse({"node_id": "n", "mqtt": {"enabled": False}, "console": {"enabled": False},
                 "model": {"path": str(model), "family": "yolox", "batch": batch, "classes": ["person"]},
                 "cameras": {"a": {"source": str(clips[0]), "realtime": False},
                             "b": {"source": str(clips[1]), "realtime": False}}}, base_dir=tmp_path)
    models = load_models(cfg)
    sink = Collect()
    dets: dict[str, list] = {"a": [], "b": []}
    pipe = Pipeline(cfg, models, [sink], max_frames=FRAMES,
                    on_detections=lambda cam, f, d: dets[cam].append((f.index, d.xyxy.copy(), d.score.copy())))
    pipe.started_at = time.monotonic()
    try:
        for w in pipe.workers.values():
            w.start()
        for s in pipe.sources.values():
            s.start()
        while not all(s.slot.ready for s in pipe.sources.values()):
            time.sleep(0.01)
        pipe.inference.start()
        while not (pipe.done or pipe.failed):
            time.sleep(0.01)
    finally:
        pipe.stop()
    assert pipe.failed is None
    events = {cam: [(e.id, e.type, e.frame, e.object.track_id if e.object else None)
                    for e in sink.events if e.camera == cam] for cam in ("a", "b")}
    return pipe.stats(), events, dets


def test_batch_2_runs_chunks_of_two_with_the_same_events(rewritten: dict, vtest: Path, tmp_path: Path) -> None:
    model, _ = rewritten["yolox_nano.onnx"]
    clips = (write_clip(tmp_path / "a.avi", vtest, 0, FRAMES), write_clip(tmp_path / "b.avi", vtest, 300, FRAMES))
    one_stats, one_events, one_dets = run_two_cameras(model, 1, clips, tmp_path)
    two_stats, two_events, two_dets = run_two_cameras(model, 2, clips, tmp_path)
    assert one_stats["inference_batches"] == {"1": 2 * FRAMES}
    batches = two_stats["inference_batches"]
    assert batches.get("2", 0) >= 1 and sum(int(k) * v for k, v in batches.items()) == 2 * FRAMES, batches
    assert sum(len(v) for v in one_events.values()) > 0
    assert two_events == one_events
    for cam in ("a", "b"):
        assert [i for i, _, _ in two_dets[cam]] == [i for i, _, _ in one_dets[cam]] == list(range(1, FRAMES + 1))
        for (_, box1, score1), (_, box2, score2) in zip(one_dets[cam], two_dets[cam]):
            np.testing.assert_allclose(box2, box1, rtol=1e-5, atol=1e-3)
            np.testing.assert_allclose(score2, score1, rtol=1e-5, atol=1e-5)


def test_auto_is_one_frame_at_a_time_on_the_cpu_and_a_fixed_batch_caps(rewritten: dict, assets: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    dynamic, _ = rewritten["yolox_nano.onnx"]

    def max_batch(path: Path, batch: object) -> int:
        cfg = parse({"node_id": "n", "model": {"path": str(path), "batch": batch},
                     "cameras": {"a": {"source": str(assets / "media" / "vtest.avi")}}}, "test")
        return load_models(cfg).max_batch

    assert max_batch(dynamic, "auto") == 1  # ONNX Runtime on the CPU: batching measured not to pay
    assert max_batch(dynamic, 3) == 3
    with caplog.at_level(logging.WARNING, logger="edgecv.models"):
        assert max_batch(assets / "models" / "yolox_nano.onnx", 4) == 1
    assert "model.batch: 4: model yolox_nano.onnx takes at most 1 frame(s) at once" in caplog.text


def test_bench_batch_prints_a_table(assets: Path) -> None:
    """A fixed-batch model is made dynamic for the benchmark; figures are printed, never asserted."""
    proc = edgecv("bench", "batch", "--model", str(assets / "models" / "yolox_nano.onnx"),
                  "--video", str(assets / "media" / "vtest.avi"), "--frames", "1", "--batches", "1,2")
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr
    assert "made dynamic for the benchmark" in out
    rows = [line.split("|")[0].strip() for line in out.splitlines() if "frames/s" in line]
    assert rows == ["batch 1, as it was", "batch 1", "batch 2"], out
