"""TensorRT backend, engine builder and cache: our code around TensorRT, not TensorRT.

Most of this runs anywhere: the cache key, ONNX reading, build planning, calibration batching on
real images, the options handed to the builder (config section, environment, CLI), the choice of
backend, error texts, and the backend itself driven through fake TensorRT engine objects (both API
generations) over a fake CUDA memory. The fake engines return what a Python function gives them
(fixed arrays, or simple arithmetic on the input): they check the backend's own shape checks,
padding, copies and batch handling, not what TensorRT computes. TensorRT's builder is not imitated:
building, INT8 calibration and engine outputs are checked by the tests at the end, which build and
run real engines and are skipped unless tensorrt, pycuda and a CUDA device are all present.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import cv2
import numpy as np
import onnx
import pytest
from conftest import ASSETS, REPO
from onnx_models import save_graph
from onnx import TensorProto, helper, numpy_helper

from edgecv import EdgecvError
from edgecv.engine import YoloxDetector, Yolov8Detector
from edgecv.engine.backend import OnnxRuntimeBackend
from edgecv.engine.cache import (
    CACHE_ENV,
    EngineKey,
    cache_dir,
    calibration_cache_path,
    calibration_fingerprint,
    engine_key,
    engine_path,
    onnx_metadata,
    read_sidecar,
    sha256_file,
    short_version,
    sidecar_path,
    write_atomic,
    write_sidecar,
)
from edgecv.engine.tensorrt import (
    Availability,
    BindingApi,
    TensorApi,
    TensorRTBackend,
    TensorSpec,
    check_input_shape,
    choose_backend,
    deserialize_error,
    engine_api,
    io_table,
    numpy_dtype,
    probe,
    rebuild_command,
)
from edgecv.engine.trt_build import (
    BuildProgress,
    CalibrationBatches,
    Heartbeat,
    auto_options,
    calibration_batch_size,
    effective_max_batch,
    env_overrides,
    list_images,
    onnx_input_shape,
    plan_profile,
)
from edgecv.engine.trt_env import cuda_device_name, import_pycuda, import_tensorrt, trt_dtype_name

YOLOX = ASSETS / "models" / "yolox_nano.onnx"
YOLOV8 = ASSETS / "models" / "yolov8n_int8.onnx"
BDD = ASSETS / "media" / "bdd"
VTEST = ASSETS / "media" / "vtest.avi"


def one_line(excinfo: pytest.ExceptionInfo, *parts: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, message
    return message


def tiny_model(path: Path, batch: Any = "N", size: int = 8, metadata: Optional[dict[str, str]] = None) -> Path:
    """input (batch, 3, size, size) -> out0 = per-item mean (B, 1), out1 = input * 2 (B, 3, size, size)."""
    nodes = [
        helper.make_node("ReduceMean", ["images"], ["m"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Unsqueeze", ["m", "axis1"], ["mean"]),
        helper.make_node("Mul", ["images", "two"], ["double"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [batch, 3, size, size])],
        [
            helper.make_tensor_value_info("mean", TensorProto.FLOAT, [batch, 1]),
            helper.make_tensor_value_info("double", TensorProto.FLOAT, [batch, 3, size, size]),
        ],
        initializer=[
            numpy_helper.from_array(np.array([1], np.int64), "axis1"),
            numpy_helper.from_array(np.array(2.0, np.float32), "two"),
        ],
    )
    return save_graph(graph, path, metadata)


# == the engine cache ======================================================================

BASE = dict(model="yolox_nano", onnx_sha256="a" * 64, trt_version="10.3.0.26", gpu_name="NVIDIA H200",
            precision="fp16", max_batch=1)


def test_cache_key_file_name_is_readable() -> None:
    key = EngineKey(**BASE)
    assert re.fullmatch(r"yolox_nano-[0-9a-f]{12}-fp16-b1-trt10\.3-NVIDIA_H200\.engine", key.filename), key.filename
    assert key.filename.startswith("yolox_nano-" + key.digest[:12])
    assert EngineKey(**BASE).digest == key.digest  # a pure function of its fields
    orin = EngineKey(**{**BASE, "gpu_name": "Orin (nvgpu)", "trt_version": "8.6.2.3", "max_batch": 4})
    assert orin.filename.endswith("-fp16-b4-trt8.6-Orin_nvgpu.engine"), orin.filename


@pytest.mark.parametrize(
    "change",
    [
        {"onnx_sha256": "b" * 64},
        {"trt_version": "10.3.0.27"},  # even a patch release: engines are not portable across versions
        {"trt_version": "8.6.1"},
        {"gpu_name": "NVIDIA H100 80GB HBM3"},
        {"precision": "fp32"},
        {"precision": "int8"},
        {"max_batch": 2},
        {"calibration": "0123456789abcdef"},
    ],
)
def test_cache_key_changes_with_every_part(change: dict) -> None:
    base, changed = EngineKey(**BASE), EngineKey(**{**BASE, **change})
    assert changed.digest != base.digest
    assert changed.filename != base.filename


def test_cache_key_ignores_the_file_name_of_the_model() -> None:
    renamed = EngineKey(**{**BASE, "model": "person_detector"})
    assert renamed.digest == EngineKey(**BASE).digest
    assert renamed.filename.startswith("person_detector-")


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"precision": "bf16"}, "precision: expected one of fp32, fp16, int8, got 'bf16'"),
        ({"max_batch": 0}, "max batch: expected a positive number, got 0"),
    ],
)
def test_cache_key_rejects_bad_parts(change: dict, expected: str) -> None:
    with pytest.raises(EdgecvError) as excinfo:
        EngineKey(**{**BASE, **change})
    one_line(excinfo, expected)


def test_engine_key_hashes_the_onnx_content(tmp_path: Path) -> None:
    a = tiny_model(tmp_path / "a.onnx")
    key = engine_key(a, "10.3.0", "GPU", "fp16", 1)
    assert key.onnx_sha256 == sha256_file(a) and key.model == "a"
    b = tiny_model(tmp_path / "b.onnx", size=16)
    assert engine_key(b, "10.3.0", "GPU", "fp16", 1).digest != key.digest
    copy = tmp_path / "copy.onnx"
    copy.write_bytes(a.read_bytes())
    assert engine_key(copy, "10.3.0", "GPU", "fp16", 1).digest == key.digest


def test_cache_folder_default_and_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(CACHE_ENV, raising=False)
    assert cache_dir() == REPO / "engines" / "cache"  # a source checkout: engines/cache (git-ignored)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "engines"))
    assert cache_dir() == tmp_path / "engines"
    key = EngineKey(**BASE)
    assert engine_path(key) == tmp_path / "engines" / key.filename
    assert engine_path(key, tmp_path / "other") == tmp_path / "other" / key.filename
    ignored = subprocess.run(["git", "check-ignore", "-q", "engines/cache/x.engine"], cwd=REPO)
    assert ignored.returncode == 0, "engines/cache/ must stay git-ignored"


def test_sidecar_and_calibration_cache_sit_next_to_the_engine(tmp_path: Path) -> None:
    engine = tmp_path / "m-0123-int8-b8-trt10.3-GPU.engine"
    assert sidecar_path(engine).name == engine.name + ".json"
    assert calibration_cache_path(engine) == tmp_path / "m-0123-int8-b8-trt10.3-GPU.calib"
    assert read_sidecar(engine) == {}
    write_sidecar(engine, {"onnx": "/x/m.onnx", "metadata": {"names": "{0: 'a'}"}})
    assert read_sidecar(engine) == {"onnx": "/x/m.onnx", "metadata": {"names": "{0: 'a'}"}}
    sidecar_path(engine).write_text("{broken")
    assert read_sidecar(engine) == {}


def test_write_atomic_replaces_without_leftovers(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "e.engine"
    write_atomic(target, b"one")
    write_atomic(target, memoryview(b"two"))
    assert target.read_bytes() == b"two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["e.engine"]


def test_calibration_fingerprint_follows_the_image_set(tmp_path: Path) -> None:
    images = sorted(BDD.glob("*.jpg"))[:3]
    assert calibration_fingerprint(images) == calibration_fingerprint(list(images))
    assert calibration_fingerprint(images) != calibration_fingerprint(images[:2])
    assert len(calibration_fingerprint(images)) == 16


def test_short_version() -> None:
    assert short_version("10.3.0.26") == "10.3" and short_version("8.6.1") == "8.6" and short_version("x") == "unknown"


# == reading ONNX without onnx/onnxruntime ==================================================


def ort_metadata(path: Path) -> dict[str, str]:
    backend = OnnxRuntimeBackend(path, threads=1, providers=["CPUExecutionProvider"])
    return backend.metadata


def test_onnx_metadata_matches_onnxruntime(tmp_path: Path) -> None:
    meta = {"names": "{0: 'person', 1: 'car'}", "imgsz": "[8, 8]", "author": "édgecv ✓", "empty": ""}
    model = tiny_model(tmp_path / "m.onnx", metadata=meta)
    assert onnx_metadata(model) == meta == ort_metadata(model)
    assert onnx_metadata(tiny_model(tmp_path / "plain.onnx")) == {}
    assert onnx_metadata(YOLOX) == ort_metadata(YOLOX) == {}
    v8 = onnx_metadata(YOLOV8)
    assert v8 == ort_metadata(YOLOV8) and v8["task"] == "detect" and "person" in v8["names"]


def test_onnx_metadata_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff")
    with pytest.raises(EdgecvError) as excinfo:
        onnx_metadata(bad)
    one_line(excinfo, f"model {bad}: expected an ONNX (protobuf) file")
    with pytest.raises(EdgecvError) as excinfo:
        onnx_metadata(tmp_path / "missing.onnx")
    one_line(excinfo, "cannot read the ONNX file")


def test_onnx_input_shape(tmp_path: Path) -> None:
    assert onnx_input_shape(YOLOX) == ("images", (1, 3, 416, 416))
    assert onnx_input_shape(YOLOV8) == ("images", (1, 3, 640, 640))
    assert onnx_input_shape(tiny_model(tmp_path / "dyn.onnx"))[1] == (-1, 3, 8, 8)
    assert onnx_input_shape(tiny_model(tmp_path / "fixed.onnx", batch=2))[1] == (2, 3, 8, 8)
    # IR < 4 style: initializers are listed among the graph inputs and must not count as inputs
    model = onnx.load(str(tmp_path / "fixed.onnx"))
    model.graph.input.append(helper.make_tensor_value_info("two", TensorProto.FLOAT, []))
    onnx.save(model, str(tmp_path / "old.onnx"))
    assert onnx_input_shape(tmp_path / "old.onnx") == ("images", (2, 3, 8, 8))
    text = tmp_path / "text.onnx"
    text.write_text("not a model")
    with pytest.raises(EdgecvError) as excinfo:
        onnx_input_shape(text)
    one_line(excinfo, f"model {text}: expected an ONNX model with a graph")


# == build planning ==========================================================================


@pytest.mark.parametrize(
    "shape, requested, expected",
    [((1, 3, 416, 416), 8, 1), ((-1, 3, 640, 640), 8, 8), ((4, 3, 64, 64), 1, 4), ((-1, 3, 8, 8), 1, 1)],
)
def test_effective_max_batch(shape: tuple, requested: int, expected: int) -> None:
    assert effective_max_batch(shape, requested) == expected


@pytest.mark.parametrize(
    "shape, max_batch, imgsz, expected",
    [
        ((1, 3, 416, 416), 8, None, None),
        ((-1, 3, 640, 640), 4, None, ((1, 3, 640, 640), (4, 3, 640, 640), (4, 3, 640, 640))),
        ((-1, 3, -1, -1), 2, (480, 640), ((1, 3, 480, 640), (2, 3, 480, 640), (2, 3, 480, 640))),
        ((1, 3, -1, -1), 8, (640, 640), ((1, 3, 640, 640), (1, 3, 640, 640), (1, 3, 640, 640))),
    ],
)
def test_plan_profile(shape: tuple, max_batch: int, imgsz: Optional[tuple], expected: Optional[tuple]) -> None:
    assert plan_profile(shape, max_batch, imgsz) == expected


@pytest.mark.parametrize(
    "shape, expected",
    [
        ((-1, 3, -1, -1), "dynamic image size and no 'imgsz' metadata"),
        ((-1, -1, 64, 64), "expected a fixed channel count"),
        ((-1, 3, 64), "expected (N, C, H, W) to build a profile"),
    ],
)
def test_plan_profile_errors(shape: tuple, expected: str) -> None:
    with pytest.raises(EdgecvError) as excinfo:
        plan_profile(shape, 4)
    one_line(excinfo, expected)


def test_calibration_batch_size() -> None:
    assert calibration_batch_size((1, 3, 416, 416), 8, 1) == 1  # fixed batch wins
    assert calibration_batch_size((-1, 3, 64, 64), 8, 4) == 4  # capped by the profile's max
    assert calibration_batch_size((-1, 3, 64, 64), 2, 4) == 2


def test_auto_options_from_environment() -> None:
    assert auto_options({}) == {"precision": "fp16", "max_batch": 4, "calib_dir": None}
    assert auto_options({"EDGECV_TRT_PRECISION": "FP32", "EDGECV_TRT_MAX_BATCH": "8"})["max_batch"] == 8
    for env, expected in [
        ({"EDGECV_TRT_PRECISION": "bf16"}, "EDGECV_TRT_PRECISION: expected one of fp32, fp16, int8, got 'bf16'"),
        ({"EDGECV_TRT_MAX_BATCH": "many"}, "EDGECV_TRT_MAX_BATCH: expected a whole number, got 'many'"),
        ({"EDGECV_TRT_MAX_BATCH": "0"}, "EDGECV_TRT_MAX_BATCH: expected 1..64, got 0"),
    ]:
        with pytest.raises(EdgecvError) as excinfo:
            auto_options(env)
        one_line(excinfo, expected)


# == calibration batches on real images ======================================================


@pytest.fixture(scope="module")
def yolox() -> YoloxDetector:
    return YoloxDetector(OnnxRuntimeBackend(YOLOX, threads=1, providers=["CPUExecutionProvider"]))


@pytest.fixture(scope="module")
def yolov8() -> Yolov8Detector:
    return Yolov8Detector(OnnxRuntimeBackend(YOLOV8, threads=1, providers=["CPUExecutionProvider"]))


def test_list_images(tmp_path: Path) -> None:
    images = list_images(BDD)
    assert len(images) >= 10 and images == sorted(images) and all(p.suffix == ".jpg" for p in images)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(EdgecvError) as excinfo:
        list_images(tmp_path)
    one_line(excinfo, f"calibration images: expected image files (.jpg, .jpeg, .png, .bmp, .webp) in {tmp_path}")
    with pytest.raises(EdgecvError) as excinfo:
        list_images(tmp_path / "nope")
    one_line(excinfo, "is not a folder")


@pytest.mark.parametrize("family", ["yolox", "yolov8"])
def test_calibration_batches_use_the_adapters_own_preprocessing(family: str, yolox: Any, yolov8: Any) -> None:
    detector = yolox if family == "yolox" else yolov8
    paths = list_images(BDD)[:5]
    batches = CalibrationBatches(paths, detector, batch_size=2)
    w, h = detector.input_size
    assert len(batches) == 3 and batches.shape == (2, 3, h, w) and batches.nbytes == 2 * 3 * h * w * 4
    got = list(batches)
    assert len(got) == 3 and all(b.shape == (2, 3, h, w) and b.dtype == np.float32 for b in got)
    for i, path in enumerate(paths):
        want, _ = detector.preprocess(cv2.imread(str(path)))
        np.testing.assert_array_equal(got[i // 2][i % 2], want)
    np.testing.assert_array_equal(got[2][1], got[2][0])  # the last batch is padded with its own first image
    if family == "yolox":
        assert got[0].max() > 1.5  # 0-255 BGR
    else:
        assert got[0].max() <= 1.0  # 0-1 RGB
    assert [len(b) for b in batches.batch_paths()] == [2, 2, 2]
    assert sum(1 for _ in batches) == 3  # can be iterated again


def test_calibration_batches_drop_and_limit(yolox: Any) -> None:
    batches = CalibrationBatches(BDD, yolox, batch_size=4, last="drop", limit=10)
    assert len(batches.paths) == 10 and len(batches) == 2
    assert [len(set(c)) for c in batches.batch_paths()] == [4, 4]
    padded = CalibrationBatches(BDD, yolox, batch_size=4, last="pad", limit=10)
    assert len(padded) == 3
    assert padded.batch_paths()[-1] == [padded.paths[8], padded.paths[9], padded.paths[8], padded.paths[9]]
    single = CalibrationBatches(BDD, yolox, batch_size=1, limit=2)
    assert [b.shape[0] for b in single] == [1, 1]


def test_calibration_batches_errors(tmp_path: Path, yolox: Any) -> None:
    cases: list[tuple[Callable[[], Any], str]] = [
        (lambda: CalibrationBatches(BDD, yolox, batch_size=0), "calibration batch size: expected a positive number, got 0"),
        (lambda: CalibrationBatches(BDD, yolox, last="wrap"), "calibration last batch: expected 'pad' or 'drop', got 'wrap'"),
        (lambda: CalibrationBatches(BDD, yolox, batch_size=4, last="drop", limit=3), "3 images make no full batch of 4"),
        (lambda: CalibrationBatches([], yolox), "calibration images: expected at least one image, got none"),
    ]
    for make, expected in cases:
        with pytest.raises(EdgecvError) as excinfo:
            make()
        one_line(excinfo, expected)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(EdgecvError) as excinfo:
        list(CalibrationBatches([broken], yolox))
    one_line(excinfo, f"calibration image {broken}: expected an image OpenCV can read")


# == dtypes =================================================================================


class Enum:
    """Stands for a pybind11 enum value of TensorRT (``DataType.HALF``, ``TensorIOMode.INPUT``...)."""

    def __init__(self, kind: str, name: str) -> None:
        self.kind, self.name = kind, name

    def __str__(self) -> str:
        return f"{self.kind}.{self.name}"


def dt(name: str) -> Enum:
    return Enum("DataType", name)


@pytest.mark.parametrize(
    "name, expected",
    [("FLOAT", np.float32), ("HALF", np.float16), ("INT8", np.int8), ("INT32", np.int32), ("INT64", np.int64),
     ("BOOL", np.bool_), ("UINT8", np.uint8)],
)  # fmt: skip
def test_dtype_mapping(name: str, expected: type) -> None:
    assert numpy_dtype(dt(name)) == np.dtype(expected)
    assert numpy_dtype(f"DataType.{name}") == np.dtype(expected)  # objects without .name: their str()
    assert trt_dtype_name(dt(name)) == name


@pytest.mark.parametrize("name", ["BF16", "FP8", "INT4", "FP4"])
def test_dtypes_without_numpy_equivalent_are_errors(name: str) -> None:
    with pytest.raises(EdgecvError) as excinfo:
        numpy_dtype(dt(name), "tensor 'x'")
    one_line(excinfo, "TensorRT tensor 'x': expected a data type among FLOAT, HALF", f"got {name}", "fp16/fp32")


# == fake TensorRT engines and fake CUDA memory ==============================================


class FakeMemory:
    """Device memory as host byte arrays, addressed like pointers."""

    def __init__(self) -> None:
        self.blocks: dict[int, bytearray] = {}
        self.next = 0x10000

    def alloc(self, nbytes: int) -> int:
        address = self.next
        self.blocks[address] = bytearray(nbytes)
        self.next += (nbytes + 255) // 256 * 256 + 256
        return address

    def locate(self, address: int, nbytes: int) -> tuple[bytearray, int]:
        for start, block in self.blocks.items():
            if start <= address and address + nbytes <= start + len(block):
                return block, address - start
        raise AssertionError(f"access of {nbytes} bytes at {address:#x} outside any allocation")

    def write(self, address: int, data: bytes) -> None:
        block, offset = self.locate(address, len(data))
        block[offset : offset + len(data)] = data

    def read(self, address: int, nbytes: int) -> bytes:
        block, offset = self.locate(address, nbytes)
        return bytes(block[offset : offset + nbytes])


class FakeAllocation:
    def __init__(self, memory: FakeMemory, nbytes: int) -> None:
        self.address = memory.alloc(nbytes)
        self.memory = memory
        self.freed = False

    def __int__(self) -> int:
        return self.address

    def free(self) -> None:
        self.freed = True


class FakeCuda:
    """The part of ``pycuda.driver`` the backend uses, over :class:`FakeMemory`."""

    def __init__(self, devices: Sequence[str] = ("Fake GPU",), init_error: Optional[Exception] = None) -> None:
        self.memory = FakeMemory()
        self.calls: list[tuple[str, int]] = []
        self.pushed = 0
        cuda = self

        class Stream:
            handle = 0xABC

            def synchronize(self) -> None:
                cuda.calls.append(("sync", 0))

        class Event:
            def record(self, stream: Any = None) -> None:
                pass

            def synchronize(self) -> None:
                pass

        class Context:
            def push(self) -> None:
                cuda.pushed += 1

            def pop(self) -> None:
                cuda.pushed -= 1

            def detach(self) -> None:
                pass

        class Device:
            def __init__(self, index: int) -> None:
                self.index = index

            @staticmethod
            def count() -> int:
                return len(devices)

            def name(self) -> str:
                return devices[self.index]

            def retain_primary_context(self) -> Context:
                return Context()

        self.Stream, self.Event, self.Device, self.Context = Stream, Event, Device, Context
        self._init_error = init_error

    def init(self) -> None:
        if self._init_error is not None:
            raise self._init_error

    def pagelocked_empty(self, shape: Any, dtype: Any) -> np.ndarray:
        return np.zeros(shape, dtype)

    def mem_alloc(self, nbytes: int) -> FakeAllocation:
        return FakeAllocation(self.memory, int(nbytes))

    def memcpy_htod_async(self, dst: Any, src: np.ndarray, stream: Any = None) -> None:
        assert src.flags.c_contiguous
        self.calls.append(("htod", src.nbytes))
        self.memory.write(int(dst), src.tobytes())

    memcpy_htod = memcpy_htod_async

    def memcpy_dtoh_async(self, dst: np.ndarray, src: Any, stream: Any = None) -> None:
        self.calls.append(("dtoh", dst.nbytes))
        dst.reshape(-1).view(np.uint8)[:] = np.frombuffer(self.memory.read(int(src), dst.nbytes), np.uint8)

    def memcpy_dtoh(self, dst: np.ndarray, src: Any) -> None:
        self.memcpy_dtoh_async(dst, src)

    def memset_d8_async(self, dst: Any, value: int, count: int, stream: Any = None) -> None:
        self.memory.write(int(dst), bytes([value]) * count)


class Tensor:
    def __init__(self, name: str, is_input: bool, shape: tuple, dtype: str = "FLOAT", profile: Any = None) -> None:
        self.name, self.is_input, self.shape, self.dtype, self.profile = name, is_input, shape, dtype, profile


class FakeEngineBase:
    """An engine whose ``run(input) -> outputs`` is a Python function; shapes follow the input's batch."""

    def __init__(self, tensors: list[Tensor], run: Callable[[np.ndarray], list[np.ndarray]], memory: FakeMemory):
        self.tensors, self.run, self.memory = tensors, run, memory
        self.contexts: list[Any] = []

    def _index(self, name: str) -> int:
        return next(i for i, t in enumerate(self.tensors) if t.name == name)


