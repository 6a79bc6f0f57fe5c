"""Several frames inferred at the same time (`model.parallel`): the lanes really overlap, each camera's frames
still reach its worker in order, and the tracks are those of one lane; `auto` follows the cores and the
backend."""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgecv.config import ConfigError, parse
from edgecv.engine.backend import Backend, OnnxRuntimeBackend, parallel_limit
from edgecv.models import Prepared, load_models
from edgecv.pipeline import Pipeline
from edgecv.types import Frame

FRAMES = 30


class Overlap:
    """Wraps a real backend's ``infer``: which threads ran it, and the most calls running at once."""

    def __init__(self, backend: Backend) -> None:
        self.inner = backend.infer
        self.lock = threading.Lock()
        self.running = 0
        self.most = 0
        self.threads: set[str] = set()
        backend.infer = self  # type: ignore[method-assign]

    def __call__(self, batch: Any) -> Any:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.threads.add(threading.current_thread().name)
        try:
            return self.inner(batch)
        finally:
            with self.lock:
                self.running -= 1


def config(assets: Path, parallel: int | str, cameras: int = 3, realtime: bool = False, every_n: int = 1) -> Any:
    """``realtime``: the cameras' slots drop (a live camera's) instead of blocking (a replay's)."""
    source = str(assets / "media" / "vtest.avi")
    return parse({"node_id": "p", "mqtt": {"enabled": False}, "console": {"enabled": False},
                  "model": {"path": str(assets / "models" / "yolox_nano.onnx"), "classes": ["person"],
                            "threads": 1, "parallel": parallel},
                  "cameras": {f"cam{i}": {"source": source, "realtime": realtime, "detect": {"every_n": every_n}}
                              for i in range(cameras)}})


def run(assets: Path, parallel: int, cameras: int = 3,
        every_n: int = 1) -> tuple[dict[str, list[tuple[int, tuple[int, ...]]]], Overlap, Pipeline]:
    cfg = config(assets, parallel, cameras, every_n=every_n)
    models = load_models(cfg)
    overlap = Overlap(models.detector.backend)
    seen: dict[str, list[tuple[int, tuple[int, ...]]]] = {name: [] for name in cfg.cameras}
    pipe = Pipeline(cfg, models, sinks=[], max_frames=FRAMES,
                    on_tracks=lambda cam, f, t: seen[cam].append((f.index, tuple(t.track_id.tolist()))))
    pipe.run()
    assert pipe.failed is None
    return seen, overlap, pipe


def test_two_lanes_overlap_keep_each_cameras_order_and_give_the_tracks_of_one(assets: Path) -> None:
    one, single, _ = run(assets, 1)
    two, overlap, pipe = run(assets, 2)
    assert single.most == 1 and single.threads == {"inference"}
    assert pipe.inference.lanes == 2
    assert overlap.most == 2, "the two lanes never inferred at the same time"
    assert overlap.threads == {"inference", "inference-2"}
    for cam, frames in two.items():
        assert [i for i, _ in frames] == list(range(1, FRAMES + 1)), f"{cam}: frames out of order or missing"
        assert frames == one[cam], f"{cam}: tracks differ from one lane's"
    assert pipe.inference.frames == 3 * FRAMES and sum(pipe.inference.batches.values()) == 3 * FRAMES
    assert pipe.inference.busy_since == 0.0 and not pipe.inference.alive


@pytest.mark.parametrize("every_n", [1, 3])
def test_one_replay_uses_every_lane_and_its_frames_still_arrive_in_order(assets: Path, every_n: int) -> None:
    """A file replayed with no drop (``realtime: false``: `edgecv track`, `eval`) may have a frame in inference on
    each lane: one camera uses both. Frames inferred out of turn wait for the earlier ones, and the frames the
    detector skips (``every_n``) keep their place, so the worker sees every frame in order and the tracks are those
    of one lane."""
    one, single, _ = run(assets, 1, cameras=1, every_n=every_n)
    two, overlap, pipe = run(assets, 2, cameras=1, every_n=every_n)
    assert single.most == 1
    assert overlap.most == 2, "one replay never had two frames in inference at once"
    assert overlap.threads == {"inference", "inference-2"}
    assert [i for i, _ in two["cam0"]] == list(range(1, FRAMES + 1)), "frames out of order or missing"
    assert two["cam0"] == one["cam0"], "tracks differ from one lane's"
    worker = pipe.workers["cam0"]
    assert worker.frames_inferred == pipe.inference.frames == len(range(1, FRAMES + 1, every_n))
    assert worker.processed == FRAMES and not any(pipe.inference._taken.values())


def test_a_live_camera_never_has_two_frames_in_inference(assets: Path) -> None:
    """A live camera keeps its one-frame limit (its newest frame is what counts; no frame waits behind another)."""
    cfg = config(assets, 2, cameras=1, realtime=True)
    pipe = Pipeline(cfg, load_models(cfg), sinks=[])
    inference, stop, slot = pipe.inference, threading.Event(), pipe.sources["cam0"].slot
    for index in (1, 2):
        assert slot.put(Prepared(Frame("cam0", index, float(index), 0.0, np.zeros((8, 8, 3), np.uint8)), ()), stop)
        chunk = inference._next_chunk()
        assert [item.frame.index for _, item, _ in chunk] == ([1] if index == 1 else [])
    assert slot.ready and inference._taken["cam0"] == 1


