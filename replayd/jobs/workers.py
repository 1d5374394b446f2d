"""`--workers K`: one command runs K processes as shards 0/K ... K-1/K of the same jobs, and supervises them.

Each worker is a fork of the supervisor running the same command line plus `--shard i/K`, in a session of its
own, so a terminal's Ctrl-C reaches only the supervisor, which forwards each signal once: the first drains
every worker, a second makes them exit at once. A worker that dies is restarted (it resumes from its shard's
checkpoints) unless it keeps dying; the supervisor's exit code is the first failure's, or 0.

Forking (rather than starting `python -m replayd` afresh) spares each worker the interpreter start and the
imports, about half a second of CPU per worker; the supervisor has no threads, event loop or connections yet.

HTTP (`[http]` of `run`, `--metrics-port` of `replay`): one listener serves all workers on the configured address,
in a process of its own forked first (so the supervisor stays free of threads, which forking the workers that
restart later does not mix with). Each worker serves its own /metrics, /healthz and /readyz on a free loopback
port and writes `index port` into a pipe the listener reads; the listener's /metrics merges the workers' (each
series labelled `worker="i"`), and its /healthz and /readyz pass only when they pass in every worker.

Should the supervisor die (SIGKILL), the kernel sends the workers (which drain) and the listener SIGTERM (Linux's
PR_SET_PDEATHSIG), so none of them runs on as an orphan holding its lease or the HTTP port.
"""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable
from types import FrameType
from typing import Any

import anyio

from replayd.errors import ConfigError
from replayd.ops.http import HttpServer, Readiness
from replayd.ops.metrics import Metrics, merge_expositions

logger = logging.getLogger(__name__)

RESTARTS = 5
"""More restarts than this within `RESTART_WINDOW_S` and the worker is given up on (and the others stopped)."""
RESTART_WINDOW_S = 60.0
WORKER_TIMEOUT_S = 2.0
"""How long the listener waits for a worker's answer: below a probe's usual timeout, so a worker that does not
answer fails the probe with its reason rather than the probe timing out."""
LISTENER = -1
"""The listener's key in `Supervisor.codes`."""
PR_SET_PDEATHSIG = 1
"""prctl(2)'s option: the signal the kernel sends a process when its parent dies."""

_announce_to: tuple[int, int] | None = None
"""In a worker with HTTP: (the pipe to the listener, the worker's index); None in any other process."""


def listener_address(host: str, port: int) -> tuple[str, int]:
    """Where this process serves HTTP: the configured address, but a worker's is a free loopback port."""
    return ("127.0.0.1", 0) if _announce_to is not None else (host, port)


def announce(port: int) -> None:
    """In a worker: tell the supervisor's listener the port this worker serves on."""
    if _announce_to is None:
        return
    pipe, index = _announce_to
    try:
        os.write(pipe, f"{index} {port}\n".encode())  # one line, below PIPE_BUF: written whole
    except OSError as exc:  # the listener is gone (the supervisor stops everything then)
        logger.warning("could not announce HTTP port %d to the supervisor: %s", port, exc)