class TensorEngine(FakeEngineBase):
    """TensorRT >= 8.5 engine API (all of it in 10.x)."""

    @property
    def num_io_tensors(self) -> int:
        return len(self.tensors)

    def get_tensor_name(self, i: int) -> str:
        return self.tensors[i].name

    def get_tensor_mode(self, name: str) -> Enum:
        return Enum("TensorIOMode", "INPUT" if self.tensors[self._index(name)].is_input else "OUTPUT")

    def get_tensor_shape(self, name: str) -> tuple:
        return self.tensors[self._index(name)].shape

    def get_tensor_dtype(self, name: str) -> Enum:
        return dt(self.tensors[self._index(name)].dtype)

    def get_tensor_profile_shape(self, name: str, profile: int) -> list:
        assert profile == 0
        return list(self.tensors[self._index(name)].profile)


class BindingEngine(FakeEngineBase):
    """TensorRT < 10 bindings API (deprecated in 8.5, the only one before)."""

    @property
    def num_bindings(self) -> int:
        return len(self.tensors)

    def get_binding_name(self, i: int) -> str:
        return self.tensors[i].name

    def binding_is_input(self, i: int) -> bool:
        return self.tensors[i].is_input

    def get_binding_shape(self, i: int) -> tuple:
        return self.tensors[i].shape

    def get_binding_dtype(self, i: int) -> Enum:
        return dt(self.tensors[i].dtype)

    def get_profile_shape(self, profile: int, i: int) -> list:
        assert profile == 0
        return list(self.tensors[i].profile)


