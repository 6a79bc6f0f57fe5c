"""What MQTT consumers get besides events: retained state topics (:mod:`.state`), Home Assistant discovery
(:mod:`.homeassistant`) and commands (:mod:`.commands`), wired together for the daemon."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Optional, Sequence

from ..config import Config
from .commands import CommandHandler
from .homeassistant import Discovery
from .state import StateService


class MqttConsumers:
    """Made with the publisher, before it connects (subscriptions and hooks are in place for the first
    connection); ``attach`` the pipeline, ``start`` after the publisher, ``stop`` before closing it."""

    def __init__(self, cfg: Config, publisher: Any, names: Sequence[str], spool_path: Path,
                 reload: threading.Event) -> None:
        self.state = StateService(cfg, publisher, names, spool_path)
        self.discovery = Discovery(cfg, self.state, spool_path)
        self.commands: Optional[CommandHandler] = (CommandHandler(publisher, self.state, reload)
                                                   if cfg.mqtt.commands.enabled else None)

    @classmethod
    def make(cls, cfg: Config, publisher: Any, names: Sequence[str],
             reload: threading.Event) -> Optional[MqttConsumers]:
        """The consumers of ``publisher`` (None without one: MQTT off)."""
        return None if publisher is None else cls(cfg, publisher, names, Path(publisher.spool.path), reload)

    @staticmethod
    def wiring(consumers: Optional[MqttConsumers]) -> tuple[list[Any], dict[str, Any]]:
        """The pipeline's extra event sinks and keyword arguments (hooks) for ``consumers`` (None: none)."""
        if consumers is None:
            return [], {}
        state = consumers.state
        return [state], {"on_state": state.on_state, "on_frame": state.on_frame,
                         "detect_switch": consumers.commands is not None}

    @staticmethod
    def attach_to(consumers: Optional[MqttConsumers], pipeline: Any) -> None:
        if consumers is not None:
            consumers.state.attach(pipeline)

    def start(self) -> None:
        self.state.start()
        self.discovery.announce(self.state.cfg)

    def reconfigure(self, cfg: Config) -> None:
        """After a reload was applied (``cfg``: the running config now)."""
        self.state.reconfigure(cfg)
        self.discovery.announce(cfg)

    def stop(self) -> None:
        self.state.stop()
        self.discovery.save()
