"""Build TensorRT engines from ONNX models: precision, INT8 calibration, progress, cache.

``edgecv build-engine MODEL.onnx`` and the automatic build of ``backend: auto``/``tensorrt``
both end in :func:`build_engine`:

1. parse the ONNX model with TensorRT's ONNX parser (explicit batch);
2. a dynamic batch dimension gets optimization profile 0 = (1, opt, max_batch) with opt =
   max_batch (a fixed batch keeps its size; ``--max-batch`` then has no effect);
3. ``fp16`` sets the FP16 flag; ``int8`` sets INT8 (and FP16 for layers INT8 cannot take) and
   calibrates with :class:`IInt8EntropyCalibrator2` on images passed through the model
   adapter's own ``Detector.preprocess`` (:class:`CalibrationBatches`; the caller passes the
   adapter factory, :func:`edgecv.engine.registry.calibration_detector`, so the builder does
   not depend on the model families); the calibration cache is written next to the engine and
   reused by the next build;
4. progress: TensorRT >= 10 reports its build phases through ``IProgressMonitor`` (a bar per
   phase when stderr is a terminal, a few lines otherwise); older versions get a heartbeat
   line every few seconds;
5. the serialized engine is written atomically, with a JSON sidecar (source ONNX, its
   metadata, TensorRT version, GPU, precision, max batch, build time).

The engine cache (:mod:`edgecv.engine.cache`) names each engine after everything it depends
on, so :func:`ensure_engine` builds once per model/TensorRT/GPU/precision/batch and then
reuses the file.
"""

from __future__ import annotations

import ast
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import cv2
import numpy as np

from edgecv import EdgecvError
from edgecv.engine.backend import DYNAMIC_MAX_BATCH, format_shape
from edgecv.engine.cache import (
    PRECISIONS,
    calibration_cache_path,
    calibration_fingerprint,
    engine_key,
    engine_path,
    onnx_metadata,
    protobuf_fields,
    sha256_file,
    write_atomic,
    write_sidecar,
)
from edgecv.engine.trt_env import cuda_device_name, import_pycuda, import_tensorrt, make_logger
from edgecv.progress import Progress

log = logging.getLogger("edgecv.engine")

PathLike = Union[str, os.PathLike]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
DEFAULT_WORKSPACE_MB = 1024
DEFAULT_CALIB_BATCH = 8
AUTO_MAX_BATCH = 4
"""Largest batch of an engine built automatically from an ONNX model with a dynamic batch."""
PRECISION_ENV, MAX_BATCH_ENV, CALIB_ENV = "EDGECV_TRT_PRECISION", "EDGECV_TRT_MAX_BATCH", "EDGECV_TRT_CALIB_DIR"

AdapterFactory = Callable[[Path, str], Any]
"""(ONNX model, family) -> the model adapter whose ``preprocess`` INT8 calibration runs images
through; :func:`edgecv.engine.registry.calibration_detector` is the one edgecv uses."""


# -- calibration data -------------------------------------------------------------------------


def list_images(folder: PathLike) -> list[Path]:
    """Image files (jpg, jpeg, png, bmp, webp) directly in ``folder``, sorted by name."""
    root = Path(folder)
    if not root.is_dir():
        raise EdgecvError(f"calibration images: expected a folder of images, {root} is not a folder")
    images = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        kinds = ", ".join(IMAGE_SUFFIXES)
        raise EdgecvError(f"calibration images: expected image files ({kinds}) in {root}, found none")
    return images