class FakeContextBase:
    def __init__(self, engine: FakeEngineBase) -> None:
        self.engine = engine
        t = engine.tensors
        self.input = next(x for x in t if x.is_input)
        self.shape: Optional[tuple] = None if -1 in self.input.shape else tuple(self.input.shape)
        self.addresses: dict[str, int] = {}
        self.shape_calls = 0
        self.runs = 0

    def _set(self, shape: tuple) -> bool:
        self.shape_calls += 1
        low, _, high = self.input.profile
        if not all(lo <= s <= hi for lo, s, hi in zip(low, shape, high)):
            return False
        self.shape = tuple(shape)
        return True

    def _shape_of(self, tensor: Tensor) -> tuple:
        if tensor.is_input:
            return self.shape if self.shape is not None else tensor.shape
        batch = self.shape[0] if self.shape is not None else -1
        return tuple(batch if i == 0 and d == -1 else d for i, d in enumerate(tensor.shape))

    def _run(self) -> bool:
        assert self.shape is not None, "input shape not set before running"
        self.runs += 1
        memory, inp = self.engine.memory, self.input
        dtype = numpy_dtype(dt(inp.dtype))
        raw = memory.read(self.addresses[inp.name], int(np.prod(self.shape)) * dtype.itemsize)
        outputs = self.engine.run(np.frombuffer(raw, dtype).reshape(self.shape))
        outs = [t for t in self.engine.tensors if not t.is_input]
        for tensor, value in zip(outs, outputs):
            value = np.ascontiguousarray(value, numpy_dtype(dt(tensor.dtype)))
            assert value.shape == self._shape_of(tensor), (value.shape, self._shape_of(tensor))
            memory.write(self.addresses[tensor.name], value.tobytes())
        return True


