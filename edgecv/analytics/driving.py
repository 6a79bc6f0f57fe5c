"""Driving rules for a forward-facing (dash) camera: forward-collision warning and the drivable-area zone.

Time to contact (TTC) from box growth: for an object closing in at a constant speed, its image size
is s ~ 1/Z (Z: distance), so d(ln s)/dt = -dZ/dt / Z = 1/TTC. The rule fits a least-squares line
to (t, ln s) over the last ``window`` frames of a track (s: sqrt of the box area by default), which
smooths the detector's jitter; the slope k gives TTC = 1/k at the window's mean time, and the
estimate for the newest frame is TTC = 1/k - (t_newest - t_mean). Only an approaching object
(k > 0) whose size grew by at least ``min_growth`` across the window, with ``min_frames`` samples,
in the vehicle's path and with TTC <= ``ttc_s`` gives ``collision.warning`` (``ttc_s`` field), at
most once per ``cooldown_s`` per track.

Ego path: the drivable-area mask of a semantic segmentation model and/or an ``ego_corridor``
polygon. A segmenter does not mark the pixels an object covers as drivable, so an object is "on"
a mask when at least ``min_drivable`` of the strip just under its box (the middle half of the box's
width, a quarter of its height deep) is in the mask; for the corridor its anchor point (default
bottom-centre) must be inside the polygon. A box that reaches the bottom of the frame has no strip
under it and counts as off the mask: use an ``ego_corridor`` (``ego_path: either``) to cover it.

The drivable-area zone is a :class:`ZoneRule` whose geometry is that mask test: ``zone.enter`` /
``zone.exit`` with ``zone`` = the mask's name, debounced by ``min_frames`` like any zone.
"""
from __future__ import annotations

import math
from collections import deque
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

from ..types import Detections, Event
from .rules import EventType, FrameContext, Removed, Rule, ZoneRule

if TYPE_CHECKING:
    from ..config import CollisionConfig, DrivableZoneConfig

PROBE_WIDTH = 0.5  # the probe strip spans the middle half of the box's width
PROBE_DEPTH = 0.25  # and reaches this share of the box's height below its bottom edge (at least 2 pixels)

SCALES = ("sqrt_area", "height", "width")


def box_scale(xyxy: np.ndarray, scale: str = "sqrt_area") -> np.ndarray:
    """(N,) size of each box: sqrt(w * h), h or w."""
    w = np.clip(xyxy[:, 2] - xyxy[:, 0], 0.0, None)
    h = np.clip(xyxy[:, 3] - xyxy[:, 1], 0.0, None)
    if scale == "sqrt_area":
        return np.sqrt(w * h)
    if scale == "height":
        return h
    if scale == "width":
        return w
    raise ValueError(f"scale: expected one of {', '.join(SCALES)}, got {scale!r}")


def mask_share_below(mask: np.ndarray, xyxy: np.ndarray) -> np.ndarray:
    """(N,) share of ``mask`` pixels in the strip under each box (0 when the strip is outside the frame)."""
    h_img, w_img = mask.shape
    out = np.zeros(len(xyxy), np.float64)
    for i, (x1, y1, x2, y2) in enumerate(np.asarray(xyxy, np.float64)):
        margin = (1.0 - PROBE_WIDTH) / 2 * (x2 - x1)
        c0, c1 = max(0, int(math.floor(x1 + margin))), min(w_img, int(math.ceil(x2 - margin)))
        r0 = max(0, int(math.floor(y2)))
        r1 = min(h_img, int(math.ceil(y2 + max(2.0, PROBE_DEPTH * (y2 - y1)))))
        if c1 > c0 and r1 > r0:
            out[i] = float(mask[r0:r1, c0:c1].mean())
    return out


def fit_ttc(times: Sequence[float], log_sizes: Sequence[float]) -> Optional[tuple[float, float]]:
    """(TTC at the newest sample in seconds, relative size growth across the samples), or None.

    None when the object is not approaching (slope <= 0) or the samples cannot be fitted (fewer than
    two distinct times). TTC is clamped at 0.
    """
    t = np.asarray(times, np.float64)
    y = np.asarray(log_sizes, np.float64)
    if len(t) < 2:
        return None
    tm = t.mean()
    dt = t - tm
    var = float(dt @ dt)
    if var <= 0.0:
        return None
    k = float(dt @ (y - y.mean())) / var  # d ln(size) / dt, per second
    if not k > 0.0:
        return None
    ttc = max(0.0, 1.0 / k - (float(t[-1]) - tm))
    growth = math.expm1(k * float(t[-1] - t[0]))
    return ttc, growth