class CalibrationBatches:
    """Calibration images as model-input batches: an iterable of (N, 3, H, W) float32 arrays.

    Each image is read with OpenCV (BGR) and turned into the model input by the adapter's
    own ``preprocess`` (letterbox, channel order, scaling), exactly as at inference time.

    ``last`` says what happens to a final batch with fewer than ``batch_size`` images:

    * ``"pad"`` (default): it is completed by repeating its own images from its start, so
      every image is used and the padding does not add a foreign value (a black or zero
      image would shift the activation histograms TensorRT calibrates on);
    * ``"drop"``: it is left out (every image in a batch is then distinct).

    TensorRT needs every calibration batch at exactly ``batch_size``. ``limit`` uses only
    the first ``limit`` images. The sequence can be iterated several times; images are
    read lazily, one batch at a time.
    """

    def __init__(
        self,
        images: Union[PathLike, Sequence[PathLike]],
        detector: Any,
        batch_size: int = DEFAULT_CALIB_BATCH,
        last: str = "pad",
        limit: Optional[int] = None,
    ) -> None:
        if batch_size < 1:
            raise EdgecvError(f"calibration batch size: expected a positive number, got {batch_size}")
        if last not in ("pad", "drop"):
            raise EdgecvError(f"calibration last batch: expected 'pad' or 'drop', got {last!r}")
        if isinstance(images, (str, os.PathLike)):
            paths = list_images(images)
        else:
            paths = [Path(p) for p in images]
        if limit is not None:
            paths = paths[: max(0, int(limit))]
        if not paths:
            raise EdgecvError("calibration images: expected at least one image, got none")
        if last == "drop" and len(paths) < batch_size:
            raise EdgecvError(
                f"calibration images: {len(paths)} images make no full batch of {batch_size} "
                "(use last='pad' or fewer per batch)"
            )
        self.paths = paths
        self.detector = detector
        self.batch_size = int(batch_size)
        self.last = last
        w, h = detector.input_size
        self.shape = (self.batch_size, 3, int(h), int(w))

    @property
    def nbytes(self) -> int:
        """Bytes of one batch."""
        return int(np.prod(self.shape)) * 4

    def __len__(self) -> int:
        full, rest = divmod(len(self.paths), self.batch_size)
        return full + (1 if rest and self.last == "pad" else 0)

    def batch_paths(self) -> list[list[Path]]:
        """The image files of each batch, padding included."""
        out = []
        for start in range(0, len(self.paths), self.batch_size):
            chunk = self.paths[start : start + self.batch_size]
            if len(chunk) < self.batch_size:
                if self.last == "drop":
                    break
                chunk = [chunk[i % len(chunk)] for i in range(self.batch_size)]
            out.append(chunk)
        return out

    def __iter__(self) -> Iterator[np.ndarray]:
        for chunk in self.batch_paths():
            batch = np.empty(self.shape, dtype=np.float32)
            done: dict[Path, int] = {}
            for i, path in enumerate(chunk):
                if path in done:  # padding: copy the already preprocessed item
                    batch[i] = batch[done[path]]
                    continue
                image = cv2.imread(str(path), cv2.IMREAD_COLOR)
                if image is None:
                    raise EdgecvError(f"calibration image {path}: expected an image OpenCV can read, could not decode")
                self.detector.preprocess(image, out=batch[i])
                done[path] = i
            yield batch


# -- shapes ---------------------------------------------------------------------------------


def onnx_input_shape(path: PathLike) -> tuple[str, tuple[int, ...]]:
    """(name, shape) of the ONNX model's single real input (initializers excluded); -1 = dynamic."""
    p = Path(path)
    try:
        inputs, initializers = _graph_inputs(p.read_bytes())
    except (OSError, StopIteration, ValueError, UnicodeDecodeError) as exc:
        raise EdgecvError(f"model {p}: expected an ONNX model with a graph, could not read it ({exc})") from exc
    real = [(n, s) for n, s in inputs if n not in initializers]
    if len(real) != 1:
        found = ", ".join(n for n, _ in real) or "none"
        raise EdgecvError(f"model {p}: expected 1 input tensor, found {len(real)} ({found})")
    return real[0]


def fields_of(data: bytes, number: int, wire: int) -> Iterator[Any]:
    """The values of field ``number`` with wire type ``wire`` in one protobuf message, lazily, in order."""
    return (v for n, w, v in protobuf_fields(data) if n == number and w == wire)


def _graph_inputs(model: bytes) -> tuple[list[tuple[str, tuple[int, ...]]], set[str]]:
    """ModelProto -> graph (7): ((name, shape) of each input (11), the initializer (5) names)."""
    graph = next(fields_of(model, 7, 2))
    initializers: set[str] = set()
    inputs: list[tuple[str, tuple[int, ...]]] = []
    for number, wire, value in protobuf_fields(graph):
        if wire != 2:
            continue
        if number == 5:  # initializer TensorProto: name = 8
            initializers.update(v.decode() for v in fields_of(value, 8, 2))
        elif number == 11:  # input ValueInfoProto
            inputs.append(_value_info(value))
    return inputs, initializers