class TensorContext(FakeContextBase):
    def set_input_shape(self, name: str, shape: tuple) -> bool:
        assert name == self.input.name
        return self._set(shape)

    def get_tensor_shape(self, name: str) -> tuple:
        return self._shape_of(self.engine.tensors[self.engine._index(name)])

    def set_tensor_address(self, name: str, address: int) -> bool:
        self.addresses[name] = int(address)
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        assert stream_handle == 0xABC
        return self._run()


class BindingContext(FakeContextBase):
    def set_binding_shape(self, index: int, shape: tuple) -> bool:
        assert self.engine.tensors[index].is_input
        return self._set(shape)

    def get_binding_shape(self, index: int) -> tuple:
        return self._shape_of(self.engine.tensors[index])

    def execute_async_v2(self, bindings: list, stream_handle: int) -> bool:
        assert stream_handle == 0xABC and len(bindings) == len(self.engine.tensors)
        self.addresses = {t.name: int(b) for t, b in zip(self.engine.tensors, bindings)}
        return self._run()


class Both(TensorContext, BindingContext):
    pass


class Engine10(TensorEngine):
    def create_execution_context(self) -> TensorContext:
        self.contexts.append(TensorContext(self))
        return self.contexts[-1]


class Engine86(TensorEngine, BindingEngine):
    def create_execution_context(self) -> Both:
        self.contexts.append(Both(self))
        return self.contexts[-1]


class Engine82(BindingEngine):
    def create_execution_context(self) -> BindingContext:
        self.contexts.append(BindingContext(self))
        return self.contexts[-1]


GENERATIONS = {"trt10": Engine10, "trt8.6": Engine86, "trt8.2": Engine82}
DYN_PROFILE = ((1, 3, 8, 8), (4, 3, 8, 8), (4, 3, 8, 8))


def tiny_run(x: np.ndarray) -> list[np.ndarray]:
    """The outputs of :func:`tiny_tensors`, in engine order."""
    return [x * 2, x.mean(axis=(1, 2, 3))[:, None]]


def tiny_tensors(batch: int = -1) -> list[Tensor]:
    return [
        Tensor("double", False, (batch, 3, 8, 8)),  # outputs need not come after the input
        Tensor("images", True, (batch, 3, 8, 8), profile=DYN_PROFILE if batch < 0 else None),
        Tensor("mean", False, (batch, 1)),
    ]


def fake_backend(generation: str, tensors: list[Tensor], run: Callable, cuda: Optional[FakeCuda] = None,
                 metadata: Optional[dict] = None) -> tuple[TensorRTBackend, Any, FakeCuda]:  # fmt: skip
    cuda = cuda or FakeCuda()
    engine = GENERATIONS[generation](tensors, run, cuda.memory)
    backend = TensorRTBackend.from_engine(engine, cuda, cuda.Stream(), cuda.Context(), "tiny.engine", metadata)
    return backend, engine, cuda


@pytest.mark.parametrize("generation", GENERATIONS)
def test_io_table_from_both_api_generations(generation: str) -> None:
    engine = GENERATIONS[generation](tiny_tensors(), tiny_run, FakeMemory())
    api = engine_api(engine, engine.create_execution_context())
    assert isinstance(api, BindingApi if generation == "trt8.2" else TensorApi)
    spec, outputs = io_table(api)
    assert spec == TensorSpec("images", True, (-1, 3, 8, 8), np.dtype(np.float32), 1, DYN_PROFILE)
    assert spec.dynamic and spec.max_shape == (4, 3, 8, 8)
    assert [o.name for o in outputs] == ["double", "mean"]  # engine order
    assert [o.shape for o in outputs] == [(-1, 3, 8, 8), (-1, 1)]
    assert all(o.profile is None and not o.is_input for o in outputs)


def test_tensor_and_binding_tables_agree_on_a_trt86_engine() -> None:
    engine = Engine86(tiny_tensors(), tiny_run, FakeMemory())
    assert TensorApi(engine).specs() == BindingApi(engine).specs()


def test_engine_api_needs_one_of_the_apis() -> None:
    with pytest.raises(EdgecvError) as excinfo:
        engine_api(object())
    one_line(excinfo, "expected the tensor API (num_io_tensors) or the bindings API (num_bindings)")


@pytest.mark.parametrize(
    "tensors, expected",
    [
        ([Tensor("a", True, (1, 3, 8, 8)), Tensor("b", True, (1, 3, 8, 8)), Tensor("o", False, (1, 1))],
         "expected 1 input tensor, found 2 (a, b)"),
        ([Tensor("o", False, (1, 1))], "expected 1 input tensor, found 0 (none)"),
        ([Tensor("a", True, (1, 3, 8, 8))], "expected at least 1 output tensor, found none"),
        ([Tensor("a", True, (1, 3, 8, 8), dtype="BF16"), Tensor("o", False, (1, 1))], "got BF16"),
    ],
)  # fmt: skip
def test_io_table_errors(tensors: list, expected: str) -> None:
    with pytest.raises(EdgecvError) as excinfo:
        io_table(TensorApi(Engine10(tensors, tiny_run, FakeMemory())), "m.engine")
    one_line(excinfo, expected)


def test_check_input_shape_messages() -> None:
    fixed = TensorSpec("images", True, (1, 3, 416, 416), np.dtype(np.float32), 0)
    check_input_shape(fixed, (1, 3, 416, 416))
    with pytest.raises(EdgecvError) as excinfo:
        check_input_shape(fixed, (1, 3, 640, 640), "m.engine")
    one_line(excinfo, "model m.engine: expected input (1, 3, 416, 416), got (1, 3, 640, 640)")
    dyn = TensorSpec("images", True, (-1, 3, 8, 8), np.dtype(np.float32), 0, DYN_PROFILE)
    check_input_shape(dyn, (3, 3, 8, 8))
    with pytest.raises(EdgecvError) as excinfo:
        check_input_shape(dyn, (5, 3, 8, 8), "m.engine")
    one_line(excinfo, "model m.engine: expected input (?, 3, 8, 8) within (1, 3, 8, 8)..(4, 3, 8, 8), got (5, 3, 8, 8)")


@pytest.mark.parametrize("generation", GENERATIONS)
def test_backend_runs_dynamic_batches(generation: str) -> None:
    backend, engine, cuda = fake_backend(generation, tiny_tensors(), tiny_run, metadata={"k": "v"})
    assert backend.name == "tensorrt" and backend.device == "cuda"
    assert backend.input_name == "images" and backend.input_shape == (-1, 3, 8, 8)
    assert backend.input_dtype == np.float32 and backend.max_batch == 4 and backend.metadata == {"k": "v"}
    assert backend.output_names == ["double", "mean"] and backend.output_shapes == [(-1, 3, 8, 8), (-1, 1)]
    rng = np.random.default_rng(1)
    context = engine.contexts[0]
    for n in (1, 3, 3, 4, 1):
        batch = rng.random((n, 3, 8, 8), dtype=np.float32)
        cuda.calls.clear()
        double, mean = backend.infer(batch)
        np.testing.assert_allclose(double, batch * 2)
        np.testing.assert_allclose(mean, batch.mean(axis=(1, 2, 3))[:, None], rtol=1e-6)
        assert double.shape == (n, 3, 8, 8) and mean.shape == (n, 1)
        # only the batch's bytes travel: H2D of the input, D2H of each output, then one sync
        assert cuda.calls == [("htod", batch.nbytes), ("dtoh", double.nbytes), ("dtoh", mean.nbytes), ("sync", 0)]
    # the shape is set at load (profile max) and then only when the batch changes: 4 -> 1 -> 3 -> 4 -> 1
    assert context.shape_calls == 5 and context.runs == 5
    assert cuda.pushed == 0  # the CUDA context is popped after every call


