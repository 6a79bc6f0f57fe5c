#!/usr/bin/env python3
"""GPU verification of edgecv's TensorRT backend and GPU preprocessing; run it on a GPU machine.

    python3 engines/gpu_check.py --assets shared --out $OUT/gpu.json

``--assets`` is a folder with ``models/yolox_nano.onnx``, ``models/yolov8n_int8.onnx`` and
``media/vtest.avi`` (like ../shared). It prints a report and writes the same facts as JSON.

1. Environment: ``import tensorrt``, ``ldconfig -p | grep nvinfer``, ``import pycuda``,
   ``nvidia-smi`` (GPU name, driver), CuPy.
2. Preprocessing kernel (``edgecv.engine.gpu_preprocess.KERNEL_SOURCE``), compiled with
   pycuda when it imports, else (and also) with CuPy's ``RawKernel``: on vtest.avi frames
   (768x576) and a synthetic 1920x1080 frame, YOLOX style (416x416, top-left, BGR, x1) and
   Ultralytics style (640x640, centred, RGB, x1/255): max |diff| against the CPU path
   (``Detector.preprocess``, OpenCV) and against the numpy twin (expected 0); time per 1080p
   frame on the GPU (host-to-device copy of the uint8 frame + kernel) and on the CPU.
3. TensorRT, when it imports (and pycuda with it): build an fp16 engine from yolox_nano.onnx,
   run it through ``TensorRTBackend`` and compare detections on 5 vtest frames with ONNX
   Runtime (IoU matching, score differences); time both; also the GPU-preprocessing path.

Nothing here needs pydantic or paho-mqtt: only ``edgecv.engine``. Each section that cannot
run says why in the report and the JSON; the exit status is 0 unless a check that ran failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout: `python3 engines/gpu_check.py`

import cv2  # noqa: E402
import numpy as np  # noqa: E402

MAX_DIFF = 1.0  # 0-255 units, kernel vs OpenCV
STYLES = {
    "yolox": {"size": (416, 416), "center": False, "rgb": False, "scale": 1.0},
    "ultralytics": {"size": (640, 640), "center": True, "rgb": True, "scale": 1.0 / 255.0},
}


def say(text: str = "") -> None:
    print(text, flush=True)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def timed(fn: Callable[[], Any], n: int, warmup: int = 5) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return {"median_ms": round(statistics.median(times), 4), "p90_ms": round(float(np.percentile(times, 90)), 4),
            "runs": n}  # fmt: skip


def run(cmd: str) -> str:
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=60).stdout.strip()
    except Exception as exc:  # noqa: BLE001 - a report, not a program
        return f"failed: {first_line(exc)}"


# -- 1. environment -------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    env: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform(), "numpy": np.__version__,
                           "opencv": cv2.__version__}  # fmt: skip
    try:
        import tensorrt

        env["tensorrt"] = tensorrt.__version__
    except Exception as exc:  # noqa: BLE001
        env["tensorrt"] = None
        env["tensorrt_error"] = first_line(exc)
    nvinfer = run("ldconfig -p | grep nvinfer")
    env["ldconfig_nvinfer"] = nvinfer.splitlines() if nvinfer else []
    try:
        import pycuda
        import pycuda.driver as cuda

        cuda.init()
        env["pycuda"] = pycuda.VERSION_TEXT
        env["pycuda_cuda_version"] = ".".join(map(str, cuda.get_version()))
        env["pycuda_driver_version"] = cuda.get_driver_version()
        env["pycuda_devices"] = [cuda.Device(i).name() for i in range(cuda.Device.count())]
    except Exception as exc:  # noqa: BLE001
        env["pycuda"] = None
        env["pycuda_error"] = first_line(exc)
    try:
        import cupy

        env["cupy"] = cupy.__version__
        env["cupy_devices"] = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001
        env["cupy"] = None
        env["cupy_error"] = first_line(exc)
    try:
        import onnxruntime

        env["onnxruntime"] = onnxruntime.__version__
        env["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except Exception as exc:  # noqa: BLE001
        env["onnxruntime"] = None
        env["onnxruntime_error"] = first_line(exc)
    smi = run("nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader")
    env["nvidia_smi"] = smi.splitlines() if smi else []
    env["nvcc"] = shutil.which("nvcc")
    return env


# -- 2. preprocessing kernel ----------------------------------------------------------------------


def frames(assets: Path) -> list[tuple[str, np.ndarray]]:
    capture = cv2.VideoCapture(str(assets / "media" / "vtest.avi"))
    out = []
    for i in range(40):
        ok, frame = capture.read()
        if not ok:
            break
        if i % 10 == 0:
            out.append((f"vtest#{i} 768x576", frame))
    capture.release()
    if not out:
        raise RuntimeError(f"cannot read {assets / 'media' / 'vtest.avi'}")
    synthetic = np.random.default_rng(0).integers(0, 256, (1080, 1920, 3), dtype=np.uint8)
    smooth = cv2.resize(out[0][1], (1920, 1080), interpolation=cv2.INTER_CUBIC)  # natural-image statistics
    return out + [("synthetic noise 1920x1080", synthetic), ("vtest upscaled 1920x1080", smooth)]


def cpu_detectors(assets: Path) -> dict[str, Any]:
    from edgecv.engine import OnnxRuntimeBackend, Yolov8Detector, YoloxDetector

    cpu = ["CPUExecutionProvider"]
    out = {"yolox": YoloxDetector(OnnxRuntimeBackend(assets / "models" / "yolox_nano.onnx", providers=cpu))}
    v8 = assets / "models" / "yolov8n_int8.onnx"
    if v8.is_file():
        out["ultralytics"] = Yolov8Detector(OnnxRuntimeBackend(v8, providers=cpu))
    return out


class CupyRunner:
    """The kernel through CuPy's RawKernel (same CUDA C source)."""

    name = "cupy"

    def __init__(self) -> None:
        import cupy as cp

        from edgecv.engine.gpu_preprocess import KERNEL_NAME, KERNEL_SOURCE

        self.cp = cp
        self.kernel = cp.RawKernel(KERNEL_SOURCE, KERNEL_NAME)
        self.pinned: dict[int, np.ndarray] = {}

    def __call__(self, frame: np.ndarray, style: dict) -> np.ndarray:
        from edgecv.engine.gpu_preprocess import kernel_params

        cp = self.cp
        w, h = style["size"]
        params = kernel_params(frame.shape[1], frame.shape[0], **style)
        src = cp.asarray(frame)
        dst = cp.empty((3, h, w), cp.float32)
        self.kernel(params.grid()[:2], (32, 8), params.args(src, frame.shape[1] * 3, dst))
        return cp.asnumpy(dst)

    def timer(self, frame: np.ndarray, style: dict) -> tuple[Callable[[], None], Callable[[], None]]:
        """(H2D from page-locked memory + kernel, synchronised; kernel only, synchronised)."""
        from edgecv.engine.gpu_preprocess import kernel_params

        cp = self.cp
        w, h = style["size"]
        params = kernel_params(frame.shape[1], frame.shape[0], **style)
        mem = cp.cuda.alloc_pinned_memory(frame.nbytes)
        host = np.frombuffer(mem, np.uint8, frame.nbytes).reshape(frame.shape)
        np.copyto(host, frame)
        src = cp.empty(frame.shape, cp.uint8)
        dst = cp.empty((3, h, w), cp.float32)
        stream = cp.cuda.Stream(non_blocking=True)
        args = params.args(src, frame.shape[1] * 3, dst)

        def copy_and_kernel() -> None:
            np.copyto(host, frame)  # the frame as it comes from the decoder, into the staging buffer
            with stream:  # RawKernel launches on the current stream
                src.set(host, stream=stream)
                self.kernel(params.grid()[:2], (32, 8), args)
            stream.synchronize()

        def kernel_only() -> None:
            with stream:
                self.kernel(params.grid()[:2], (32, 8), args)
            stream.synchronize()

        self._keep = (mem, host, src, dst, stream)
        return copy_and_kernel, kernel_only


