"""Handlers for the subprocess lifecycle tests (loaded by `replayd run` from its config)."""

from __future__ import annotations

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


def mark_seen(event: Event, ctx: Context) -> None:
    """Marks each event it handles, in the commit (`dlq retry` tests)."""
    ctx.tx.set(f"seen:{event.stream_id}", 1)
