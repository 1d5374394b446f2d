"""What a running job watches beside its data path: each stream's head and lag (for the metrics), Redis's eviction
policy after each reconnect, and the projection's retired versions (to sweep them). The engine runs them in its
task group; Redis being away is waited out here, never a reason to stop the job."""

from __future__ import annotations

import logging
from typing import Any

import anyio

from replayd.connection import Client, check_eviction_policy, connects, is_retriable
from replayd.events import ZERO, format_id
from replayd.jobs.progress import Stats
from replayd.jobs.versions import Versions
from replayd.ops.metrics import JobView
from replayd.pipeline.source import BatchSizer, head

logger = logging.getLogger(__name__)


async def watch_heads(redis: Client, stats: Stats, view: JobView, sizer: BatchSizer, interval_s: float = 5.0) -> None:
    """Keep each stream's head (and, when small, the exact entry lag) fresh for the metrics. The first look
    waits: the plan has just read the heads, and the first reads of the job are the ones it would delay."""
    while True:
        await anyio.sleep(interval_s)
        for stream in stats.streams:
            with anyio.move_on_after(interval_s):
                try:
                    view.head[stream] = await head(redis, stream)
                    await _count_lag(redis, stream, stats, view, min(1000, sizer.fit))
                except Exception as exc:
                    if not is_retriable(exc):
                        raise
                    logger.debug("head of %s not refreshed: %s", stream, exc)


async def _count_lag(redis: Client, stream: str, stats: Stats, view: JobView, limit: int) -> None:
    """Entries after the checkpoint (lag) and still kept before it (retention margin, the trim risk).

    Each is one XRANGE bounded by `limit`: exact when small, which is when it matters (a job near the
    head; a checkpoint near the trim point); beyond `limit` the gauge is left out rather than guessed.
    XRANGE returns whole entries, so the limit (at most a read's) also keeps each within `max_batch_bytes`.
    """
    position = format_id(stats.position.get(stream, ZERO))
    for gauge, low, high in ((view.lag_entries, "(" + position, "+"), (view.retention, "-", position)):
        entries: list[Any] = await redis.execute_command("XRANGE", stream, low, high, "COUNT", limit + 1)
        if len(entries) <= limit:
            gauge[stream] = len(entries)
        else:
            gauge.pop(stream, None)


async def watch_eviction_policy(redis: Client, *, allow: bool, every_s: float = 1.0) -> None:
    """Check Redis's maxmemory-policy again after each reconnect (a restarted or promoted Redis may run another:
    exit 78 if it may evict the checkpoints)."""
    seen = connects()
    while True:
        await anyio.sleep(every_s)
        if connects() == seen:
            continue
        try:
            await check_eviction_policy(redis, allow=allow)
        except Exception as exc:
            if not is_retriable(exc):
                raise
            continue
        seen = connects()


async def sweep_retired(versions: Versions, interval_s: float = 30.0) -> None:
    """Delete the projection's replaced versions once their retention passes (if the rebuild did not wait)."""
    while True:
        try:
            await versions.sweep()
        except Exception as exc:
            if not is_retriable(exc):
                raise
        await anyio.sleep(interval_s)
