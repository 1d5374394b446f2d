"""`--workers K`: one command runs K processes as shards 0/K ... K-1/K of the same jobs, and supervises them.

Each worker is `python -m replayd <same arguments> --shard i/K` in a session of its own, so a terminal's
Ctrl-C reaches only the supervisor, which forwards each signal once: the first drains every worker, a second
makes them exit at once. A worker that dies is restarted (it resumes from its shard's checkpoints) unless it
keeps dying; the supervisor's exit code is the first failure's, or 0.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from collections import deque
from types import FrameType

logger = logging.getLogger(__name__)

RESTARTS = 5
"""More restarts than this within `RESTART_WINDOW_S` and the worker is given up on (and the others stopped)."""
RESTART_WINDOW_S = 60.0


class Supervisor:
    def __init__(self, args: list[str], workers: int) -> None:
        self.args = args
        self.workers = workers
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.codes: dict[int, int] = {}
        self.restarts: dict[int, deque[float]] = {i: deque(maxlen=RESTARTS) for i in range(workers)}
        self.signals = 0

    def _spawn(self, index: int) -> None:
        command = [sys.executable, "-m", "replayd", *self.args, "--shard", f"{index}/{self.workers}"]
        self.procs[index] = subprocess.Popen(command, start_new_session=True)  # noqa: S603 - our own argv
        logger.info("worker %d/%d started (pid %d)", index, self.workers, self.procs[index].pid)

    def _forward(self, signum: int, frame: FrameType | None) -> None:
        self.signals += 1
        for proc in self.procs.values():
            proc.send_signal(signum)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._forward)
        signal.signal(signal.SIGINT, self._forward)
        for index in range(self.workers):
            self._spawn(index)
        while self.procs:
            for index, proc in list(self.procs.items()):
                code = proc.poll()
                if code is not None:
                    del self.procs[index]
                    self._exited(index, code)
            time.sleep(0.1)
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