def test_auto_is_the_cores_over_the_threads_and_one_for_a_backend_that_cannot(assets: Path) -> None:
    model = assets / "models" / "yolox_nano.onnx"
    ort_backend = OnnxRuntimeBackend(model, threads=1, providers=["CPUExecutionProvider"])
    cores = os.cpu_count() or 1
    assert parallel_limit(ort_backend) == cores
    assert parallel_limit(ort_backend, 3) == 3
    assert parallel_limit(OnnxRuntimeBackend(model, threads=cores, providers=["CPUExecutionProvider"])) == 1

    class OneContext(OnnxRuntimeBackend):  # as TensorRT: one execution context, never two calls at once
        concurrent = False

    assert parallel_limit(OneContext(model, threads=1, providers=["CPUExecutionProvider"]), 4) == 1
    assert load_models(config(assets, "auto", 1)).parallel == cores  # threads 1 in the config


@pytest.mark.parametrize("value", [0, 17, "two", True])
def test_a_bad_parallel_names_the_field(assets: Path, value: Any) -> None:
    with pytest.raises(ConfigError) as e:
        config(assets, value)
    assert "model.parallel" in str(e.value) and "auto or a number 1 to 16" in str(e.value)


def test_the_backlog_counts_frames_to_infer_not_skipped_ones_riding_in_a_slot(assets: Path) -> None:
    """`detect.defer_when_busy` reads the backlog: a slot holding only frames the detector skips passes them
    straight through, so it is no wait; a frame to infer in another camera's slot is one; the asking camera's
    own slot never counts. The wait is shared by the lanes."""
    cfg = config(assets, 2, cameras=3)
    pipe = Pipeline(cfg, load_models(cfg), sinks=[])
    frame = Frame("cam0", 1, 0.0, 0.0, np.zeros((8, 8, 3), np.uint8))
    stop = threading.Event()
    pipe.sources["cam0"].slot.put(Prepared(frame, ()), stop)  # to infer, but the asking camera's own
    pipe.sources["cam1"].slot.put(Prepared(frame, (), skip="interval"), stop)  # skipped: passes straight on
    pipe.sources["cam2"].slot.put(Prepared(frame, ()), stop)  # to infer
    inference = pipe.inference
    assert inference.backlog("cam0") == 1
    assert inference.backlog("cam1") == 2
    inference.frame_ms = 20.0
    assert inference.wait_ms("cam0") == pytest.approx(1 * 20.0 / 2)


def test_the_oldest_frame_waiting_is_inferred_first_whichever_camera_it_is(assets: Path) -> None:
    """Under load every camera waits alike: a lane takes the frame captured first among those waiting, and a frame
    that became ready after the others were collected still goes before the younger ones among them (not after
    all of them, which starved the cameras whose frames kept arriving just after a collection)."""
    cfg = config(assets, 2, cameras=3, realtime=True)
    pipe = Pipeline(cfg, load_models(cfg), sinks=[])
    inference, stop = pipe.inference, threading.Event()
    assert inference.models.max_batch == 1

    def put(camera: str, index: int, captured: float) -> None:
        frame = Frame(camera, index, captured, 0.0, np.zeros((8, 8, 3), np.uint8))
        assert pipe.sources[camera].slot.put(Prepared(frame, ()), stop)

    def next_one() -> tuple[str, int]:
        chunk = inference._next_chunk()
        assert len(chunk) == 1
        return chunk[0][1].frame.camera, chunk[0][1].frame.index

    put("cam0", 1, 50.0)
    put("cam2", 1, 10.0)
    assert next_one() == ("cam2", 1)  # cam0 comes first in the config, but its frame is younger
    put("cam1", 1, 30.0)  # ready after that collection, captured before cam0's frame
    put("cam2", 2, 60.0)  # cam2's next frame: waits in its slot while cam2 has one in inference
    assert next_one() == ("cam1", 1)
    assert next_one() == ("cam0", 1)
    assert inference._next_chunk() == []  # cam2's second frame: not while its first is being inferred
    inference._taken["cam2"] -= 1  # its first frame handed over
    assert next_one() == ("cam2", 2)


def test_a_camera_whose_waiting_frame_was_replaced_keeps_its_place(assets: Path) -> None:
    """A newer frame that replaced a waiting one (a drop) takes over the camera's place in the queue: it is served
    by how long the camera has waited, not as a camera that has just begun to wait. Otherwise a camera that
    dropped a frame waited longer next time and dropped again, while the others dropped none."""
    cfg = config(assets, 2, cameras=2, realtime=True)
    pipe = Pipeline(cfg, load_models(cfg), sinks=[])
    stop = threading.Event()
    assert not pipe.sources["cam0"].slot.blocking

    def put(camera: str, index: int, captured: float) -> None:
        frame = Frame(camera, index, captured, 0.0, np.zeros((8, 8, 3), np.uint8))
        assert pipe.sources[camera].slot.put(Prepared(frame, ()), stop)

    put("cam0", 1, 10.0)
    put("cam1", 1, 20.0)
    put("cam0", 2, 40.0)  # replaces cam0's first frame: cam0 has waited since 10
    assert pipe.sources["cam0"].slot.dropped == 1
    order = [(item.frame.camera, item.frame.index) for _, item, _ in
             (pipe.inference._next_chunk()[0], pipe.inference._next_chunk()[0])]
    assert order == [("cam0", 2), ("cam1", 1)]
    put("cam0", 3, 50.0)  # cam0's slot was empty again: it waits from this frame's capture on
    assert pipe.sources["cam0"].slot.take_waiting()[1] == 50.0
