"""`edgecv bench`: speed figures printed as a table (never asserted in tests).

- model: model-only throughput (inference on a pre-made input tensor), pre- and post-processing;
- track: `edgecv track` end to end on a video (decode, preprocess, infer, decode, NMS, tracking) and its
  ratio to the model-only throughput measured with the same thread settings;
- tracker: the tracker's time per frame on synthetic moving boxes.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

import cv2

from . import EdgecvError, assets


def _table(rows: list[tuple[str, str]], title: str) -> str:
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 3 + max(len(v) for _, v in rows))
    body = "\n".join(f"{k:<{width}} | {v}" for k, v in rows)
    return f"{title}\n{line}\n{body}\n{line}"


def _frame(video: Path, index: int = 200) -> Any:
    cap = cv2.VideoCapture(str(video))
    frame = None
    for _ in range(index):
        ok, img = cap.read()
        if not ok:
            break
        frame = img
    cap.release()
    return frame


def run_bench(args: argparse.Namespace) -> int:
    from .engine.bench import bench_model
    from .engine.registry import build_detector
    from .track import track_video
    from .tracking.bytetrack import bench_tracker

    model = assets.resolve(args.model)
    video = assets.resolve(args.video)
    if args.what in ("model", "track", "all") and model is None:
        raise EdgecvError(f"--model: file not found: {args.model}")
    if args.what in ("model", "track", "all") and video is None:
        raise EdgecvError(f"--video: file not found: {args.video}")
    rows: list[tuple[str, str]] = [("cpu cores", str(os.cpu_count())),
                                   ("threads", str(args.threads) if args.threads else "runtime default")]
    model_fps = None
    if args.what in ("model", "track", "all"):
        detector = build_detector(model, threads=args.threads)
        r = bench_model(detector, n=max(20, min(args.frames, 200)), image=_frame(video))
        model_fps = 1000.0 / r["infer_ms"]
        rows += [
            ("model", f"{Path(r['model']).name} ({r['family']}, {r['backend']}, {r['device']}, "
                      f"input {r['input_size'][0]}x{r['input_size'][1]})"),
            ("inference (model only)", f"{r['infer_ms']:.2f} ms median, p90 {r['infer_ms_p90']:.2f} ms "
                                       f"= {model_fps:.1f} fps"),
            ("preprocess", f"{r['preprocess_ms']:.2f} ms ({r['frame_size'][0]}x{r['frame_size'][1]} frame)"),
            ("postprocess", f"{r['postprocess_ms']:.2f} ms ({r['detections']} detections)"),
        ]
    if args.what in ("track", "all"):
        with tempfile.TemporaryDirectory() as tmp:
            res = track_video(str(video), str(model), str(Path(tmp) / "mot.txt"), threads=args.threads,
                              max_frames=args.frames)
        rows += [
            ("edgecv track", f"{res.frames} frames of {video.name} in {res.seconds:.2f} s = {res.fps:.1f} fps"),
            ("track / model-only", f"{res.fps / model_fps:.2f}" if model_fps else "n/a"),
        ]
    if args.what in ("tracker", "all"):
        for n in (10, 50):
            rows.append((f"tracker, {n} objects", f"{bench_tracker(n_objects=n, n_frames=300):.3f} ms per frame"))
    print(_table(rows, f"edgecv bench {args.what}"))
    return 0
