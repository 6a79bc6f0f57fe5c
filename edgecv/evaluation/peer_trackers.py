#!/usr/bin/env python3
"""Run the open-source peer trackers (roboflow ``trackers``) on detections that edgecv saved.

Run as a script by ``edgecv bench trackers`` with the Python of another environment (``scripts/peers.sh``
makes ``.venv-peers`` with ``trackers==2.6.1``), so the peers never become dependencies of edgecv: this
file imports nothing from edgecv and is never imported by it.

Input: a detections file in MOT-challenge det format (``frame,-1,x,y,w,h,score,class``), the video (frames for
the trackers that compensate camera motion) and its frame rate. Output: one MOT result file per tracker in
``--out`` (``<tracker>.txt``) and ``timing.json`` (milliseconds per ``update`` call, median).
Every tracker runs with its package defaults except ``frame_rate``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import supervision as sv
import trackers

PEERS = {
    "bytetrack": lambda fps: trackers.ByteTrackTracker(frame_rate=fps),
    "ocsort": lambda fps: trackers.OCSORTTracker(frame_rate=fps),
    "botsort": lambda fps: trackers.BoTSORTTracker(frame_rate=fps),
    "cbiou": lambda fps: trackers.CBIoUTracker(frame_rate=fps),
    "mcbyte": lambda fps: trackers.McByteTracker(frame_rate=fps),
    "sort": lambda fps: trackers.SORTTracker(frame_rate=fps),
}
NEEDS_FRAMES = {"botsort", "mcbyte"}


def read_dets(path: Path) -> dict[int, np.ndarray]:
    rows = np.loadtxt(path, delimiter=",", ndmin=2) if path.stat().st_size else np.zeros((0, 8))
    return {int(f): rows[rows[:, 0] == f] for f in np.unique(rows[:, 0])}


def read_video(path: Path) -> list[np.ndarray]:
    frames = []
    cap = cv2.VideoCapture(str(path))
    while True:
        ok, img = cap.read()
        if not ok:
            break
        frames.append(img)
    cap.release()
    return frames


def _detections(rows: np.ndarray) -> sv.Detections:
    """det-format rows (``frame,-1,x,y,w,h,score,class``) as supervision detections."""
    xyxy = np.concatenate([rows[:, 2:4], rows[:, 2:4] + rows[:, 4:6]], axis=1).reshape(-1, 4)
    return sv.Detections(xyxy=xyxy.astype(np.float32), confidence=rows[:, 6].astype(np.float32),
                         class_id=rows[:, 7].astype(int))


def _mot_lines(index: int, out: sv.Detections) -> list[str]:
    """A tracker's output of frame ``index`` as MOT result lines (tracked boxes only)."""
    ids = out.tracker_id if out.tracker_id is not None else np.zeros(0, int)
    conf = out.confidence if out.confidence is not None else np.ones(len(out))
    return [f"{index},{tid},{x1:.2f},{y1:.2f},{x2 - x1:.2f},{y2 - y1:.2f},{score:.4f},-1,-1,-1\n"
            for (x1, y1, x2, y2), tid, score in zip(out.xyxy.tolist(), ids.tolist(), conf.tolist()) if tid >= 0]


def run_tracker(name: str, fps: float, frames: list[np.ndarray], dets: dict[int, np.ndarray]) -> tuple[str, float]:
    """One peer tracker over every frame: its MOT result text and its median time per ``update`` (ms)."""
    tracker = PEERS[name](fps)
    lines, times = [], []
    for index, image in enumerate(frames, 1):
        det = _detections(dets.get(index, np.zeros((0, 8))))
        t0 = time.perf_counter()
        out = tracker.update(det, frame=image) if name in NEEDS_FRAMES else tracker.update(det)
        times.append((time.perf_counter() - t0) * 1000)
        lines += _mot_lines(index, out)
    return "".join(lines), float(np.median(times))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dets", required=True, type=Path)
    p.add_argument("--video", required=True, type=Path)
    p.add_argument("--fps", required=True, type=float)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--trackers", default="bytetrack,ocsort,botsort,cbiou,mcbyte")
    args = p.parse_args()
    names = [n.strip() for n in args.trackers.split(",") if n.strip()]
    unknown = [n for n in names if n not in PEERS]
    if unknown:
        print(f"peer_trackers: unknown tracker {unknown[0]!r}; known: {', '.join(PEERS)}", file=sys.stderr)
        return 2
    dets = read_dets(args.dets)
    frames = read_video(args.video)
    if not frames:
        print(f"peer_trackers: no frame decoded from {args.video}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    timing = {}
    for name in names:
        text, timing[name] = run_tracker(name, args.fps, frames, dets)
        (args.out / f"{name}.txt").write_text(text, encoding="utf-8")
    (args.out / "timing.json").write_text(json.dumps(timing), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
