"""CLEAR-MOT and identity metrics of a tracker result against ground truth, computed by motmetrics.

Boxes match at IoU >= 0.5 (MOTChallenge). A result box that matches a not-scored gt box (flag 0 or a
distractor class) is removed from its frame before scoring, as MOTChallenge's evaluation does.

motmetrics 1.4.0 computes its IoU distances with ``np.asfarray``, which NumPy 2 removed; the distance
matrices are therefore made here (``iou_distance``, the same definition) and motmetrics does everything
else: the per-frame matching with identity carry-over, and every metric.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from .. import EdgecvError
from .mot import MotSequence

IOU_THRESHOLD = 0.5

# (motmetrics name, our key, label in tables)
METRICS = (
    ("mota", "mota", "MOTA"),
    ("idf1", "idf1", "IDF1"),
    ("num_switches", "id_switches", "IDsw"),
    ("precision", "precision", "Prec"),
    ("recall", "recall", "Rec"),
    ("num_false_positives", "fp", "FP"),
    ("num_misses", "fn", "FN"),
    ("mostly_tracked", "mostly_tracked", "MT"),
    ("mostly_lost", "mostly_lost", "ML"),
    ("num_fragmentations", "fragmentations", "Frag"),
    ("motp", "motp", "MOTP"),
    ("num_unique_objects", "gt_ids", "GT ids"),
    ("num_frames", "frames", "frames"),
)


def _motmetrics() -> Any:
    try:
        import motmetrics  # lazy: an optional dependency (the `eval` extra), needed by `edgecv eval` only
    except ImportError:
        raise EdgecvError("edgecv eval needs motmetrics: pip install 'edgecv[eval]'") from None
    return motmetrics


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) IoU of corner boxes."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0.0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def iou_distance(gt: np.ndarray, hyp: np.ndarray, threshold: float = IOU_THRESHOLD) -> np.ndarray:
    """motmetrics' ``iou_matrix(gt, hyp, max_iou=1 - threshold)`` on corner boxes: 1 - IoU, NaN beyond."""
    d = 1.0 - box_iou(gt, hyp)
    d[d > 1.0 - threshold] = np.nan
    return d


def _drop_ignored(hyp_xyxy: np.ndarray, ignore: np.ndarray) -> np.ndarray:
    """Mask of result boxes kept after removing those matched one-to-one to not-scored gt boxes."""
    keep = np.ones(len(hyp_xyxy), bool)
    if len(ignore) and len(hyp_xyxy):
        iou = box_iou(ignore, hyp_xyxy)
        rows, cols = linear_sum_assignment(-iou)
        keep[cols[iou[rows, cols] >= IOU_THRESHOLD]] = False
    return keep


def accumulate(gt: MotSequence, results: MotSequence, last_frame: int = 0) -> Any:
    """A motmetrics ``MOTAccumulator`` fed every frame from 1 to the last of gt, results and ``last_frame``."""
    mm = _motmetrics()
    acc = mm.MOTAccumulator(auto_id=False)
    empty_ids = np.zeros(0, np.int64)
    for f in range(1, max(gt.last_frame, results.last_frame, last_frame) + 1):
        g, h = gt.frames.get(f), results.frames.get(f)
        g_ids, g_box = (g.ids, g.xyxy) if g is not None else (empty_ids, np.zeros((0, 4)))
        h_ids, h_box = (h.ids, h.xyxy) if h is not None else (empty_ids, np.zeros((0, 4)))
        if g is not None and len(g.ignore):
            keep = _drop_ignored(h_box, g.ignore)
            h_ids, h_box = h_ids[keep], h_box[keep]
        acc.update(g_ids.tolist(), h_ids.tolist(), iou_distance(g_box, h_box), frameid=f)
    return acc


def identities(gt: MotSequence, results: MotSequence, last_frame: int = 0) -> dict[int, list[int]]:
    """gt id -> the result ids matched to it, in frame order, each change kept once (``[3, 7]``: switched once)."""
    events = accumulate(gt, results, last_frame).mot_events
    matched = events[events.Type.isin(["MATCH", "SWITCH", "TRANSFER", "ASCEND", "MIGRATE"])]
    out: dict[int, list[int]] = {}
    for oid, hid in zip(matched.OId.tolist(), matched.HId.tolist()):
        seq = out.setdefault(int(oid), [])
        if not seq or seq[-1] != int(hid):
            seq.append(int(hid))
    return out


def score(gt: MotSequence, results: MotSequence, last_frame: int = 0) -> dict[str, float]:
    """Our metric keys (see ``METRICS``) for one sequence."""
    mm = _motmetrics()
    acc = accumulate(gt, results, last_frame)
    summary = mm.metrics.create().compute(acc, metrics=[m for m, _, _ in METRICS], name="seq")
    return {key: float(summary[name].iloc[0]) for name, key, _ in METRICS}


@dataclass(frozen=True)
class Column:
    key: str
    label: str
    integer: bool


COLUMNS = tuple(Column(key, label, key not in ("mota", "idf1", "precision", "recall", "motp"))
                for _, key, label in METRICS if key not in ("motp", "frames"))


def mean_row(rows: list[dict[str, float]]) -> dict[str, float]:
    """Unweighted mean over sequences for rates, sums for counts."""
    out: dict[str, float] = {}
    for c in COLUMNS:
        values = [r[c.key] for r in rows if c.key in r]
        if values:
            out[c.key] = float(np.sum(values)) if c.integer else float(np.mean(values))
    return out
