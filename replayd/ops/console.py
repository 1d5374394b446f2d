"""Terminal output of one-shot commands: a progress bar on stderr (only on a terminal) and summary lines."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Awaitable

import anyio

from replayd.events import display_id, format_id
from replayd.jobs.progress import Stats


async def with_progress(stats: Stats, work: Awaitable[Stats]) -> Stats:
    """Await `work`, drawing a progress bar of `stats` on stderr when it is a terminal (NO_COLOR-safe: no colour)."""
    if not sys.stderr.isatty():
        return await work
    handlers, clear = logging.getLogger().handlers, _ClearLine()
    for handler in handlers:
        handler.addFilter(clear)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_draw, stats)
            result = await work
            tg.cancel_scope.cancel()
    finally:
        for handler in handlers:
            handler.removeFilter(clear)
        sys.stderr.write(CLEAR)
    return result


CLEAR = "\r\033[K"
"""Back to the start of the line, and erase it."""


class _ClearLine(logging.Filter):
    """Erases the bar before a log line is written, so the line starts on its own (the bar is redrawn below it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        sys.stderr.write(CLEAR)
        return True


async def _draw(stats: Stats) -> None:
    started = time.monotonic()
    first: tuple[float, float] | None = None
    """When the bar first saw the run under way, and its percent then: where the time left is measured from."""
    while True:
        await anyio.sleep(0.2)
        now, percent = time.monotonic(), stats.percent()
        first = first or ((now, percent) if stats.position else None)
        sys.stderr.write(CLEAR + bar(percent, stats.total, now - started, stats.failed, _left(first, now, percent)))
        sys.stderr.flush()


def bar(percent: float, events: int, elapsed: float, failed: int, left: float | None) -> str:
    """`[#####.....]  42.0%  12,345 events  6,000/s  failed 0  ETA 1m05s`."""
    filled = int(percent / 100 * 30)
    return (
        f"[{'#' * filled}{'.' * (30 - filled)}] {percent:5.1f}%  {events:,} events  "
        f"{events / max(elapsed, 1e-9):,.0f}/s  failed {failed:,}  ETA {_duration(left)}"
    )


def _left(first: tuple[float, float] | None, now: float, percent: float) -> float | None:
    """Seconds left at the pace since `first`, or None before there is a pace to go by."""
    if first is None or percent <= first[1]:
        return None
    return (now - first[0]) * (100.0 - percent) / (percent - first[1])


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "--"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def summary(verb: str, stats: Stats) -> str:
    """One line: what was done, how fast, and where each stream's checkpoint now is."""
    elapsed = max((stats.completed_at or time.time()) - stats.started_at, 1e-9)
    positions = ", ".join(f"{s} at {display_id(format_id(p))}" for s, p in stats.position.items())
    return (
        f"{verb} {stats.total:,} events in {elapsed:.1f}s ({stats.total / elapsed:,.0f}/s): "
        f"{stats.processed:,} processed, {stats.skipped:,} skipped, {stats.failed:,} failed; {positions}"
    )