class Supervisor:
    """Runs `command(args + ["--shard", "i/K"])` in K forked workers; `command` is the CLI's entry point, passed in
    (not imported: the CLI imports this module)."""

    def __init__(
        self,
        command: Callable[[list[str]], int],
        args: list[str],
        workers: int,
        listen: tuple[str, int] | None = None,
    ) -> None:
        self.command = command
        self.args = args
        self.workers = workers
        self.listen = listen
        """The address of the one HTTP listener for all workers; None: no HTTP."""
        self.pids: dict[int, int] = {}
        """Worker index -> process ID, while it runs."""
        self.codes: dict[int, int] = {}
        self.restarts: dict[int, deque[float]] = {i: deque(maxlen=RESTARTS) for i in range(workers)}
        self.signals = 0
        self.pid = os.getpid()
        self.listener: int | None = None
        """The listener's process ID, while it runs."""
        self.ports = -1
        """The write end of the pipe workers announce their ports into (inherited by every worker)."""

    def _spawn(self, index: int) -> None:
        argv = [*self.args, "--shard", f"{index}/{self.workers}"]
        pid = _fork()
        if pid == 0:  # pragma: no cover - the worker (coverage does not follow forks)
            _worker(self.command, argv, (self.ports, index) if self.listen else None, self.pid)
        self.pids[index] = pid
        logger.info("worker %d/%d started (pid %d)", index, self.workers, pid)

    def _start_listener(self, host: str, port: int) -> None:
        read, self.ports = os.pipe()
        os.set_blocking(self.ports, False)  # a listener that does not read never blocks a worker
        pid = _fork()
        if pid == 0:  # pragma: no cover - the listener (coverage does not follow forks)
            os.close(self.ports)
            _listener(WorkersHttp(read, self.workers, host=host, port=port), self.pid)
        os.close(read)
        self.listener = pid

    def _forward(self, signum: int, frame: FrameType | None) -> None:
        self.signals += 1
        for pid in self.pids.values():
            try:
                os.kill(pid, signum)
            except ProcessLookupError:  # exited; reaped by the loop below
                pass

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._forward)
        signal.signal(signal.SIGINT, self._forward)
        if self.listen:
            self._start_listener(*self.listen)
        for index in range(self.workers):
            self._spawn(index)
        while self.pids:
            pid, status = os.wait()  # a signal runs `_forward`, then the wait goes on (PEP 475)
            code = os.waitstatus_to_exitcode(status)
            if pid == self.listener:
                self._listener_exited(code)
            exited = next((i for i, p in self.pids.items() if p == pid), None)
            if exited is not None:
                del self.pids[exited]
                self._exited(exited, code)
        self._stop_listener()
        return next((code for code in self.codes.values() if code != 0), 0)

    def _listener_exited(self, code: int) -> None:
        """The listener serves until the workers are done: exiting before, it failed (it could not bind)."""
        self.listener = None
        self.codes[LISTENER] = code if code > 0 else 128 - code
        logger.error("the HTTP listener exited with %d: stopping all workers", code)
        self._forward(signal.SIGTERM, None)

    def _stop_listener(self) -> None:
        """Served through the workers' drain; stopped once they exited."""
        if self.listener is not None:
            os.kill(self.listener, signal.SIGTERM)
            os.waitpid(self.listener, 0)
            self.listener = None

    def _exited(self, index: int, code: int) -> None:
        if code == 0 or self.signals:
            self.codes[index] = code
            return
        recent = self.restarts[index]
        now = time.monotonic()
        if len(recent) == RESTARTS and now - recent[0] < RESTART_WINDOW_S:
            logger.error("worker %d keeps failing (exit %d): stopping all workers", index, code)
            self.codes[index] = code if code > 0 else 128 - code
            self._forward(signal.SIGTERM, None)
            return
        recent.append(now)
        logger.warning("worker %d exited with %d: restarting it", index, code)
        self._spawn(index)


def _fork() -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    gc.freeze()  # the collector in the child then leaves the inherited objects' pages alone (shared, not copied)
    return os.fork()


def _stop_with(supervisor: int) -> None:
    """Have the kernel SIGTERM this process (a drain, for a worker) when the supervisor dies, SIGKILLed say, so
    neither workers nor the listener (holding the HTTP port) outlive it. Linux; elsewhere they would."""
    try:
        prctl = ctypes.CDLL(None).prctl
    except (OSError, AttributeError):
        return
    prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != supervisor:  # it died before the prctl
        os.kill(os.getpid(), signal.SIGTERM)