def test_backend_outputs_are_not_views_of_the_reused_buffers() -> None:
    backend, _, _ = fake_backend("trt10", tiny_tensors(), tiny_run)
    first = backend.infer(np.ones((2, 3, 8, 8), np.float32))
    backend.infer(np.zeros((2, 3, 8, 8), np.float32))
    assert first[0].min() == 2.0
    assert not any(np.shares_memory(out, buf.host) for out in first for buf in backend._outs)


def test_backend_fixed_batch_pads_and_checks_shapes() -> None:
    tensors = [Tensor("images", True, (2, 3, 8, 8)), Tensor("mean", False, (2, 1))]
    seen: list[np.ndarray] = []

    def run(x: np.ndarray) -> list[np.ndarray]:
        seen.append(x.copy())
        return [x.mean(axis=(1, 2, 3))[:, None]]

    backend, engine, _ = fake_backend("trt10", tensors, run)
    assert backend.max_batch == 2 and backend.input_shape == (2, 3, 8, 8)
    (mean,) = backend.infer(np.full((1, 3, 8, 8), 5.0, np.float32))
    assert mean.shape == (1, 1) and mean[0, 0] == 5.0
    assert seen[-1].shape == (2, 3, 8, 8) and seen[-1][1].max() == 0.0  # padding is zeros, and dropped
    assert engine.contexts[0].shape_calls == 0  # static shape: never set
    for bad, expected in [
        (np.zeros((3, 3, 8, 8), np.float32), "expected input (2, 3, 8, 8) with batch 1..2, got (3, 3, 8, 8)"),
        (np.zeros((1, 3, 16, 16), np.float32), "expected input (2, 3, 8, 8) with batch 1..2, got (1, 3, 16, 16)"),
        (np.zeros((3, 8, 8), np.float32), "got (3, 8, 8)"),
    ]:
        with pytest.raises(EdgecvError) as excinfo:
            backend.infer(bad)
        one_line(excinfo, "model tiny.engine: ", expected)


def test_backend_converts_to_the_engine_input_dtype() -> None:
    tensors = [Tensor("images", True, (1, 3, 8, 8), dtype="HALF"), Tensor("out", False, (1, 3, 8, 8), dtype="HALF")]
    backend, _, _ = fake_backend("trt10", tensors, lambda x: [x + np.float16(1)])
    assert backend.input_dtype == np.float16
    (out,) = backend.infer(np.full((1, 3, 8, 8), 0.5, np.float64))
    assert out.dtype == np.float16 and float(out.max()) == 1.5


def test_backend_refuses_data_dependent_output_shapes() -> None:
    tensors = [Tensor("images", True, (1, 3, 8, 8)), Tensor("boxes", False, (1, -1, 4))]
    with pytest.raises(EdgecvError) as excinfo:
        fake_backend("trt10", tensors, lambda x: [])
    one_line(excinfo, "output 'boxes' has a data-dependent shape (1, ?, 4)")


def test_backend_reports_failed_execution() -> None:
    backend, engine, _ = fake_backend("trt10", tiny_tensors(), tiny_run)
    engine.contexts[0].execute_async_v3 = lambda handle: False
    with pytest.raises(EdgecvError) as excinfo:
        backend.infer(np.zeros((1, 3, 8, 8), np.float32))
    one_line(excinfo, "model tiny.engine: TensorRT inference failed")


def test_device_hooks_for_gpu_preprocessing() -> None:
    backend, _, cuda = fake_backend("trt10", tiny_tensors(), tiny_run)
    item = 3 * 8 * 8 * 4
    assert backend.input_pointer(1) - backend.input_pointer(0) == item
    x = np.arange(2 * 3 * 8 * 8, dtype=np.float32).reshape(2, 3, 8, 8)
    cuda.memory.write(backend.input_pointer(0), x.tobytes())  # what the letterbox kernel would do
    cuda.calls.clear()
    double, mean = backend.infer_device(2)
    np.testing.assert_allclose(double, x * 2)
    assert not [c for c in cuda.calls if c[0] == "htod"]  # no host-to-device copy of the input
    with pytest.raises(EdgecvError) as excinfo:
        backend.input_pointer(4)
    one_line(excinfo, "expected a batch index 0..3, got 4")
    with pytest.raises(EdgecvError) as excinfo:
        backend.infer_images([np.zeros((8, 8, 3), np.uint8)])
    one_line(excinfo, "GPU preprocessing is not attached")


@pytest.mark.parametrize("generation", ["trt10", "trt8.2"])
def test_detector_adapters_decode_what_the_tensorrt_backend_returns(generation: str, yolox: Any) -> None:
    """YOLOX on a TensorRTBackend: the adapter's tensor reaches the engine unchanged, and the engine's outputs reach
    the adapter unchanged. The fake engine computes nothing: it returns outputs ONNX Runtime made beforehand."""
    capture = cv2.VideoCapture(str(VTEST))
    frame = capture.read()[1]
    capture.release()
    tensor, _ = yolox.preprocess(frame)
    fixed = yolox.backend.infer(tensor[None])
    seen: list[np.ndarray] = []

    def run(x: np.ndarray) -> list[np.ndarray]:
        seen.append(x.copy())
        return fixed

    ort = yolox.backend
    tensors = [Tensor(ort.input_name, True, ort.input_shape)]
    tensors += [Tensor(name, False, shape) for name, shape in zip(ort.output_names, ort.output_shapes)]
    backend, _, _ = fake_backend(generation, tensors, run, metadata=onnx_metadata(YOLOX))
    got = YoloxDetector(backend, conf=0.3).detect([frame])[0]
    want = YoloxDetector(ort, conf=0.3).detect([frame])[0]
    np.testing.assert_array_equal(seen[0], tensor[None])
    assert len(got) >= 3
    np.testing.assert_array_equal(got.xyxy, want.xyxy)
    np.testing.assert_array_equal(got.score, want.score)
    np.testing.assert_array_equal(got.class_id, want.class_id)


# == fake modules: the real __init__ path, imports, devices, deserialization =================


def fake_trt_module(engines: dict[bytes, Any], version: str = "10.3.0.26", log_on_fail: Sequence[str] = ()) -> Any:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version

    class ILogger:
        def __init__(self) -> None:
            pass

    class Runtime:
        def __init__(self, logger: Any) -> None:
            self.logger = logger

        def deserialize_cuda_engine(self, data: bytes) -> Any:
            if data in engines:
                return engines[data]
            for line in log_on_fail:
                self.logger.log(Enum("Severity", "ERROR"), line)
            return None

    trt.ILogger, trt.Runtime = ILogger, Runtime
    trt.init_libnvinfer_plugins = lambda logger, namespace: True
    return trt


def install(monkeypatch: pytest.MonkeyPatch, trt: Any, cuda: FakeCuda) -> None:
    pycuda = types.ModuleType("pycuda")
    driver = types.ModuleType("pycuda.driver")
    for name in ("init", "Device", "Stream", "Event", "pagelocked_empty", "mem_alloc", "memcpy_htod_async",
                 "memcpy_dtoh_async", "memcpy_htod", "memcpy_dtoh", "memset_d8_async"):  # fmt: skip
        setattr(driver, name, getattr(cuda, name))
    pycuda.driver = driver
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "pycuda", pycuda)
    monkeypatch.setitem(sys.modules, "pycuda.driver", driver)