class NumpyRunner:
    """``--simulate``: the kernel's numpy twin in place of a GPU, to check this script on a CPU-only machine."""

    name = "numpy-twin"

    def __call__(self, frame: np.ndarray, style: dict) -> np.ndarray:
        from edgecv.engine.gpu_preprocess import reference_preprocess

        return reference_preprocess(frame, **style)[0]

    def timer(self, frame: np.ndarray, style: dict) -> tuple[Callable[[], None], Callable[[], None]]:
        return (lambda: self(frame, style)), None  # type: ignore[return-value]


class PycudaRunner:
    """The kernel through edgecv's own GpuPreprocessor (pycuda SourceModule)."""

    name = "pycuda"

    def __init__(self) -> None:
        import pycuda.driver as cuda

        cuda.init()
        self.cuda = cuda
        self.context = cuda.Device(0).retain_primary_context()
        self.context.push()
        self.pre: dict[str, Any] = {}

    def _pre(self, style: dict) -> Any:
        from edgecv.engine.gpu_preprocess import GpuPreprocessor

        key = json.dumps(style, sort_keys=True)
        if key not in self.pre:
            self.pre[key] = GpuPreprocessor(**style, cuda=self.cuda)
        return self.pre[key]

    def __call__(self, frame: np.ndarray, style: dict) -> np.ndarray:
        pre = self._pre(style)
        pre(frame)
        return pre.download()

    def timer(self, frame: np.ndarray, style: dict) -> tuple[Callable[[], None], Callable[[], None]]:
        pre = self._pre(style)

        def copy_and_kernel() -> None:
            pre(frame)  # copy into page-locked staging, async H2D, kernel
            pre.stream.synchronize()

        return copy_and_kernel, None  # type: ignore[return-value]

    def close(self) -> None:
        self.context.pop()
        self.context.detach()


