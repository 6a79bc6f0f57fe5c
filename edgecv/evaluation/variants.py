"""Variants of a sequence with ground truth, for tuning beyond the few clips there are (`edgecv variants`).

- ``pan``, ``fastpan``, ``shake``: a moving camera. A window smaller than the frame sweeps across it (a smooth pan, back and
  forth, with a slower tilt) and shakes (random jitter each frame), optionally rolling by a small angle; the output is what
  the window sees, and the ground truth is moved by the same transform. A gt box cut by the window edge
  is clipped; one with less than half its area inside becomes not scored (flag 0).
- ``drop<K>``: a low-fps camera: every K-th frame, at fps / K.
- ``half``: half the resolution.
- several joined by ``+`` (``pan+drop2``): applied left to right.

Videos are written as MJPEG (quality 95) in ``video.avi``, beside ``gt.txt`` and ``seqinfo.ini``; every variant
is seeded, so the same call makes the same files.
"""
from __future__ import annotations

import configparser
import re
import shutil
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Optional, Sequence

import cv2
import numpy as np
import yaml

from .. import EdgecvError

DEFAULT_VARIANTS = ("pan", "fastpan", "shake", "drop2", "drop3", "half", "pan+drop2", "shake+half")
MIN_VISIBLE = 0.5  # fraction of a gt box inside the window for it to be scored


@dataclass
class Clip:
    """A sequence in memory: frames, gt rows (frame, id, x, y, w, h, flag, class, vis) and frame rate."""

    name: str
    frames: list[np.ndarray]
    gt: np.ndarray
    fps: float
    notes: list[str] = field(default_factory=list)

    @property
    def size(self) -> tuple[int, int]:
        return (self.frames[0].shape[1], self.frames[0].shape[0]) if self.frames else (0, 0)


@dataclass(frozen=True)
class PanSettings:
    window: float = 0.75  # window size as a fraction of the frame (each side)
    speed: float = 0.01  # peak pan speed, as a fraction of the frame width per frame
    shake_px: float = 4.0  # standard deviation of the per-frame jitter, in output pixels
    roll_deg: float = 0.0  # standard deviation of a per-frame roll, in degrees
    seed: int = 0


def read_clip(folder: Path) -> Clip:
    """A sequence folder: ``video.*``, ``gt.txt``, optional ``seqinfo.ini`` (its frameRate wins)."""
    videos = sorted(p for p in folder.glob("video.*") if p.is_file())
    if not videos:
        raise EdgecvError(f"{folder}: no video.* file")
    gt_path = folder / "gt.txt"
    if not gt_path.is_file():
        raise EdgecvError(f"{folder}: no gt.txt")
    cap = cv2.VideoCapture(str(videos[0]))
    fps = cap.get(cv2.CAP_PROP_FPS) or 0.0
    cap.release()
    frames = read_frames(videos[0])
    if not frames:
        raise EdgecvError(f"{videos[0]}: no decodable frame")
    rate = seqinfo_rate(folder)
    gt = np.loadtxt(gt_path, delimiter=",", ndmin=2)
    if gt.shape[1] < 9:
        gt = np.concatenate([gt, np.tile([1.0, -1.0, -1.0], (len(gt), 1))[:, gt.shape[1] - 6:]], axis=1)
    return Clip(folder.name, frames, gt[:, :9].astype(np.float64), rate or fps or 10.0)


def read_frames(video: Path, limit: Optional[int] = None) -> list[np.ndarray]:
    """The frames of a video file, at most ``limit`` (none when it cannot be read)."""
    cap = cv2.VideoCapture(str(video))
    frames: list[np.ndarray] = []
    while limit is None or len(frames) < limit:
        ok, img = cap.read()
        if not ok:
            break
        frames.append(img)
    cap.release()
    return frames


def seqinfo_rate(folder: Path) -> Optional[float]:
    """The frame rate a ``seqinfo.ini`` gives, if any."""
    ini = folder / "seqinfo.ini"
    if not ini.is_file():
        return None
    parser = configparser.ConfigParser()
    try:
        parser.read(ini, encoding="utf-8")
        return float(parser["Sequence"]["frameRate"])
    except (KeyError, ValueError, configparser.Error):
        return None


def _seed(name: str, seed: int) -> int:
    return zlib.crc32(name.encode()) ^ seed