def _value_info(value_info: bytes) -> tuple[str, tuple[int, ...]]:
    """ValueInfoProto: name = 1, type = 2 (the last of each wins)."""
    name, shape = "", ()
    for n, w, v in protobuf_fields(value_info):
        if n == 1 and w == 2:
            name = v.decode()
        elif n == 2 and w == 2:
            shape = _type_shape(v)
    return name, shape


def _type_shape(type_proto: bytes) -> tuple[int, ...]:
    """TypeProto -> tensor_type (1) -> shape (2) -> dim (1) -> dim_value (1) | dim_param (2)."""
    for tensor in fields_of(type_proto, 1, 2):
        for shape in fields_of(tensor, 2, 2):
            return tuple(_dim_value(dim) for dim in fields_of(shape, 1, 2))
    return ()


def _dim_value(dim: bytes) -> int:
    """Dimension: its dim_value (1) when positive, else -1 (dynamic: a dim_param, or none)."""
    value = list(fields_of(dim, 1, 0))
    return int(value[0]) if value and value[0] > 0 else -1


def effective_max_batch(input_shape: Sequence[int], requested: int) -> int:
    """The batch an engine is built for: a fixed batch dimension wins over ``requested``."""
    if requested < 1:
        raise EdgecvError(f"max batch: expected a positive number, got {requested}")
    fixed = int(input_shape[0]) if input_shape else 1
    return fixed if fixed > 0 else int(requested)


