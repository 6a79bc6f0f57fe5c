"""Letterbox + normalise + HWC->CHW in one CUDA kernel, and its exact numpy twin.

The CPU path (:meth:`edgecv.engine.adapters.Detector.preprocess`: OpenCV ``resize``
with ``INTER_LINEAR`` into a grey canvas, then channel split and scaling) stays the
reference. With TensorRT the same work runs on the GPU: the BGR uint8 frame is copied
to the device (1 byte per pixel instead of 4 for a float tensor) and one kernel writes
the model input, already in CHW float32, straight into the engine's input buffer.

What the kernel computes, for every output pixel (x, y) of a ``dst_w`` x ``dst_h`` input:

* outside the placed image (``pad_x``/``pad_y``, top-left for YOLOX, centred for
  Ultralytics): ``pad_value * value_scale`` (114, or 114/255);
* inside: bilinear interpolation with OpenCV's ``INTER_LINEAR`` convention, half-pixel
  centres ``fx = (rx + 0.5) * src_w / new_w - 0.5``, ``sx = floor(fx)``, weights
  ``fx - sx``; a coordinate left of the first or right of the last pixel centre is
  clamped to that pixel with weight 0 (as OpenCV does). The value is rounded to an
  integer (OpenCV's output is uint8), then multiplied by ``value_scale`` (1 or 1/255);
* channels are written B, G, R or, when the model wants RGB, R, G, B, as planes.

Every float operation in the kernel uses the round-to-nearest intrinsics
(``__fmul_rn``, ``__fadd_rn``...), which the compiler may not fuse into FMAs, so
:func:`reference_kernel` (numpy float32, one rounding per operation, same order)
reproduces it bit for bit. The difference to OpenCV comes from OpenCV's fixed-point
arithmetic (11-bit weights): at most 1 in 0-255 units on a few pixels, measured in
``tests/test_gpu_preprocess.py`` and by ``engines/gpu_check.py``.

The kernel source is the module constant :data:`KERNEL_SOURCE` (plain CUDA C with an
``extern "C"`` entry point), so any CUDA binding can compile it: pycuda's
``SourceModule`` here, CuPy's ``RawKernel`` in the GPU check.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from edgecv import EdgecvError
from edgecv.engine.ops import PAD_VALUE, InputSpec, Letterbox
from edgecv.engine.trt_env import first_line, import_pycuda

log = logging.getLogger("edgecv.engine")

KERNEL_NAME = "letterbox_chw"
BLOCK = (32, 8, 1)

KERNEL_SOURCE = r"""
extern "C" __global__ void letterbox_chw(
    const unsigned char* __restrict__ src, int src_w, int src_h, int src_pitch,
    float* __restrict__ dst, int dst_w, int dst_h,
    int new_w, int new_h, int pad_x, int pad_y,
    float scale_x, float scale_y, float value_scale, int swap_rb, float pad_value)
{
    // src: BGR uint8, src_h rows of src_pitch bytes; dst: 3 planes of dst_h x dst_w float32.
    // scale_x = src_w / new_w and scale_y = src_h / new_h: source pixels per resized pixel.
    const int x = blockIdx.x * blockDim.x + threadIdx.x;
    const int y = blockIdx.y * blockDim.y + threadIdx.y;
    if (x >= dst_w || y >= dst_h) return;
    const int plane = dst_w * dst_h;
    float* out = dst + (long long)y * dst_w + x;
    const int rx = x - pad_x;
    const int ry = y - pad_y;
    if (rx < 0 || ry < 0 || rx >= new_w || ry >= new_h) {
        const float v = __fmul_rn(pad_value, value_scale);
        out[0] = v; out[plane] = v; out[2 * plane] = v;
        return;
    }
    // OpenCV INTER_LINEAR: half-pixel centres, clamped at the borders with weight 0.
    float fx = __fsub_rn(__fmul_rn(__fadd_rn((float)rx, 0.5f), scale_x), 0.5f);
    int sx = (int)floorf(fx);
    fx = __fsub_rn(fx, (float)sx);
    if (sx < 0) { sx = 0; fx = 0.0f; }
    if (sx >= src_w - 1) { sx = src_w - 1; fx = 0.0f; }
    const int sx1 = min(sx + 1, src_w - 1);
    float fy = __fsub_rn(__fmul_rn(__fadd_rn((float)ry, 0.5f), scale_y), 0.5f);
    int sy = (int)floorf(fy);
    fy = __fsub_rn(fy, (float)sy);
    if (sy < 0) { sy = 0; fy = 0.0f; }
    if (sy >= src_h - 1) { sy = src_h - 1; fy = 0.0f; }
    const int sy1 = min(sy + 1, src_h - 1);
    const float wx0 = __fsub_rn(1.0f, fx);
    const float wy0 = __fsub_rn(1.0f, fy);
    const unsigned char* r0 = src + (long long)sy * src_pitch;
    const unsigned char* r1 = src + (long long)sy1 * src_pitch;
    float v[3];
    #pragma unroll
    for (int c = 0; c < 3; ++c) {
        const float top = __fadd_rn(__fmul_rn((float)r0[3 * sx + c], wx0), __fmul_rn((float)r0[3 * sx1 + c], fx));
        const float bot = __fadd_rn(__fmul_rn((float)r1[3 * sx + c], wx0), __fmul_rn((float)r1[3 * sx1 + c], fx));
        const float val = __fadd_rn(__fmul_rn(top, wy0), __fmul_rn(bot, fy));
        v[c] = __fmul_rn(floorf(__fadd_rn(val, 0.5f)), value_scale);
    }
    // v is B, G, R; planes are B, G, R or R, G, B.
    out[0] = swap_rb ? v[2] : v[0];
    out[plane] = v[1];
    out[2 * plane] = swap_rb ? v[0] : v[2];
}
"""


@dataclass(frozen=True)
class KernelParams:
    """The geometry and style of one letterbox launch: the kernel's scalar arguments."""

    src_w: int
    src_h: int
    dst_w: int
    dst_h: int
    new_w: int
    new_h: int
    pad_x: int
    pad_y: int
    value_scale: float
    swap_rb: bool
    pad_value: float
    letterbox: Letterbox

    @property
    def scale_x(self) -> np.float32:
        """Source pixels per resized pixel, horizontally (what OpenCV's resize uses, not the letterbox scale)."""
        return np.float32(self.src_w / self.new_w)

    @property
    def scale_y(self) -> np.float32:
        return np.float32(self.src_h / self.new_h)

    def args(self, src: Any, src_pitch: int, dst: Any) -> tuple[Any, ...]:
        """Kernel arguments in order; ``src``/``dst`` are whatever the binding takes as pointers."""
        i32, f32 = np.int32, np.float32
        return (
            src, i32(self.src_w), i32(self.src_h), i32(src_pitch),
            dst, i32(self.dst_w), i32(self.dst_h),
            i32(self.new_w), i32(self.new_h), i32(self.pad_x), i32(self.pad_y),
            self.scale_x, self.scale_y, f32(self.value_scale), i32(1 if self.swap_rb else 0), f32(self.pad_value),
        )  # fmt: skip

    def grid(self, block: tuple[int, int, int] = BLOCK) -> tuple[int, int, int]:
        return ((self.dst_w + block[0] - 1) // block[0], (self.dst_h + block[1] - 1) // block[1], 1)


def letterbox_geometry(
    src_w: int, src_h: int, dst_w: int, dst_h: int, center: bool
) -> tuple[int, int, int, int, Letterbox]:
    """(new_w, new_h, pad_x, pad_y, Letterbox): the placement :func:`edgecv.engine.ops.letterbox` uses."""
    if src_w < 1 or src_h < 1:
        raise ValueError(f"image: expected a non-empty image, got {src_w}x{src_h}")
    scale = min(dst_w / src_w, dst_h / src_h)
    new_w = min(dst_w, max(1, round(src_w * scale)))
    new_h = min(dst_h, max(1, round(src_h * scale)))
    pad_x, pad_y = ((dst_w - new_w) // 2, (dst_h - new_h) // 2) if center else (0, 0)
    return new_w, new_h, pad_x, pad_y, Letterbox(scale, float(pad_x), float(pad_y), src_w, src_h)


def kernel_params(
    src_w: int,
    src_h: int,
    size: tuple[int, int],
    center: bool,
    rgb: bool,
    scale: float,
    pad_value: float = PAD_VALUE,
) -> KernelParams:
    """The launch for a ``src_w`` x ``src_h`` frame into a ``size`` = (w, h) model input."""
    dst_w, dst_h = size
    new_w, new_h, pad_x, pad_y, box = letterbox_geometry(src_w, src_h, dst_w, dst_h, center)
    value_scale = float(np.float32(scale))
    return KernelParams(
        src_w, src_h, dst_w, dst_h, new_w, new_h, pad_x, pad_y, value_scale, bool(rgb), float(pad_value), box
    )


def _axis(n_out: int, n_src: int, scale: np.float32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per output index along one axis: first source index, second source index, weight of the second."""
    pos = (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    s0 = np.floor(pos).astype(np.int64)
    frac = (pos - s0.astype(np.float32)).astype(np.float32)
    low = s0 < 0
    s0[low], frac[low] = 0, 0.0
    high = s0 >= n_src - 1
    s0[high], frac[high] = n_src - 1, 0.0
    return s0, np.minimum(s0 + 1, n_src - 1), frac


def reference_kernel(image: np.ndarray, params: KernelParams) -> np.ndarray:
    """What the kernel writes for ``image`` (BGR uint8 HxWx3), computed with numpy: (3, dst_h, dst_w) float32."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image: expected a BGR uint8 array (H, W, 3), got {image.dtype} {image.shape}")
    if image.shape[:2] != (params.src_h, params.src_w):
        raise ValueError(f"image: expected {params.src_w}x{params.src_h}, got {image.shape[1]}x{image.shape[0]}")
    f32 = np.float32
    value_scale = f32(params.value_scale)
    out = np.empty((3, params.dst_h, params.dst_w), dtype=np.float32)
    out[...] = f32(params.pad_value) * value_scale
    x0, x1, fx = _axis(params.new_w, params.src_w, params.scale_x)
    y0, y1, fy = _axis(params.new_h, params.src_h, params.scale_y)
    wx0, wy0 = (f32(1) - fx)[None, :], (f32(1) - fy)[:, None]
    fx, fy = fx[None, :], fy[:, None]
    src = image.astype(np.float32)
    rows0, rows1 = src[y0], src[y1]  # (new_h, W, 3)
    region = out[:, params.pad_y : params.pad_y + params.new_h, params.pad_x : params.pad_x + params.new_w]
    order = (2, 1, 0) if params.swap_rb else (0, 1, 2)
    for plane, c in enumerate(order):
        r0, r1 = rows0[:, :, c], rows1[:, :, c]
        top = r0[:, x0] * wx0 + r0[:, x1] * fx
        bot = r1[:, x0] * wx0 + r1[:, x1] * fx
        val = top * wy0 + bot * fy
        region[plane] = np.floor(val + f32(0.5)) * value_scale
    return out


def reference_preprocess(
    image: np.ndarray, size: tuple[int, int], center: bool, rgb: bool, scale: float, pad_value: float = PAD_VALUE
) -> tuple[np.ndarray, Letterbox]:
    """:func:`reference_kernel` for a model input ``size`` and style; returns (tensor, placement)."""
    params = kernel_params(image.shape[1], image.shape[0], size, center, rgb, scale, pad_value)
    return reference_kernel(image, params), params.letterbox


class GpuPreprocessor:
    """Runs :data:`KERNEL_SOURCE` through pycuda: ``__call__(image, dst) -> Letterbox``.

    ``dst`` is a device pointer (int) to a (3, H, W) float32 tensor, e.g. one batch slot of
    a TensorRT engine's input buffer (:meth:`TensorRTBackend.input_pointer`); without one
    the preprocessor writes into its own buffer (:meth:`download` reads it back). Work is
    queued on ``stream`` (the engine's, so the engine runs after it); the call returns
    once the frame is staged, not when the kernel has finished. ``slot`` gives each batch
    item its own staging buffers so several frames can be in flight.

    The CUDA context that is current when it is created must be current when it is called.
    """

    def __init__(
        self,
        size: tuple[int, int],
        center: bool,
        rgb: bool,
        scale: float,
        pad_value: float = PAD_VALUE,
        stream: Any = None,
        cuda: Any = None,
    ) -> None:
        if cuda is None:
            cuda = import_pycuda()
        self._cuda = cuda
        self.size = (int(size[0]), int(size[1]))
        self.center, self.rgb, self.scale, self.pad_value = bool(center), bool(rgb), float(scale), float(pad_value)
        put_nvcc_on_path()  # pycuda compiles the kernel with the nvcc it finds on PATH
        self._kernel = compile_kernel()
        self.stream = stream if stream is not None else cuda.Stream()
        self._slots: dict[int, _Staging] = {}
        self._own: Any = None
        self._lock = threading.Lock()

    @classmethod
    def for_spec(cls, spec: InputSpec, **kwargs: Any) -> "GpuPreprocessor":
        """A preprocessor making the input an adapter describes (size, placement, channel order, scale, pad)."""
        return cls(spec.size, spec.center, spec.rgb, spec.scale, spec.pad_value, **kwargs)

    @property
    def nbytes(self) -> int:
        """Bytes of one (3, H, W) float32 output."""
        return 3 * self.size[0] * self.size[1] * 4

    def __call__(self, image: np.ndarray, dst: Optional[int] = None, slot: int = 0) -> Letterbox:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image: expected a BGR uint8 array (H, W, 3), got {image.dtype} {image.shape}")
        cuda = self._cuda
        h, w = image.shape[:2]
        params = kernel_params(w, h, self.size, self.center, self.rgb, self.scale, self.pad_value)
        with self._lock:
            staging = self._slots.get(slot)
            if staging is None or staging.capacity < image.nbytes:
                staging = self._slots[slot] = _Staging(cuda, image.nbytes)
            staging.done.synchronize()  # the previous frame of this slot has left the host buffer
            host = staging.host[: image.nbytes]
            np.copyto(host.reshape(image.shape), image)  # also makes a strided view contiguous
            cuda.memcpy_htod_async(staging.device, host, self.stream)
            staging.done.record(self.stream)
            if dst is None:
                if self._own is None:
                    self._own = cuda.mem_alloc(self.nbytes)
                dst = int(self._own)
            pitch = image.shape[1] * 3
            self._kernel(
                *params.args(staging.device, pitch, np.uintp(dst)),
                block=BLOCK,
                grid=params.grid()[:2],
                stream=self.stream,
            )
        return params.letterbox

    def download(self) -> np.ndarray:
        """Wait for the queued work; the own output buffer as a (3, H, W) float32 array."""
        if self._own is None:
            raise RuntimeError("GpuPreprocessor.download: nothing was written to the own buffer")
        out = np.empty((3, self.size[1], self.size[0]), dtype=np.float32)
        self.stream.synchronize()
        self._cuda.memcpy_dtoh(out, self._own)
        return out


class _Staging:
    """Page-locked host buffer + device buffer for one frame, and an event marking its copy done."""

    def __init__(self, cuda: Any, nbytes: int) -> None:
        self.capacity = int(nbytes)
        self.host = cuda.pagelocked_empty(self.capacity, np.uint8)
        self.device = cuda.mem_alloc(self.capacity)
        self.done = cuda.Event()
        self.done.record()  # an event never recorded would make synchronize() fail on some drivers


_compiled: dict[int, Any] = {}
_modules: dict[int, Any] = {}


CUDA_BIN = "/usr/local/cuda/bin"
"""Where JetPack and the CUDA installers put ``nvcc`` (often not on PATH)."""


def put_nvcc_on_path(environ: Optional[MutableMapping[str, str]] = None, cuda_bin: str = CUDA_BIN) -> bool:
    """Append ``cuda_bin`` to ``PATH`` when ``nvcc`` is not on it but is there; True when PATH changed.

    pycuda compiles with the ``nvcc`` it finds on PATH. This changes the process environment
    (``environ``: default :data:`os.environ`), so it is called explicitly, once before the
    kernel is compiled (:class:`GpuPreprocessor`), never at import.
    """
    env = os.environ if environ is None else environ
    nvcc = os.path.join(cuda_bin, "nvcc")
    if shutil.which("nvcc", path=env.get("PATH", os.defpath)) is not None or not os.path.exists(nvcc):
        return False
    env["PATH"] = env.get("PATH", "") + os.pathsep + cuda_bin
    return True


def compile_kernel() -> Any:
    """Compile :data:`KERNEL_SOURCE` with pycuda (once per CUDA context); the kernel function.

    pycuda compiles with ``nvcc`` from PATH (see :func:`put_nvcc_on_path`, which the caller
    runs first).
    """
    from pycuda import driver as cuda  # lazy: pycuda is optional (edgecv[tensorrt]); the caller made sure it imports
    from pycuda.compiler import SourceModule  # lazy, as above: compiling needs pycuda and nvcc, never at import

    context = cuda.Context.get_current()
    key = int(getattr(context, "handle", id(context))) if context is not None else 0
    if key in _compiled:
        return _compiled[key]
    try:
        module = SourceModule(KERNEL_SOURCE, no_extern_c=True, options=["-O3"])
    except Exception as exc:  # pycuda.driver.CompileError, or nvcc missing (OSError)
        raise EdgecvError(
            f"GPU preprocessing: cannot compile the letterbox kernel (needs nvcc): {first_line(exc)}"
        ) from exc
    function = module.get_function(KERNEL_NAME)
    _compiled[key] = function
    _modules[key] = module  # the function is only valid while its module is loaded
    return function
