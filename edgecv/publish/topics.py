"""Every MQTT topic is built here, and nowhere else."""
from __future__ import annotations

from dataclasses import dataclass


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
