"""A cheap appearance cue for association: the colour layout of the middle of each box.

Each box's inner part (its middle 60 % across, 80 % down: less background, less of a neighbour) is read as a
grid of ``GRID`` cells, each the mean colour (YCrCb) of a few pixels spread over it; two boxes differ by the mean
absolute difference of their cells, scaled to 0 (the same) .. 1 (as different as ``SCALE`` or more). Clothing
colours above and below, a car's body colour: enough to tell apart two objects whose boxes overlap, which IoU
alone cannot. About 10 us per box (`edgecv bench tracker`): no crop is resized, no image converted.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from scipy.spatial.distance import cdist

# Chosen with `edgecv eval --suite` on cached detections of both detectors (README, "How good is the tracking"):
# grids of 1x8 to 4x8 cells scored alike; SCALE 20 beat 10, 15 and 30 (and, in CIE Lab, 40 and 80).
GRID = (4, 8)  # cells across, down
SIZE = GRID[0] * GRID[1] * 3
SCALE = 20.0  # mean absolute YCrCb difference (0..255 per channel) counted as "entirely different"
ALPHA = 0.5  # weight of a track's appearance so far when a new clear view is averaged in (0.9 scored lower)
SAMPLES = 3  # pixels read per cell, across and down
OVERLAP = 0.3  # a detection overlapping another by more IoU is no clear view of one object (0.1, 0.5 lower)


_INNER = np.array([0.2, 0.1, -0.2, -0.1])  # of a box's width and height, moved in from each side
_FX = (np.arange(GRID[0] * SAMPLES) + 0.5) / (GRID[0] * SAMPLES)  # where samples are read across a crop, 0..1
_FY = (np.arange(GRID[1] * SAMPLES) + 0.5) / (GRID[1] * SAMPLES)
# BGR -> YCrCb (ITU-R BT.601, without offsets: only differences count) folded into the cell averaging: a
# descriptor is _DOWN @ samples @ _ACROSS, samples (down, across * 3) in BGR, two small matrix products per box.
_YCRCB = np.array([[0.114, 0.587, 0.299], [-0.081, -0.419, 0.5], [0.5, -0.331, -0.169]], np.float32)  # rows: Y Cr Cb
_DOWN = np.kron(np.eye(GRID[1]), np.full((1, SAMPLES), 1.0 / SAMPLES)).astype(np.float32)
_ACROSS = np.kron(np.kron(np.eye(GRID[0]), np.full((SAMPLES, 1), 1.0 / SAMPLES)), _YCRCB.T).astype(np.float32)


def describe(image: np.ndarray, boxes: np.ndarray,
             wanted: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """(N, SIZE) float32 descriptors of ``boxes`` (N, 4 corner boxes in the image's pixels) and (N,) bool:
    which were described (a box too small or outside the image cannot be; with ``wanted``, (N,) bool, only
    those are tried).

    Each cell is the mean of ``SAMPLES`` x ``SAMPLES`` pixels spread over it, read for every box at once (one
    gather, then the averaging and the colour conversion as two small matrix products): no per-box resize. A grey
    image (2-D) reads as BGR with three equal channels; a fourth channel (alpha) is ignored.
    """
    n = len(boxes)
    out = np.zeros((n, SIZE), np.float32)
    valid = np.zeros(n, bool)
    if not n:
        return out, valid
    boxes = np.asarray(boxes, dtype=np.float64)
    finite = np.isfinite(boxes).all(axis=1)
    boxes = np.where(finite[:, None], boxes, 0.0)
    h, w = image.shape[:2]
    wh = boxes[:, 2:] - boxes[:, :2]
    inner = np.clip(boxes + np.hstack([wh, wh]) * _INNER, 0.0, (w, h, w, h))  # the middle 60 % x 80 %
    x0, y0, x1, y1 = inner.T
    ok = finite & (x1 - x0 >= GRID[0]) & (y1 - y0 >= GRID[1])
    if wanted is not None:
        ok &= wanted
    rows = np.flatnonzero(ok)
    if not len(rows):
        return out, valid
    xs = np.minimum((x0[rows, None] + _FX[None, :] * (x1 - x0)[rows, None]).astype(np.intp), w - 1)  # (K, across)
    ys = np.minimum((y0[rows, None] + _FY[None, :] * (y1 - y0)[rows, None]).astype(np.intp), h - 1)  # (K, down)
    pixels = _gather(image if image.ndim == 3 else image[:, :, None], ys, xs)  # (K, down, across, channels)
    pixels = np.repeat(pixels, 3, axis=-1) if pixels.shape[-1] == 1 else pixels[..., :3]
    pixels = pixels.reshape(len(rows), len(_FY), -1).astype(np.float32)
    out[rows] = (_DOWN @ pixels @ _ACROSS).reshape(len(rows), SIZE)  # cell means, in YCrCb
    valid[rows] = True
    return out, valid


def _gather(image: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """(K, len(ys[0]), len(xs[0]), C) pixels of an (H, W, C) image at rows ``ys`` (K, down) x columns ``xs`` (K,
    across). A contiguous image is read as one flat array of C-byte pixels with ``np.take`` (2.4 times faster
    than fancy indexing on its three axes)."""
    h, w, c = image.shape
    if image.flags.c_contiguous and image.dtype == np.uint8:
        flat = image.reshape(-1).view(np.dtype((np.void, c)))
        taken = np.take(flat, ys[:, :, None] * w + xs[:, None, :])
        return taken.view(np.uint8).reshape(*taken.shape, c)
    return image[ys[:, :, None], xs[:, None, :]]


def distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) appearance distance 0..1 between descriptors ``a`` (N, SIZE) and ``b`` (M, SIZE)."""
    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)), np.float32)
    d = cdist(a, b, "cityblock") / (a.shape[1] * SCALE)
    return np.minimum(d, 1.0).astype(np.float32)
