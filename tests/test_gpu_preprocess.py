"""GPU letterbox kernel: its numpy twin against OpenCV, its source, and its plumbing.

On any machine: the numpy reference of the kernel (same coordinate math, same float32
rounding order) is compared with ``Detector.preprocess`` (OpenCV) on real frames for both
letterbox styles; the kernel source is compiled to PTX with nvcc when nvcc is installed
(no GPU needed); ``GpuPreprocessor`` and ``TensorRTBackend.infer_images`` are driven with a
fake CUDA whose "kernel" is the numpy reference (and a fake engine that only records its
input), to check the arguments and buffers they pass; the pipeline runs with a backend that
makes its own inputs from the frames (the seam TensorRT's GPU preprocessing uses). On a GPU
machine: the real kernel, through pycuda and through CuPy, must equal the reference bit for bit.

Tolerance against OpenCV (0-255 units): max |diff| <= 1 (OpenCV resizes in fixed point with
11-bit weights, the kernel in float), mean |diff| <= 0.15, padding identical.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Sequence

import cv2
import numpy as np
import pytest
from conftest import ASSETS, REPO

from edgecv.engine import YoloxDetector, Yolov8Detector
from edgecv.engine.backend import Backend, OnnxRuntimeBackend, Staged
from edgecv.engine.gpu_preprocess import (
    KERNEL_NAME,
    KERNEL_SOURCE,
    GpuPreprocessor,
    KernelParams,
    kernel_params,
    letterbox_geometry,
    put_nvcc_on_path,
    reference_kernel,
    reference_preprocess,
)
from edgecv.engine.ops import InputSpec, letterbox

YOLOX = ASSETS / "models" / "yolox_nano.onnx"
YOLOV8 = ASSETS / "models" / "yolov8n_int8.onnx"
MAX_DIFF, MEAN_DIFF = 1.0, 0.15


def vtest_frames(n: int) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(ASSETS / "media" / "vtest.avi"))
    frames = []
    for _ in range(n):
        ok, frame = capture.read()
        assert ok
        frames.append(frame)
    capture.release()
    return frames


def real_frames() -> list[tuple[str, np.ndarray]]:
    bdd = sorted((ASSETS / "media" / "bdd").glob("*.jpg"))[:4]
    frames = [(f"vtest#{i}", f) for i, f in enumerate(vtest_frames(10)[::3])]
    frames += [(p.name, cv2.imread(str(p))) for p in bdd]
    big = cv2.resize(cv2.imread(str(bdd[0])), (1920, 1080), interpolation=cv2.INTER_LINEAR)
    frames.append(("bdd 1920x1080", big))
    frames.append(("portrait", np.ascontiguousarray(big[:, 600:1000])))
    return frames


@pytest.fixture(scope="module")
def detectors() -> dict[str, Any]:
    cpu = ["CPUExecutionProvider"]
    return {
        "yolox": YoloxDetector(OnnxRuntimeBackend(YOLOX, threads=1, providers=cpu)),
        "yolov8": Yolov8Detector(OnnxRuntimeBackend(YOLOV8, threads=1, providers=cpu)),
    }


# -- the numpy twin against OpenCV --------------------------------------------------------------


@pytest.mark.parametrize("family", ["yolox", "yolov8"])
def test_reference_matches_opencv_preprocess_on_real_frames(family: str, detectors: dict) -> None:
    detector = detectors[family]
    style = asdict(detector.input_spec)
    unit = 1.0 / style["scale"]  # back to 0-255 units
    for name, frame in real_frames():
        want, want_box = detector.preprocess(frame)
        got, got_box = reference_preprocess(frame, **style)
        assert got_box == want_box, name
        assert got.shape == want.shape and got.dtype == np.float32
        diff = np.abs(got.astype(np.float64) - want) * unit
        assert diff.max() <= MAX_DIFF + 1e-3, (name, diff.max())
        assert diff.mean() <= MEAN_DIFF, (name, diff.mean())
        # the padding is exact: same grey, same place
        box = got_box
        params = kernel_params(frame.shape[1], frame.shape[0], style["size"], style["center"], style["rgb"], style["scale"])
        pad = np.ones(got.shape[1:], bool)
        pad[params.pad_y : params.pad_y + params.new_h, params.pad_x : params.pad_x + params.new_w] = False
        np.testing.assert_array_equal(got[:, pad], want[:, pad])
        assert box.pad_x == params.pad_x and box.pad_y == params.pad_y


def test_reference_styles_channel_order_and_scale(detectors: dict) -> None:
    image = np.zeros((4, 4, 3), np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = 10, 20, 30  # B, G, R
    bgr, _ = reference_preprocess(image, (8, 8), center=False, rgb=False, scale=1.0)
    rgb, _ = reference_preprocess(image, (8, 8), center=True, rgb=True, scale=1 / 255)
    assert bgr[:, 0, 0].tolist() == [10, 20, 30]
    np.testing.assert_allclose(rgb[:, 4, 4], np.array([30, 20, 10], np.float32) / 255, rtol=1e-6)
    assert detectors["yolox"].input_spec == InputSpec((416, 416), center=False, rgb=False, scale=1.0, pad_value=114)
    assert detectors["yolov8"].input_spec == InputSpec((640, 640), center=True, rgb=True, scale=1 / 255, pad_value=114)


def test_reference_is_an_exact_copy_when_no_resize_is_needed() -> None:
    image = np.random.default_rng(3).integers(0, 256, (64, 48, 3), dtype=np.uint8)
    out, box = reference_preprocess(image, (64, 64), center=True, rgb=False, scale=1.0)
    assert box.scale == 1.0 and box.pad_x == 8
    np.testing.assert_array_equal(out[:, :, 8:56], image.transpose(2, 0, 1))
    assert (out[:, :, :8] == 114).all() and (out[:, :, 56:] == 114).all()


@pytest.mark.parametrize("center", [False, True])
def test_geometry_is_the_cpu_letterbox(center: bool) -> None:
    sizes = [(768, 576), (1280, 720), (1920, 1080), (720, 1280), (53, 37), (1, 1), (416, 416), (5000, 3), (3, 5000)]
    for src_w, src_h in sizes:
        for dst in [(416, 416), (640, 640), (640, 384), (320, 192)]:
            _, box = letterbox(np.zeros((src_h, src_w, 3), np.uint8), dst, center=center)
            new_w, new_h, pad_x, pad_y, ours = letterbox_geometry(src_w, src_h, *dst, center)
            assert ours == box, (src_w, src_h, dst)
            assert 1 <= new_w <= dst[0] and 1 <= new_h <= dst[1]
            assert pad_x + new_w <= dst[0] and pad_y + new_h <= dst[1]


def test_reference_rejects_bad_images() -> None:
    params = kernel_params(8, 8, (16, 16), False, False, 1.0)
    for bad in (np.zeros((8, 8), np.uint8), np.zeros((8, 8, 3), np.float32), np.zeros((8, 9, 3), np.uint8)):
        with pytest.raises(ValueError):
            reference_kernel(bad, params)


# -- the kernel source --------------------------------------------------------------------------


def kernel_parameters() -> list[tuple[str, str]]:
    """(type, name) of each parameter of the kernel, read from its source."""
    signature = re.search(rf"{KERNEL_NAME}\s*\((.*?)\)\s*\{{", KERNEL_SOURCE, re.S)
    assert signature
    text = re.sub(r"//[^\n]*", "", signature.group(1))
    params = []
    for part in text.split(","):
        tokens = part.replace("*", " * ").split()
        params.append((" ".join(t for t in tokens[:-1] if t not in ("const", "__restrict__")), tokens[-1]))
    return params


def test_kernel_arguments_match_its_signature() -> None:
    params = kernel_params(768, 576, (416, 416), center=True, rgb=True, scale=1 / 255)
    args = params.args("SRC", 768 * 3, "DST")
    signature = kernel_parameters()
    assert len(args) == len(signature) == 16
    for arg, (ctype, name) in zip(args, signature):
        if ctype.endswith("*"):
            assert arg in ("SRC", "DST"), name
        elif ctype == "int":
            assert isinstance(arg, np.int32), name
        else:
            assert ctype == "float" and isinstance(arg, np.float32), name
    named = {name: arg for arg, (_, name) in zip(args, signature)}
    assert named["new_w"] == 416 and named["new_h"] == 312 and named["pad_y"] == 52 and named["swap_rb"] == 1
    assert named["scale_x"] == np.float32(768 / 416) and named["pad_value"] == 114
    assert params.grid() == (13, 52, 1)


@pytest.mark.skipif(shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").exists(),
                    reason="needs nvcc (the CUDA toolkit) to compile the kernel source")  # fmt: skip
def test_kernel_source_compiles_without_fused_multiply_adds(tmp_path: Path) -> None:
    """nvcc accepts the source; the PTX has the entry point and no fma (so numpy float32 can match it)."""
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    source = tmp_path / "letterbox.cu"
    source.write_text(KERNEL_SOURCE)
    result = subprocess.run([nvcc, "--ptx", "-O3", "-o", str(tmp_path / "k.ptx"), str(source)],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    ptx = (tmp_path / "k.ptx").read_text()
    assert f".entry {KERNEL_NAME}(" in ptx
    assert "fma." not in ptx, "the kernel must not fuse multiply-adds (its numpy twin rounds each operation)"
    assert "mul.rn.f32" in ptx and "add.rn.f32" in ptx


def test_nvcc_goes_on_path_only_when_asked_and_only_once(tmp_path: Path) -> None:
    cuda_bin, elsewhere = tmp_path / "cuda" / "bin", tmp_path / "bin"
    cuda_bin.mkdir(parents=True)
    elsewhere.mkdir()
    env = {"PATH": str(elsewhere)}
    assert put_nvcc_on_path(env, str(cuda_bin)) is False and env == {"PATH": str(elsewhere)}  # no nvcc there
    nvcc = cuda_bin / "nvcc"
    nvcc.write_text("#!/bin/sh\n")
    nvcc.chmod(0o755)
    assert put_nvcc_on_path(env, str(cuda_bin)) is True
    assert env == {"PATH": str(elsewhere) + os.pathsep + str(cuda_bin)}
    assert put_nvcc_on_path(env, str(cuda_bin)) is False and env["PATH"].count(str(cuda_bin)) == 1
    # importing the module changes nothing: PATH is only touched by that call
    code = "import os, edgecv.engine.gpu_preprocess, edgecv.engine; print(os.environ['PATH'])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PATH": str(elsewhere)})
    assert result.returncode == 0 and result.stdout.strip() == str(elsewhere), result.stderr


# -- GpuPreprocessor and infer_images with a fake CUDA whose kernel is the reference -------------


class ReferenceKernel:
    """Stands in for the compiled kernel: reads its arguments like the CUDA code, computes with numpy."""

    def __init__(self, memory: Any) -> None:
        self.memory = memory
        self.launches: list[dict] = []

    def __call__(self, *args: Any, block: tuple, grid: tuple, stream: Any) -> None:
        names = [name for _, name in kernel_parameters()]
        a = dict(zip(names, args))
        src_w, src_h, pitch = int(a["src_w"]), int(a["src_h"]), int(a["src_pitch"])
        assert pitch >= 3 * src_w
        raw = np.frombuffer(self.memory.read(int(a["src"]), pitch * src_h), np.uint8).reshape(src_h, pitch)
        image = np.ascontiguousarray(raw[:, : 3 * src_w].reshape(src_h, src_w, 3))
        params = KernelParams(
            src_w, src_h, int(a["dst_w"]), int(a["dst_h"]), int(a["new_w"]), int(a["new_h"]), int(a["pad_x"]),
            int(a["pad_y"]), float(a["value_scale"]), bool(a["swap_rb"]), float(a["pad_value"]), letterbox=None,
        )  # fmt: skip
        assert a["scale_x"] == params.scale_x and a["scale_y"] == params.scale_y
        assert grid[0] * block[0] >= params.dst_w and grid[1] * block[1] >= params.dst_h
        self.memory.write(int(a["dst"]), reference_kernel(image, params).tobytes())
        self.launches.append(a)


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> Any:
    from test_tensorrt import FakeCuda

    import edgecv.engine.gpu_preprocess as gp

    cuda = FakeCuda()
    kernel = ReferenceKernel(cuda.memory)
    monkeypatch.setattr(gp, "compile_kernel", lambda: kernel)
    monkeypatch.setattr(gp, "put_nvcc_on_path", lambda: False)  # leave this process's PATH alone
    return cuda, kernel


def test_gpu_preprocessor_passes_frames_and_geometry_to_the_kernel(fake_gpu: Any, detectors: dict) -> None:
    cuda, kernel = fake_gpu
    for family in ("yolox", "yolov8"):
        detector = detectors[family]
        pre = GpuPreprocessor.for_spec(detector.input_spec, cuda=cuda)
        for name, frame in real_frames()[:3] + [("strided", real_frames()[0][1][::2, ::2])]:
            box = pre(frame)
            want, want_box = reference_preprocess(np.ascontiguousarray(frame), **asdict(detector.input_spec))
            assert box == want_box, name
            np.testing.assert_array_equal(pre.download(), want)
        assert pre.nbytes == 3 * detector.input_size[0] * detector.input_size[1] * 4
    with pytest.raises(ValueError):
        pre(np.zeros((8, 8), np.uint8))


def test_infer_images_letterboxes_into_the_engine_input_buffer(fake_gpu: Any, detectors: dict) -> None:
    """TensorRTBackend.infer_images: the kernel writes each frame into its slot of the engine's input buffer, a
    short batch on a fixed-batch engine is zero-padded on the device, the letterboxes come back. The fake engine
    records the input it finds on the device and returns its per-item mean; it computes nothing else."""
    from test_tensorrt import Tensor, fake_backend

    from edgecv import EdgecvError

    cuda, kernel = fake_gpu
    spec = detectors["yolox"].input_spec
    w, h = spec.size
    seen: list[np.ndarray] = []

    def run(x: np.ndarray) -> list[np.ndarray]:
        seen.append(x.copy())
        return [x.mean(axis=(1, 2, 3))[:, None]]

    tensors = [Tensor("images", True, (2, 3, h, w)), Tensor("mean", False, (2, 1))]
    backend, _, _ = fake_backend("trt10", tensors, run, cuda=cuda)
    assert not backend.makes_inputs
    backend.attach(spec)
    assert backend.makes_inputs and backend.preprocessor is not None
    frames = vtest_frames(3)
    want = [reference_preprocess(f, **asdict(spec)) for f in frames]
    (mean,), boxes = backend.infer_images(frames[:2])
    np.testing.assert_array_equal(seen[-1], np.stack([want[0][0], want[1][0]]))
    assert boxes == [want[0][1], want[1][1]] and mean.shape == (2, 1)
    np.testing.assert_allclose(mean, seen[-1].mean(axis=(1, 2, 3))[:, None], rtol=1e-6)
    assert [int(k["dst"]) for k in kernel.launches] == [backend.input_pointer(0), backend.input_pointer(1)]
    (mean,), boxes = backend.infer_images(frames[2:])
    assert mean.shape == (1, 1) and boxes == [want[2][1]]
    np.testing.assert_array_equal(seen[-1][0], want[2][0])
    assert not seen[-1][1].any()  # slot 1 still held frame 1: zeroed on the device
    with pytest.raises(EdgecvError) as excinfo:
        backend.infer_images(frames)
    assert "expected 1..2 images, got 3" in str(excinfo.value)


# -- the real kernel on a GPU -------------------------------------------------------------------


def pycuda_ready() -> str:
    from edgecv.engine.trt_env import cuda_device_name, import_pycuda

    try:
        cuda_device_name(import_pycuda())
    except Exception as exc:  # EdgecvError with the reason
        return str(exc)
    return ""


def cupy_ready() -> str:
    try:
        import cupy

        cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # ImportError, or CUDARuntimeError without a device
        return f"cupy with a CUDA device: {type(exc).__name__}: {exc}"
    return ""


@pytest.mark.gpu
@pytest.mark.skipif(bool(pycuda_ready()), reason=f"needs pycuda and a CUDA device: {pycuda_ready()}")
def test_pycuda_kernel_equals_reference() -> None:
    import pycuda.driver as cuda

    context = cuda.Device(0).retain_primary_context()
    context.push()
    try:
        synthetic = np.random.default_rng(0).integers(0, 256, (1080, 1920, 3), dtype=np.uint8)
        for center, rgb, scale in [(False, False, 1.0), (True, True, 1 / 255)]:
            pre = GpuPreprocessor((416, 416), center, rgb, scale)
            for frame in [vtest_frames(1)[0], synthetic]:
                pre(frame)
                want, _ = reference_preprocess(frame, (416, 416), center, rgb, scale)
                np.testing.assert_array_equal(pre.download(), want)
    finally:
        context.pop()
        context.detach()


@pytest.mark.gpu
@pytest.mark.skipif(bool(cupy_ready()), reason=f"needs {cupy_ready()}")
def test_cupy_kernel_equals_reference() -> None:
    import cupy as cp

    kernel = cp.RawKernel(KERNEL_SOURCE, KERNEL_NAME)
    synthetic = np.random.default_rng(0).integers(0, 256, (1080, 1920, 3), dtype=np.uint8)
    for center, rgb, scale in [(False, False, 1.0), (True, True, 1 / 255)]:
        for frame in [vtest_frames(1)[0], synthetic]:
            params = kernel_params(frame.shape[1], frame.shape[0], (416, 416), center, rgb, scale)
            src = cp.asarray(frame)
            dst = cp.empty((3, 416, 416), cp.float32)
            kernel(params.grid()[:2], (32, 8), params.args(src, frame.shape[1] * 3, dst))
            np.testing.assert_array_equal(cp.asnumpy(dst), reference_kernel(frame, params))


# -- the GPU check script, on the CPU ---------------------------------------------------------------


def test_gpu_check_script_runs_without_pydantic_or_paho(tmp_path: Path) -> None:
    """engines/gpu_check.py end to end with the numpy twin standing in for the GPU (``--simulate``).

    The GPU machine has no pydantic or paho-mqtt: both are made unimportable here.
    """
    import json
    import sys

    out = tmp_path / "gpu.json"
    code = (
        "import runpy, sys; sys.modules['pydantic'] = None; sys.modules['paho'] = None; "
        f"sys.argv = ['gpu_check.py', '--assets', {str(ASSETS)!r}, '--out', {str(out)!r}, '--runs', '2', '--simulate']; "
        "runpy.run_path('engines/gpu_check.py', run_name='__main__')"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["ok"] and "kernel" in report["ran"]
    cases = report["kernel"]["runners"]["numpy-twin"]["cases"]
    assert len(cases) == 12 and {c["style"] for c in cases} == {"yolox", "ultralytics"}
    assert all(c["vs_numpy_twin_max"] == 0.0 and c["vs_cpu_max"] <= MAX_DIFF for c in cases)
    assert "environment" in report and "tensorrt" in report


# -- the pipeline with a backend that makes its own inputs --------------------------------------


class MakesItsOwnInputs(Backend):
    """A backend that makes its input tensors itself, from the frames, on the inference thread (as TensorRT does
    with the letterbox kernel): once attached, ``stage`` keeps the frame and ``infer_staged`` letterboxes it with
    the kernel's numpy twin and runs the model with ONNX Runtime. It records the threads each step ran on."""

    name = "makes-its-own-inputs"
    device = "cpu"

    def __init__(self, inner: OnnxRuntimeBackend) -> None:
        self.inner = inner
        for attr in ("path", "input_name", "input_shape", "input_dtype", "output_names", "output_shapes",
                     "metadata", "max_batch"):  # fmt: skip
            setattr(self, attr, getattr(inner, attr))
        self.spec: Optional[InputSpec] = None
        self.threads: dict[str, set[str]] = {"stage": set(), "infer_staged": set()}

    def infer(self, batch: np.ndarray) -> list[np.ndarray]:
        return self.inner.infer(batch)

    def attach(self, spec: Optional[InputSpec]) -> None:
        self.spec = spec

    @property
    def makes_inputs(self) -> bool:
        return self.spec is not None

    def stage(self, image: np.ndarray, preprocess: Any) -> Staged:
        if self.spec is None:
            return super().stage(image, preprocess)
        self.threads["stage"].add(threading.current_thread().name)
        return Staged(image=image)

    def infer_staged(self, items: Sequence[Staged]) -> tuple[list[np.ndarray], list[Any]]:
        if self.spec is None:
            return super().infer_staged(items)
        self.threads["infer_staged"].add(threading.current_thread().name)
        made = [reference_preprocess(s.image, **asdict(self.spec)) for s in items]
        return self.inner.infer(np.stack([tensor for tensor, _ in made])), [box for _, box in made]


