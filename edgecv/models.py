"""The models run on every frame: building them from the config, checking the config against them, and the
per-frame steps (preprocess on the capture thread, inference, decoding on the camera worker).

`load_models(cfg)` builds every configured model (one detector, whose boxes are tracked, and any semantic
segmenters) and checks every class and mask name the config uses against them; problems are `ConfigError`s
naming their field (`model.path`, `models[1]`, `cameras.gate.zones.door.classes`).
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from . import EdgecvError
from .config import Config, ConfigError, DrivingConfig, ModelConfig, resolve_path
from .engine.adapters import Detector
from .engine.backend import Staged, batch_limit, parallel_limit
from .engine.registry import Adapter, build_detector
from .engine.segmentation import SemanticSegmenter
from .types import Detections, Frame, SemanticMasks

log = logging.getLogger("edgecv.models")


@dataclass(frozen=True)
class Prepared:
    """A frame made ready for every model on the capture thread (each model's backend staged it)."""

    frame: Frame
    staged: tuple[Staged, ...]  # per model (ModelSet order): its input tensor and placement, or the frame
    prep_ms: float = 0.0  # time spent preprocessing (all models)
    skip: Optional[str] = None  # why the detector skips this frame (nothing staged; sources.gate), None: inferred
    # frames the detector skips that came before / after this one while it waited in the source's slot: handed to
    # the camera worker in order around it (see merge_skipped)
    before: list["Prepared"] = field(default_factory=list)
    after: list["Prepared"] = field(default_factory=list)

    @property
    def infer(self) -> bool:
        """Whether the models run on this frame (else the camera worker's tracker predicts it)."""
        return self.skip is None


MAX_WAITING_SKIPS = 32
"""Most skipped frames kept around one waiting in a slot (beyond: the oldest is dropped and counted)."""


def merge_skipped(unread: Prepared, new: Prepared) -> tuple[Prepared, int]:
    """What a camera's one-slot buffer holds when ``new`` comes while ``unread`` waits (a gated camera), and how
    many frames that drops. A frame the detector skips costs nothing to pass on, and the rules must see every
    frame, so it is never replaced: it rides along with the frame that waits for inference (after it) or with the
    next one (before it). Only an inferred frame replaces an older inferred frame (the newest-frame rule that keeps
    latency from building up), and its skipped companions move to the new one."""
    if unread.infer and not new.infer:
        unread.after.append(new)
        kept = unread
    else:
        new.before.extend([*unread.before, *([] if unread.infer else [unread]), *unread.after])
        unread.before.clear()  # moved: each frame is passed on once, from the item the slot holds
        unread.after.clear()
        kept = new
    dropped = 1 if unread.infer and new.infer else 0
    for waiting in (kept.before, kept.after):
        while len(waiting) > MAX_WAITING_SKIPS:
            waiting.pop(0)
            dropped += 1
    return kept, dropped


class ModelSet:
    """The models run on every frame: one detector (first; its boxes are tracked) and any segmenters."""

    def __init__(self, detector: Detector, segmenters: Sequence[SemanticSegmenter] = (),
                 names: Optional[Sequence[str]] = None, batch: Sequence[int | str] = (),
                 parallel: Sequence[int | str] = ()) -> None:
        """``batch``, ``parallel``: each model's `batch` and `parallel` settings (ModelSet order; missing ones are
        ``auto``)."""
        self.detector = detector
        self.segmenters = list(segmenters)
        self.all: list[Adapter] = [detector, *self.segmenters]
        self.names = list(names) if names is not None else [Path(str(m.backend.path)).stem for m in self.all]
        if len(self.names) != len(self.all) or len(set(self.names)) != len(self.names):
            raise ValueError(f"ModelSet: expected {len(self.all)} distinct model names, got {self.names}")
        def per_model(settings: Sequence[int | str]) -> list[tuple[Adapter, int | str]]:
            return list(zip(self.all, [*settings, *["auto"] * (len(self.all) - len(settings))]))

        self.batch = [batch_limit(m.backend, b) for m, b in per_model(batch)]  # per model: frames per run
        self.max_batch = min(self.batch)  # the inference thread's chunk: frames of several cameras run together
        # inference threads: chunks of different cameras inferred at the same time (every model must allow it)
        self.parallel = min(parallel_limit(m.backend, p) for m, p in per_model(parallel))

    def prepare(self, frame: Frame) -> Prepared:
        """Every model's input for one frame (runs on the capture thread); a backend that makes its inputs on
        the GPU (TensorRT with the letterbox kernel) keeps the frame for the inference thread instead."""
        t0 = time.perf_counter()
        staged = tuple(m.backend.stage(frame.image, m.preprocess) for m in self.all)
        return Prepared(frame, staged, (time.perf_counter() - t0) * 1000)

    def infer(self, j: int, chunk: Sequence[Prepared]) -> tuple[list[np.ndarray], list[Any]]:
        """Model j's outputs for a chunk of frames, and each frame's placement (Letterbox, InputRegion)."""
        return self.all[j].backend.infer_staged([p.staged[j] for p in chunk])

    def decode(self, placements: Sequence[Any], outputs: Sequence[list[np.ndarray]],
               detector: Optional[Detector] = None) -> tuple[Detections, Optional[SemanticMasks]]:
        """The detector's Detections and the segmenters' merged masks for one frame's outputs and placements
        (ModelSet order); ``detector`` decodes the boxes instead of the set's own (a camera's copy with reloaded
        thresholds, see `retuned`)."""
        dets = (detector or self.detector).postprocess(outputs[0], [placements[0]])[0]
        if not self.segmenters:
            return dets, None
        parts = [seg.postprocess(outputs[j], [placements[j]])[0] for j, seg in enumerate(self.segmenters, 1)]
        return dets, SemanticMasks.merge(parts)


Built = tuple[str, ModelConfig, Adapter]  # (field path, section, adapter)


def load_models(cfg: Config) -> ModelSet:
    """Build every configured model and check the config against them.

    Exactly one detector (its boxes are tracked) and any number of segmenters; every class name the
    config uses must be one of the detector's (a segmenter's `classes` one of its mask names); the
    masks the driving rules need must come from a segmenter. Errors of a model in `models` start with
    its field path (`models[1]: ...`).
    """
    built = [_build(cfg, key, m) for key, m in cfg.model_sections]
    detectors = [b for b in built if b[2].kind == "detector"]
    segmenters = [b for b in built if b[2].kind != "detector"]
    if len(detectors) != 1:
        found = ", ".join(f"{k} ({a.family})" for k, _, a in detectors + segmenters)
        raise ConfigError([f"models: expected exactly one detector model (tracked), got {len(detectors)}: {found}"])
    det_key, det_cfg, detector = detectors[0]
    problems: list[str] = []
    check = _class_check(detector, problems)
    check(f"{det_key}.classes", det_cfg.classes)
    masks = _check_masks(segmenters, problems)
    _check_cameras(cfg, masks, check, problems)
    if problems:
        raise ConfigError(problems)
    if det_cfg.classes:
        detector.class_filter = np.asarray(detector.class_ids(det_cfg.classes), np.int32)
    order = [(det_key, det_cfg)] + [(k, m) for k, m, _ in segmenters]
    _warn_fixed_batch(built)
    return ModelSet(detector, [s for _, _, s in segmenters], names=[m.display_name for _, m in order],
                    batch=[m.batch for _, m in order], parallel=[m.parallel for _, m in order])


def retuned(detector: Detector, m: ModelConfig) -> Detector:
    """A copy of ``detector`` (sharing its model) decoding with the section's conf, iou and classes; an unknown
    class name is an error. A reload hands it to every camera worker, which decodes with it from its next frame."""
    d = copy.copy(detector)
    d.conf, d.iou = m.conf, m.iou
    d.class_filter = np.asarray(detector.class_ids(m.classes), np.int32) if m.classes else None
    return d


def load_detector(cfg: Config) -> Detector:
    """Build the configured models and return the detector (see :func:`load_models`)."""
    return load_models(cfg).detector


def _build(cfg: Config, key: str, m: ModelConfig) -> Built:
    model_path = resolve_path(cfg, m.path)
    if model_path is None:
        raise ConfigError([f"{key}.path: file not found: {m.path}"])
    labels = resolve_path(cfg, m.labels) if m.labels else None
    build = m.tensorrt.model_dump()  # used only when the backend is TensorRT (the environment overrides it)
    if build["calib_dir"] and cfg.base_dir and not Path(build["calib_dir"]).is_absolute():
        build["calib_dir"] = str(Path(cfg.base_dir) / build["calib_dir"])  # relative to the config file
    try:
        adapter = build_detector(model_path, family=m.family, backend=m.backend, conf=m.conf, iou=m.iou,
                                 classes=None, labels=labels, threads=m.threads, build=build)
    except EdgecvError as e:  # a model that cannot be used is a problem of the config that names it
        raise ConfigError([f"{key}.path: {e}"]) from None
    return key, m, adapter


def _warn_fixed_batch(built: Sequence[Built]) -> None:
    """A `batch` above what a model takes (a fixed batch) cannot apply: said once, at load."""
    for key, m, adapter in built:
        if m.batch != "auto" and m.batch > adapter.backend.max_batch:
            log.warning("%s.batch: %d: model %s takes at most %d frame(s) at once (a fixed batch; `edgecv model "
                        "dynamic-batch` makes it dynamic)", key, m.batch, Path(m.path).name, adapter.backend.max_batch)


def _check_masks(segmenters: Sequence[Built], problems: list[str]) -> dict[str, str]:
    """The masks the segmenters give (name -> the model section giving it); unknown or doubled masks are
    problems."""
    masks: dict[str, str] = {}
    for key, m, seg in segmenters:
        unknown = [c for c in m.classes or [] if c not in seg.names]
        for c in unknown:
            problems.append(f"{key}.classes: unknown mask {c!r} for model {Path(m.path).name} "
                            f"(masks: {', '.join(seg.names)})")
        if m.classes and not unknown:
            seg.keep = set(m.classes)
        for name in sorted(seg.keep, key=seg.names.index):
            if name in masks:
                problems.append(f"{key}: mask {name!r} is also given by {masks[name]}; keep one with `classes`")
            masks.setdefault(name, key)
    return masks


ClassCheck = Callable[[str, Optional[list[str]]], None]


def _class_check(detector: Detector, problems: list[str]) -> ClassCheck:
    """A function adding a problem for every name in `classes` that is not one of the detector's classes."""
    valid = set(detector.names)
    det_name = Path(str(detector.backend.path)).name

    def check(field: str, classes: Optional[list[str]]) -> None:
        for c in classes or []:
            if c not in valid:
                problems.append(f"{field}: unknown class {c!r} for model {det_name} "
                                f"(e.g. {', '.join(list(detector.names)[:6])}, ...)")
    return check


def _check_cameras(cfg: Config, masks: dict[str, str], check: ClassCheck, problems: list[str]) -> None:
    """Every class name the cameras use is one of the detector's; the driving rules' masks exist."""
    for cam_name, cam in cfg.cameras.items():
        at = f"cameras.{cam_name}"
        check(f"{at}.objects.classes", cam.objects.classes)
        for zname, z in cam.zones.items():
            check(f"{at}.zones.{zname}.classes", z.classes)
        for lname, ln in cam.lines.items():
            check(f"{at}.lines.{lname}.classes", ln.classes)
        if cam.driving is not None:
            _check_driving(at, cam.driving, masks, check, problems)


def _check_driving(at: str, drv: DrivingConfig, masks: dict[str, str], check: ClassCheck,
                   problems: list[str]) -> None:
    have = ", ".join(masks) or "none: add a semseg model to `models`"
    if drv.collision is not None and drv.collision.enabled:
        c = drv.collision
        check(f"{at}.driving.collision.classes", c.classes)
        if c.uses_drivable and "drivable" not in masks and not (c.ego_path == "either" and c.ego_corridor):
            problems.append(f"{at}.driving.collision: ego_path {c.ego_path!r} needs the 'drivable' "
                            f"mask of a segmentation model (masks: {have}) or an ego_corridor polygon")
    if drv.drivable_zone is not None and drv.drivable_zone.enabled:
        z = drv.drivable_zone
        check(f"{at}.driving.drivable_zone.classes", z.classes)
        if z.mask not in masks:
            problems.append(f"{at}.driving.drivable_zone.mask: no model gives mask {z.mask!r} (masks: {have})")
