"""What changed between two configs, as data: the reload (SIGHUP) applies the live part and reports the rest.

`diff(old, new, detector)` is pure: it compares the sections and says which changes the running daemon can take
without stopping a source or reloading a model (a camera's rules, the tracker, the detector's thresholds) and
which need a restart (in words, for the log). `applied(old, new, change)` is the running config once the live
part is applied: everything else keeps its running value until the restart.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .config import Config

RULE_KEYS = frozenset({"zones", "lines", "objects", "driving"})  # a camera's sections applied live
LIVE_MODEL_KEYS = frozenset({"conf", "iou", "classes"})  # a detector's settings applied live
RESTART_SECTIONS = ("node_id", "mqtt", "console", "log_level", "failure_limit", "http")


@dataclass(frozen=True)
class ConfigDiff:
    """The difference between a running config and a new one."""

    rules: tuple[str, ...] = ()  # cameras whose rule sections changed (applied live)
    tracker: bool = False  # the tracker section changed (applied live, each camera keeps its frame rate)
    detector: Optional[str] = None  # field path of the detector section whose conf/iou/classes changed (live)
    restart: tuple[str, ...] = ()  # what only a restart applies, in words

    @property
    def live(self) -> list[str]:
        """The changes applied live, in words."""
        return ([f"cameras.{n} rules" for n in self.rules] + (["tracker"] if self.tracker else [])
                + ([f"{self.detector} thresholds"] if self.detector else []))

    @property
    def models_changed(self) -> bool:
        """Whether a model section changed beyond what applies live (it keeps running as it is)."""
        return "models" in self.restart


def diff(old: Config, new: Config, detector: str) -> ConfigDiff:
    """The changes from ``old`` to ``new``; ``detector`` is the display name of the running detector model
    (its thresholds apply live; any other model's need a restart)."""
    rules: list[str] = []
    restart: list[str] = []
    for name, cam in new.cameras.items():
        prev = old.cameras.get(name)
        if prev is None:
            restart.append(f"new camera {name}")
            continue
        if prev.model_dump(exclude=set(RULE_KEYS)) != cam.model_dump(exclude=set(RULE_KEYS)):
            restart.append(f"cameras.{name} source settings")
        if prev.model_dump(include=set(RULE_KEYS)) != cam.model_dump(include=set(RULE_KEYS)):
            rules.append(name)
    restart += [f"removed camera {n}" for n in old.cameras if n not in new.cameras]
    det_key, model_restart = _model_changes(old, new, detector)
    restart += model_restart
    restart += [s for s in RESTART_SECTIONS if getattr(new, s) != getattr(old, s)]
    return ConfigDiff(tuple(rules), new.tracker != old.tracker, det_key, tuple(restart))


def _model_changes(old: Config, new: Config, detector: str) -> tuple[Optional[str], list[str]]:
    """(the detector's field path when its live settings changed, model changes needing a restart)."""
    old_models, new_models = old.model_sections, new.model_sections

    def fixed(sections: list) -> list:
        return [(k, m.model_dump(exclude=set(LIVE_MODEL_KEYS))) for k, m in sections]

    if fixed(old_models) != fixed(new_models):
        return None, ["models"]
    det_key: Optional[str] = None
    restart: list[str] = []
    for (key, a), (_, b) in zip(old_models, new_models):
        if a.model_dump(include=set(LIVE_MODEL_KEYS)) == b.model_dump(include=set(LIVE_MODEL_KEYS)):
            continue
        if a.display_name == detector:
            det_key = key
        else:
            restart.append(f"{key} thresholds")
    return det_key, restart


def applied(old: Config, new: Config, change: ConfigDiff) -> Config:
    """The running config once ``change`` (from ``diff(old, new, ...)``) is applied: the rules of the cameras
    that still run, the tracker and the models' live settings come from ``new``; everything else stays."""
    cameras = dict(old.cameras)
    for name, cam in new.cameras.items():
        if name in cameras:
            cameras[name] = cameras[name].model_copy(update={k: getattr(cam, k) for k in RULE_KEYS})
    update: dict = {"tracker": new.tracker, "cameras": cameras}
    if change.detector is not None:
        live = dict(new.model_sections)[change.detector]
        update["models"] = [live if key == change.detector else m for key, m in old.model_sections]
    return old.model_copy(update=update)
