"""The /metrics, /healthz (alias /livez) and /readyz listener, served from threads of its own.

Why not on the event loop: liveness must fail when a handler blocks the loop (a sync `time.sleep`, a CPU-bound
loop in an `async def`). A server on that loop cannot answer then: the probe only times out, nobody learns why,
and /metrics goes dark exactly when it is needed. So the loop only *beats* and threads *serve*:

- `HttpServer.run` is a task on the daemon's loop, started with `port = await tg.start(server.run)`: it binds
  (a bind error surfaces at start, as `ConfigError`), reports the bound port (port 0 = ephemeral), starts the
  listener and watchdog threads, then refreshes a `Heartbeat` every `heartbeat_s` until cancelled, and on
  cancellation stops both threads.
- The listener is the standard library's `socketserver` + `BaseHTTPRequestHandler` (its request parsing, 400
  on malformed requests), one short-lived thread per connection and at most `max_connections` at once (more are
  closed at once), and `Connection: close` on every response. GET and HEAD; 404 for unknown paths.
- A request has `request_timeout_s` in all to arrive, however it trickles in (a deadline on the whole request,
  not a time-out per read: a client sending a byte every 2 s would otherwise hold its thread for ever), and as
  long again for its response to be written. Slow or hostile clients are dropped at their deadline; with 256
  connections allowed, 64 of them at once still leave room for the kubelet's probes and the scrape.
- /healthz compares the heartbeat's age with `stall_after_s` when asked: 200 while the loop keeps beating,
  503 with the reason while it is blocked, 200 again once it runs. It never touches Redis.
- The watchdog thread checks the same heartbeat and logs, once per stall, a warning with the loop thread's
  stack (which handler blocks it), and a line when the loop answers again.
- /metrics runs `generate_latest` in the request's thread, never on the loop, so it still answers (with the
  last values) while the loop is blocked. /readyz reads `Readiness`: flags the daemon sets (config valid,
  plugins loaded) and `watch_redis` keeps (the last PING answered); never "caught up", because a native
  sidecar's readiness gates its whole Pod.
"""

from __future__ import annotations

import io
import json
import logging
import socket
import socketserver
import sys
import threading
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any, ClassVar
from urllib.parse import urlsplit

import anyio
from anyio.abc import TaskStatus
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from replayd.errors import ConfigError
from replayd.ops.metrics import Metrics, error_class

logger = logging.getLogger(__name__)

JSON = "application/json"


class Heartbeat:
    """A monotonic timestamp the loop refreshes and other threads read (a float store is atomic)."""

    def __init__(self) -> None:
        self._at = time.monotonic()

    def beat(self) -> None:
        self._at = time.monotonic()

    def age_s(self) -> float:
        return max(time.monotonic() - self._at, 0.0)


@dataclass
class Readiness:
    """What /readyz reports: configured and connected, never "caught up"."""

    config_ok: bool = False
    """The settings were validated."""
    plugins_loaded: bool = False
    """Every job's handler and filters were imported and built."""
    redis_ok: bool = False
    """The last PING answered in time."""
    redis_error: str = ""
    """Why the last PING failed, as `metrics.error_class` names it; "" while it answers or before the first try."""

    def reasons(self) -> list[str]:
        """Why replayd is not ready; empty when it is."""
        reasons = []
        if not self.config_ok:
            reasons.append("configuration not validated")
        if not self.plugins_loaded:
            reasons.append("plugins not loaded")
        if not self.redis_ok:
            reasons.append(f"redis unreachable ({self.redis_error})" if self.redis_error else "redis not reached yet")
        return reasons


async def watch_redis(
    readiness: Readiness,
    ping: Callable[[], Awaitable[object]],
    *,
    interval_s: float = 5.0,
    timeout_s: float = 2.0,
) -> None:
    """PING every `interval_s` with a `timeout_s` deadline and keep `readiness.redis_ok` (logged on change)."""
    while True:
        error = ""
        try:
            with anyio.fail_after(timeout_s):
                await ping()
        except Exception as exc:  # noqa: BLE001 - any failure means "not reachable now"; the class is reported
            error = error_class(exc)
        if error and (readiness.redis_ok or not readiness.redis_error):
            logger.warning("redis PING failed (%s): not ready", error)
        elif not error and not readiness.redis_ok:
            logger.info("redis answers PING: ready")
        readiness.redis_ok, readiness.redis_error = not error, error
        await anyio.sleep(interval_s)