def test_pipeline_lets_a_backend_make_its_own_inputs(detectors: dict) -> None:
    """With a backend that makes its inputs (TensorRT with the kernel attached), the capture thread makes no
    tensor and the inference thread has the backend make them; the tracks equal those of the CPU pipeline."""
    from edgecv.config import parse
    from edgecv.models import ModelSet
    from edgecv.pipeline import Pipeline
    from edgecv.types import Frame

    backend = MakesItsOwnInputs(detectors["yolox"].backend)
    own_detector = YoloxDetector(backend, conf=0.35)
    assert not backend.makes_inputs
    backend.attach(own_detector.input_spec)
    assert backend.makes_inputs
    cfg = parse({"node_id": "g", "mqtt": {"enabled": False}, "console": {"enabled": False},
                 "model": {"path": str(YOLOX)},
                 "cameras": {"cam": {"source": str(ASSETS / "media" / "vtest.avi"), "realtime": False}}})

    def run(models: ModelSet) -> dict[int, list[int]]:
        seen: dict[int, list[int]] = {}
        pipe = Pipeline(cfg, models, sinks=[], max_frames=12,
                        on_tracks=lambda _c, f, t: seen.__setitem__(f.index, sorted(t.track_id.tolist())))
        pipe.run()
        return seen

    own_tracks = run(ModelSet(own_detector))
    assert backend.threads == {"stage": {"capture-cam"}, "infer_staged": {"inference"}}
    cpu_tracks = run(ModelSet(YoloxDetector(detectors["yolox"].backend, conf=0.35)))
    frame = Frame("cam", 1, 0.0, 0.0, vtest_frames(1)[0])
    own_staged = ModelSet(own_detector).prepare(frame).staged[0]
    cpu_staged = ModelSet(detectors["yolox"]).prepare(frame).staged[0]
    assert own_staged.tensor is None and own_staged.image is frame.image
    assert cpu_staged.tensor.shape == (3, 416, 416)
    assert len(own_tracks) == len(cpu_tracks) == 12
    same = sum(own_tracks[i] == cpu_tracks[i] for i in cpu_tracks)
    assert same >= 10, (own_tracks, cpu_tracks)
