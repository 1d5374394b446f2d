"""Terminal output of one-shot commands: a progress bar on stderr (only on a terminal) and summary lines."""

from __future__ import annotations

import sys
import time
from collections.abc import Awaitable

import anyio

from replayd.events import format_id
from replayd.jobs.progress import Stats


async def with_progress(stats: Stats, work: Awaitable[Stats]) -> Stats:
    """Await `work`, drawing a progress bar of `stats` on stderr when it is a terminal (NO_COLOR-safe: no colour)."""
    if not sys.stderr.isatty():
        return await work
    async with anyio.create_task_group() as tg:
        tg.start_soon(_draw, stats)
        result = await work
        tg.cancel_scope.cancel()
    sys.stderr.write("\r\033[K")
    return result


async def _draw(stats: Stats) -> None:
    started = time.monotonic()
    while True:
        await anyio.sleep(0.2)
        percent = stats.percent()
        filled = int(percent / 100 * 30)
        rate = stats.total / max(time.monotonic() - started, 1e-9)
        sys.stderr.write(
            f"\r\033[K[{'#' * filled}{'.' * (30 - filled)}] {percent:5.1f}%  {stats.total:,} events  "
            f"{rate:,.0f}/s  failed {stats.failed:,}"
        )
        sys.stderr.flush()


def summary(verb: str, stats: Stats) -> str:
    """One line: what was done, how fast, and where each stream's checkpoint now is."""
    elapsed = max((stats.completed_at or time.time()) - stats.started_at, 1e-9)
    positions = ", ".join(f"{s} at {format_id(p)}" for s, p in stats.position.items())
    return (
        f"{verb} {stats.total:,} events in {elapsed:.1f}s ({stats.total / elapsed:,.0f}/s): "
        f"{stats.processed:,} processed, {stats.skipped:,} skipped, {stats.failed:,} failed; {positions}"
    )