def plan_profile(
    input_shape: Sequence[int], max_batch: int, imgsz: Optional[tuple[int, int]] = None
) -> Optional[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) of optimization profile 0, or None for a fully static input.

    Batch: 1 .. ``max_batch`` with opt = max; a dynamic image size takes ``imgsz`` = (h, w)
    (Ultralytics' metadata) for all three; a dynamic channel count is an error.
    """
    shape = tuple(int(d) for d in input_shape)
    if all(d > 0 for d in shape):
        return None
    if len(shape) != 4:
        raise EdgecvError(f"model input {format_shape(shape)}: expected (N, C, H, W) to build a profile")
    n, c, h, w = shape
    if c < 0:
        raise EdgecvError(f"model input {format_shape(shape)}: expected a fixed channel count")
    if h < 0 or w < 0:
        h, w = _image_size(shape, imgsz)
    low = (1 if n < 0 else n, c, h, w)
    high = (max_batch if n < 0 else n, c, h, w)
    return low, high, high


def _image_size(shape: tuple[int, ...], imgsz: Optional[tuple[int, int]]) -> tuple[int, int]:
    """(h, w) of an (N, C, H, W) input with a dynamic image size: its dynamic dims taken from ``imgsz``."""
    if imgsz is None:
        raise EdgecvError(
            f"model input {format_shape(shape)}: dynamic image size and no 'imgsz' metadata; "
            "export the model with a fixed size"
        )
    h, w = shape[2], shape[3]
    return (h if h > 0 else imgsz[0]), (w if w > 0 else imgsz[1])


def calibration_batch_size(input_shape: Sequence[int], requested: int, max_batch: int) -> int:
    """Images per calibration batch: the model's fixed batch, else ``requested`` capped at ``max_batch``."""
    fixed = int(input_shape[0]) if input_shape else 1
    return fixed if fixed > 0 else max(1, min(int(requested), int(max_batch)))


def _imgsz(metadata: dict[str, str]) -> Optional[tuple[int, int]]:
    try:
        value = ast.literal_eval(metadata.get("imgsz", ""))
    except (ValueError, SyntaxError):
        return None
    if isinstance(value, int):
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    return None


# -- progress -------------------------------------------------------------------------------


class BuildProgress:
    """Turns TensorRT's phase/step callbacks into a few readable lines (thread-safe).

    Top-level phases print when they start and finish; steps print at most every
    ``interval`` seconds, as ``phase: step k/n``. ``bars`` (stderr is a terminal): a bar per
    phase instead (:class:`edgecv.progress.Progress`; nested phases indented, cleared when
    done). ``step_complete`` returns True (a False would ask TensorRT to cancel the build).
    """

    def __init__(
        self, write: Callable[[str], None], interval: float = 3.0, clock: Callable[[], float] = time.monotonic,
        bars: bool = False,
    ) -> None:
        self.write = write
        self.interval = interval
        self.clock = clock
        self.bars = bars
        self._phases: dict[str, tuple[Optional[str], int, float]] = {}
        self._bars: dict[str, Progress] = {}
        self._last = -float("inf")
        self._lock = threading.Lock()

    def _path(self, name: str) -> str:
        parts = [name]
        parent = self._phases.get(name, (None, 0, 0.0))[0]
        while parent is not None and len(parts) < 8:
            parts.append(parent)
            parent = self._phases.get(parent, (None, 0, 0.0))[0]
        return " > ".join(reversed(parts))

    def phase_start(self, name: str, parent: Optional[str], steps: int) -> None:
        with self._lock:
            self._phases[name] = (parent or None, int(steps), self.clock())
            if self.bars:
                depth = self._path(name).count(" > ")
                self._bars[name] = Progress("  " * depth + name, total=int(steps), unit="steps", tty=True,
                                            leave=not parent)
            elif not parent:
                self.write(f"  {name} ...")

    def step_complete(self, name: str, step: int) -> bool:
        with self._lock:
            bar = self._bars.get(name)
            if bar is not None:
                bar.update(max(0, step + 1 - int(bar.n)))  # steps may be reported from several threads
                return True
            now = self.clock()
            if now - self._last >= self.interval:
                self._last = now
                steps = self._phases.get(name, (None, 0, 0.0))[1]
                self.write(f"  {self._path(name)}: step {step + 1}/{steps}")
        return True

    def phase_finish(self, name: str) -> None:
        with self._lock:
            bar = self._bars.pop(name, None)
            if bar is not None:
                bar.close()
            parent, _, started = self._phases.pop(name, (None, 0, self.clock()))
            if parent is None and bar is None:
                self.write(f"  {name} done ({self.clock() - started:.1f} s)")


class Heartbeat:
    """A line every ``interval`` seconds from a thread while a long call runs (context manager)."""

    def __init__(self, write: Callable[[str], None], interval: float = 5.0, what: str = "building") -> None:
        self.write = write
        self.interval = interval
        self.what = what
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="build-heartbeat", daemon=True)
        self._start = 0.0

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.write(f"  still {self.what}... {time.monotonic() - self._start:.0f} s")

    def __enter__(self) -> "Heartbeat":
        self._start = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def _make_monitor(trt: Any, progress: BuildProgress) -> Any:
    """A ``tensorrt.IProgressMonitor`` that forwards to ``progress`` (TensorRT >= 10)."""

    class _Monitor(trt.IProgressMonitor):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name: str, parent_phase: Optional[str], num_steps: int) -> None:
            progress.phase_start(phase_name, parent_phase, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            return progress.step_complete(phase_name, step)

        def phase_finish(self, phase_name: str) -> None:
            progress.phase_finish(phase_name)

    return _Monitor()


def _make_calibrator(
    trt: Any, cuda: Any, batches: CalibrationBatches, cache: Path, write: Callable[[str], None]
) -> Any:
    """An ``IInt8EntropyCalibrator2`` feeding ``batches`` through one device buffer."""

    class _Calibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self._batches = iter(batches)
            self._device = cuda.mem_alloc(batches.nbytes)
            self.count = 0

        def get_batch_size(self) -> int:
            return batches.batch_size

        def get_batch(self, names: list[str], *_: Any) -> Optional[list[int]]:
            try:
                batch = next(self._batches)
            except StopIteration:
                return None
            cuda.memcpy_htod(self._device, np.ascontiguousarray(batch))
            self.count += 1
            write(f"  calibration batch {self.count}/{len(batches)}")
            return [int(self._device)]

        def read_calibration_cache(self) -> Optional[bytes]:
            if cache.is_file():
                write(f"  using calibration cache {cache}")
                return cache.read_bytes()
            return None

        def write_calibration_cache(self, data: Any) -> None:
            write_atomic(cache, bytes(data))
            write(f"  calibration cache written: {cache}")

    return _Calibrator()


# -- building -------------------------------------------------------------------------------


@dataclass
class BuildResult:
    path: Path
    seconds: float
    precision: str
    max_batch: int
    sidecar: dict[str, Any]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def build_engine(
    onnx: PathLike,
    output: Optional[PathLike] = None,
    precision: str = "fp16",
    max_batch: int = 1,
    workspace_mb: int = DEFAULT_WORKSPACE_MB,
    calib_dir: Optional[PathLike] = None,
    calib_batch: int = DEFAULT_CALIB_BATCH,
    family: str = "auto",
    device: int = 0,
    cache_folder: Optional[PathLike] = None,
    write: Callable[[str], None] = _stderr,
    adapter_factory: Optional[AdapterFactory] = None,
) -> BuildResult:
    """Build a TensorRT engine from ``onnx``; ``output`` defaults to its cache path.

    INT8 needs ``calib_dir`` (a folder of images like the ones the model will see) unless
    a calibration cache already sits where the engine goes. Calibrating on images needs
    ``adapter_factory`` (:data:`AdapterFactory`), called with ``(onnx, family)``.
    """
    onnx = Path(onnx)
    _check_build_options(onnx, precision, workspace_mb)
    _, input_shape = onnx_input_shape(onnx)
    batch = effective_max_batch(input_shape, max_batch)
    if batch != max_batch:
        write(f"  {onnx.name} has a fixed batch of {batch}: building for it (--max-batch {max_batch} ignored)")
    metadata = onnx_metadata(onnx)
    images = _calibration_images(precision, calib_dir, adapter_factory)
    trt = import_tensorrt()
    cuda = import_pycuda()
    gpu = cuda_device_name(cuda, device)
    digest = sha256_file(onnx)
    calib_id = calibration_fingerprint(images) if images else ""
    key = engine_key(onnx, str(trt.__version__), gpu, precision, batch, calib_id, onnx_sha256=digest)
    out = Path(output) if output is not None else engine_path(key, cache_folder)
    calib_cache = calibration_cache_path(out)
    if precision == "int8" and not images and not calib_cache.is_file():
        raise EdgecvError(
            f"precision int8: expected --calib-dir with images like the model will see (a few hundred), "
            f"or a calibration cache at {calib_cache}; got neither"
        )

    context = cuda.Device(device).retain_primary_context()
    context.push()
    started = time.monotonic()
    try:
        serialized, inputs, outputs = _build(
            trt, cuda, onnx, input_shape, metadata, precision, batch, workspace_mb, images, calib_batch, family,
            adapter_factory, calib_cache, write,
        )  # fmt: skip
    finally:
        context.pop()
        context.detach()
    seconds = time.monotonic() - started
    write_atomic(out, serialized)
    info = {
        "onnx": str(onnx.resolve()),
        "onnx_sha256": digest,
        "metadata": metadata,
        "trt_version": str(trt.__version__),
        "gpu": gpu,
        "precision": precision,
        "max_batch": batch,
        "calibration": _calibration_info(precision, images, calib_id, calib_cache),
        "workspace_mb": int(workspace_mb),
        "inputs": inputs,
        "outputs": outputs,
        "key": key.digest,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "build_seconds": round(seconds, 1),
    }
    write_sidecar(out, info)
    size_mb = out.stat().st_size / 1e6
    write(f"engine written: {out} ({size_mb:.1f} MB, {precision}, batch {batch}, built in {seconds:.0f} s)")
    return BuildResult(out, seconds, precision, batch, info)


def _check_build_options(onnx: Path, precision: str, workspace_mb: int) -> None:
    """The model file exists, the precision is known, the workspace is positive."""
    if not onnx.is_file():
        raise EdgecvError(f"model {onnx}: expected an ONNX model file, found no such file")
    if precision not in PRECISIONS:
        raise EdgecvError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    if workspace_mb < 1:
        raise EdgecvError(f"workspace: expected a positive number of MB, got {workspace_mb}")


def _calibration_images(
    precision: str, calib_dir: Optional[PathLike], adapter_factory: Optional[AdapterFactory]
) -> list[Path]:
    """The INT8 calibration images (none unless int8 with a folder); calibrating needs ``adapter_factory``."""
    if precision != "int8" or calib_dir is None:
        return []
    images = list_images(calib_dir)
    if adapter_factory is None:
        raise EdgecvError(
            "INT8 calibration preprocesses images with the model's adapter: expected an adapter_factory "
            "(edgecv.engine.registry.calibration_detector), got none"
        )
    return images


def _calibration_info(precision: str, images: list[Path], calib_id: str, calib_cache: Path) -> Optional[dict[str, Any]]:
    """The sidecar's ``calibration`` entry: None unless int8."""
    if precision != "int8":
        return None
    return {"images": len(images), "fingerprint": calib_id, "cache": str(calib_cache)}


def _build(
    trt: Any,
    cuda: Any,
    onnx: Path,
    input_shape: tuple[int, ...],
    metadata: dict[str, str],
    precision: str,
    max_batch: int,
    workspace_mb: int,
    images: list[Path],
    calib_batch: int,
    family: str,
    adapter_factory: Optional[AdapterFactory],
    calib_cache: Path,
    write: Callable[[str], None],
) -> tuple[Any, list[dict[str, Any]], list[dict[str, Any]]]:
    """Parse, configure and build (CUDA context current); (serialized engine, inputs, outputs)."""
    logger, builder, network = _parse_network(trt, onnx)
    tensor, net_shape, inputs, outputs = _network_io(onnx, network)
    config = _builder_config(trt, builder, workspace_mb)
    profile_dims = plan_profile(net_shape, max_batch, _imgsz(metadata))
    if profile_dims is not None:
        config.add_optimization_profile(_profile(builder, tensor.name, profile_dims))
    _set_precision_flags(trt, builder, config, precision, write)
    if precision == "int8":
        batch = calibration_batch_size(net_shape, calib_batch, max_batch)
        batches = _calibration_batches(onnx, input_shape, images, batch, family, adapter_factory, write)
        config.int8_calibrator = _make_calibrator(trt, cuda, batches, calib_cache, write)
        if profile_dims is not None and hasattr(config, "set_calibration_profile"):
            fixed = (batch, *profile_dims[2][1:])
            config.set_calibration_profile(_profile(builder, tensor.name, (fixed, fixed, fixed)))
    write(
        f"building TensorRT {trt.__version__} engine from {onnx.name}: {precision}, input {format_shape(net_shape)}, "
        f"max batch {max_batch}, workspace {workspace_mb} MB (usually 1-5 minutes on a desktop GPU, up to 20 on Jetson)"
    )
    return _serialize(trt, builder, network, config, logger, onnx, write), inputs, outputs


def _parse_network(trt: Any, onnx: Path) -> tuple[Any, Any, Any]:
    """(logger, builder, network) with the ONNX model parsed into the network (explicit batch)."""
    logger = make_logger(trt)
    if hasattr(trt, "init_libnvinfer_plugins"):
        trt.init_libnvinfer_plugins(logger, "")
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if hasattr(parser, "parse_from_file"):
        ok = parser.parse_from_file(str(onnx))
    else:
        ok = parser.parse(onnx.read_bytes())
    if not ok:
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)] or logger.errors or ["unknown error"]
        raise EdgecvError(f"model {onnx}: TensorRT's ONNX parser rejects it: {errors[0].strip()}")
    return logger, builder, network


