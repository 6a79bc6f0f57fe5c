"""systemd integration: the sd_notify protocol spoken by `edgecv run`, and the unit `edgecv service install` writes.

sd_notify: when systemd starts the daemon with ``Type=notify`` it sets ``$NOTIFY_SOCKET`` (a unix datagram socket; a
leading ``@`` is the abstract namespace). The daemon sends ``READY=1`` once every camera has started (streaming, or
retrying after a failed first attempt) and the publisher is up, ``STATUS=`` one line that follows the state,
``WATCHDOG=1`` every ``$WATCHDOG_USEC``/2 only while :meth:`edgecv.pipeline.Pipeline.health` finds nothing stuck (no
pings: systemd kills and, with ``Restart=on-failure``, restarts the service), ``RELOADING=1`` then ``READY=1``
around a SIGHUP reload, and ``STOPPING=1`` on shutdown. Without ``$NOTIFY_SOCKET`` every call does nothing.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Optional

log = logging.getLogger("edgecv.service")

DEFAULT_WATCHDOG_S = 1.0  # ping interval when $NOTIFY_SOCKET is set without $WATCHDOG_USEC
STATUS_REFRESH_S = 5.0  # STATUS= at least this often (its fps figure), else on a change of state


class Notifier:
    """Sends sd_notify datagrams to ``$NOTIFY_SOCKET`` (nothing when unset)."""

    def __init__(self, environ: Optional[Mapping[str, str]] = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.enabled = bool(address)
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        watchdog_s = int(usec) / 1e6 if usec.isdigit() and int(usec) > 0 else 0.0
        if pid.isdigit() and int(pid) != os.getpid():  # the watchdog is another process's
            watchdog_s = 0.0
        # ping twice per watchdog period, as sd_watchdog_enabled(3) recommends
        self.watchdog_interval_s = watchdog_s / 2 if watchdog_s else DEFAULT_WATCHDOG_S
        self._sock: Optional[socket.socket] = None
        self._failed = False

    def send(self, *fields: str) -> bool:
        """One datagram of ``KEY=value`` lines; False when not sent (no socket, or it failed: said once)."""
        if not self.enabled:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(fields).encode(), self.address)
            return True
        except OSError as e:
            if not self._failed:
                self._failed = True
                log.warning("sd_notify to %s failed: %s", self.address.replace("\0", "@"), e)
            return False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def camera_started(source: Any) -> bool:
    """A camera has started: it streams, or its first attempt is over (retrying, stalled, failed, ended)."""
    state, reason = source.state, source.reason
    return state in ("streaming", "stalled", "failed") or (state in ("connecting", "stopped") and bool(reason))


def summary(pipeline: Any, publisher: Any, fps: Optional[float], problems: list[str]) -> str:
    """One line: "3 cameras: 2 streaming, 1 connecting; mqtt connected; 12.3 fps" (and what is stuck)."""
    states: dict[str, int] = {}
    for s in pipeline.sources.values():
        states[s.state] = states.get(s.state, 0) + 1
    n = len(pipeline.sources)
    parts = [f"{n} camera{'s' if n != 1 else ''}: " + ", ".join(f"{c} {st}" for st, c in sorted(states.items()))]
    if publisher is not None:
        parts.append(f"mqtt {publisher.state}")
    if fps is not None:
        parts.append(f"{fps:.1f} fps")
    if problems:
        parts.append("stuck: " + "; ".join(problems))
    return "; ".join(parts)


class ServiceNotify:
    """What `Daemon.run` tells systemd, from small calls in its loop (see the module's docstring)."""

    def __init__(self, notifier: Optional[Notifier] = None) -> None:
        self.notifier = notifier or Notifier()
        self.ready = False
        self.healthy = True
        self._next_ping = 0.0
        self._status_key = ""
        self._status_at = 0.0
        self._frames = 0
        self._fps: Optional[float] = None

    @property
    def enabled(self) -> bool:
        return self.notifier.enabled

    def status(self, text: str) -> None:
        self.notifier.send(f"STATUS={text}")

    def tick(self, pipeline: Any, publisher: Any = None) -> None:
        """Called every turn of the daemon's loop: READY once, STATUS on a change, WATCHDOG while healthy."""
        if not self.enabled:
            return
        now = time.monotonic()
        if not self.ready and all(camera_started(s) for s in pipeline.sources.values()):
            self.ready = True
            self.notifier.send("READY=1", "STATUS=" + self._status(pipeline, publisher, [], now))
        if now < self._next_ping:
            return
        self._next_ping = now + self.notifier.watchdog_interval_s
        problems = pipeline.health(now)
        self._watchdog(problems)
        self._maybe_status(pipeline, publisher, problems, now)

    def _watchdog(self, problems: list[str]) -> None:
        if not problems:
            if not self.healthy:
                log.warning("service: the pipeline makes progress again; systemd watchdog pings resume")
            self.healthy = True
            self.notifier.send("WATCHDOG=1")
            return
        if self.healthy:
            log.error("service: the pipeline is not making progress (%s); systemd watchdog pings stop",
                      "; ".join(problems))
        self.healthy = False

    def _status(self, pipeline: Any, publisher: Any, problems: list[str], now: float) -> str:
        frames = sum(w.processed for w in pipeline.workers.values())
        since = self._status_at or pipeline.started_at  # the frame rate since the last STATUS (first: the start)
        self._fps = (frames - self._frames) / max(1e-3, now - since)
        self._frames, self._status_at = frames, now
        self._status_key = summary(pipeline, publisher, None, problems)
        return summary(pipeline, publisher, self._fps, problems)

    def _maybe_status(self, pipeline: Any, publisher: Any, problems: list[str], now: float) -> None:
        if summary(pipeline, publisher, None, problems) != self._status_key or now - self._status_at >= STATUS_REFRESH_S:
            self.status(self._status(pipeline, publisher, problems, now))

    def reloading(self) -> None:
        self.notifier.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}", "STATUS=reloading the config")

    def reloaded(self, pipeline: Any, publisher: Any = None) -> None:
        self.notifier.send("READY=1", "STATUS=" + self._status(pipeline, publisher, [], time.monotonic()))

    def stopping(self) -> None:
        self.notifier.send("STOPPING=1", "STATUS=shutting down")


