"""The operator HTTP server: one ``ThreadingHTTPServer`` on its own daemon thread, started and stopped by the
daemon.

- ``/metrics``: Prometheus text format (:mod:`edgecv.web.metrics`);
- ``/healthz``: 200 while the pipeline's threads are alive and making progress, else 503 with the reasons
  (``Pipeline.health()``) in JSON;
- ``/readyz``: 200 when it is healthy, every camera is streaming, the broker is connected and the spool is under
  its bound, else 503 with the reasons in JSON;
- ``/``: a page with every camera's state, rates and counters and its live preview;
  ``/cameras.json``: the same figures; ``/cameras/<name>/latest.jpg`` the newest annotated frame,
  ``/cameras/<name>/stream.mjpeg`` the same as an MJPEG stream at most ``preview_fps`` frames a second
  (``?grid=1``: with a coordinate grid in source pixels).

Hostile clients cost the daemon a bounded amount: at most ``MAX_CONNECTIONS`` connections are served at once (a
thread each; more are closed at once), and a connection that sends no request, or a stream viewer that reads
nothing, for ``SOCKET_TIMEOUT_S`` is dropped.
"""
from __future__ import annotations

import errno
import html
import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from .. import EdgecvError
from ..config import Config, HttpConfig
from .metrics import PipelineCollector, attach_histograms
from .preview import Preview

log = logging.getLogger("edgecv.http")

BOUNDARY = "edgecv-frame"


MAX_CONNECTIONS = 32  # served at once (a thread each); more are closed at once (the module docstring)
SOCKET_TIMEOUT_S = 10.0  # a client that sends no request, or reads nothing of a stream, for this long is dropped


class _Server4(ThreadingHTTPServer):
    daemon_threads = True  # a viewer's open stream never holds up the exit
    app: "OperatorServer"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.active = 0  # connections being served now
        self.refused = 0  # connections closed at once because MAX_CONNECTIONS were being served
        self._count = threading.Lock()
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        """A thread per connection, but at most ``MAX_CONNECTIONS`` at once: a client opening connections without
        end (or holding them open without a request) costs the daemon a bounded number of threads."""
        with self._count:
            full = self.active >= MAX_CONNECTIONS
            if full:
                self.refused += 1
            else:
                self.active += 1
        if full:
            log.debug("http: %d connections served already: %s closed", MAX_CONNECTIONS, client_address)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # its thread did not start: it was never served
            with self._count:
                self.active -= 1
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._count:
                self.active -= 1


class _Server6(_Server4):
    address_family = socket.AF_INET6


def readiness(pipeline: Any, publisher: Any) -> list[str]:
    """Why the daemon is not ready to serve (empty: ready): unhealthy, a camera not streaming, the broker not
    connected, the spool at its bound."""
    problems = list(pipeline.health())
    for name, s in pipeline.sources.items():
        if s.state != "streaming":
            problems.append(f"camera {name}: {s.state}" + (f" ({s.reason})" if s.reason else ""))
    if publisher is not None:
        if not publisher.connected:
            why = f": {publisher.last_error}" if publisher.last_error else ""
            problems.append(f"mqtt: not connected ({publisher.state}){why}")
        spool = publisher.spool
        if spool.size_bytes >= spool.max_bytes:
            problems.append(f"spool: at its bound ({spool.size_bytes} of {spool.max_bytes} bytes, the oldest events "
                            "are being dropped)")
    return problems


class OperatorServer:
    """Binds at construction (a port in use is one line, at start-up); serves from :meth:`start` to :meth:`stop`."""

    def __init__(self, cfg: HttpConfig) -> None:
        self.cfg = cfg
        server = _Server6 if ":" in cfg.host else _Server4
        try:
            self.httpd = server((cfg.host.strip("[]"), cfg.port), _Handler)
        except OSError as e:
            why = "address in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e)).lower()
            raise EdgecvError(f"http: cannot listen on {cfg.host}:{cfg.port}: {why}") from None
        self.httpd.app = self
        self.port = self.httpd.server_address[1]
        self.stopping = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.pipeline: Any = None
        self.publisher: Any = None
        self.preview: Optional[Preview] = None
        self.registry = CollectorRegistry(auto_describe=False)

    def attach(self, pipeline: Any, publisher: Any, config: Callable[[], Config], names: list[str]) -> None:
        """What to serve: the pipeline (before it starts), its MQTT publisher (None: MQTT off), the running config."""
        self.pipeline, self.publisher = pipeline, publisher
        attach_histograms(pipeline)
        self.preview = Preview(pipeline, config, names)
        self.registry.register(PipelineCollector(pipeline, publisher, self.preview))

    def start(self) -> None:
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="http", daemon=True)
        self._thread.start()
        log.info("http: serving /metrics, /healthz, /readyz and the preview on http://%s:%d/",
                 f"[{self.cfg.host}]" if ":" in self.cfg.host else self.cfg.host, self.port)

    def stop(self) -> None:
        self.stopping.set()  # open MJPEG streams end
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(2.0)
        self.httpd.server_close()

    # ---- the answers
    def metrics(self) -> bytes:
        return generate_latest(self.registry)

    def cameras(self) -> dict[str, dict[str, Any]]:
        """Each camera's state and counters (the page's figures)."""
        p = self.pipeline
        elapsed = max(1e-6, time.monotonic() - p.started_at) if p.started_at else 0.0
        out = {}
        for name, w in p.workers.items():
            s = p.sources[name]
            out[name] = {"state": s.state, "reason": s.reason,
                         "fps_in": round(s.stats.read / elapsed, 1) if elapsed else 0.0,
                         "fps_processed": round(w.processed / elapsed, 1) if elapsed else 0.0,
                         "frames_read": s.stats.read, "frames_processed": w.processed,
                         "frames_dropped": s.slot.dropped, "events": w.events}
        return out