def _network_flags(trt: Any) -> int:
    """``create_network`` flags: EXPLICIT_BATCH on TensorRT 7-9 (10.x: the only mode, the flag is deprecated)."""
    explicit = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)
    if explicit is not None and str(trt.__version__).split(".")[0] in ("7", "8", "9"):
        return 1 << int(explicit)
    return 0


def _network_io(
    onnx: Path, network: Any
) -> tuple[Any, tuple[int, ...], list[dict[str, Any]], list[dict[str, Any]]]:
    """(the input tensor, its shape, the inputs and outputs for the sidecar); more than one input is an error."""
    if network.num_inputs != 1:
        raise EdgecvError(f"model {onnx}: expected 1 input tensor, found {network.num_inputs}")
    tensor = network.get_input(0)
    net_shape = tuple(int(d) for d in tensor.shape)
    inputs = [{"name": tensor.name, "shape": list(net_shape), "dtype": str(tensor.dtype)}]
    outputs = [
        {"name": network.get_output(i).name, "shape": [int(d) for d in network.get_output(i).shape]}
        for i in range(network.num_outputs)
    ]
    return tensor, net_shape, inputs, outputs


def _builder_config(trt: Any, builder: Any, workspace_mb: int) -> Any:
    """A builder config with the workspace limit set."""
    config = builder.create_builder_config()
    workspace = int(workspace_mb) << 20
    if hasattr(config, "set_memory_pool_limit"):
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    else:  # TensorRT < 8.4
        config.max_workspace_size = workspace
    return config