def pan_path(n: int, size: tuple[int, int], settings: PanSettings, name: str = "") -> np.ndarray:
    """(n, 3) per-frame window placement: top-left x, y (float, source pixels) and roll in degrees."""
    w, h = size
    ww, wh = settings.window * w, settings.window * h
    span_x, span_y = w - ww, h - wh
    rng = np.random.default_rng(_seed(name, settings.seed))
    # the sweep: a cosine from one side to the other and back, at most `speed` * width px per frame
    step = 2.0 * settings.speed * w / span_x if span_x > 0 else 0.0
    phase = step * np.arange(n, dtype=np.float64)
    x = span_x * (0.5 - 0.5 * np.cos(phase))
    y = span_y * (0.5 - 0.25 * np.cos(0.5 * phase + 1.0))  # a slower tilt as well
    x += rng.normal(0.0, settings.shake_px, n)
    y += rng.normal(0.0, settings.shake_px, n)
    roll = rng.normal(0.0, settings.roll_deg, n) if settings.roll_deg > 0 else np.zeros(n)
    return np.stack([np.clip(x, 0, span_x), np.clip(y, 0, span_y), roll], axis=1)


def window_matrix(x: float, y: float, roll_deg: float, out_size: tuple[int, int]) -> np.ndarray:
    """2x3 affine from source pixels to the window's output pixels (roll about the window centre)."""
    ow, oh = out_size
    c = (ow / 2.0, oh / 2.0)
    rot = cv2.getRotationMatrix2D(c, roll_deg, 1.0)
    shift = np.array([[1.0, 0.0, -x], [0.0, 1.0, -y], [0.0, 0.0, 1.0]])
    return rot @ shift


def transform_boxes(rows: np.ndarray, matrix: np.ndarray, out_size: tuple[int, int]) -> np.ndarray:
    """gt rows with boxes moved by ``matrix`` (bounding box of the moved corners), clipped to the output.

    Rows whose box is entirely outside are dropped; rows with less than ``MIN_VISIBLE`` of the moved box
    inside get flag 0 (not scored).
    """
    if not len(rows):
        return rows
    x1, y1 = rows[:, 2], rows[:, 3]
    x2, y2 = x1 + rows[:, 4], y1 + rows[:, 5]
    corners = np.stack([np.stack([x1, y1], 1), np.stack([x2, y1], 1), np.stack([x1, y2], 1),
                        np.stack([x2, y2], 1)], axis=1)  # (N, 4, 2)
    moved = corners @ matrix[:, :2].T + matrix[:, 2]
    lo, hi = moved.min(axis=1), moved.max(axis=1)
    area = np.prod(hi - lo, axis=1)
    w, h = out_size
    clo = np.clip(lo, 0, [w, h])
    chi = np.clip(hi, 0, [w, h])
    inside = np.prod(np.clip(chi - clo, 0, None), axis=1)
    out = rows.copy()
    out[:, 2:4] = clo
    out[:, 4:6] = chi - clo
    visible = np.where(area > 0, inside / np.maximum(area, 1e-9), 0.0)
    out[visible < MIN_VISIBLE, 6] = 0
    return out[inside > 0]


def pan(clip: Clip, settings: PanSettings = PanSettings()) -> Clip:
    w, h = clip.size
    out_size = (int(round(settings.window * w)), int(round(settings.window * h)))
    path = pan_path(len(clip.frames), clip.size, settings, clip.name)
    frames, rows = [], []
    for i, (image, (x, y, roll)) in enumerate(zip(clip.frames, path), 1):
        m = window_matrix(x, y, roll, out_size)
        frames.append(cv2.warpAffine(image, m[:2], out_size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT))
        rows.append(transform_boxes(clip.gt[clip.gt[:, 0] == i], m, out_size))
    step = np.abs(np.diff(path[:, :2], axis=0)).max(axis=0) if len(path) > 1 else np.zeros(2)
    note = (f"pan: window {out_size[0]}x{out_size[1]}, shake {settings.shake_px:g} px, roll {settings.roll_deg:g} deg, "
            f"largest step {step[0]:.1f} px (x) {step[1]:.1f} px (y)")
    return Clip(clip.name, frames, np.concatenate(rows) if rows else clip.gt[:0], clip.fps, clip.notes + [note])


def drop(clip: Clip, k: int) -> Clip:
    keep = list(range(0, len(clip.frames), k))
    renumber = {i + 1: n for n, i in enumerate(keep, 1)}
    rows = clip.gt[np.isin(clip.gt[:, 0], list(renumber))].copy()
    rows[:, 0] = [renumber[int(f)] for f in rows[:, 0]]
    return Clip(clip.name, [clip.frames[i] for i in keep], rows, clip.fps / k, clip.notes + [f"drop{k}: every {k}th frame"])