def test_backend_init_loads_an_engine_file_and_its_source_metadata(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cuda = FakeCuda(["NVIDIA H200"])
    engine = GENERATIONS["trt10"](tiny_tensors(), tiny_run, cuda.memory)
    install(monkeypatch, fake_trt_module({b"ENGINE-1": engine}), cuda)
    model = tiny_model(tmp_path / "tiny.onnx", metadata={"names": "{0: 'x'}"})
    path = tmp_path / "tiny.engine"
    path.write_bytes(b"ENGINE-1")
    backend = TensorRTBackend(path)
    assert backend.metadata == {} and backend.gpu == "NVIDIA H200" and backend.trt_version == "10.3.0.26"
    np.testing.assert_allclose(backend.infer(np.ones((2, 3, 8, 8), np.float32))[0], 2.0)
    assert TensorRTBackend(path, onnx=model).metadata == {"names": "{0: 'x'}"}  # the given ONNX
    write_sidecar(path, {"onnx": str(model)})
    assert TensorRTBackend(path).metadata == {"names": "{0: 'x'}"}  # the ONNX the sidecar names
    write_sidecar(path, {"onnx": str(tmp_path / "gone.onnx"), "metadata": {"imgsz": "[8, 8]"}})
    assert TensorRTBackend(path).metadata == {"imgsz": "[8, 8]"}  # else the sidecar's copy
    backend.close()
    assert cuda.pushed == 0


VERSION_TAG_10 = (
    "IRuntime::deserializeCudaEngine: Error Code 1: Serialization (Serialization assertion stdVersionRead == "
    "kSERIALIZATION_VERSION failed.Version tag does not match. Note: Current Version: 238, Serialized Engine Version: 236)"
)
VERSION_TAG_8 = (
    "1: [stdArchiveReader.cpp::StdArchiveReader::40] Error Code 1: Serialization (Serialization assertion "
    "stdVersionRead == serializationVersion failed.Version tag does not match. Note: Current Version: 213, "
    "Serialized Engine Version: 232)"
)
OTHER_GPU = (
    "1: [runtime.cpp::deserializeCudaEngine::...] The engine plan file is generated on an incompatible device, "
    "expecting compute 8.7 got compute 9.0, please rebuild."
)
PLUGIN_8 = "getPluginCreator could not find plugin: EfficientNMS_TRT version: 1"
PLUGIN_10 = "IPluginRegistry::getCreator: Error Code 4: API Usage Error (Cannot find plugin: YoloLayer_TRT, version: 1, namespace:.)"
MAGIC = "1: [stdArchiveReader.cpp::...] Error Code 1: Serialization (Serialization assertion magicTagRead == kMAGIC_TAG failed.Magic tag does not match)"


@pytest.mark.parametrize(
    "lines, built, expected",
    [
        ([VERSION_TAG_10], {}, ["was built by another TensorRT version", "Version tag does not match",
                                "rebuild it: edgecv build-engine MODEL.onnx --precision fp16 --max-batch 1"]),
        ([VERSION_TAG_8], {"onnx": "/m/yolox_nano.onnx", "precision": "int8", "max_batch": 4},
         ["another TensorRT version", "rebuild it: edgecv build-engine /m/yolox_nano.onnx --precision int8 --max-batch 4"]),
        ([VERSION_TAG_10], {"trt_version": "10.0.1.6", "gpu": "NVIDIA H200"},
         ["was built by TensorRT 10.0.1.6, this is TensorRT 10.3.0.26", "edgecv build-engine"]),
        ([], {"trt_version": "10.3.0.26", "gpu": "Orin"},
         ["was built for the GPU Orin, this is NVIDIA H200", "rebuild it here: edgecv build-engine"]),
        ([OTHER_GPU], {}, ["was built for another GPU", "expecting compute 8.7 got compute 9.0", "edgecv build-engine"]),
        ([PLUGIN_8], {}, ["needs the TensorRT plugin EfficientNMS_TRT, which is not registered here"]),
        ([PLUGIN_10], {}, ["needs the TensorRT plugin YoloLayer_TRT"]),
        ([MAGIC], {}, ["expected a serialized TensorRT engine, found something else or a damaged file"]),
        ([], {}, ["TensorRT could not load it (deserialize_cuda_engine returned None)", "another TensorRT version or GPU",
                  "edgecv build-engine"]),
    ],
)  # fmt: skip
def test_deserialize_error_messages(lines: list, built: dict, expected: list) -> None:
    assert rebuild_command() == "edgecv build-engine MODEL.onnx --precision fp16 --max-batch 1"
    message = deserialize_error("m.engine", lines, built, "10.3.0.26", "NVIDIA H200")
    assert "\n" not in message and message.startswith("engine m.engine")
    for part in expected:
        assert part in message, message


def test_backend_init_turns_deserialization_failure_into_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    install(monkeypatch, fake_trt_module({}, log_on_fail=[VERSION_TAG_10]), FakeCuda())
    path = tmp_path / "old.engine"
    path.write_bytes(b"built elsewhere")
    write_sidecar(path, {"onnx": "/models/yolox_nano.onnx", "trt_version": "8.6.1", "precision": "fp16", "max_batch": 1})
    with pytest.raises(EdgecvError) as excinfo:
        TensorRTBackend(path)
    one_line(excinfo, f"engine {path} was built by TensorRT 8.6.1, this is TensorRT 10.3.0.26",
             "edgecv build-engine /models/yolox_nano.onnx --precision fp16 --max-batch 1")
    with pytest.raises(EdgecvError) as excinfo:
        TensorRTBackend(tmp_path / "missing.engine")
    one_line(excinfo, "expected a TensorRT engine file, found no such file")


def importer_for(available: dict[str, Any]) -> Callable[[str], Any]:
    def importer(name: str) -> Any:
        value = available.get(name)
        if isinstance(value, BaseException):
            raise value
        if value is None:
            raise ModuleNotFoundError(f"No module named '{name}'", name=name)
        return value

    return importer


def test_import_errors_name_the_extra_to_install() -> None:
    with pytest.raises(EdgecvError) as excinfo:
        import_tensorrt(importer_for({}))
    one_line(excinfo, "the tensorrt package is not installed (pip install 'edgecv[tensorrt]'", "python3-libnvinfer")
    with pytest.raises(EdgecvError) as excinfo:
        import_tensorrt(importer_for({"tensorrt": OSError("libnvinfer.so.10: cannot open shared object file")}))
    one_line(excinfo, "the tensorrt package does not load: libnvinfer.so.10: cannot open shared object file")
    with pytest.raises(EdgecvError) as excinfo:
        import_pycuda(importer_for({}))
    one_line(excinfo, "backend 'tensorrt': pycuda is not installed (pip install 'edgecv[tensorrt]')")
    no_driver = ImportError("libcuda.so.1: cannot open shared object file: No such file or directory")
    with pytest.raises(EdgecvError) as excinfo:
        import_pycuda(importer_for({"pycuda": types.ModuleType("pycuda"), "pycuda.driver": no_driver}))
    one_line(excinfo, "pycuda cannot load the NVIDIA driver library (is the driver installed?): libcuda.so.1")


def test_no_cuda_device_messages() -> None:
    with pytest.raises(EdgecvError) as excinfo:
        cuda_device_name(FakeCuda(init_error=RuntimeError("cuInit failed: no CUDA-capable device is detected")))
    one_line(excinfo, "backend 'tensorrt': no CUDA device: cuInit failed: no CUDA-capable device is detected")
    with pytest.raises(EdgecvError) as excinfo:
        cuda_device_name(FakeCuda(devices=()))
    one_line(excinfo, "no CUDA device found (the driver reports 0 GPUs)")
    with pytest.raises(EdgecvError) as excinfo:
        cuda_device_name(FakeCuda(), 1)
    one_line(excinfo, "expected a CUDA device index 0..0, got 1")
    assert cuda_device_name(FakeCuda(["NVIDIA H200"])) == "NVIDIA H200"


def test_probe_answers() -> None:
    trt = types.SimpleNamespace(__version__="10.3.0.26")
    pycuda = types.ModuleType("pycuda")
    good = FakeCuda(["NVIDIA H200"])
    assert probe(importer_for({})).problem.startswith("the tensorrt package is not installed")
    got = probe(importer_for({"tensorrt": trt}))
    assert got.tensorrt == "10.3.0.26" and not got.pycuda and got.problem.startswith("pycuda is not installed")
    nodev = FakeCuda(init_error=RuntimeError("cuInit failed: no CUDA-capable device is detected"))
    got = probe(importer_for({"tensorrt": trt, "pycuda": pycuda, "pycuda.driver": nodev}))
    assert got.pycuda and not got.usable and got.problem.startswith("no CUDA device")
    got = probe(importer_for({"tensorrt": trt, "pycuda": pycuda, "pycuda.driver": good}))
    assert got == Availability("10.3.0.26", True, "NVIDIA H200", "") and got.usable


# == what the builder is given (building an engine needs TensorRT: see the tests at the end) ==


def test_build_engine_checks_its_options_before_importing_tensorrt(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import edgecv.engine.trt_build as tb

    def no_import() -> Any:
        raise AssertionError("TensorRT imported before the options were checked")

    monkeypatch.setattr(tb, "import_tensorrt", no_import)
    model = tiny_model(tmp_path / "tiny.onnx")
    for kwargs, expected in [
        ({"precision": "fp8"}, "precision: expected one of fp32, fp16, int8, got 'fp8'"),
        ({"workspace_mb": 0}, "workspace: expected a positive number of MB, got 0"),
        ({"max_batch": 0}, "max batch: expected a positive number, got 0"),
        ({"precision": "int8", "calib_dir": BDD},  # calibrating on images needs the caller's adapter factory
         "INT8 calibration preprocesses images with the model's adapter: expected an adapter_factory"),
    ]:  # fmt: skip
        with pytest.raises(EdgecvError) as excinfo:
            tb.build_engine(model, write=lambda line: None, **kwargs)
        one_line(excinfo, expected)
    with pytest.raises(EdgecvError) as excinfo:
        tb.build_engine(tmp_path / "missing.onnx", write=lambda line: None)
    one_line(excinfo, "expected an ONNX model file, found no such file")


def test_build_engine_command_passes_its_options_and_the_calibration_adapter(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture) -> None:  # fmt: skip
    """The builder knows no model families: the CLI hands it calibration_detector (the registry too, below)."""
    import edgecv.cli as cli
    from edgecv.engine.registry import calibration_detector

    calls: list[tuple[tuple, dict]] = []
    out = tmp_path / "out" / "yolox-int8.engine"

    def build_engine(*args: Any, **kwargs: Any) -> Any:
        calls.append((args, kwargs))
        return types.SimpleNamespace(path=out)

    monkeypatch.setattr(cli, "build_engine", build_engine)
    args = ["build-engine", str(YOLOX), "--precision", "int8", "--calib-dir", str(BDD), "--max-batch", "2",
            "--workspace-mb", "256", "--output", str(out)]  # fmt: skip
    assert cli.main(args) == 0
    assert capfd.readouterr().out.strip() == str(out)
    ((model,), kwargs), = calls
    assert Path(model) == YOLOX and str(kwargs["output"]) == str(out) and str(kwargs["calib_dir"]) == str(BDD)
    assert kwargs["precision"] == "int8" and kwargs["max_batch"] == 2 and kwargs["workspace_mb"] == 256
    assert kwargs["adapter_factory"] is calibration_detector


def test_environment_overrides_hold_only_the_variables_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """What ensure_engine lays over the model's `tensorrt:` section: only the EDGECV_TRT_* that are set."""
    assert env_overrides({}) == {}
    assert env_overrides({"EDGECV_TRT_PRECISION": "", "EDGECV_TRT_MAX_BATCH": " ", "EDGECV_TRT_CALIB_DIR": ""}) == {}
    assert env_overrides({"EDGECV_TRT_MAX_BATCH": "2"}) == {"max_batch": 2}  # the section's precision stays
    full = {"EDGECV_TRT_PRECISION": " INT8 ", "EDGECV_TRT_MAX_BATCH": "8", "EDGECV_TRT_CALIB_DIR": "/calib"}
    assert env_overrides(full) == {"precision": "int8", "max_batch": 8, "calib_dir": "/calib"}
    assert auto_options({"EDGECV_TRT_PRECISION": "fp32"}) == {"precision": "fp32", "max_batch": 4, "calib_dir": None}
    for name in ("EDGECV_TRT_PRECISION", "EDGECV_TRT_MAX_BATCH", "EDGECV_TRT_CALIB_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("EDGECV_TRT_PRECISION", "fp32")
    assert env_overrides() == {"precision": "fp32"}  # by default: this process's environment


def test_engine_options_are_defaults_then_the_section_then_the_environment(caplog: pytest.LogCaptureFixture) -> None:
    from edgecv.engine.trt_build import engine_options

    section = {"precision": "fp32", "max_batch": 2, "calib_dir": None}
    assert engine_options({}, {}) == {"precision": "fp16", "max_batch": 4, "calib_dir": None}
    assert engine_options(section, {}) == section
    assert engine_options({"precision": None, "max_batch": 8}, {}) == {"precision": "fp16", "max_batch": 8,
                                                                       "calib_dir": None}
    env = {"EDGECV_TRT_PRECISION": "int8", "EDGECV_TRT_CALIB_DIR": "/calib"}
    with caplog.at_level(logging.INFO, logger="edgecv.engine"):
        assert engine_options(section, env) == {"precision": "int8", "max_batch": 2, "calib_dir": "/calib"}
    assert "TensorRT engine: precision int8 from the environment (the config says fp32)" in caplog.messages


def test_the_configs_tensorrt_section_reaches_the_engine_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """`model.tensorrt` is handed to open_tensorrt (which builds the engine) with the calibration adapter."""
    import edgecv.engine.registry as registry
    from edgecv.config import ConfigError, parse
    from edgecv.models import load_models

    calls: list[tuple[Path, dict]] = []

    def open_tensorrt(path: Any, **kwargs: Any) -> Any:
        calls.append((Path(path), kwargs))
        raise EdgecvError("open_tensorrt called")  # no TensorRT here to build with: stop at the call

    monkeypatch.setattr(registry, "choose_backend", lambda requested, path: ("tensorrt", f"{requested}: in a test"))
    monkeypatch.setattr(registry, "open_tensorrt", open_tensorrt)
    data = {"node_id": "n", "cameras": {"c": {"source": str(VTEST)}},
            "model": {"path": str(YOLOX), "backend": "tensorrt", "tensorrt": {"precision": "fp32", "max_batch": 2}}}
    with pytest.raises(ConfigError) as excinfo:
        load_models(parse(data))
    assert excinfo.value.problems == ["model.path: open_tensorrt called"]
    ((path, kwargs),) = calls
    assert path.resolve() == YOLOX.resolve()
    assert kwargs["precision"] == "fp32" and kwargs["max_batch"] == 2 and kwargs["calib_dir"] is None
    assert kwargs["adapter_factory"] is registry.calibration_detector
    with pytest.raises(ConfigError) as excinfo:  # the section is checked like the rest of the config
        parse({**data, "model": {**data["model"], "tensorrt": {"precision": "int8"}}})
    assert "model.tensorrt: " in str(excinfo.value) and "needs calib_dir" in str(excinfo.value)


def test_calibration_detector_is_the_models_adapter(tmp_path: Path) -> None:
    from edgecv.engine.registry import calibration_detector

    assert isinstance(calibration_detector(YOLOX), YoloxDetector)
    assert isinstance(calibration_detector(YOLOV8, "yolov8"), Yolov8Detector)  # an explicit family is taken...
    with pytest.raises(EdgecvError) as excinfo:  # ...and checked against the model
        calibration_detector(YOLOX, "yolov8")
    one_line(excinfo, "family 'yolov8' expects output (1, 4+C, N), got (1, 3549, 85)")
    with pytest.raises(EdgecvError) as excinfo:
        calibration_detector(YOLOX, "nope")
    one_line(excinfo, "family: expected one of auto, yolox, yolov8", "got 'nope'")
    with pytest.raises(EdgecvError) as excinfo:
        calibration_detector(tmp_path / "missing.onnx")
    one_line(excinfo, "INT8 calibration preprocesses images with the model's adapter: ")


# == choosing the backend ====================================================================

HERE = Availability("10.3.0.26", True, "NVIDIA H200")
NO_TRT = Availability(problem="the tensorrt package is not installed (pip install 'edgecv[tensorrt]')")
NO_GPU = Availability("8.6.2", True, None, "no CUDA device: cuInit failed: no CUDA-capable device is detected")


def never() -> Availability:
    raise AssertionError("probed although the answer does not depend on it")


@pytest.mark.parametrize(
    "requested, path, found, backend, reason",
    [
        ("auto", "m.onnx", HERE, "tensorrt", "auto: TensorRT 10.3.0.26 with pycuda on NVIDIA H200"),
        ("auto", "m.onnx", NO_TRT, "onnxruntime", "auto: TensorRT not used (the tensorrt package is not installed"),
        ("auto", "m.onnx", NO_GPU, "onnxruntime", "auto: TensorRT not used (no CUDA device"),
        ("tensorrt", "m.onnx", HERE, "tensorrt", "requested: TensorRT 10.3.0.26"),
        ("auto", "m.engine", HERE, "tensorrt", "engine file: TensorRT 10.3.0.26"),
        ("onnxruntime", "m.onnx", None, "onnxruntime", "requested"),
    ],
)
def test_choose_backend(requested: str, path: str, found: Optional[Availability], backend: str, reason: str) -> None:
    chosen, why = choose_backend(requested, path, (lambda: found) if found else never)
    assert chosen == backend and why.startswith(reason), why


@pytest.mark.parametrize(
    "requested, path, found, expected",
    [
        ("tensorrt", "m.onnx", NO_TRT, "backend 'tensorrt' requested but TensorRT cannot run here: the tensorrt package is not installed"),
        ("tensorrt", "m.onnx", NO_GPU, "backend 'tensorrt' requested but TensorRT cannot run here: no CUDA device"),
        ("auto", "m.plan", NO_GPU, "model m.plan is a TensorRT engine but TensorRT cannot run here: no CUDA device"),
        ("onnxruntime", "m.engine", None, "model m.engine: a TensorRT engine file cannot run on backend 'onnxruntime'"),
        ("openvino", "m.onnx", HERE, "backend: expected one of auto, onnxruntime, tensorrt, got 'openvino'"),
    ],
)  # fmt: skip
def test_choose_backend_errors(requested: str, path: str, found: Optional[Availability], expected: str) -> None:
    with pytest.raises(EdgecvError) as excinfo:
        choose_backend(requested, path, (lambda: found) if found else never)
    one_line(excinfo, expected)


TRT_HERE = probe().usable


@pytest.mark.skipif(TRT_HERE, reason="this machine runs TensorRT: auto picks it (covered by the GPU tests)")
def test_auto_falls_back_to_onnxruntime_and_logs_why(caplog: pytest.LogCaptureFixture) -> None:
    from edgecv.engine import build_detector

    with caplog.at_level(logging.INFO, logger="edgecv.engine"):
        detector = build_detector(YOLOX)
    assert detector.backend.name == "onnxruntime"
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("backend ")]
    assert len(lines) == 1 and lines[0].startswith("backend onnxruntime for yolox_nano.onnx (auto: TensorRT not used (")
    with pytest.raises(EdgecvError) as excinfo:
        build_detector(YOLOX, backend="tensorrt")
    one_line(excinfo, "backend 'tensorrt' requested but TensorRT cannot run here")


# == progress ================================================================================


def test_build_progress_lines() -> None:
    lines: list[str] = []
    now = [0.0]
    progress = BuildProgress(lines.append, interval=2.0, clock=lambda: now[0])
    progress.phase_start("Building engine", None, 3)
    progress.phase_start("Tactic timing", "Building engine", 100)
    for step in range(100):
        now[0] += 0.1
        assert progress.step_complete("Tactic timing", step) is True
    progress.phase_finish("Tactic timing")
    now[0] += 1.0
    progress.phase_finish("Building engine")
    assert lines[0] == "  Building engine ..."
    steps = [line for line in lines if "step" in line]
    assert steps[0] == "  Building engine > Tactic timing: step 1/100"
    assert 4 <= len(steps) <= 6  # every 2 s over 10 s, not 100 lines
    assert lines[-1] == "  Building engine done (11.0 s)"


def test_heartbeat_writes_while_running() -> None:
    lines: list[str] = []
    with Heartbeat(lines.append, interval=0.05):
        time.sleep(0.3)
    count = len(lines)
    assert count >= 3 and all(line.startswith("  still building... ") for line in lines)
    time.sleep(0.15)
    assert len(lines) == count  # stopped with the block


# == command line ============================================================================


def run_cli(*args: str, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgecv.cli", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})  # fmt: skip


def test_build_engine_command_line() -> None:
    helped = run_cli("build-engine", "--help")
    assert helped.returncode == 0
    for option in ("--precision", "--calib-dir", "--max-batch", "--workspace-mb", "--output", "{fp32,fp16,int8}"):
        assert option in helped.stdout
    missing = run_cli("build-engine", "nowhere/missing.onnx")
    assert missing.returncode == 1
    assert missing.stderr.strip() == "edgecv: error: model nowhere/missing.onnx: expected an ONNX model file, found no such file"


@pytest.mark.skipif(TRT_HERE, reason="TensorRT runs here")
def test_build_engine_without_tensorrt_says_what_to_install() -> None:
    result = run_cli("build-engine", str(YOLOX))
    assert result.returncode == 1
    assert result.stderr.startswith("edgecv: error: backend 'tensorrt': the tensorrt package is not installed (pip install")
    assert len(result.stderr.strip().splitlines()) == 1


def test_package_imports_without_tensorrt_pycuda_pydantic_or_paho() -> None:
    code = (
        "import sys, edgecv.engine, edgecv.engine.tensorrt, edgecv.engine.trt_build, edgecv.engine.gpu_preprocess; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorrt', 'pycuda', 'pydantic', 'paho')]; "
        "print(bad)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr


# == real TensorRT (skipped unless tensorrt, pycuda and a CUDA device are present) ===========

needs_trt = pytest.mark.skipif(not TRT_HERE, reason=f"needs TensorRT + pycuda + a CUDA device: {probe().problem}")


@pytest.fixture
def engine_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


@needs_trt
@pytest.mark.gpu
def test_real_engine_build_run_and_cache(tmp_path: Path, engine_cache: Path) -> None:
    from edgecv.engine.trt_build import build_engine, ensure_engine

    model = tiny_model(tmp_path / "tiny.onnx", metadata={"names": "{0: 'x'}"})
    lines: list[str] = []
    result = build_engine(model, precision="fp32", max_batch=4, write=lines.append)
    assert result.path.parent == engine_cache and result.path.is_file() and result.max_batch == 4
    assert read_sidecar(result.path)["onnx_sha256"] == sha256_file(model)
    assert any(line.startswith("engine written: ") for line in lines)
    backend = TensorRTBackend(result.path)
    assert backend.metadata == {"names": "{0: 'x'}"} and backend.max_batch == 4
    ort = OnnxRuntimeBackend(model, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for n in (1, 4, 2):
        batch = rng.random((n, 3, 8, 8), dtype=np.float32)
        for got, want in zip(backend.infer(batch), ort.infer(batch)):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(EdgecvError):
        backend.infer(np.zeros((5, 3, 8, 8), np.float32))
    mtime = result.path.stat().st_mtime_ns
    assert ensure_engine(model, precision="fp32", max_batch=4) == result.path  # cached: not rebuilt
    assert result.path.stat().st_mtime_ns == mtime
    damaged = tmp_path / "damaged.engine"
    damaged.write_bytes(result.path.read_bytes()[:1000])
    with pytest.raises(EdgecvError) as excinfo:
        TensorRTBackend(damaged)
    one_line(excinfo, f"engine {damaged}")


@needs_trt
@pytest.mark.gpu
def test_real_yolox_fp16_matches_onnxruntime(engine_cache: Path) -> None:
    from edgecv.engine import build_detector
    from edgecv.engine.ops import box_iou

    trt_det = build_detector(YOLOX, backend="tensorrt", conf=0.3)
    assert trt_det.backend.name == "tensorrt"
    ort_det = build_detector(YOLOX, backend="onnxruntime", conf=0.3)
    capture = cv2.VideoCapture(str(VTEST))
    frames = [capture.read()[1] for _ in range(5)]
    for a, b in zip(trt_det.detect(frames), ort_det.detect(frames)):
        assert abs(len(a) - len(b)) <= 1
        iou = box_iou(b.xyxy, a.xyxy)
        assert (iou.max(axis=1) > 0.9).mean() >= 0.9


@needs_trt
@pytest.mark.gpu
def test_real_int8_build_with_calibration_cache(tmp_path: Path, engine_cache: Path) -> None:
    from edgecv.engine.registry import calibration_detector
    from edgecv.engine.trt_build import build_engine

    out = tmp_path / "yolox_int8.engine"
    result = build_engine(YOLOX, output=out, precision="int8", calib_dir=BDD, write=lambda line: None,
                          adapter_factory=calibration_detector)
    assert result.path == out and calibration_cache_path(out).is_file()
    assert json.loads(sidecar_path(out).read_text())["calibration"]["images"] == len(list_images(BDD))
    assert TensorRTBackend(out).infer(np.zeros((1, 3, 416, 416), np.float32))[0].shape == (1, 3549, 85)
