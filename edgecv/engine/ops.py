"""Image and box operations shared by the model adapters: letterbox, layout, NMS, IoU."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import cv2
import numpy as np

PAD_VALUE = 114
"""Grey used around the letterboxed image (YOLOX and Ultralytics both train with it)."""


@dataclass(frozen=True, slots=True)
class Letterbox:
    """Where a source image sits in the model input.

    source px = (input px - pad) / scale, for x with ``pad_x`` and y with ``pad_y``.
    """

    scale: float
    pad_x: float
    pad_y: float
    src_w: int
    src_h: int

    def to_source(self, xyxy: np.ndarray) -> np.ndarray:
        """Map (N, 4) boxes from input pixels to source pixels, clipped to the image (new float32 array)."""
        out = np.array(xyxy, dtype=np.float32).reshape(-1, 4)  # a copy
        out -= np.array([self.pad_x, self.pad_y, self.pad_x, self.pad_y], dtype=np.float32)
        out /= np.float32(self.scale)
        np.clip(out, 0.0, np.array([self.src_w, self.src_h, self.src_w, self.src_h], dtype=np.float32), out=out)
        return out


@dataclass(frozen=True)
class InputSpec:
    """How a frame becomes a letterbox model's input tensor: what a backend needs to make it itself (on the CPU by
    default, on the GPU with TensorRT) without knowing the model adapter."""

    size: tuple[int, int]  # (w, h) of the model input
    center: bool  # image centred in the canvas (Ultralytics), else at the top-left (YOLOX)
    rgb: bool  # the model wants RGB (the frames are BGR)
    scale: float  # pixel value multiplier: 1 for 0-255 input, 1/255 for 0-1
    pad_value: int = PAD_VALUE  # grey around the image, before scaling

    def make(self, image: np.ndarray, out: Optional[np.ndarray] = None) -> tuple[np.ndarray, Letterbox]:
        """The (3, H, W) float32 tensor of a BGR uint8 image (written into ``out`` when given) and its placement."""
        w, h = self.size
        canvas, box = letterbox(image, self.size, center=self.center, pad_value=self.pad_value)
        if out is None:
            out = np.empty((3, h, w), dtype=np.float32)
        to_chw(canvas, out, scale=self.scale, swap_rb=self.rgb)
        return out, box


def letterbox(
    image: np.ndarray, size: tuple[int, int], center: bool, pad_value: int = PAD_VALUE
) -> tuple[np.ndarray, Letterbox]:
    """Fit a BGR uint8 image into a ``size`` = (w, h) canvas keeping its aspect ratio.

    The image is resized (bilinear) straight into its place in a freshly filled canvas;
    ``center`` puts it in the middle (Ultralytics), otherwise at the top-left (YOLOX).
    Returns the (h, w, 3) uint8 canvas and the placement.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image: expected a BGR uint8 array (H, W, 3), got {image.dtype} {image.shape}")
    src_h, src_w = image.shape[:2]
    dst_w, dst_h = size
    scale = min(dst_w / src_w, dst_h / src_h)
    new_w = min(dst_w, max(1, round(src_w * scale)))
    new_h = min(dst_h, max(1, round(src_h * scale)))
    pad_x, pad_y = ((dst_w - new_w) // 2, (dst_h - new_h) // 2) if center else (0, 0)
    canvas = np.full((dst_h, dst_w, 3), pad_value, dtype=np.uint8)
    region = canvas[pad_y : pad_y + new_h, pad_x : pad_x + new_w]
    if (new_w, new_h) == (src_w, src_h):
        region[...] = image
    else:
        cv2.resize(image, (new_w, new_h), dst=region, interpolation=cv2.INTER_LINEAR)
    return canvas, Letterbox(scale, float(pad_x), float(pad_y), src_w, src_h)


def to_chw(image: np.ndarray, out: np.ndarray, scale: float = 1.0, swap_rb: bool = False) -> np.ndarray:
    """Write an (H, W, 3) uint8 image into a (3, H, W) float array as ``value * scale``.

    ``swap_rb`` turns BGR into RGB. One pass per channel, no temporaries beyond the split planes.
    """
    planes = cv2.split(image)
    if swap_rb:
        planes = planes[::-1]
    for dst, src in zip(out, planes):
        if scale == 1.0:
            np.copyto(dst, src)
        else:
            np.multiply(src, np.float32(scale), out=dst)
    return out


def cxcywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """(N, 4) centre x, centre y, width, height -> (N, 4) x1, y1, x2, y2 (new array)."""
    half = boxes[:, 2:4] * 0.5
    return np.concatenate([boxes[:, :2] - half, boxes[:, :2] + half], axis=1)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) intersection over union of xyxy boxes ``a`` (N, 4) and ``b`` (M, 4)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0.0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0.0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0.0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def nms(
    xyxy: np.ndarray, scores: np.ndarray, class_ids: np.ndarray, iou_threshold: float, max_det: int = 300
) -> np.ndarray:
    """Class-aware greedy non-maximum suppression.

    A box is dropped when it overlaps a higher-scored box of the same class with
    IoU > ``iou_threshold``; boxes of different classes never suppress each other.
    Returns the kept indices, highest score first, at most ``max_det``.
    """
    if len(xyxy) == 0:
        return np.zeros(0, dtype=np.intp)
    boxes = np.asarray(xyxy, dtype=np.float64).reshape(-1, 4)
    # OpenCV keeps classes apart by shifting each box by class_id * (max coordinate + 1),
    # which only separates them when coordinates are >= 0: translate first (IoU is unchanged).
    origin = min(0.0, float(boxes.min()))
    xywh = np.empty_like(boxes)
    xywh[:, :2] = boxes[:, :2] - origin
    xywh[:, 2:] = boxes[:, 2:] - boxes[:, :2]
    keep = cv2.dnn.NMSBoxesBatched(
        xywh,
        np.asarray(scores, dtype=np.float32).reshape(-1),
        np.asarray(class_ids, dtype=np.int32).reshape(-1),
        score_threshold=-np.inf,
        nms_threshold=float(iou_threshold),
    )
    return np.asarray(keep, dtype=np.intp).reshape(-1)[:max_det]