# ---- the unit file

SYSTEM_UNIT_DIR = Path("/etc/systemd/system")

UNIT_HEAD = """\
# edgecv: real-time video analytics daemon (written by `edgecv service install`; see deploy/README.md)
[Unit]
Description=edgecv video analytics ({config})
Documentation=https://github.com/edgecv/edgecv#running-as-a-systemd-service
Wants=network-online.target
After=network-online.target

[Service]
Type=notify
ExecStart={exec_start}
ExecReload=/bin/kill -HUP $MAINPID
# no WATCHDOG=1 for this long (a stuck inference, worker or capture read): killed, then restarted
WatchdogSec=30s
Restart=on-failure
RestartSec=5s
# models load (TensorRT: an engine build) before READY=1
TimeoutStartSec=15min
TimeoutStopSec=20s
Environment=PYTHONUNBUFFERED=1
"""

# what only a system manager applies (a user manager cannot change users, groups, capabilities, devices, or
# set up mount namespaces without PrivateUsers)
UNIT_SYSTEM = """\
DynamicUser=yes
# V4L2 and CSI cameras: /dev/video* belong to the group video
SupplementaryGroups=video
# the spool ($STATE_DIRECTORY), TensorRT engines (cache) and the config (/etc/edgecv)
StateDirectory=edgecv
CacheDirectory=edgecv
ConfigurationDirectory=edgecv
Environment=EDGECV_ENGINE_CACHE=%C/edgecv/engines
ProtectSystem=strict
ProtectHome={protect_home}
PrivateTmp=yes
PrivateMounts=yes
# cameras only; an NVIDIA GPU needs a drop-in with DeviceAllow=char-nvidia-frontend rw, char-nvidia-uvm rw
# (and /dev/nvhost-*, /dev/nvmap on Jetson), see deploy/README.md
DevicePolicy=closed
DeviceAllow=char-video4linux rw
CapabilityBoundingSet=
AmbientCapabilities=
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
PrivateIPC=yes
RemoveIPC=yes
KeyringMode=private
"""