class HttpServer:
    """Serves /metrics, /healthz, /livez and /readyz from threads while `run` beats on the loop it watches."""

    def __init__(
        self,
        metrics: Metrics,
        readiness: Readiness,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        stall_after_s: float = 10.0,
        heartbeat_s: float = 1.0,
        request_timeout_s: float = 5.0,
        max_connections: int = 256,
    ) -> None:
        if not 0 < heartbeat_s < stall_after_s:
            raise ValueError(f"heartbeat_s ({heartbeat_s}) must be positive and below stall_after_s ({stall_after_s})")
        self.metrics = metrics
        self.readiness = readiness
        self.host = host
        self.port = port
        self.stall_after_s = stall_after_s
        self.heartbeat_s = heartbeat_s
        self.request_timeout_s = request_timeout_s
        self.max_connections = max_connections
        self.heartbeat = Heartbeat()

    async def run(self, *, task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        """Bind, report the bound port, serve until cancelled."""
        listener = self._bind()
        port: int = listener.server_address[1]
        self.heartbeat.beat()
        serving = threading.Thread(
            target=listener.serve_forever, kwargs={"poll_interval": 0.1}, name="replayd-http", daemon=True
        )
        watchdog = _Watchdog(self.heartbeat, self.stall_after_s, threading.get_ident())
        serving.start()
        watchdog.start()
        try:
            task_status.started(port)
            while True:
                self.heartbeat.beat()
                await anyio.sleep(self.heartbeat_s)
        finally:
            watchdog.stop()
            with anyio.move_on_after(2, shield=True):
                await anyio.to_thread.run_sync(listener.shutdown, abandon_on_cancel=True)
            listener.server_close()

    def _bind(self) -> _Listener:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        try:
            return _Listener(self, family)
        except OSError as exc:
            raise ConfigError(f"http: cannot listen on {self.host}:{self.port}: {exc.strerror or exc}") from None

    # --- the responses, called from the listener's threads -----------------------------------------------------

    def health(self) -> tuple[int, dict[str, Any]]:
        age = self.heartbeat.age_s()
        body: dict[str, Any] = {"loop_heartbeat_age_s": round(age, 3), "stall_after_s": self.stall_after_s}
        if age > self.stall_after_s:
            reason = f"event loop blocked: no heartbeat for {age:.1f}s (limit {self.stall_after_s:g}s)"
            return 503, {"status": "fail", "reasons": [reason], **body}
        return 200, {"status": "ok", **body}

    def ready(self) -> tuple[int, dict[str, Any]]:
        r = self.readiness
        checks = {"config": r.config_ok, "plugins": r.plugins_loaded, "redis": r.redis_ok}
        reasons = r.reasons()
        if reasons:
            return 503, {"status": "fail", "reasons": reasons, "checks": checks}
        return 200, {"status": "ok", "checks": checks}

    def exposition(self) -> bytes:
        for attempt in range(3):
            try:
                return generate_latest(self.metrics.registry)
            except RuntimeError:
                # a collector iterated a dict the loop was growing (a job registering); a second read is consistent
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")


class _Listener(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """A threading TCP server with a cap on concurrent connections (socketserver, not HTTPServer: no getfqdn)."""

    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, app: HttpServer, family: socket.AddressFamily) -> None:
        self.address_family = family
        self.app = app
        self._slots = threading.BoundedSemaphore(app.max_connections)
        super().__init__((app.host, app.port), _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            logger.debug("http: %d connections open, refusing %s", self.app.max_connections, client_address)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # called inside `except`: a client that hung up or stalled is not replayd's error (no traceback on stderr)
        if isinstance(sys.exc_info()[1], OSError):
            logger.debug("http: connection from %s failed", client_address, exc_info=True)
        else:
            logger.exception("http: serving %s failed", client_address)


class _Handler(BaseHTTPRequestHandler):
    server: _Listener
    protocol_version = "HTTP/1.1"
    default_request_version = "HTTP/1.0"  # malformed request lines still get a status line
    server_version = "replayd"
    sys_version = ""
    routes: ClassVar[dict[str, str]] = {
        "/metrics": "metrics",
        "/healthz": "health",
        "/livez": "health",
        "/readyz": "ready",
    }

    def setup(self) -> None:
        super().setup()
        deadline = time.monotonic() + self.server.app.request_timeout_s
        self.rfile.close()  # the socket's own reader, replaced (closed: the socket's close is not held back by it)
        self.rfile = io.BufferedReader(_DeadlineReader(self.connection, deadline))

    def do_GET(self) -> None:
        self._respond(body=True)

    def do_HEAD(self) -> None:
        self._respond(body=False)

    def _respond(self, *, body: bool) -> None:
        app = self.server.app
        self.connection.settimeout(app.request_timeout_s)  # the response's own bound, once the request is in
        route = self.routes.get(urlsplit(self.path).path)
        content_type = JSON
        if route == "metrics":
            status, payload, content_type = 200, app.exposition(), CONTENT_TYPE_LATEST
        elif route == "health":
            status, doc = app.health()
            payload = _json(doc)
        elif route == "ready":
            status, doc = app.ready()
            payload = _json(doc)
        else:
            status, payload = 404, _json({"status": "not_found", "paths": sorted(self.routes)})
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("http: %s %s", self.address_string(), format % args)


class _DeadlineReader(io.RawIOBase):
    """A socket's reads, each given only what is left of one deadline for the whole request."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        super().__init__()
        self._sock = sock
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("request deadline passed")
        self._sock.settimeout(left)
        return self._sock.recv_into(buffer)


def _json(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True).encode() + b"\n"


class _Watchdog:
    """A thread that logs once when the loop's heartbeat goes stale (with the loop thread's stack) and on recovery."""

    def __init__(self, heartbeat: Heartbeat, stall_after_s: float, loop_thread: int) -> None:
        self.heartbeat = heartbeat
        self.stall_after_s = stall_after_s
        self.loop_thread = loop_thread
        self.interval_s = min(1.0, stall_after_s / 4)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="replayd-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def _run(self) -> None:
        stalled = False
        while not self._stop.wait(self.interval_s):
            age = self.heartbeat.age_s()
            if age > self.stall_after_s and not stalled:
                stalled = True
                logger.warning(
                    "event loop blocked for %.1fs (limit %gs): /healthz fails; the loop thread is at:\n%s",
                    age,
                    self.stall_after_s,
                    self._stack(),
                )
            elif age <= self.stall_after_s and stalled:
                stalled = False
                logger.info("event loop answers again: /healthz passes")

    def _stack(self) -> str:
        frame = sys._current_frames().get(self.loop_thread)
        return "".join(traceback.format_stack(frame, limit=12)).rstrip() if frame else "(loop thread not found)"
