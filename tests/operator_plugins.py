"""Handlers that `replayd dlq retry` subprocesses load in the operator-fencing tests."""

from __future__ import annotations

import anyio

from replayd.events import Event
from replayd.handlers import Context


class GatedApplied:
    """Counts each event it applies (in `applied`), once the key `gate` exists; sets `waiting` while it waits, so
    a test knows the command is under way and can hold it there."""

    name = "gated"

    async def handle(self, event: Event, ctx: Context) -> None:
        while not await ctx.redis.exists("gate"):
            await ctx.redis.set("waiting", 1)
            await anyio.sleep(0.01)
        ctx.tx.hincrby("applied", event.stream_id, 1)