def check_kernel(assets: Path, env: dict[str, Any], n: int, simulate: bool = False) -> dict[str, Any]:
    from edgecv.engine.gpu_preprocess import reference_preprocess

    result: dict[str, Any] = {"max_diff_allowed": MAX_DIFF, "runners": {}}
    runners: list[Any] = [NumpyRunner()] if simulate else []
    for cls, ready in ((PycudaRunner, env.get("pycuda")), (CupyRunner, env.get("cupy"))):
        if not ready:
            result["runners"][cls.name] = {"skipped": env.get(f"{cls.name}_error", "not importable")}
            continue
        try:
            runners.append(cls())
        except Exception as exc:  # noqa: BLE001
            result["runners"][cls.name] = {"error": first_line(exc), "trace": traceback.format_exc(limit=3)}
    if not runners:
        result["skipped"] = "neither pycuda nor CuPy can run the kernel here"
        return result
    detectors = cpu_detectors(assets)
    images = frames(assets)
    ok = True
    for runner in runners:
        report: dict[str, Any] = {"cases": []}
        try:
            for style_name, style in STYLES.items():
                detector = detectors.get(style_name)
                unit = 1.0 / style["scale"]
                for frame_name, frame in images:
                    gpu = runner(frame, style)
                    ref, _ = reference_preprocess(frame, **style)
                    case: dict[str, Any] = {"style": style_name, "frame": frame_name,
                                            "vs_numpy_twin_max": float(np.abs(gpu - ref).max() * unit)}  # fmt: skip
                    if detector is not None:
                        cpu, _ = detector.preprocess(frame)
                        diff = np.abs(gpu.astype(np.float64) - cpu) * unit
                        case["vs_cpu_max"] = round(float(diff.max()), 4)
                        case["vs_cpu_mean"] = round(float(diff.mean()), 5)
                        case["vs_cpu_pixels_differing"] = round(float((diff > 1e-3).mean()), 5)
                        ok &= case["vs_cpu_max"] <= MAX_DIFF + 1e-3
                    ok &= case["vs_numpy_twin_max"] == 0.0
                    report["cases"].append(case)
                    say(f"  [{runner.name}] {style_name:11s} {frame_name:26s} vs CPU max {case.get('vs_cpu_max', '-')}"
                        f" mean {case.get('vs_cpu_mean', '-')}; vs numpy twin max {case['vs_numpy_twin_max']}")
            big = next(f for name, f in images if "1920x1080" in name)
            timings: dict[str, Any] = {}
            for style_name, style in STYLES.items():
                copy_kernel, kernel_only = runner.timer(big, style)
                timings[style_name] = {"gpu_h2d_plus_kernel": timed(copy_kernel, n)}
                if kernel_only is not None:
                    timings[style_name]["gpu_kernel_only"] = timed(kernel_only, n)
                detector = detectors.get(style_name)
                if detector is not None:
                    out = np.empty((3, style["size"][1], style["size"][0]), np.float32)
                    timings[style_name]["cpu_detector_preprocess"] = timed(
                        lambda d=detector, f=big, o=out: d.preprocess(f, out=o), n
                    )
                t = timings[style_name]
                say(f"  [{runner.name}] {style_name:11s} 1920x1080 frame: GPU H2D+kernel "
                    f"{t['gpu_h2d_plus_kernel']['median_ms']:.3f} ms"
                    + (f" (kernel {t['gpu_kernel_only']['median_ms']:.3f} ms)" if "gpu_kernel_only" in t else "")
                    + (f", CPU {t['cpu_detector_preprocess']['median_ms']:.3f} ms"
                       if "cpu_detector_preprocess" in t else ""))
            report["timings_1080p"] = timings
        except Exception as exc:  # noqa: BLE001
            ok = False
            report["error"] = first_line(exc)
            report["trace"] = traceback.format_exc(limit=5)
            say(f"  [{runner.name}] FAILED: {first_line(exc)}")
        finally:
            if hasattr(runner, "close"):
                runner.close()
        result["runners"][runner.name] = report
    result["ok"] = bool(ok)
    return result


