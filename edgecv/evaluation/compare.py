"""`edgecv bench trackers --suite DIR`: edgecv against the open-source peer trackers on the same detections.

For every sequence, edgecv's pipeline runs as `edgecv eval` runs it and the detections its tracker was
given are saved; the peers (roboflow ``trackers``: ByteTrack, OC-SORT, BoT-SORT, C-BIoU, McByte, each
with its defaults and the clip's frame rate) then track those same detections in their own Python
environment (``peer_trackers.py``, run as a script), and every result is scored by the same code.
"""
from __future__ import annotations

import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .. import EdgecvError
from ..types import Detections, Frame
from .metrics import COLUMNS, score
from .mot import load_gt, load_results
from .runner import RunSpec, SequenceResult, _grid, _sequence_spec, evaluate
from .variants import sequence_dirs

PEER_SCRIPT = Path(__file__).resolve().parent / "peer_trackers.py"
DEFAULT_PEERS = "bytetrack,ocsort,botsort,cbiou,mcbyte"


def default_peers_python() -> Path:
    """$EDGECV_PEERS_PYTHON, else .venv-peers/bin/python of the repository (made by scripts/peers.sh)."""
    env = os.environ.get("EDGECV_PEERS_PYTHON")
    return Path(env) if env else Path(__file__).resolve().parents[2] / ".venv-peers" / "bin" / "python"


class _DetectionLog:
    """The detections the tracker is given, as MOT det rows ``frame,-1,x,y,w,h,score,class``."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, frame: Frame, dets: Detections) -> None:
        for (x1, y1, x2, y2), s, c in zip(dets.xyxy.tolist(), dets.score.tolist(), dets.class_id.tolist()):
            self.lines.append(f"{frame.index},-1,{x1:.3f},{y1:.3f},{x2 - x1:.3f},{y2 - y1:.3f},{s:.5f},{c}\n")


@dataclass
class Comparison:
    sequence: str
    results: list[SequenceResult]  # edgecv first, then the peers

    def best_peer(self, key: str) -> Optional[float]:
        peers = [r.metrics[key] for r in self.results[1:]]
        return max(peers) if peers else None

    def edgecv_at_or_above(self, key: str) -> bool:
        best = self.best_peer(key)
        return best is None or self.results[0].metrics[key] >= best - 1e-9


def compare_suite(suite: str, spec: RunSpec, python: Path, peers: str = DEFAULT_PEERS,
                  on_sequence: Optional[Callable[[Comparison], None]] = None) -> list[Comparison]:
    if not python.exists():
        raise EdgecvError(f"--peers-python: {python} not found; run scripts/peers.sh to install the peer trackers "
                          "(roboflow trackers) into .venv-peers, or set EDGECV_PEERS_PYTHON")
    out = []
    for folder in sequence_dirs(Path(suite)):
        video = sorted(p for p in folder.glob("video.*") if p.is_file())[0]
        log = _DetectionLog()
        ours = evaluate(str(video), str(folder / "gt.txt"), _sequence_spec(spec, folder), name=folder.name,
                        on_detections=log)
        results = [ours]
        gt = load_gt(folder / "gt.txt")
        with tempfile.TemporaryDirectory(prefix="edgecv-peers-") as tmp:
            dets = Path(tmp) / "dets.txt"
            dets.write_text("".join(log.lines), encoding="utf-8")
            cmd = [str(python), str(PEER_SCRIPT), "--dets", str(dets), "--video", str(video), "--fps",
                   f"{ours.fps:g}", "--out", tmp, "--trackers", peers]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                last = (done.stderr.strip().splitlines() or ["no output"])[-1]
                raise EdgecvError(f"peer trackers failed on {folder.name}: {last}")
            for name in peers.split(","):
                res = load_results(Path(tmp) / f"{name}.txt")
                metrics = score(gt, res, last_frame=ours.frames)
                results.append(SequenceResult(folder.name, ours.frames, ours.fps, 0.0, metrics, tracker=name,
                                              tracks=res))
        comparison = Comparison(folder.name, results)
        out.append(comparison)
        if on_sequence is not None:
            on_sequence(comparison)
    return out


def comparison_table(comparisons: list[Comparison]) -> str:
    """Per sequence: edgecv and each peer (MOTA, IDF1, ...), then where edgecv is at or above the best peer."""
    head = ["sequence", "tracker"] + [c.label for c in COLUMNS]
    rows = []
    for comp in comparisons:
        for r in comp.results:
            rows.append([comp.sequence if r is comp.results[0] else "", r.tracker]
                        + [f"{r.metrics[c.key]:.0f}" if c.integer else f"{r.metrics[c.key]:.3f}" for c in COLUMNS])
    return _grid(head, rows)


def summary_table(comparisons: list[Comparison]) -> str:
    """edgecv against the best peer per sequence (the best peer may differ between MOTA and IDF1)."""
    head = ["sequence", "edgecv MOTA", "best peer", "edgecv IDF1", "best peer", "at or above on both"]
    rows = []
    for comp in comparisons:
        ours = comp.results[0].metrics
        both = comp.edgecv_at_or_above("mota") and comp.edgecv_at_or_above("idf1")
        rows.append([comp.sequence, f"{ours['mota']:.3f}", f"{comp.best_peer('mota'):.3f}", f"{ours['idf1']:.3f}",
                     f"{comp.best_peer('idf1'):.3f}", "yes" if both else "NO"])
    n = len(comparisons)
    mota = sum(c.edgecv_at_or_above("mota") for c in comparisons)
    idf1 = sum(c.edgecv_at_or_above("idf1") for c in comparisons)
    means = [np.mean([c.results[0].metrics[k] for c in comparisons]) for k in ("mota", "idf1")]
    peer_means = [np.mean([c.best_peer(k) for c in comparisons]) for k in ("mota", "idf1")]
    rows.append([f"mean / count ({n})", f"{means[0]:.3f}", f"{peer_means[0]:.3f}", f"{means[1]:.3f}",
                 f"{peer_means[1]:.3f}", f"MOTA {mota}/{n}, IDF1 {idf1}/{n}"])
    return _grid(head, rows)