class CollisionRule(Rule):
    """collision.warning with ``ttc_s`` for approaching objects in the ego path (see the module docstring).

    ``ego_path``: "drivable" (mask), "corridor" (polygon), "either", "both", or "auto" (the corridor
    when given, else the mask). A mask missing from a frame counts as "not on it".
    """

    kind = "collision"

    def __init__(self, ttc_s: float = 2.0, *, window: int = 8, min_frames: int = 4, min_growth: float = 0.05,
                 scale: str = "sqrt_area", cooldown_s: float = 3.0, class_ids: Optional[set[int]] = None,
                 ego_path: str = "auto", ego_corridor: Optional[Sequence[Sequence[float]]] = None,
                 anchor: str = "bottom_center", min_drivable: float = 0.2, mask: str = "drivable") -> None:
        super().__init__("collision", class_ids=class_ids, min_frames=min_frames, cooldown_s=cooldown_s)
        if ego_path == "auto":
            ego_path = "corridor" if ego_corridor is not None else "drivable"
        if ego_path not in ("drivable", "corridor", "either", "both"):
            raise ValueError(f"ego_path: expected auto, drivable, corridor, either or both, got {ego_path!r}")
        if ego_path in ("corridor", "both") and ego_corridor is None:
            raise ValueError(f"ego_path {ego_path!r} needs an ego_corridor polygon")
        if min_frames > window:
            raise ValueError(f"min_frames ({min_frames}) must be <= window ({window})")
        box_scale(np.zeros((0, 4), np.float32), scale)  # validates the name
        self.ttc_s = float(ttc_s)
        self.window = int(window)
        self.min_growth = float(min_growth)
        self.scale = scale
        self.ego_path = ego_path
        self.corridor = None if ego_corridor is None else ZoneRule("ego_corridor", ego_corridor, anchor=anchor)
        self.min_drivable = float(min_drivable)
        self.mask = mask
        self._history: dict[int, deque[tuple[float, float]]] = {}

    @classmethod
    def from_config(cls, cfg: CollisionConfig, class_ids: Optional[set[int]] = None) -> CollisionRule:
        """A camera's ``driving.collision`` section; ``class_ids``: its ``classes`` as the detector's ids."""
        return cls(cfg.ttc_s, window=cfg.window, min_frames=cfg.min_frames, min_growth=cfg.min_growth,
                   scale=cfg.scale, cooldown_s=cfg.cooldown_s, class_ids=class_ids, ego_path=cfg.ego_path,
                   ego_corridor=cfg.ego_corridor, anchor=cfg.anchor, min_drivable=cfg.min_drivable)

    @property
    def tracked(self) -> int:
        return len(self._history)

    def in_ego_path(self, ctx: FrameContext, tracks: Detections) -> np.ndarray:
        """Boolean per track: is it in the vehicle's path this frame."""
        n = len(tracks)
        on_mask = np.zeros(n, bool)
        if self.ego_path != "corridor":
            m = ctx.semantic.get(self.mask) if ctx.semantic is not None else None
            if m is not None:
                on_mask = mask_share_below(m, tracks.xyxy) >= self.min_drivable
        in_corridor = self.corridor.inside(ctx, tracks) if self.corridor is not None and n else np.zeros(n, bool)
        return {"drivable": on_mask, "corridor": in_corridor, "either": on_mask | in_corridor,
                "both": on_mask & in_corridor}[self.ego_path]

    def update(self, ctx: FrameContext, tracks: Detections, removed: Sequence[Removed]) -> list[Event]:
        events: list[Event] = []
        if len(tracks) and tracks.track_id is not None:
            sizes = box_scale(tracks.xyxy, self.scale)
            in_path: Optional[np.ndarray] = None  # computed once, only when some track qualifies
            for i in range(len(tracks)):
                if not self.wants(tracks.class_id[i]):
                    continue
                tid = int(tracks.track_id[i])
                hist = self._history.setdefault(tid, deque(maxlen=self.window))
                if sizes[i] > 0:
                    hist.append((ctx.t, math.log(float(sizes[i]))))
                if len(hist) < self.min_frames:
                    continue
                times, logs = zip(*hist)
                fit = fit_ttc(times, logs)
                if fit is None or fit[0] > self.ttc_s or fit[1] < self.min_growth:
                    continue
                if in_path is None:
                    in_path = self.in_ego_path(ctx, tracks)
                if not in_path[i] or not self._cooled(tid, EventType.COLLISION_WARNING, ctx.t):
                    continue
                obj = ctx.obj(tid, int(tracks.class_id[i]), float(tracks.score[i]), tracks.xyxy[i])
                events.append(ctx.event(EventType.COLLISION_WARNING, obj, self.name, ttc_s=round(fit[0], 2)))
        for r in removed:
            self._history.pop(r.track_id, None)
            self._forget(r.track_id)
        return events


class MaskZoneRule(ZoneRule):
    """zone.enter / zone.exit for a semantic mask (e.g. the drivable area), zone = the mask's name.

    A track is in the zone when at least ``min_share`` of the strip under its box is in the mask
    (see :func:`mask_share_below`); debounce, cooldown and exit on lost as :class:`ZoneRule`.
    """

    kind = "mask_zone"

    def __init__(self, mask: str = "drivable", *, class_ids: Optional[set[int]] = None, min_frames: int = 3,
                 cooldown_s: float = 0.0, exit_on_lost: bool = True, min_share: float = 0.2) -> None:
        super().__init__(mask, [[0, 0], [1, 0], [0, 1]], class_ids=class_ids, min_frames=min_frames,
                         cooldown_s=cooldown_s, exit_on_lost=exit_on_lost)
        self.mask = mask
        self.min_share = float(min_share)

    @classmethod
    def from_config(cls, cfg: DrivableZoneConfig,  # type: ignore[override]
                    class_ids: Optional[set[int]] = None) -> MaskZoneRule:
        """A camera's ``driving.drivable_zone`` section (no name: the mask names the zone); ``class_ids``: its
        ``classes`` as the detector's ids."""
        return cls(cfg.mask, class_ids=class_ids, min_frames=cfg.min_frames, cooldown_s=cfg.cooldown_s,
                   exit_on_lost=cfg.exit_on_lost, min_share=cfg.min_drivable)

    def inside(self, ctx: FrameContext, tracks: Detections) -> np.ndarray:
        m = ctx.semantic.get(self.mask) if ctx.semantic is not None else None
        if m is None:
            return np.zeros(len(tracks), bool)
        return mask_share_below(m, tracks.xyxy) >= self.min_share