def _profile(builder: Any, name: str, dims: tuple[tuple[int, ...], ...]) -> Any:
    """An optimization profile giving input ``name`` its (min, opt, max) shapes."""
    profile = builder.create_optimization_profile()
    profile.set_shape(name, *dims)
    return profile


def _set_precision_flags(trt: Any, builder: Any, config: Any, precision: str, write: Callable[[str], None]) -> None:
    """FP16 for fp16 and int8, INT8 for int8; a note when the GPU has no fast path for it."""
    if precision in ("fp16", "int8"):
        if not getattr(builder, "platform_has_fast_fp16", True):
            write("  note: this GPU has no fast FP16; TensorRT will pick FP32 where FP16 does not pay")
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        if not getattr(builder, "platform_has_fast_int8", True):
            write("  note: this GPU has no fast INT8; the engine may gain little from it")
        config.set_flag(trt.BuilderFlag.INT8)


def _calibration_batches(
    onnx: Path,
    input_shape: tuple[int, ...],
    images: list[Path],
    batch: int,
    family: str,
    adapter_factory: Optional[AdapterFactory],
    write: Callable[[str], None],
) -> Union[CalibrationBatches, _CachedOnly]:
    """The INT8 calibration batches: the images through the model's adapter, or none (a cache exists)."""
    if not images:
        return _CachedOnly(batch, input_shape)
    assert adapter_factory is not None  # build_engine checked
    batches = CalibrationBatches(images, adapter_factory(onnx, family), batch_size=batch)
    write(f"  INT8 calibration: {len(images)} images in {len(batches)} batches of {batch}")
    return batches


