"""Handlers for the subprocess lifecycle tests (loaded by `replayd run` from its config)."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import anyio

from replayd import Context, Event, Outcome


class SlowRecorder:
    """Records every event ID in a set and a list, in the commit's transaction; sleeps per batch."""

    name = "slow_recorder"
    partition_by = None
    event_types = None

    async def handle_batch(self, events: Sequence[Event], ctx: Context) -> Outcome:
        await anyio.sleep(0.05)
        for event in events:
            ctx.tx.sadd("eff:set", event.stream_id)
            ctx.tx.rpush("eff:log", event.stream_id)
        return Outcome(handled=len(events))


def blocking(event: Event) -> None:
    """A sync handler that is slow: it runs in a worker thread."""
    time.sleep(0.5)


def stuck(event: Event) -> None:
    """A sync handler that never returns (a call to a dead dependency without a time-out)."""
    time.sleep(3600)


def mark_seen(event: Event, ctx: Context) -> None:
    """Marks each event it handles, in the commit (`dlq retry` tests)."""
    ctx.tx.set(f"seen:{event.stream_id}", 1)


def mark_seen_with_a_bad_value(event: Event, ctx: Context) -> None:
    """`mark_seen`, and a command holding a value no Redis command takes (a handler's bug)."""
    mark_seen(event, ctx)
    ctx.tx.commands.append(("SET", f"bad:{event.stream_id}", None))  # type: ignore[arg-type]  # past Tx's checks


def seen(event: Event, ctx: Context) -> None:
    """Marks each event it handles in its projection's namespace (`projection:{seen}:<id>` on a cluster, in the
    slot of the job `seen`: `dlq retry` on a Redis Cluster)."""
    ctx.tx.set(ctx.key(event.stream_id), 1)


class PeakRss:
    """Does nothing per event; at shutdown writes the process's peak RSS (VmHWM, /proc/self/status) to the file
    named by REPLAYD_TEST_RSS_PATH."""

    name = "peak_rss"
    partition_by = None
    event_types = None

    async def handle_batch(self, events: Sequence[Event], ctx: Context) -> Outcome:
        return Outcome(handled=len(events))

    async def shutdown(self, ctx: Context) -> None:
        status = await anyio.Path("/proc/self/status").read_text()
        peak = next(line.split(":", 1)[1].strip() for line in status.splitlines() if line.startswith("VmHWM"))
        await anyio.Path(os.environ["REPLAYD_TEST_RSS_PATH"]).write_text(peak)


async def reads_through_pool(event: Event, ctx: Context) -> None:
    """Reads through the job's (small) pool, then marks the event: 8 lanes compete for the connections."""
    await ctx.redis.get("pool:probe")
    await anyio.sleep(0.01)
    ctx.tx.sadd("pool:seen", event.stream_id)