# -- 3. TensorRT ------------------------------------------------------------------------------------


def match(a: Any, b: Any, iou_min: float = 0.5) -> dict[str, Any]:
    """Greedy IoU matching of detections ``a`` (TensorRT) to ``b`` (ONNX Runtime), same class only."""
    from edgecv.engine.ops import box_iou

    iou = box_iou(b.xyxy, a.xyxy)  # (len(b), len(a))
    iou = np.where(b.class_id[:, None] == a.class_id[None, :], iou, 0.0)
    pairs: list[tuple[int, int, float, float]] = []
    free = set(range(len(a)))
    for i in np.argsort(-b.score):  # highest ONNX Runtime score first takes its best free match
        if not free:
            break
        j = max(free, key=lambda k: iou[i, k])
        if iou[i, j] >= iou_min:
            free.discard(j)
            pairs.append((int(i), int(j), float(iou[i, j]), float(abs(b.score[i] - a.score[j]))))
    return {"onnxruntime": len(b), "tensorrt": len(a), "matched": len(pairs),
            "mean_iou": round(float(np.mean([p[2] for p in pairs])), 4) if pairs else None,
            "max_score_diff": round(float(max([p[3] for p in pairs], default=0.0)), 4)}  # fmt: skip


def check_tensorrt(assets: Path, env: dict[str, Any], n: int, work: Path) -> dict[str, Any]:
    if not env.get("tensorrt"):
        return {"skipped": f"tensorrt does not import: {env.get('tensorrt_error')}"}
    if not env.get("pycuda"):
        return {"skipped": f"tensorrt {env['tensorrt']} imports but pycuda does not: {env.get('pycuda_error')}"}
    from edgecv.engine import OnnxRuntimeBackend, YoloxDetector
    from edgecv.engine.tensorrt import TensorRTBackend
    from edgecv.engine.trt_build import build_engine

    result: dict[str, Any] = {}
    model = assets / "models" / "yolox_nano.onnx"
    try:
        built = build_engine(model, output=work / "yolox_nano-fp16.engine", precision="fp16", max_batch=1,
                             write=lambda line: say("  " + line.strip()))  # fmt: skip
        result["build_seconds"] = round(built.seconds, 1)
        result["engine_mb"] = round(built.path.stat().st_size / 1e6, 2)
        trt_backend = TensorRTBackend(built.path, onnx=model)
        trt_det = YoloxDetector(trt_backend, conf=0.3)
        ort_det = YoloxDetector(OnnxRuntimeBackend(model), conf=0.3)
        result["onnxruntime_providers"] = ort_det.backend.providers
        vtest = [f for name, f in frames(assets) if name.startswith("vtest#")]
        capture = cv2.VideoCapture(str(assets / "media" / "vtest.avi"))
        five = [capture.read()[1] for _ in range(5)]
        capture.release()
        per_frame = [match(a, b) for a, b in zip(trt_det.detect(five), ort_det.detect(five))]
        result["frames"] = per_frame
        matched = sum(p["matched"] for p in per_frame)
        total = sum(p["onnxruntime"] for p in per_frame)
        result["matched_fraction"] = round(matched / max(1, total), 4)
        tensor, _ = ort_det.preprocess(five[0])
        batch = tensor[None]
        result["infer_ms"] = {"tensorrt_fp16": timed(lambda: trt_backend.infer(batch), n),
                              "onnxruntime": timed(lambda: ort_det.backend.infer(batch), max(10, n // 5))}  # fmt: skip
        trt_ms = result["infer_ms"]["tensorrt_fp16"]["median_ms"]
        say(f"  detections matched {matched}/{total}; TensorRT {trt_ms:.3f} ms,"
            f" ONNX Runtime {result['infer_ms']['onnxruntime']['median_ms']:.3f} ms per inference")
        pre = trt_backend.attach_preprocessor(trt_det)
        if pre is not None:
            gpu_path = []
            for frame in five:
                outputs, boxes = trt_backend.infer_images([frame])
                gpu_path.append(match(trt_det.postprocess(outputs, boxes)[0], ort_det.detect([frame])[0]))
            result["gpu_preprocess_frames"] = gpu_path
            result["gpu_preprocess_infer_images"] = timed(lambda: trt_backend.infer_images([vtest[0]]), n)
        result["ok"] = result["matched_fraction"] >= 0.9
    except Exception as exc:  # noqa: BLE001
        result["ok"] = False
        result["error"] = first_line(exc)
        result["trace"] = traceback.format_exc(limit=6)
        say(f"  TensorRT check FAILED: {first_line(exc)}")
    return result


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--assets", required=True, help="folder with models/ and media/ (e.g. shared)")
    parser.add_argument("--out", required=True, help="JSON report path")
    parser.add_argument("--runs", type=int, default=200, help="timed runs per measurement (default 200)")
    parser.add_argument("--simulate", action="store_true",
                        help="also run the kernel section with the numpy twin (checks this script without a GPU)")
    args = parser.parse_args(argv)
    assets = Path(args.assets).resolve()
    if not (assets / "models" / "yolox_nano.onnx").is_file():
        print(f"gpu_check: expected {assets}/models/yolox_nano.onnx", file=sys.stderr)
        return 2
    report: dict[str, Any] = {"assets": str(assets), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    say("== environment")
    report["environment"] = env = environment()
    for key, value in env.items():
        say(f"  {key}: {value}")
    say("== preprocessing kernel")
    report["kernel"] = check_kernel(assets, env, args.runs, args.simulate)
    if "skipped" in report["kernel"]:
        say(f"  skipped: {report['kernel']['skipped']}")
    say("== TensorRT")
    with tempfile.TemporaryDirectory(prefix="edgecv-gpu-check-") as work:
        os.environ.setdefault("EDGECV_ENGINE_CACHE", work)
        report["tensorrt"] = check_tensorrt(assets, env, args.runs, Path(work))
    if "skipped" in report["tensorrt"]:
        say(f"  skipped: {report['tensorrt']['skipped']}")
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    failed = [name for name in ("kernel", "tensorrt") if report[name].get("ok") is False]
    report["ran"] = [name for name in ("kernel", "tensorrt") if "ok" in report[name]]
    report["ok"] = not failed
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    ran = ", ".join(report["ran"]) or "nothing (see the skipped reasons)"
    say(f"== {'OK' if not failed else 'FAILED: ' + ', '.join(failed)}; checks that ran: {ran}; report written to {out}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