def half(clip: Clip) -> Clip:
    frames = [cv2.resize(f, (f.shape[1] // 2, f.shape[0] // 2), interpolation=cv2.INTER_AREA) for f in clip.frames]
    rows = clip.gt.copy()
    rows[:, 2:6] *= 0.5
    return Clip(clip.name, frames, rows, clip.fps, clip.notes + ["half: half resolution"])


# camera motions: a steady pan with some shake (pan-tilt head, vehicle), a fast pan, a hovering drone's shake
MOTIONS = {
    "pan": {},
    "fastpan": {"speed": 0.03, "shake_px": 2.0},
    "shake": {"speed": 0.0, "shake_px": 8.0, "roll_deg": 0.5},
}


def apply(clip: Clip, spec: str, settings: PanSettings = PanSettings()) -> Clip:
    """One variant, e.g. ``pan``, ``drop3``, ``half`` or ``pan+drop2`` (see ``MOTIONS`` for the motions)."""
    out = clip
    for part in spec.split("+"):
        m = re.fullmatch(r"drop([2-9])", part)
        if part in MOTIONS:
            out = pan(out, replace(settings, **MOTIONS[part]))
        elif part == "half":
            out = half(out)
        elif m:
            out = drop(out, int(m.group(1)))
        else:
            raise EdgecvError(f"--variants: unknown variant {part!r}; expected {', '.join(MOTIONS)}, half or "
                              "drop2..drop9, joined by '+'")
    return out


def write_clip(clip: Clip, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    w, h = clip.size
    writer = cv2.VideoWriter(str(folder / "video.avi"), cv2.VideoWriter_fourcc(*"MJPG"), clip.fps, (w, h))
    if not writer.isOpened():
        raise EdgecvError(f"{folder}: cannot write video.avi")
    writer.set(cv2.VIDEOWRITER_PROP_QUALITY, 95)
    for f in clip.frames:
        writer.write(f)
    writer.release()
    lines = [f"{int(r[0])},{int(r[1])},{r[2]:.2f},{r[3]:.2f},{r[4]:.2f},{r[5]:.2f},{int(r[6])},{int(r[7])},{r[8]:g}\n"
             for r in clip.gt[np.lexsort((clip.gt[:, 1], clip.gt[:, 0]))]]
    (folder / "gt.txt").write_text("".join(lines), encoding="utf-8")
    (folder / "seqinfo.ini").write_text(
        f"[Sequence]\nname={folder.name}\nframeRate={clip.fps:g}\nseqLength={len(clip.frames)}\n"
        f"imWidth={w}\nimHeight={h}\n; {'; '.join(clip.notes)}\n", encoding="utf-8")
    return folder


def sequence_dirs(suite: Path) -> list[Path]:
    """Sequence folders of a suite: subfolders with a video.* and a gt.txt, sorted by name."""
    if not suite.is_dir():
        raise EdgecvError(f"--suite: not a folder: {suite}")
    found = [d for d in sorted(suite.iterdir()) if d.is_dir() and (d / "gt.txt").is_file() and any(d.glob("video.*"))]
    if not found:
        raise EdgecvError(f"--suite: no sequence folder (video.* and gt.txt) in {suite}")
    return found


def generic_rules(size: tuple[int, int]) -> dict:
    """Rules for measuring event accuracy on any clip: a vertical and a horizontal counting line through the
    frame and a zone on its right third (debounced as the config defaults are)."""
    w, h = size
    return {
        "lines": {"vertical": {"points": [[w / 2, 0], [w / 2, h - 1]]},
                  "horizontal": {"points": [[0, 0.6 * h], [w - 1, 0.6 * h]]}},
        "zones": {"right": {"polygon": [[2 * w / 3, 0], [w - 1, 0], [w - 1, h - 1], [2 * w / 3, h - 1]]}},
    }


def _write_rules(folder: Path, size: tuple[int, int]) -> None:
    (folder / "rules.yaml").write_text(yaml.safe_dump(generic_rules(size), default_flow_style=None), encoding="utf-8")


def make_variants(suite: Path, out: Path, specs: Sequence[str] = DEFAULT_VARIANTS,
                  settings: PanSettings = PanSettings(), copy_base: bool = True, rules: bool = False) -> Iterator[Path]:
    """Write each sequence of ``suite`` (when ``copy_base``) and its variants under ``out``; yields the folders.

    With ``rules``, each folder also gets a ``rules.yaml`` (``generic_rules``) for event accuracy."""
    for folder in sequence_dirs(suite):
        clip = read_clip(folder)
        if copy_base:
            base = out / folder.name
            base.mkdir(parents=True, exist_ok=True)
            for f in [*folder.glob("video.*"), folder / "gt.txt", folder / "seqinfo.ini"]:
                if f.is_file():
                    shutil.copyfile(f, base / f.name)
            if rules:
                _write_rules(base, clip.size)
            yield base
        for spec in specs:
            variant = apply(clip, spec, settings)
            target = write_clip(variant, out / f"{folder.name}~{spec}")
            if rules:
                _write_rules(target, variant.size)
            yield target
