"""The TensorRT/pycuda environment: importing them, the CUDA device, TensorRT's logger.

A leaf of :mod:`edgecv.engine`: the backend (:mod:`edgecv.engine.tensorrt`), the builder
(:mod:`edgecv.engine.trt_build`) and the GPU preprocessing
(:mod:`edgecv.engine.gpu_preprocess`) all take TensorRT and pycuda from here, so none of
them needs another. ``import tensorrt`` and ``import pycuda`` happen only when a function
here is called, so :mod:`edgecv` imports without them.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any, Callable

from edgecv import EdgecvError

log = logging.getLogger("edgecv.engine")

INSTALL_HINT = "pip install 'edgecv[tensorrt]'"
Importer = Callable[[str], Any]


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def import_tensorrt(importer: Importer = importlib.import_module) -> Any:
    """The ``tensorrt`` module, or an :class:`EdgecvError` saying how to get it."""
    try:
        return importer("tensorrt")
    except ImportError as exc:
        if getattr(exc, "name", None) in ("tensorrt", None) and "No module named" in str(exc):
            raise EdgecvError(
                f"backend 'tensorrt': the tensorrt package is not installed ({INSTALL_HINT}; "
                "on Jetson it comes with JetPack: apt install python3-libnvinfer)"
            ) from exc
        raise EdgecvError(f"backend 'tensorrt': the tensorrt package does not load: {first_line(exc)}") from exc
    except OSError as exc:  # libnvinfer.so missing or of another CUDA
        raise EdgecvError(f"backend 'tensorrt': the tensorrt package does not load: {first_line(exc)}") from exc


def import_pycuda(importer: Importer = importlib.import_module) -> Any:
    """``pycuda.driver`` (not initialised), or an :class:`EdgecvError` saying what is missing."""
    try:
        importer("pycuda")
    except ImportError as exc:
        raise EdgecvError(f"backend 'tensorrt': pycuda is not installed ({INSTALL_HINT})") from exc
    try:
        return importer("pycuda.driver")
    except (ImportError, OSError) as exc:  # libcuda.so.1 absent: no NVIDIA driver
        raise EdgecvError(
            f"backend 'tensorrt': pycuda cannot load the NVIDIA driver library (is the driver installed?): "
            f"{first_line(exc)}"
        ) from exc


def cuda_device_name(cuda: Any, index: int = 0) -> str:
    """Initialise the CUDA driver and return the name of device ``index``; no device is an error."""
    try:
        cuda.init()
        count = cuda.Device.count()
    except Exception as exc:  # pycuda.driver.RuntimeError: cuInit failed: no CUDA-capable device is detected
        raise EdgecvError(f"backend 'tensorrt': no CUDA device: {first_line(exc)}") from exc
    if count < 1:
        raise EdgecvError("backend 'tensorrt': no CUDA device found (the driver reports 0 GPUs)")
    if not 0 <= index < count:
        raise EdgecvError(f"backend 'tensorrt': expected a CUDA device index 0..{count - 1}, got {index}")
    return str(cuda.Device(index).name())


def trt_dtype_name(dtype: Any) -> str:
    """``tensorrt.DataType.HALF`` -> ``HALF`` (also for anything with a ``name`` or that prints so).

    Works for any TensorRT enum member: ``TensorIOMode.INPUT``, ``ILogger.Severity.ERROR``...
    """
    name = getattr(dtype, "name", None)
    if not isinstance(name, str):
        name = str(dtype).rsplit(".", 1)[-1]
    return name.upper()


def make_logger(trt: Any) -> Any:
    """A TensorRT logger (``trt.ILogger``) that keeps errors in ``.errors`` (for messages) and
    forwards errors and warnings to the ``edgecv.engine`` log at debug level."""

    class _Logger(trt.ILogger):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            level = trt_dtype_name(severity)
            if level in ("INTERNAL_ERROR", "ERROR"):
                self.errors.append(str(msg))
                log.debug("TensorRT: %s", msg)
            elif level == "WARNING":
                log.debug("TensorRT warning: %s", msg)

    return _Logger()


__all__ = [
    "INSTALL_HINT",
    "Importer",
    "cuda_device_name",
    "first_line",
    "import_pycuda",
    "import_tensorrt",
    "make_logger",
    "trt_dtype_name",
]