class _Handler(BaseHTTPRequestHandler):
    server: _Server4
    protocol_version = "HTTP/1.0"
    server_version = "edgecv"

    def setup(self) -> None:
        self.timeout = SOCKET_TIMEOUT_S  # read at setup (module constant, so a test can shorten it)
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        app = self.server.app
        url = urlsplit(self.path)
        grid = parse_qs(url.query).get("grid", ["0"])[-1] not in ("0", "", "false")
        parts = [p for p in url.path.split("/") if p]
        try:
            if app.pipeline is None:
                self._send(503, "text/plain; charset=utf-8", b"starting\n")
            elif len(parts) == 3 and parts[0] == "cameras":
                self._camera(app, parts[1], parts[2], grid)
            else:
                self._route(app, url.path)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass  # the client went away, or stopped reading (a stream it no longer takes)

    def _route(self, app: OperatorServer, path: str) -> None:
        if path == "/metrics":
            self._send(200, CONTENT_TYPE_LATEST, app.metrics())
        elif path == "/healthz":
            self._problems(app.pipeline.health())
        elif path == "/readyz":
            self._problems(readiness(app.pipeline, app.publisher))
        elif path == "/cameras.json":
            self._send(200, "application/json", json.dumps(app.cameras()).encode())
        elif path in ("/", "/index.html"):
            self._send(200, "text/html; charset=utf-8", page(app).encode())
        else:
            self._send(404, "text/plain; charset=utf-8", f"not found: {path}\n".encode())

    def _camera(self, app: OperatorServer, name: str, what: str, grid: bool) -> None:
        assert app.preview is not None
        if name not in app.preview.cameras:
            self._send(404, "text/plain; charset=utf-8", f"no camera named {name!r}\n".encode())
        elif what == "latest.jpg":
            got = app.preview.jpeg(name, grid)
            if got is None:
                self._send(503, "text/plain; charset=utf-8", f"camera {name}: no frame processed yet\n".encode())
            else:
                self._send(200, "image/jpeg", got[1])
        elif what == "stream.mjpeg":
            self._stream(app, name, grid)
        else:
            self._send(404, "text/plain; charset=utf-8", f"not found: {self.path}\n".encode())

    def _stream(self, app: OperatorServer, name: str, grid: bool) -> None:
        """multipart/x-mixed-replace: each new frame, at most preview_fps a second, until the client leaves."""
        assert app.preview is not None
        self.send_response(200)
        self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={BOUNDARY}")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        period = 1.0 / app.cfg.preview_fps
        last: Any = None
        while not app.stopping.is_set():
            began = time.monotonic()
            got = app.preview.jpeg(name, grid)
            if got is not None and got[0] is not last:
                last, data = got
                self.wfile.write(f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(data)}\r\n\r\n"
                                 .encode() + data + b"\r\n")
                self.wfile.flush()
            app.stopping.wait(max(0.0, period - (time.monotonic() - began)))

    def _problems(self, problems: list[str]) -> None:
        body = {"status": "unhealthy" if problems else "ok", "problems": problems}
        self._send(503 if problems else 200, "application/json", json.dumps(body).encode())

    def _send(self, code: int, content_type: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>edgecv {node}</title>
<style>
body {{ font-family: sans-serif; margin: 12px; background: #f4f4f4; }}
.cam {{ display: inline-block; vertical-align: top; margin: 0 12px 12px 0; background: #fff; padding: 8px; }}
.cam img {{ display: block; width: 640px; max-width: 95vw; min-height: 120px; background: #222; }}
.figures {{ font-size: 13px; margin: 6px 0; }}
</style></head>
<body><h3>edgecv node {node}: {count} camera(s) &middot; <a href="/metrics">metrics</a> &middot;
<a href="/healthz">health</a> &middot; <a href="/readyz">ready</a> &middot;
<label><input type="checkbox" id="grid"> coordinate grid</label></h3>
{cards}
<script>
const period = {period_ms};
function refresh(img) {{
  const grid = document.getElementById("grid").checked ? "&grid=1" : "";
  img.src = img.dataset.base + "?t=" + Date.now() + grid;
}}
for (const img of document.querySelectorAll("img.live")) {{
  img.onload = () => setTimeout(() => refresh(img), period);
  img.onerror = () => setTimeout(() => refresh(img), 1000);
  refresh(img);
}}
async function figures() {{
  try {{
    const cams = await (await fetch("/cameras.json", {{cache: "no-store"}})).json();
    for (const [name, c] of Object.entries(cams)) {{
      const el = document.getElementById("figures-" + name);
      if (el) el.textContent = `${{c.state}} · ${{c.fps_in}} fps in, ${{c.fps_processed}} processed · ` +
        `${{c.frames_read}} read, ${{c.frames_processed}} processed, ${{c.frames_dropped}} dropped · ${{c.events}} events`;
    }}
  }} catch (e) {{}}
  setTimeout(figures, 2000);
}}
figures();
</script></body></html>
"""

CARD = """<div class="cam"><b>{name}</b> <a href="/cameras/{name}/stream.mjpeg">MJPEG stream</a>
<div class="figures" id="figures-{name}">{figures}</div>
<img class="live" data-base="/cameras/{name}/latest.jpg" alt="{name}"></div>
"""


def page(app: OperatorServer) -> str:
    cams = app.cameras()
    cards = "".join(CARD.format(name=html.escape(n), figures=html.escape(f"{c['state']}")) for n, c in cams.items())
    node = html.escape(app.pipeline.cfg.node_id)
    return PAGE.format(node=node, count=len(cams), cards=cards, period_ms=int(1000 / app.cfg.preview_fps))