UNIT_TAIL = """\
NoNewPrivileges=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
# ONNX Runtime's CPU kernels, OpenCV and NumPy are compiled ahead of time: nothing maps writable+executable memory
MemoryDenyWriteExecute=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
SystemCallErrorNumber=EPERM
UMask=0077

[Install]
WantedBy={wanted_by}
"""


def _quote(arg: str) -> str:
    """One ExecStart= argument: specifiers (%) and variables ($) escaped, quoted when it has blanks or quotes."""
    arg = arg.replace("%", "%%").replace("$", "$$")
    if any(c.isspace() or c in "\"'\\;" for c in arg):
        return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return arg


def _home_path(path: Path) -> bool:
    return any(path == p or p in path.parents for p in (Path("/home"), Path("/root"), Path("/run/user")))


def unit_text(executable: str | os.PathLike, config: str | os.PathLike, user: bool = False) -> str:
    """The unit running ``executable run config`` (absolute paths); ``user``: for a user manager."""
    exe, cfg = Path(executable), Path(config)
    head = UNIT_HEAD.format(config=str(cfg).replace("%", "%%"),
                            exec_start=" ".join(_quote(a) for a in (str(exe), "run", str(cfg))))
    if user:
        return head + UNIT_TAIL.format(wanted_by="default.target")
    # a virtualenv or config under /home (or /root) stays readable; else the homes are hidden
    protect_home = "read-only" if _home_path(exe) or _home_path(cfg) else "yes"
    return head + UNIT_SYSTEM.format(protect_home=protect_home) + UNIT_TAIL.format(wanted_by="multi-user.target")


def edgecv_executable() -> Path:
    """This installation's `edgecv` script (next to the running Python: a virtualenv's bin/)."""
    candidate = Path(sys.executable).parent / "edgecv"
    if candidate.is_file():
        return candidate.absolute()
    argv0 = Path(sys.argv[0])
    if argv0.name == "edgecv" and argv0.is_file():
        return argv0.resolve()
    return candidate.absolute()


def unit_dir(user: bool, environ: Optional[Mapping[str, str]] = None) -> Path:
    if not user:
        return SYSTEM_UNIT_DIR
    env = os.environ if environ is None else environ
    return Path(env.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "systemd" / "user"


def systemctl_commands(unit_path: Path, user: bool) -> list[str]:
    """What to run after writing ``unit_path`` (never run by edgecv)."""
    ctl = "systemctl --user" if user else "sudo systemctl"
    journal = "journalctl --user" if user else "journalctl"
    name = unit_path.name
    lines = []
    if unit_path.parent != unit_dir(user):
        lines.append(f"{'' if user else 'sudo '}cp {_shell(unit_path)} {_shell(unit_dir(user) / name)}")
    lines += [f"{ctl} daemon-reload", f"{ctl} enable --now {name}", f"{ctl} status {name}",
              f"{journal} -u {name} -f", f"{ctl} reload {name}   # after editing the config (SIGHUP)"]
    return lines


def _shell(path: Path) -> str:
    text = str(path)
    return text if all(c.isalnum() or c in "/._-+@" for c in text) else "'" + text.replace("'", "'\\''") + "'"


def install(config: str | os.PathLike, user: bool = False, output: Optional[str | os.PathLike] = None,
            executable: Optional[str | os.PathLike] = None) -> Path:
    """Write the unit for ``config`` to ``output`` (default: the manager's unit folder, edgecv.service).
    Raises OSError (one line) when it cannot be written."""
    exe = Path(executable) if executable else edgecv_executable()
    path = Path(output).expanduser() if output else unit_dir(user) / "edgecv.service"
    if path.is_dir():
        path = path / "edgecv.service"
    text = unit_text(exe, Path(config).expanduser().absolute(), user=user)
    try:
        if not output:  # the manager's folder (a user's may not exist yet); an --output folder must exist
            path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as e:
        raise OSError(f"cannot write {path}: {e.strerror or e}") from None
    return path
