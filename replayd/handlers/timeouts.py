"""Handler time-outs, watched by one task per job instead of a timer per event.

A timer per event (`anyio.fail_after` around each call) would cost every event a cancel scope and a loop timer,
though most handler calls finish without suspending at all; even one cancel scope per lane batch costs 10 µs
(`asyncio.timeout`: 5 µs), as much as 30 events. So a lane batch only registers here (`HandlerWatch.watch`: its
task and its outcome counts, about 1 µs), and `HandlerWatch.run` looks every `tick_s`: a batch whose counts have
not moved for `timeout_s` is stuck on one event. An async call is cancelled there (`task.cancel()`, which the lane
takes back with `Watched.expired` and turns into a failure of that event: retried, then the poison policy); a
sync function in a worker thread cannot be cancelled: it is reported once (log with the event and handler,
metric) and the job reads as `stalled` until it returns. The check is late by at most `tick_s`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import anyio

from replayd.events import Event

logger = logging.getLogger(__name__)


class Counts(Protocol):
    """What a lane batch has settled so far (`replayd.handlers.Outcome`)."""

    handled: int
    failed: int
    parked: int
    retried: int


class Watched:
    """One registered run of handler calls: a lane batch's events (`outcome` counts their verdicts) or one retry."""

    __slots__ = ("at", "cancellable", "events", "outcome", "paused", "reported", "seen", "since", "task", "timed_out")

    def __init__(self, events: Sequence[Event], outcome: Counts | None, cancellable: bool, at: int = 0) -> None:
        self.events = events
        self.outcome = outcome
        self.cancellable = cancellable
        self.at = at
        """The first event of the run (a sync function's thread call moves it on as it goes: it has no outcome)."""
        self.task = asyncio.current_task()
        self.seen = self.progress()
        self.since = time.monotonic()
        self.paused = False
        """A retry of the current event runs under a Watched of its own meanwhile."""
        self.timed_out = False
        self.reported = False

    def progress(self) -> int:
        """Grows with every verdict and every retry: unchanged, the same call is still running."""
        o = self.outcome
        return self.at if o is None else self.at + o.handled + o.failed + o.parked + o.retried

    def index(self) -> int:
        """The position in `events` of the event whose call runs now."""
        o = self.outcome
        return self.at if o is None else self.at + o.handled + o.failed + o.parked

    def current(self) -> Event:
        return self.events[min(self.index(), len(self.events) - 1)]

    def expired(self) -> bool:
        """Called with a CancelledError in hand: whether it is this watch's time-out alone (then taken back, and
        the lane goes on) rather than a shutdown or a task group's cancel (to be let through)."""
        if not self.timed_out or self.task is None:
            return False
        self.timed_out = False
        return self.task.uncancel() == 0


class HandlerWatch:
    """The time-outs of one job's handler calls (`handler_timeout_s`)."""

    def __init__(self, timeout_s: float, handler: str, on_timeout: Callable[[str], None]) -> None:
        self.timeout_s = timeout_s
        self.handler = handler
        self.on_timeout = on_timeout
        """Called with `cancelled` or `reported` (the metric)."""
        self.tick_s = min(1.0, timeout_s / 4)
        self.overrunning = 0
        """Calls past their time that could not be cancelled and still run: the job is `stalled`."""
        self._watched: set[Watched] = set()

    def watch(self, events: Sequence[Event], outcome: Counts | None, *, cancellable: bool, at: int = 0) -> Watched:
        """Register the calls on `events` (from `at`) from now until `unwatch`, with no await in between but theirs."""
        watched = Watched(events, outcome, cancellable, at)
        self._watched.add(watched)
        return watched

    def unwatch(self, watched: Watched) -> None:
        self._watched.discard(watched)
        if watched.reported:
            self.overrunning -= 1
            logger.warning("handler %s returned after %.1fs (handler_timeout_s = %g)", self.handler,
                           time.monotonic() - watched.since, self.timeout_s)  # fmt: skip

    def batch_timed_out(self, events: Sequence[Event]) -> None:
        """A `handle_batch` call outlived its time and was cancelled: the batch's events failed."""
        self.on_timeout("cancelled")
        logger.error("handler %s: handle_batch on %d events from %s %s outlived handler_timeout_s = %g: cancelled, "
                     "the batch failed", self.handler, len(events), events[0].stream, events[0].stream_id,
                     self.timeout_s)  # fmt: skip

    async def run(self) -> None:
        """Check the registered calls every `tick_s`, for as long as the job runs."""
        while True:
            await anyio.sleep(self.tick_s)
            now = time.monotonic()
            for watched in list(self._watched):
                self._check(watched, now)

    def _check(self, watched: Watched, now: float) -> None:
        progress = watched.progress()
        if progress != watched.seen or watched.paused:
            watched.seen, watched.since = progress, now
            return
        took = now - watched.since
        if took < self.timeout_s or watched.timed_out or watched.reported:
            return
        event = watched.current()
        where = f"{event.stream} {event.stream_id} (event {event.event_id}, {event.event_type})"
        if watched.cancellable and watched.task is not None:
            watched.timed_out = True
            watched.task.cancel(f"handler_timeout_s = {self.timeout_s:g}")
            self.on_timeout("cancelled")
            logger.error("handler %s timed out after %.1fs on %s (handler_timeout_s = %g): cancelled, a failure "
                         "of that event", self.handler, took, where, self.timeout_s)  # fmt: skip
        else:
            watched.reported = True
            self.overrunning += 1
            self.on_timeout("reported")
            logger.error("handler %s has run for %.1fs on %s, past handler_timeout_s = %g: a sync function in a "
                         "worker thread cannot be cancelled; its lane waits for it (state stalled)", self.handler,
                         took, where, self.timeout_s)  # fmt: skip