def _serialize(
    trt: Any, builder: Any, network: Any, config: Any, logger: Any, onnx: Path, write: Callable[[str], None]
) -> Any:
    """Build the serialized engine, reporting progress (TensorRT >= 10) or a heartbeat; None is an error."""
    monitor = None  # held here while TensorRT builds: the config only borrows it
    if hasattr(trt, "IProgressMonitor") and hasattr(config, "progress_monitor"):
        monitor = _make_monitor(trt, BuildProgress(write, bars=write is _stderr and sys.stderr.isatty()))
        config.progress_monitor = monitor
        serialized = builder.build_serialized_network(network, config)
    else:
        with Heartbeat(write):
            serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        detail = logger.errors[-1] if logger.errors else "build_serialized_network returned None"
        raise EdgecvError(f"model {onnx}: TensorRT could not build an engine: {detail}")
    return serialized


class _CachedOnly:
    """Calibration batches when only a calibration cache exists: TensorRT reads the cache, never a batch."""

    def __init__(self, batch_size: int, input_shape: tuple[int, ...]) -> None:
        self.batch_size = batch_size
        self.nbytes = 4 * batch_size * int(np.prod([d for d in input_shape[1:] if d > 0] or [1]))

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter(())

    def __len__(self) -> int:
        return 0