def _worker(  # pragma: no cover - a forked worker
    command: Callable[[list[str]], int], argv: list[str], announce_to: tuple[int, int] | None, supervisor: int
) -> None:
    """Run the command as one shard and exit with its code; never returns into the supervisor's loop."""
    global _announce_to
    code = 70
    try:
        os.setsid()  # a session of its own: a terminal's Ctrl-C reaches only the supervisor
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _stop_with(supervisor)
        _announce_to = announce_to
        code = command(argv)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _listener(server: WorkersHttp, supervisor: int) -> None:  # pragma: no cover - the forked listener
    """Serve until the supervisor's SIGTERM (the default action: nothing to drain); exit 78 if it cannot bind."""
    code = 70
    try:
        os.setsid()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor stops it once the workers are done
        _stop_with(supervisor)
        anyio.run(_serve, server)
    except ConfigError as exc:
        print(f"replayd: {exc}", file=sys.stderr)
        code = exc.exit_code
    except BaseException:  # the process ends here: say why
        logger.exception("the HTTP listener failed")
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


async def _serve(server: WorkersHttp) -> None:
    async with anyio.create_task_group() as tg:
        port = await tg.start(server.run)
        logger.info("serving /metrics /healthz /readyz of %d workers on %s:%d", server.workers, server.host, port)


class WorkersHttp(HttpServer):
    """The supervisor's listener: /metrics merges every worker's (each series labelled `worker="i"`); /healthz and
    /readyz pass when they pass in every worker, and else say which worker fails and why."""

    def __init__(self, ports: int, workers: int, *, host: str, port: int) -> None:
        super().__init__(Metrics(), Readiness(), host=host, port=port)
        self.workers = workers
        self._pipe = ports
        os.set_blocking(ports, False)
        self._ports: dict[int, int] = {}
        self._unread = b""
        self._lock = threading.Lock()  # requests are served from threads of their own

    def worker_ports(self) -> dict[int, int]:
        """Worker index -> the port it serves on, from the lines read so far (a restarted worker's replaces)."""
        with self._lock:
            while True:
                try:
                    chunk = os.read(self._pipe, 4096)
                except BlockingIOError:
                    break
                if not chunk:
                    break
                self._unread += chunk
            *lines, self._unread = self._unread.split(b"\n")
            for line in lines:
                index, port = line.split()
                self._ports[int(index)] = int(port)
            return dict(self._ports)

    def _ask(self, path: str) -> dict[int, tuple[int, str]]:
        """Every worker's answer to GET `path`: (status, body); status 0 when it gave none."""
        ports = self.worker_ports()
        answers = {}
        for index in range(self.workers):
            if index not in ports:
                answers[index] = (0, "not serving yet")
                continue
            try:
                url = f"http://127.0.0.1:{ports[index]}{path}"
                with urllib.request.urlopen(url, timeout=WORKER_TIMEOUT_S) as response:  # loopback
                    answers[index] = (response.status, response.read().decode())
            except urllib.error.HTTPError as exc:
                answers[index] = (exc.code, exc.read().decode())
            except OSError as exc:
                answers[index] = (0, f"no answer: {exc}")
        return answers

    def _every_worker(self, path: str) -> tuple[int, dict[str, Any]]:
        answers = self._ask(path)
        reasons = [f"worker {i}: {_reasons(body)}" for i, (status, body) in answers.items() if status != 200]
        body: dict[str, Any] = {"workers": {str(i): status for i, (status, _) in answers.items()}}
        if reasons:
            return 503, {"status": "fail", "reasons": reasons, **body}
        return 200, {"status": "ok", **body}

    def health(self) -> tuple[int, dict[str, Any]]:
        return self._every_worker("/healthz")

    def ready(self) -> tuple[int, dict[str, Any]]:
        return self._every_worker("/readyz")

    def exposition(self) -> bytes:
        answers = self._ask("/metrics")
        return merge_expositions({str(i): body for i, (status, body) in answers.items() if status == 200}, "worker")


def _reasons(body: str) -> str:
    """A worker's own reasons, from its JSON answer; else what was said instead."""
    try:
        return "; ".join(json.loads(body)["reasons"])
    except (ValueError, KeyError, TypeError):
        return body.strip()[:200]


def without_workers(argv: list[str]) -> list[str]:
    """The command line minus `--workers K` / `--workers=K`: what each worker runs."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--workers":
            skip = True
        elif not arg.startswith("--workers="):
            out.append(arg)
    return out
