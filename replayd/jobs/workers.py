"""`--workers K`: one command runs K processes as shards 0/K ... K-1/K of the same jobs, and supervises them.

Each worker is a fork of the supervisor running the same command line plus `--shard i/K`, in a session of its
own, so a terminal's Ctrl-C reaches only the supervisor, which forwards each signal once: the first drains
every worker, a second makes them exit at once. A worker that dies is restarted (it resumes from its shard's
checkpoints) unless it keeps dying; the supervisor's exit code is the first failure's, or 0.

Forking (rather than starting `python -m replayd` afresh) spares each worker the interpreter start and the
imports, about half a second of CPU per worker; the supervisor has no threads, event loop or connections yet.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from types import FrameType

logger = logging.getLogger(__name__)

RESTARTS = 5
"""More restarts than this within `RESTART_WINDOW_S` and the worker is given up on (and the others stopped)."""
RESTART_WINDOW_S = 60.0


class Supervisor:
    """Runs `command(args + ["--shard", "i/K"])` in K forked workers; `command` is the CLI's entry point, passed in
    (not imported: the CLI imports this module)."""

    def __init__(self, command: Callable[[list[str]], int], args: list[str], workers: int) -> None:
        self.command = command
        self.args = args
        self.workers = workers
        self.pids: dict[int, int] = {}
        """Worker index -> process ID, while it runs."""
        self.codes: dict[int, int] = {}
        self.restarts: dict[int, deque[float]] = {i: deque(maxlen=RESTARTS) for i in range(workers)}
        self.signals = 0

    def _spawn(self, index: int) -> None:
        argv = [*self.args, "--shard", f"{index}/{self.workers}"]
        sys.stdout.flush()
        sys.stderr.flush()
        gc.freeze()  # the collector in the worker then leaves the inherited objects' pages alone (shared, not copied)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the worker (coverage does not follow forks)
            _worker(self.command, argv)
        self.pids[index] = pid
        logger.info("worker %d/%d started (pid %d)", index, self.workers, pid)

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
        for index in range(self.workers):
            self._spawn(index)
        while self.pids:
            pid, status = os.wait()  # a signal runs `_forward`, then the wait goes on (PEP 475)
            exited = next((i for i, p in self.pids.items() if p == pid), None)
            if exited is not None:
                del self.pids[exited]
                self._exited(exited, os.waitstatus_to_exitcode(status))
        return next((code for code in self.codes.values() if code != 0), 0)

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


def _worker(command: Callable[[list[str]], int], argv: list[str]) -> None:  # pragma: no cover - in the worker
    """Run the command as one shard and exit with its code; never returns into the supervisor's loop."""
    code = 70
    try:
        os.setsid()  # a session of its own: a terminal's Ctrl-C reaches only the supervisor
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        code = command(argv)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


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
