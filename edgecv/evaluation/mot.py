"""MOT-challenge text files: ground truth and tracker results.

One row per object and frame: ``frame,id,x,y,w,h,flag,class,visibility`` (1-based frames, pixels,
top-left corner and size). In ground truth, ``flag`` 0 marks a box that is not scored, and the class
column follows MOT17 (1 pedestrian, 2 person on vehicle, 3 car, 4 bicycle, 5 motorbike, 6 non-motorised
vehicle, 7 static person, 8 distractor, 9-11 occluders, 12 reflection; -1 or missing: unspecified).
In results, column 7 is the score. Files with only the first six columns are accepted.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np

from .. import EdgecvError

# MOTChallenge: boxes of these classes are neither scored nor counted as false positives when a result
# box covers them (a person on a bike, a static person, a mannequin, a reflection).
DISTRACTOR_CLASSES = frozenset({2, 7, 8, 12})
OCCLUDER_CLASSES = frozenset({9, 10, 11})  # not objects at all: dropped
# gt class -> the COCO label a detector gives such objects (the default classes of `edgecv eval`)
GT_CLASS_LABELS = {1: "person", 3: "car", 4: "bicycle", 5: "motorcycle"}


@dataclass
class FrameBoxes:
    """The boxes of one frame: ids (N,), xyxy (N, 4) float64, and for gt the ignored boxes (M, 4)."""

    ids: np.ndarray
    xyxy: np.ndarray
    scores: Optional[np.ndarray] = None
    ignore: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))


@dataclass
class MotSequence:
    """Rows of one MOT file grouped by frame (frames with no rows are absent from ``frames``)."""

    frames: dict[int, FrameBoxes]
    classes: frozenset[int] = frozenset()  # classes of the scored rows (gt)

    @property
    def last_frame(self) -> int:
        return max(self.frames, default=0)

    @property
    def ids(self) -> set[int]:
        return {int(i) for f in self.frames.values() for i in f.ids}

    def labels(self) -> list[str]:
        """Detector labels of the scored classes (``person`` when the file names none)."""
        known = sorted({GT_CLASS_LABELS[c] for c in self.classes if c in GT_CLASS_LABELS})
        return known or ["person"]

    def tracks(self) -> dict[int, list[tuple[int, np.ndarray]]]:
        """id -> [(frame, xyxy), ...] in frame order."""
        out: dict[int, list[tuple[int, np.ndarray]]] = {}
        for f in sorted(self.frames):
            boxes = self.frames[f]
            for i, box in zip(boxes.ids.tolist(), boxes.xyxy):
                out.setdefault(int(i), []).append((f, box))
        return out


def _read_rows(path: Union[str, Path], what: str) -> np.ndarray:
    p = Path(path)
    if not p.is_file():
        raise EdgecvError(f"{what}: file not found: {p}")
    rows: list[list[float]] = []
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EdgecvError(f"{what}: cannot read {p}: {e}") from None
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        parts = line.replace(" ", ",").split(",") if "," not in line else line.split(",")
        try:
            values = [float(v) for v in parts if v.strip() != ""]
        except ValueError:
            raise EdgecvError(f"{what}: {p}:{n}: expected numbers (frame,id,x,y,w,h,...), got {line[:60]!r}") from None
        if len(values) < 6:
            raise EdgecvError(f"{what}: {p}:{n}: expected at least 6 columns (frame,id,x,y,w,h), got {len(values)}")
        if not np.isfinite(values[:6]).all() or values[0] < 1 or values[4] < 0 or values[5] < 0:
            raise EdgecvError(f"{what}: {p}:{n}: expected frame >= 1 and finite, non-negative sizes, got {line[:60]!r}")
        values += [1.0, -1.0, -1.0][len(values) - 6:] if len(values) < 9 else []
        rows.append(values[:9])
    return np.asarray(rows, dtype=np.float64).reshape(-1, 9)


def _xyxy(rows: np.ndarray) -> np.ndarray:
    return np.concatenate([rows[:, 2:4], rows[:, 2:4] + rows[:, 4:6]], axis=1)


def load_gt(path: Union[str, Path]) -> MotSequence:
    """Ground truth: scored rows per frame, with the not-scored boxes (flag 0, distractors) as ``ignore``."""
    rows = _read_rows(path, "--gt")
    cls = rows[:, 7].astype(np.int64)
    rows, cls = rows[~np.isin(cls, list(OCCLUDER_CLASSES))], cls[~np.isin(cls, list(OCCLUDER_CLASSES))]
    scored = (rows[:, 6] != 0) & ~np.isin(cls, list(DISTRACTOR_CLASSES))
    if not scored.any():  # MOTA and IDF1 are undefined (-inf, nan): say why instead of printing them
        raise EdgecvError(f"--gt: {path}: no box to score against (the file is empty, or every row has flag 0 "
                          "or a distractor or occluder class)")
    frames: dict[int, FrameBoxes] = {}
    for f in np.unique(rows[:, 0]).astype(int).tolist():
        in_frame = rows[:, 0] == f
        keep, skip = in_frame & scored, in_frame & ~scored
        frames[f] = FrameBoxes(rows[keep, 1].astype(np.int64), _xyxy(rows[keep]), ignore=_xyxy(rows[skip]))
    return MotSequence(frames, frozenset(int(c) for c in np.unique(cls[scored]) if c > 0))


def load_results(path: Union[str, Path], what: str = "results") -> MotSequence:
    """Tracker output (``edgecv track`` rows or any MOT-challenge result file)."""
    rows = _read_rows(path, what)
    frames: dict[int, FrameBoxes] = {}
    for f in np.unique(rows[:, 0]).astype(int).tolist():
        r = rows[rows[:, 0] == f]
        frames[f] = FrameBoxes(r[:, 1].astype(np.int64), _xyxy(r), scores=r[:, 6])
    return MotSequence(frames)
