"""Inference backends: one small interface in front of ONNX Runtime (and TensorRT later).

A backend runs one model: ``infer(batch)`` takes the model's input tensor and returns
its outputs, in ``output_names`` order. It knows nothing about images or boxes; the
model adapters in :mod:`edgecv.engine.adapters` do.
"""

from __future__ import annotations

import abc
import os
import re
from collections.abc import Sequence
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from edgecv import EdgecvError
from edgecv.engine.ops import InputSpec

DYNAMIC_MAX_BATCH = 16
"""Largest batch sent to a model whose batch dimension is dynamic."""

_ORT_DTYPES: dict[str, type[np.generic]] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(uint8)": np.uint8,
}
_ORT_ERROR_PREFIX = re.compile(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*")


def format_shape(shape: Sequence[int]) -> str:
    """``(1, 3, ?, ?)``: a shape for messages, dynamic dimensions as ``?``."""
    dims = ["?" if d < 0 else str(d) for d in shape]
    return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"


def batch_limit(backend: "Backend", setting: int | str = "auto") -> int:
    """How many frames a model infers together (``model.batch``): at most ``setting`` (a number) or, for
    ``auto``, 1 with a backend on the CPU (batching the frames of several cameras was measured not to pay on the
    CPU: README, Batching) and the backend's largest batch on a GPU (TensorRT, ONNX Runtime with CUDA); never
    more than the model takes (a fixed batch is its own limit)."""
    wanted = (1 if backend.device == "cpu" else backend.max_batch) if setting == "auto" else int(setting)
    return max(1, min(wanted, backend.max_batch))


def parallel_limit(backend: "Backend", setting: int | str = "auto") -> int:
    """How many frames a model may infer at the same time, each on a thread of its own (``model.parallel``): at
    most ``setting`` (a number) or, for ``auto``, on the CPU the cores divided by the backend's intra-op threads
    (on 2 cores with the default 1 thread: 2; there YOLOX-Nano gave 72 fps one at a time, 94 with two intra-op
    threads and 144 two at once, one thread each: README, Capacity), 1 on a GPU (its frames are batched
    instead). Always 1 for a backend that cannot run from several threads at once (TensorRT's one execution
    context)."""
    if not backend.concurrent:
        return 1
    if setting != "auto":
        return max(1, int(setting))
    if backend.device != "cpu":
        return 1
    return max(1, (os.cpu_count() or 1) // max(1, backend.intra_threads))


Preprocess = Callable[[np.ndarray], tuple[np.ndarray, Any]]
"""An adapter's CPU preprocessing: BGR frame -> (C, H, W) input tensor, placement (Letterbox, InputRegion)."""


@dataclass(frozen=True)
class Staged:
    """One frame made ready for one model on the capture thread (:meth:`Backend.stage`): its input tensor and
    placement, or, for a backend that makes the input on its device, the frame itself."""

    tensor: Optional[np.ndarray] = None
    placement: Any = None
    image: Optional[np.ndarray] = None


class Backend(abc.ABC):
    """Runs one model with a single image-like input.

    Attributes are fixed once the model is loaded. Dynamic dimensions are -1.
    ``max_batch`` is the largest batch ``infer`` accepts: the fixed batch size,
    or :data:`DYNAMIC_MAX_BATCH` when the batch dimension is dynamic.

    Frames reach a model in two steps, so that a backend may make the input tensors itself (TensorRT letterboxes
    on the GPU): :meth:`stage` on the capture thread, :meth:`infer_staged` on the inference thread. By default
    the adapter's CPU preprocessing runs in :meth:`stage` and :meth:`infer_staged` stacks the tensors.
    """

    name: str  # backend kind: "onnxruntime", later "tensorrt"
    device: str  # where it runs: "cpu" or "cuda"
    path: Path
    input_name: str
    input_shape: tuple[int, ...]
    input_dtype: np.dtype
    output_names: list[str]
    output_shapes: list[tuple[int, ...]]  # as declared by the model; may hold -1
    metadata: dict[str, str]  # ONNX custom metadata map
    max_batch: int
    concurrent = False  # whether ``infer`` may run on several threads at once
    intra_threads = 1  # CPU threads one inference uses

    @abc.abstractmethod
    def infer(self, batch: np.ndarray) -> list[np.ndarray]:
        """Run the model on ``batch`` (1..max_batch items); outputs in ``output_names`` order."""

    def attach(self, spec: Optional[InputSpec]) -> None:
        """Told how the adapter makes its input (None: not a letterbox the backend could make); a backend that
        makes inputs on its device prepares for it. The default makes them on the CPU: nothing to do."""

    @property
    def makes_inputs(self) -> bool:
        """Whether this backend makes the input tensors from the frames itself (on its device)."""
        return False

    def stage(self, image: np.ndarray, preprocess: Preprocess) -> Staged:
        """Make a frame ready for this model (capture thread): by default the adapter's CPU preprocessing."""
        tensor, placement = preprocess(image)
        return Staged(tensor, placement)

    def infer_staged(self, items: Sequence[Staged]) -> tuple[list[np.ndarray], list[Any]]:
        """Run the model on staged frames (1..max_batch); the outputs and each frame's placement. One frame is
        passed as a view of its tensor (no copy: a 416x416 input is 2 MB)."""
        tensors = [s.tensor for s in items]
        batch = tensors[0][None] if len(tensors) == 1 else np.stack(tensors)
        return self.infer(batch), [s.placement for s in items]

    def _check_batch(self, batch: np.ndarray) -> np.ndarray:
        """Validate ``batch`` against the input spec; return it contiguous in the input dtype."""
        shape = batch.shape
        fits = (
            len(shape) == len(self.input_shape)
            and 1 <= shape[0] <= self.max_batch
            and all(want < 0 or want == got for want, got in zip(self.input_shape[1:], shape[1:]))
        )
        if not fits:
            raise EdgecvError(
                f"model {self.path}: expected input {format_shape(self.input_shape)} with batch 1..{self.max_batch}, "
                f"got {format_shape(shape)}"
            )
        return np.ascontiguousarray(batch, dtype=self.input_dtype)


def _ort_message(exc: BaseException) -> str:
    """The first line of an ONNX Runtime error, without its ``[ONNXRuntimeError] : 7 :`` prefix."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return _ORT_ERROR_PREFIX.sub("", text)


def _dims(shape: Sequence[Any]) -> tuple[int, ...]:
    """ONNX Runtime shape (ints, symbolic names or None) -> ints with -1 for dynamic dims."""
    return tuple(d if isinstance(d, int) and d >= 0 else -1 for d in shape)


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime session: CUDA execution provider when available (``providers=None``), else CPU.

    ``threads`` sets ``intra_op_num_threads`` (None: :func:`default_threads`, half the cores).
    ``providers`` names ONNX Runtime execution providers explicitly, e.g.
    ``["CPUExecutionProvider"]``; an unavailable one is an error.
    """

    name = "onnxruntime"
    concurrent = True  # ONNX Runtime's Run is thread-safe; with its own intra-op threads each run computes apart

    def __init__(
        self,
        path: str | Path,
        threads: Optional[int] = None,
        providers: Optional[list[str]] = None,
        max_batch: int = DYNAMIC_MAX_BATCH,
    ) -> None:
        ort = _import_onnxruntime()
        self.path = _check_model_file(Path(path))
        if threads is not None and threads < 1:
            raise EdgecvError(f"threads: expected a positive number or None, got {threads}")
        self.intra_threads = threads if threads is not None else default_threads()
        self._session = _open_session(ort, self.path, self.intra_threads, providers)
        self._read_io()
        self.metadata = dict(self._session.get_modelmeta().custom_metadata_map)
        batch_dim = self.input_shape[0] if self.input_shape else 1
        self.max_batch = batch_dim if batch_dim > 0 else max(1, int(max_batch))
        self.providers: list[str] = list(self._session.get_providers())
        self.device = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"

    def _read_io(self) -> None:
        """The session's one input (name, shape, dtype) and its outputs (names, shapes)."""
        inputs = self._session.get_inputs()
        if len(inputs) != 1:
            found = ", ".join(i.name for i in inputs)
            raise EdgecvError(f"model {self.path}: expected 1 input tensor, found {len(inputs)} ({found})")
        spec = inputs[0]
        if spec.type not in _ORT_DTYPES:
            raise EdgecvError(f"model {self.path}: expected input of type {', '.join(_ORT_DTYPES)}, found {spec.type}")
        self.input_name = spec.name
        self.input_shape = _dims(spec.shape)
        self.input_dtype = np.dtype(_ORT_DTYPES[spec.type])
        outputs = self._session.get_outputs()
        self.output_names = [o.name for o in outputs]
        self.output_shapes = [_dims(o.shape) for o in outputs]

    def infer(self, batch: np.ndarray) -> list[np.ndarray]:
        """Run the model; a short batch on a fixed-batch model is zero-padded and the padding dropped."""
        batch = self._check_batch(batch)
        n = batch.shape[0]
        fixed = self.input_shape[0]
        if 0 < fixed != n:
            padded = np.zeros((fixed, *batch.shape[1:]), dtype=batch.dtype)
            padded[:n] = batch
            batch = padded
        try:
            outputs = self._session.run(self.output_names, {self.input_name: batch})
        except Exception as exc:  # ORT raises its own exception types
            raise EdgecvError(f"model {self.path}: inference failed: {_ort_message(exc)}") from exc
        return outputs if fixed == n or fixed < 0 else [o[:n] for o in outputs]

    def __repr__(self) -> str:
        return (
            f"OnnxRuntimeBackend({str(self.path)!r}, input={format_shape(self.input_shape)}, "
            f"providers={self.providers})"
        )


def _import_onnxruntime() -> Any:
    """The ``onnxruntime`` module, or an :class:`EdgecvError` saying how to install it."""
    try:
        import onnxruntime as ort  # lazy: an optional package (edgecv[cpu]); edgecv imports without it
    except ImportError as exc:
        raise EdgecvError(
            "backend 'onnxruntime': the onnxruntime package is not installed "
            "(pip install 'edgecv[cpu]', or onnxruntime-gpu for CUDA)"
        ) from exc
    return ort


def _check_model_file(path: Path) -> Path:
    """``path``, when it is an existing regular file."""
    if not path.exists():
        raise EdgecvError(f"model {path}: expected an ONNX model file, found no such file")
    if not path.is_file():
        raise EdgecvError(f"model {path}: expected an ONNX model file, found a directory or special file")
    return path


def default_threads() -> int:
    """Inference threads when the config does not say: half the cores (at least one), leaving the other half to
    what else runs per frame (decoding, preprocessing, tracking, rules, publishing). ONNX Runtime's own default,
    one per core, made every other stage take cores from an inference that wanted them all: measured with
    `edgecv bench capacity` on 2 cores, one thread held 7 cameras at 10 fps where two held 5, at the same
    model-only speed (README, Capacity)."""
    return max(1, (os.cpu_count() or 2) // 2)


def _open_session(ort: Any, path: Path, threads: Optional[int], providers: Optional[list[str]]) -> Any:
    """An ``ort.InferenceSession`` on ``path`` (all graph optimizations, sequential, no spinning, fatal-only
    logging); ``threads`` None: :func:`default_threads`."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads if threads is not None else default_threads()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # the intra-op threads sleep when they run out of work instead of spinning: the cores they would burn are the
    # ones the capture threads (decoding), the camera workers (tracking) and the publisher need. Measured with
    # `edgecv bench latency` and `edgecv bench capacity` (README, Capacity): spinning doubled one inference and
    # the capture -> subscriber latency whenever anything else wanted the cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # fatal only: ORT's warnings would go to stderr on every load, and its error lines (raw, coloured, outside
    # the log format) repeat what the exception it raises says; edgecv logs that, once, in one line
    options.log_severity_level = 4
    chosen = _select_providers(providers, ort.get_available_providers())
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=chosen)
    except Exception as exc:  # ORT raises its own exception types (InvalidProtobuf, Fail, ...)
        raise EdgecvError(
            f"model {path}: expected an ONNX model onnxruntime can load, "
            f"found one it rejects: {_ort_message(exc)}"
        ) from exc


def _select_providers(requested: Optional[list[str]], available: list[str]) -> list[str]:
    """``None`` or ``["auto"]``: CUDA when this onnxruntime build has it, then CPU."""
    if requested is None or list(requested) == ["auto"]:
        return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    missing = [p for p in requested if p not in available]
    if missing:
        raise EdgecvError(f"onnxruntime: expected execution providers among {', '.join(available)}, got {missing[0]!r}")
    return list(requested)
