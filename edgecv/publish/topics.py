"""Every MQTT topic is built here, and nowhere else."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Topics:
    prefix: str
    node: str

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.node}"

    @property
    def status(self) -> str:
        return f"{self.base}/status"

    @property
    def stats(self) -> str:
        return f"{self.base}/stats"

    def events(self, camera: str) -> str:
        return f"{self.base}/{camera}/events"

    def tracks(self, camera: str) -> str:
        return f"{self.base}/{camera}/tracks"

    def snapshot(self, camera: str) -> str:
        return f"{self.base}/{camera}/snapshot"

    # ---- retained state (edgecv.publish.state)
    def camera_state(self, camera: str) -> str:
        return f"{self.base}/{camera}/state"

    def zone(self, camera: str, zone: str, label: str) -> str:
        """Occupancy now of ``label`` (or ``all``) in ``zone``."""
        return f"{self.base}/{camera}/zones/{zone}/{label}"

    def line(self, camera: str, line: str, direction: str, label: str) -> str:
        """Running count of ``line.cross`` events of ``label`` in ``direction`` (in, out)."""
        return f"{self.base}/{camera}/lines/{line}/{direction}/{label}"

    def detect_state(self, camera: str) -> str:
        return f"{self.base}/{camera}/detect/state"

    def fps(self, camera: str) -> str:
        """Processed frames per second, retained (Home Assistant's fps sensor)."""
        return f"{self.base}/{camera}/fps"

    # ---- commands (edgecv.publish.commands)
    def detect_set(self, camera: str) -> str:
        return f"{self.base}/{camera}/detect/set"

    def snapshot_set(self, camera: str) -> str:
        return f"{self.base}/{camera}/snapshot/set"

    def line_reset(self, camera: str, line: str) -> str:
        return f"{self.base}/{camera}/lines/{line}/reset"

    @property
    def reload_set(self) -> str:
        return f"{self.base}/reload/set"

    @property
    def command_result(self) -> str:
        return f"{self.base}/command/result"

    @property
    def command_filters(self) -> list[str]:
        """What the daemon subscribes to when commands are enabled: every topic under ``base`` whose last level is
        ``set`` or ``reset``, 1 to 4 levels below ``base`` (the command namespace; each message there is answered
        on :attr:`command_result`)."""
        return [f"{self.base}{'/+' * depth}/{verb}" for depth in range(4) for verb in ("set", "reset")]

    def command_path(self, topic: str) -> Optional[list[str]]:
        """The levels of ``topic`` below ``base`` when it is in the command namespace (see
        :attr:`command_filters`), else None."""
        head = self.base + "/"
        if not topic.startswith(head):
            return None
        levels = topic[len(head):].split("/")
        if not 1 <= len(levels) <= 4 or levels[-1] not in ("set", "reset"):
            return None
        return levels


def ha_config(prefix: str, component: str, node_id: str, object_id: str) -> str:
    """A Home Assistant MQTT discovery config topic: ``<prefix>/<component>/<node_id>/<object_id>/config``."""
    return f"{prefix}/{component}/{node_id}/{object_id}/config"
