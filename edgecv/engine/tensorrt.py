"""TensorRT backend: a serialized engine run through pycuda buffers on one CUDA stream.

Written against two generations of the TensorRT Python API:

* **tensors by name** (TensorRT >= 8.5: 8.6 on JetPack 5/6, and 10.x, where it is the
  only one): ``num_io_tensors``, ``get_tensor_name/mode/shape/dtype``,
  ``get_tensor_profile_shape``, ``set_input_shape``, ``set_tensor_address``,
  ``execute_async_v3``;
* **bindings by index** (TensorRT < 8.5, e.g. 8.2 on JetPack 4.6; removed in 10):
  ``num_bindings``, ``binding_is_input``, ``get_profile_shape``, ``set_binding_shape``,
  ``execute_async_v2``. Used only when the engine has no tensor API.

Per call: the batch goes into a page-locked host buffer, is copied to the device
asynchronously, the engine runs, the outputs come back asynchronously, then the stream
is synchronised. Buffers are allocated once, for the largest shape of optimization
profile 0; a dynamic batch sets the input shape on each call whose batch differs from
the previous one.

``import tensorrt`` and ``import pycuda`` happen only when a backend is made or the
machine is probed (through :mod:`edgecv.engine.trt_env`), so :mod:`edgecv` imports without
them. The logic that does not need
a GPU (dtype mapping, the I/O tensor table, shape checks, error texts, the choice of
backend) is in plain functions that work on anything with the TensorRT engine API; the
tests drive them, and :class:`TensorRTBackend` itself, with fake engine objects.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np

from edgecv import EdgecvError
from edgecv.engine.backend import Backend, Preprocess, Staged, format_shape
from edgecv.engine.cache import ENGINE_SUFFIXES, onnx_metadata, read_sidecar
from edgecv.engine.gpu_preprocess import GpuPreprocessor
from edgecv.engine.ops import InputSpec
from edgecv.engine.trt_build import ensure_engine
from edgecv.engine.trt_env import (
    Importer,
    cuda_device_name,
    first_line,
    import_pycuda,
    import_tensorrt,
    make_logger,
    trt_dtype_name,
)

log = logging.getLogger("edgecv.engine")


# -- the machine ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Availability:
    """Whether this machine can run TensorRT, and if not, why (one line)."""

    tensorrt: Optional[str] = None  # version, when it imports
    pycuda: bool = False
    device: Optional[str] = None  # GPU name, when there is one
    problem: str = ""

    @property
    def usable(self) -> bool:
        return not self.problem


def probe(importer: Importer = importlib.import_module, device: int = 0) -> Availability:
    """Check, without raising, that tensorrt and pycuda import and a CUDA device is present."""
    try:
        trt = import_tensorrt(importer)
    except EdgecvError as exc:
        return Availability(problem=_strip_prefix(str(exc)))
    version = str(getattr(trt, "__version__", "unknown"))
    try:
        cuda = import_pycuda(importer)
    except EdgecvError as exc:
        return Availability(tensorrt=version, problem=_strip_prefix(str(exc)))
    try:
        name = cuda_device_name(cuda, device)
    except EdgecvError as exc:
        return Availability(tensorrt=version, pycuda=True, problem=_strip_prefix(str(exc)))
    return Availability(tensorrt=version, pycuda=True, device=name)


def _strip_prefix(message: str) -> str:
    return message.removeprefix("backend 'tensorrt': ")


def is_engine_file(path: Union[str, Path]) -> bool:
    return Path(path).suffix.lower() in ENGINE_SUFFIXES


def choose_backend(
    requested: str, path: Union[str, Path], probe_fn: Callable[[], Availability] = probe
) -> tuple[str, str]:
    """(backend, reason) for a model: ``requested`` is ``auto``, ``onnxruntime`` or ``tensorrt``.

    ``auto`` takes TensorRT when tensorrt and pycuda import and a CUDA device is present,
    else ONNX Runtime; an engine file (.engine/.plan/.trt) needs TensorRT whatever is asked.
    ``tensorrt`` that cannot work is an error (it is not silently replaced). ``probe_fn`` is
    only called when the answer depends on it.
    """
    engine = is_engine_file(path)
    if requested == "onnxruntime":
        if engine:
            raise EdgecvError(
                f"model {path}: a TensorRT engine file cannot run on backend 'onnxruntime'; "
                "give the .onnx model or use backend 'tensorrt'"
            )
        return "onnxruntime", "requested"
    if requested not in ("auto", "tensorrt"):
        raise EdgecvError(f"backend: expected one of auto, onnxruntime, tensorrt, got {requested!r}")
    found = probe_fn()
    if found.usable:
        why = "requested" if requested == "tensorrt" else ("engine file" if engine else "auto")
        return "tensorrt", f"{why}: TensorRT {found.tensorrt} with pycuda on {found.device}"
    if requested == "tensorrt" or engine:
        what = f"model {path} is a TensorRT engine" if requested == "auto" else "backend 'tensorrt' requested"
        raise EdgecvError(f"{what} but TensorRT cannot run here: {found.problem}")
    return "onnxruntime", f"auto: TensorRT not used ({found.problem})"


# -- dtypes and the I/O tensor table ---------------------------------------------------------

_TRT_TO_NUMPY: dict[str, type[np.generic]] = {
    "FLOAT": np.float32,
    "HALF": np.float16,
    "INT8": np.int8,
    "INT32": np.int32,
    "INT64": np.int64,
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "DOUBLE": np.float64,
}


def numpy_dtype(dtype: Any, tensor: str = "tensor") -> np.dtype:
    """The numpy dtype of a TensorRT dtype; BF16, FP8, INT4... (no numpy equivalent) are errors."""
    name = trt_dtype_name(dtype)
    if name not in _TRT_TO_NUMPY:
        raise EdgecvError(
            f"TensorRT {tensor}: expected a data type among {', '.join(_TRT_TO_NUMPY)}, got {name} "
            "(rebuild the engine with that tensor in fp16/fp32)"
        )
    return np.dtype(_TRT_TO_NUMPY[name])


def dims(shape: Any) -> tuple[int, ...]:
    """A TensorRT ``Dims`` (or any sequence) as a tuple of ints, -1 for dynamic."""
    return tuple(int(d) for d in shape)


def volume(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of an engine."""

    name: str
    is_input: bool
    shape: tuple[int, ...]  # as declared; -1 = dynamic
    dtype: np.dtype
    index: int  # binding index (bindings API) or position among the I/O tensors
    profile: Optional[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = None  # inputs: min, opt, max

    @property
    def dynamic(self) -> bool:
        return any(d < 0 for d in self.shape)

    @property
    def max_shape(self) -> tuple[int, ...]:
        """The largest shape this input takes: the declared one, or the profile's max."""
        if not self.dynamic:
            return self.shape
        if self.profile is None:
            raise EdgecvError(f"TensorRT input {self.name!r}: dynamic shape {format_shape(self.shape)} and no profile")
        return self.profile[2]


class TensorApi:
    """TensorRT >= 8.5 (8.6 on JetPack 5/6, 10.x): I/O tensors by name, ``execute_async_v3``."""

    name = "tensors"

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def specs(self, profile: int = 0) -> list[TensorSpec]:
        out = []
        for i in range(int(self.engine.num_io_tensors)):
            name = str(self.engine.get_tensor_name(i))
            mode = self.engine.get_tensor_mode(name)
            is_input = trt_dtype_name(mode) == "INPUT"
            shape = dims(self.engine.get_tensor_shape(name))
            dtype = numpy_dtype(self.engine.get_tensor_dtype(name), f"tensor {name!r}")
            prof = None
            if is_input and any(d < 0 for d in shape):
                prof = tuple(dims(s) for s in self.engine.get_tensor_profile_shape(name, profile))
            out.append(TensorSpec(name, is_input, shape, dtype, i, prof))  # type: ignore[arg-type]
        return out

    def set_input_shape(self, context: Any, spec: TensorSpec, shape: tuple[int, ...]) -> bool:
        return bool(context.set_input_shape(spec.name, tuple(shape)))

    def output_shape(self, context: Any, spec: TensorSpec) -> tuple[int, ...]:
        return dims(context.get_tensor_shape(spec.name))

    def bind(self, context: Any, addresses: dict[str, int]) -> None:
        for name, address in addresses.items():
            if context.set_tensor_address(name, int(address)) is False:
                raise EdgecvError(f"TensorRT: could not bind tensor {name!r}")

    def execute(self, context: Any, stream_handle: int) -> bool:
        return bool(context.execute_async_v3(stream_handle))


class BindingApi:
    """TensorRT < 8.5 (JetPack 4.6's 8.2): bindings by index, ``execute_async_v2``."""

    name = "bindings"

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self._bindings: list[int] = []

    def specs(self, profile: int = 0) -> list[TensorSpec]:
        out = []
        for i in range(int(self.engine.num_bindings)):
            name = str(self.engine.get_binding_name(i))
            is_input = bool(self.engine.binding_is_input(i))
            shape = dims(self.engine.get_binding_shape(i))
            dtype = numpy_dtype(self.engine.get_binding_dtype(i), f"tensor {name!r}")
            prof = None
            if is_input and any(d < 0 for d in shape):
                prof = tuple(dims(s) for s in self.engine.get_profile_shape(profile, i))
            out.append(TensorSpec(name, is_input, shape, dtype, i, prof))  # type: ignore[arg-type]
        return out

    def set_input_shape(self, context: Any, spec: TensorSpec, shape: tuple[int, ...]) -> bool:
        return bool(context.set_binding_shape(spec.index, tuple(shape)))

    def output_shape(self, context: Any, spec: TensorSpec) -> tuple[int, ...]:
        return dims(context.get_binding_shape(spec.index))

    def bind(self, context: Any, addresses: dict[str, int]) -> None:
        names = [str(self.engine.get_binding_name(i)) for i in range(int(self.engine.num_bindings))]
        self._bindings = [int(addresses[n]) for n in names]

    def execute(self, context: Any, stream_handle: int) -> bool:
        return bool(context.execute_async_v2(bindings=self._bindings, stream_handle=stream_handle))


def engine_api(engine: Any, context: Any = None) -> Union[TensorApi, BindingApi]:
    """The API generation to drive ``engine`` with: tensors by name when it has them, else bindings."""
    if hasattr(engine, "num_io_tensors") and (context is None or hasattr(context, "execute_async_v3")):
        return TensorApi(engine)
    if hasattr(engine, "num_bindings"):
        return BindingApi(engine)
    raise EdgecvError("TensorRT engine: expected the tensor API (num_io_tensors) or the bindings API (num_bindings)")


def io_table(
    api: Union[TensorApi, BindingApi], path: Union[str, Path] = "engine"
) -> tuple[TensorSpec, list[TensorSpec]]:
    """(the one input, the outputs in engine order); anything else than one input is an error."""
    specs = api.specs()
    inputs = [s for s in specs if s.is_input]
    outputs = [s for s in specs if not s.is_input]
    if len(inputs) != 1:
        found = ", ".join(s.name for s in inputs) or "none"
        raise EdgecvError(f"model {path}: expected 1 input tensor, found {len(inputs)} ({found})")
    if not outputs:
        raise EdgecvError(f"model {path}: expected at least 1 output tensor, found none")
    spec = inputs[0]
    if spec.dynamic:
        _check_profile(spec, path)
    return spec, outputs


def _check_profile(spec: TensorSpec, path: Union[str, Path]) -> None:
    """A dynamic input needs an optimization profile of its own rank."""
    if spec.profile is None:
        shape = format_shape(spec.shape)
        raise EdgecvError(f"model {path}: input {spec.name!r} is dynamic {shape} without a profile")
    if any(len(s) != len(spec.shape) for s in spec.profile):
        raise EdgecvError(f"model {path}: input {spec.name!r} profile does not match its rank")


def check_input_shape(spec: TensorSpec, shape: Sequence[int], path: Union[str, Path] = "engine") -> None:
    """Error unless ``shape`` fits the input: declared static dims equal, dynamic dims inside the profile."""
    shape = tuple(int(d) for d in shape)
    ok = len(shape) == len(spec.shape) and all(w < 0 or w == g for w, g in zip(spec.shape, shape))
    if ok and spec.dynamic and spec.profile is not None:
        low, _, high = spec.profile
        ok = all(lo <= g <= hi for lo, g, hi in zip(low, shape, high))
    if not ok:
        if spec.dynamic and spec.profile is not None:
            want = f"{format_shape(spec.shape)} within {format_shape(spec.profile[0])}..{format_shape(spec.profile[2])}"
        else:
            want = format_shape(spec.shape)
        raise EdgecvError(f"model {path}: expected input {want}, got {format_shape(shape)}")


# -- error texts -----------------------------------------------------------------------------


def rebuild_command(onnx: Optional[Union[str, Path]] = None, precision: str = "fp16", max_batch: int = 1) -> str:
    return f"edgecv build-engine {onnx or 'MODEL.onnx'} --precision {precision} --max-batch {max_batch}"


_PLUGIN = re.compile(r"plugin(?: creator)?[:\s]+['\"]?([A-Za-z0-9_]+)", re.IGNORECASE)
# phrases of TensorRT's deserialization errors: an engine of another TensorRT version, of another GPU
_OTHER_VERSION = ("version tag", "library version", "not compatible with this version")
_OTHER_GPU = ("incompatible device", "expecting compute", "compute capability")


def deserialize_error(
    path: Union[str, Path],
    log_lines: Sequence[str],
    built: Optional[dict[str, Any]] = None,
    trt_version: str = "",
    gpu: str = "",
) -> str:
    """One line explaining why TensorRT could not load an engine file, with the fix.

    ``log_lines``: TensorRT's error messages during deserialization; ``built``: the engine's
    sidecar (what it was built with), when there is one; ``trt_version``/``gpu``: this machine.
    """
    built = built or {}
    onnx = built.get("onnx")
    rebuild = rebuild_command(onnx, built.get("precision", "fp16"), int(built.get("max_batch", 1)))
    text = " ".join(log_lines)
    reason = _sidecar_mismatch(path, built, trt_version, gpu, rebuild) or _log_reason(path, text, log_lines, rebuild)
    if reason:
        return reason
    detail = _last(log_lines) or "deserialize_cuda_engine returned None"
    return (
        f"engine {path}: TensorRT could not load it ({detail}); it may come from another TensorRT version "
        f"or GPU: rebuild it: {rebuild}"
    )


def _sidecar_mismatch(path: Union[str, Path], built: dict[str, Any], trt_version: str, gpu: str, rebuild: str) -> str:
    """The engine was built (its sidecar says) by another TensorRT version or for another GPU; "" when not."""
    was_trt, was_gpu = built.get("trt_version"), built.get("gpu")
    if was_trt and trt_version and was_trt != trt_version:
        return (
            f"engine {path} was built by TensorRT {was_trt}, this is TensorRT {trt_version}: "
            f"engines only load in the version that built them; rebuild it: {rebuild}"
        )
    if was_gpu and gpu and was_gpu != gpu:
        return (
            f"engine {path} was built for the GPU {was_gpu}, this is {gpu}: engines are specific to a GPU; "
            f"rebuild it here: {rebuild}"
        )
    return ""


def _log_reason(path: Union[str, Path], text: str, log_lines: Sequence[str], rebuild: str) -> str:
    """What TensorRT's error messages (``text``: joined) say went wrong (version, GPU, plugin, not an engine);
    "" when unclear."""
    lower = text.lower()
    if any(phrase in lower for phrase in _OTHER_VERSION):
        return (
            f"engine {path} was built by another TensorRT version ({_last(log_lines)}); "
            f"engines only load in the version that built them; rebuild it: {rebuild}"
        )
    if any(phrase in lower for phrase in _OTHER_GPU):
        return f"engine {path} was built for another GPU ({_last(log_lines)}); rebuild it here: {rebuild}"
    if "plugin" in lower:
        match = _PLUGIN.search(text)
        name = match.group(1) if match else "(unnamed)"
        return (
            f"engine {path} needs the TensorRT plugin {name}, which is not registered here: load the library "
            f"that provides it (ctypes.CDLL) before opening the engine, or rebuild without it: {rebuild}"
        )
    if "magic tag" in lower:
        return f"engine {path}: expected a serialized TensorRT engine, found something else or a damaged file"
    return ""


def _last(lines: Sequence[str]) -> str:
    return lines[-1].strip() if lines else ""


# -- the backend ----------------------------------------------------------------------------


@dataclass
class _Buffer:
    spec: TensorSpec
    host: np.ndarray  # page-locked, flat, sized for the largest shape
    device: Any  # pycuda DeviceAllocation (int() is its address)
    capacity: int  # elements


class TensorRTBackend(Backend):
    """A TensorRT engine file run with pycuda (page-locked host buffers, one stream).

    ``onnx``: the ONNX model the engine was built from, when known; its metadata (class
    names, imgsz) becomes :attr:`metadata`. Otherwise the engine's sidecar JSON (written by
    ``edgecv build-engine``) names it, or holds a copy; else the metadata is empty.

    ``infer`` is thread-safe (one call at a time). The GPU preprocessing hooks
    (:meth:`input_pointer`, :meth:`infer_device`, :meth:`infer_images`) let the letterbox
    kernel write the input on the device instead.
    """

    name = "tensorrt"
    device = "cuda"

    def __init__(self, path: Union[str, Path], onnx: Optional[Union[str, Path]] = None, device: int = 0) -> None:
        path = Path(path)
        if not path.is_file():
            raise EdgecvError(f"engine {path}: expected a TensorRT engine file, found no such file")
        trt = import_tensorrt()
        cuda = import_pycuda()
        gpu = cuda_device_name(cuda, device)
        built = read_sidecar(path)
        cuda_ctx = cuda.Device(device).retain_primary_context()
        cuda_ctx.push()
        try:
            logger = make_logger(trt)
            if hasattr(trt, "init_libnvinfer_plugins"):
                trt.init_libnvinfer_plugins(logger, "")
            runtime = trt.Runtime(logger)
            engine = None
            try:
                engine = runtime.deserialize_cuda_engine(path.read_bytes())
            except Exception as exc:  # some versions raise instead of returning None
                logger.errors.append(first_line(exc))
            if engine is None:
                raise EdgecvError(deserialize_error(path, logger.errors, built, str(trt.__version__), gpu))
            self._runtime, self._logger = runtime, logger  # engine must not outlive them
            self._setup(engine, cuda, cuda.Stream(), cuda_ctx, path, _metadata(onnx, built), gpu)
        except BaseException:
            cuda_ctx.pop()
            cuda_ctx.detach()
            raise
        cuda_ctx.pop()
        self.trt_version = str(trt.__version__)
        self.built = built

    @classmethod
    def from_engine(
        cls,
        engine: Any,
        cuda: Any,
        stream: Any,
        cuda_context: Any,
        path: Union[str, Path] = "engine",
        metadata: Optional[dict[str, str]] = None,
        gpu: str = "",
    ) -> "TensorRTBackend":
        """A backend around an already deserialized ``engine`` (what ``__init__`` ends with)."""
        self = cls.__new__(cls)
        self._setup(engine, cuda, stream, cuda_context, Path(path), metadata or {}, gpu)
        self.trt_version = ""
        self.built = {}
        return self

    def _setup(
        self,
        engine: Any,
        cuda: Any,
        stream: Any,
        cuda_context: Any,
        path: Path,
        metadata: dict[str, str],
        gpu: str,
    ) -> None:
        self.path = path
        self.metadata = dict(metadata)
        self.gpu = gpu
        self._cuda, self._stream, self._cuda_ctx = cuda, stream, cuda_context
        self._engine = engine
        self._lock = threading.Lock()
        self.preprocessor: Any = None
        context = engine.create_execution_context()
        if context is None:
            raise EdgecvError(f"engine {path}: TensorRT could not create an execution context (out of GPU memory?)")
        self._context = context
        self._api = engine_api(engine, context)
        spec, outputs = io_table(self._api, path)
        self._input = spec
        self.input_name = spec.name
        self.input_shape = spec.shape
        self.input_dtype = spec.dtype
        self.output_names = [o.name for o in outputs]
        self.output_shapes = [o.shape for o in outputs]
        largest = spec.max_shape
        self.max_batch = int(largest[0]) if largest else 1
        self._shape: Optional[tuple[int, ...]] = None
        self._set_shape(largest)
        out_max = [self._api.output_shape(context, o) for o in outputs]
        for o, shape in zip(outputs, out_max):
            if any(d < 0 for d in shape):
                raise EdgecvError(
                    f"model {path}: output {o.name!r} has a data-dependent shape {format_shape(shape)}; "
                    "expected shapes fixed by the input"
                )
        self._in = self._alloc(spec, volume(largest))
        self._outs = [self._alloc(o, volume(s)) for o, s in zip(outputs, out_max)]
        self._api.bind(context, {b.spec.name: int(b.device) for b in [self._in, *self._outs]})
        log.debug("TensorRT engine %s: input %s %s, outputs %s, API %s", path, spec.name,
                  format_shape(spec.shape), ", ".join(self.output_names), self._api.name)

    def _alloc(self, spec: TensorSpec, count: int) -> _Buffer:
        host = self._cuda.pagelocked_empty(count, spec.dtype)
        device = self._cuda.mem_alloc(max(1, count * spec.dtype.itemsize))
        return _Buffer(spec, host, device, count)

    def _set_shape(self, shape: tuple[int, ...]) -> None:
        """Give a dynamic input its shape for the next run (only when it changes)."""
        if shape == self._shape:
            return
        if self._input.dynamic and not self._api.set_input_shape(self._context, self._input, shape):
            raise EdgecvError(
                f"model {self.path}: TensorRT rejected input shape {format_shape(shape)} "
                f"(profile {format_shape(self._input.profile[0])}..{format_shape(self._input.profile[2])})"  # type: ignore[index]
            )
        self._shape = shape

    @contextlib.contextmanager
    def _active(self) -> Iterator[None]:
        """One call at a time, with this backend's CUDA context current on the calling thread."""
        with self._lock:
            self._cuda_ctx.push()
            try:
                yield
            finally:
                self._cuda_ctx.pop()

    # -- inference -------------------------------------------------------------------------

    def _run_shape(self, n: int, tail: Optional[Sequence[int]] = None) -> tuple[int, ...]:
        """The shape a batch of ``n`` items runs with: a fixed batch dimension stays (padded), else ``n``."""
        fixed = self._input.shape[0]
        return (fixed if fixed > 0 else n, *(tuple(tail) if tail is not None else self._shape_tail()))

    def _shape_tail(self) -> tuple[int, ...]:
        tail = self._input.shape[1:]
        if all(d > 0 for d in tail):
            return tuple(tail)
        return tuple(self._input.max_shape[1:])  # dynamic H/W: infer() passes the batch's own

    def infer(self, batch: np.ndarray) -> list[np.ndarray]:
        """Run the engine on ``batch`` (1..max_batch items); outputs in ``output_names`` order."""
        batch = self._check_batch(batch)
        n = batch.shape[0]
        shape = self._run_shape(n, batch.shape[1:])
        check_input_shape(self._input, shape, self.path)
        with self._active():
            staged = self._in.host[: volume(shape)].reshape(shape)
            staged[:n] = batch
            if shape[0] > n:
                staged[n:] = 0  # a fixed-batch engine with fewer items: padding, dropped below
            self._cuda.memcpy_htod_async(self._in.device, staged, self._stream)
            outputs = self._execute(shape)
        return [o[:n] for o in outputs]

    def _execute(self, shape: tuple[int, ...]) -> list[np.ndarray]:
        """Run on the input already on the device (context active); outputs as new host arrays."""
        self._set_shape(shape)
        if not self._api.execute(self._context, self._stream.handle):
            raise EdgecvError(f"model {self.path}: TensorRT inference failed (see TensorRT's log)")
        views = []
        for buf in self._outs:
            out_shape = self._api.output_shape(self._context, buf.spec)
            view = buf.host[: volume(out_shape)].reshape(out_shape)
            self._cuda.memcpy_dtoh_async(view, buf.device, self._stream)
            views.append(view)
        self._stream.synchronize()
        return [np.array(v) for v in views]  # copies: the page-locked buffers are reused next call

    # -- GPU preprocessing hooks -------------------------------------------------------------

    def input_pointer(self, index: int = 0) -> int:
        """Device address of batch item ``index`` of the input buffer (for the letterbox kernel)."""
        if not 0 <= index < self.max_batch:
            raise EdgecvError(f"model {self.path}: expected a batch index 0..{self.max_batch - 1}, got {index}")
        item = volume(self._shape_tail()) * self.input_dtype.itemsize
        return int(self._in.device) + index * item

    def infer_device(self, n: int) -> list[np.ndarray]:
        """Run on the first ``n`` items already written to the input device buffer."""
        if not 1 <= n <= self.max_batch:
            raise EdgecvError(f"model {self.path}: expected a batch of 1..{self.max_batch}, got {n}")
        with self._active():
            outputs = self._execute(self._run_shape(n))
        return [o[:n] for o in outputs]

    def attach(self, spec: Optional[InputSpec]) -> None:
        """Compile the letterbox kernel for the adapter's input ``spec``, on this engine's stream; from then on
        frames are letterboxed on the GPU straight into the input buffer (:meth:`stage`, :meth:`infer_staged`).

        Needs a letterbox input (``spec``) and a float32 engine input of fixed size; when the kernel is not
        used, the reason is logged and the CPU path stays.
        """
        self.preprocessor = None
        if spec is None:
            log.info("GPU preprocessing not used: the model's input is not a letterbox; preprocessing on the CPU")
            return
        if self.input_dtype != np.float32 or any(d < 0 for d in self._input.shape[1:]):
            log.info("GPU preprocessing not used: the engine input is %s %s (needs fixed-size float32)",
                     self.input_dtype, format_shape(self._input.shape))
            return
        try:
            with self._active():
                self.preprocessor = GpuPreprocessor.for_spec(spec, stream=self._stream, cuda=self._cuda)
        except Exception as exc:  # EdgecvError (no nvcc...) or a pycuda error: keep the CPU path
            log.warning("GPU preprocessing not used, preprocessing on the CPU: %s", first_line(exc))
            self.preprocessor = None
        else:
            log.info("GPU preprocessing: letterbox kernel writes into the TensorRT input buffer")

    @property
    def makes_inputs(self) -> bool:
        return self.preprocessor is not None

    def stage(self, image: np.ndarray, preprocess: Preprocess) -> Staged:
        """With the kernel attached the capture thread makes no tensor: the frame goes to :meth:`infer_staged`."""
        if self.preprocessor is None:
            return super().stage(image, preprocess)
        return Staged(image=image)

    def infer_staged(self, items: Sequence[Staged]) -> tuple[list[np.ndarray], list[Any]]:
        if self.preprocessor is None:
            return super().infer_staged(items)
        return self.infer_images([s.image for s in items])

    def infer_images(self, images: Sequence[np.ndarray]) -> tuple[list[np.ndarray], list[Any]]:
        """GPU-preprocess up to ``max_batch`` BGR frames into the input buffer and run the engine.

        Returns (outputs, Letterbox per image), as ``Detector.postprocess`` takes them.
        """
        if self.preprocessor is None:
            raise EdgecvError(f"model {self.path}: GPU preprocessing is not attached (attach)")
        n = len(images)
        if not 1 <= n <= self.max_batch:
            raise EdgecvError(f"model {self.path}: expected 1..{self.max_batch} images, got {n}")
        with self._active():
            boxes = [self.preprocessor(img, self.input_pointer(i), slot=i) for i, img in enumerate(images)]
            shape = self._run_shape(n)
            if shape[0] > n:  # fixed batch: zero the unused items on the device
                item = volume(shape[1:]) * self.input_dtype.itemsize
                self._cuda.memset_d8_async(self.input_pointer(n), 0, item * (shape[0] - n), self._stream)
            outputs = self._execute(shape)
        return [o[:n] for o in outputs], boxes

    def close(self) -> None:
        """Free the device buffers and the engine (also done when the object is collected)."""
        if getattr(self, "_engine", None) is None:
            return
        with self._active():
            for buf in [self._in, *self._outs]:
                free = getattr(buf.device, "free", None)
                if free is not None:
                    free()
            self.preprocessor = None
            self._context = None  # TensorRT objects go in order: context, engine, runtime
            self._engine = None
            self._runtime = None
        detach = getattr(self._cuda_ctx, "detach", None)
        if detach is not None:
            detach()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: CUDA may already be gone
            pass

    def __repr__(self) -> str:
        return (
            f"TensorRTBackend({str(self.path)!r}, input={format_shape(self.input_shape)}, "
            f"max_batch={self.max_batch}, api={self._api.name})"
        )


def _metadata(onnx: Optional[Union[str, Path]], built: dict[str, Any]) -> dict[str, str]:
    """ONNX metadata: from the given ONNX, else the one the sidecar names, else the sidecar's copy, else {}."""
    candidates = [onnx, built.get("onnx")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            try:
                return onnx_metadata(candidate)
            except EdgecvError as exc:
                log.warning("%s", exc)
    copy = built.get("metadata")
    return {str(k): str(v) for k, v in copy.items()} if isinstance(copy, dict) else {}


def open_tensorrt(path: Union[str, Path], device: int = 0, **build: Any) -> TensorRTBackend:
    """A TensorRT backend for an engine file, or for an ONNX model (built once, then taken from the cache).

    ``build``: options for :func:`edgecv.engine.trt_build.ensure_engine` (precision, max_batch,
    ``adapter_factory`` for INT8 calibration...).
    """
    path = Path(path)
    if is_engine_file(path):
        return TensorRTBackend(path, device=device)
    engine = ensure_engine(path, device=device, **build)
    return TensorRTBackend(engine, onnx=path, device=device)


__all__ = [
    "Availability",
    "BindingApi",
    "TensorApi",
    "TensorRTBackend",
    "TensorSpec",
    "check_input_shape",
    "choose_backend",
    "deserialize_error",
    "engine_api",
    "io_table",
    "numpy_dtype",
    "open_tensorrt",
    "probe",
    "rebuild_command",
]