def env_overrides(environ: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """The build options set in the environment, which override the model's `tensorrt:` section:
    ``EDGECV_TRT_PRECISION`` (fp16, fp32, int8: needs a calibration folder), ``EDGECV_TRT_MAX_BATCH`` (for models
    with a dynamic batch) and ``EDGECV_TRT_CALIB_DIR``. Unset ones are absent."""
    env = os.environ if environ is None else environ
    out: dict[str, Any] = {}
    precision = env.get(PRECISION_ENV, "").strip().lower()
    if precision:
        if precision not in PRECISIONS:
            raise EdgecvError(f"{PRECISION_ENV}: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
        out["precision"] = precision
    raw = env.get(MAX_BATCH_ENV, "").strip()
    if raw:
        try:
            max_batch = int(raw)
        except ValueError:
            raise EdgecvError(f"{MAX_BATCH_ENV}: expected a whole number, got {raw!r}") from None
        if not 1 <= max_batch <= DYNAMIC_MAX_BATCH * 4:
            raise EdgecvError(f"{MAX_BATCH_ENV}: expected 1..{DYNAMIC_MAX_BATCH * 4}, got {max_batch}")
        out["max_batch"] = max_batch
    if env.get(CALIB_ENV):
        out["calib_dir"] = env[CALIB_ENV]
    return out


def auto_options(environ: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """Build options for an engine built automatically with no `tensorrt:` section: the defaults (fp16, batch
    :data:`AUTO_MAX_BATCH`, no calibration folder) with the environment's overrides."""
    return {"precision": "fp16", "max_batch": AUTO_MAX_BATCH, "calib_dir": None, **env_overrides(environ)}


def engine_options(given: dict[str, Any], environ: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """The options of an automatic build: the defaults, then what is ``given`` (the model's `tensorrt:` section;
    None: unset), then the environment's overrides (:func:`env_overrides`), each override that changes a given
    value logged."""
    overrides = env_overrides(environ)
    for key, value in overrides.items():
        if given.get(key) is not None and str(given[key]) != str(value):
            log.info("TensorRT engine: %s %s from the environment (the config says %s)", key, value, given[key])
    return {**auto_options({}), **{k: v for k, v in given.items() if v is not None}, **overrides}


def ensure_engine(
    onnx: PathLike,
    precision: Optional[str] = None,
    max_batch: Optional[int] = None,
    calib_dir: Optional[PathLike] = None,
    device: int = 0,
    cache_folder: Optional[PathLike] = None,
    adapter_factory: Optional[AdapterFactory] = None,
    workspace_mb: int = DEFAULT_WORKSPACE_MB,
) -> Path:
    """The cached engine for ``onnx`` on this machine, built first if there is none.

    The options are the model's `tensorrt:` section (unset: :func:`auto_options`'s defaults); the environment
    (:func:`env_overrides`) overrides them. Logs which engine is used, or that it is being built and roughly how
    long that takes. ``adapter_factory``: for an INT8 build that calibrates on images (see :func:`build_engine`).
    """
    options = engine_options({"precision": precision, "max_batch": max_batch, "calib_dir": calib_dir})
    precision, max_batch, calib_dir = options["precision"], options["max_batch"], options["calib_dir"]
    onnx = Path(onnx)
    if not onnx.is_file():
        raise EdgecvError(f"model {onnx}: expected an ONNX model file, found no such file")
    trt = import_tensorrt()
    gpu = cuda_device_name(import_pycuda(), device)
    _, shape = onnx_input_shape(onnx)
    batch = effective_max_batch(shape, int(max_batch))
    calib_id = calibration_fingerprint(list_images(calib_dir)) if precision == "int8" and calib_dir else ""
    key = engine_key(onnx, str(trt.__version__), gpu, precision, batch, calib_id)
    path = engine_path(key, cache_folder)
    if path.is_file():
        log.info("TensorRT engine: cached %s", path)
        return path
    log.warning(
        "TensorRT engine: none cached for %s (%s, batch %d, TensorRT %s, %s); building %s once: "
        "usually 1-5 minutes on a desktop GPU, up to 20 on a Jetson",
        onnx.name, precision, batch, trt.__version__, gpu, path,
    )  # fmt: skip
    result = build_engine(
        onnx, path, precision=precision, max_batch=batch, calib_dir=calib_dir, device=device,
        workspace_mb=workspace_mb, write=lambda line: log.info("%s", line.strip()), adapter_factory=adapter_factory,
    )  # fmt: skip
    return result.path
