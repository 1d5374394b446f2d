"""StreamReader: XRANGE batches from an exclusive start, one batch prefetched; then, to follow, XREAD BLOCK."""

from __future__ import annotations

import time
from functools import partial
from typing import Any, NamedTuple

from anyio.streams.memory import MemoryObjectSendStream

from replayd.codec import RawEntry
from replayd.connection import Client, retrying
from replayd.events import Id, format_id, parse_id
from replayd.metrics import Metrics


class Batch(NamedTuple):
    """Entries of one read, in stream order."""

    stream: str
    """The stream key."""
    entries: list[RawEntry]
    """Raw entries as hiredis returns them."""
    last_id: Id
    """The ID of the last entry: the position once the batch is handled."""
    replaying: bool
    """True when the entries are history being replayed, False for live events."""
    read_at: float
    """Monotonic time of the read (for pacing and latency)."""


class BatchSizer:
    """Adaptive batching: reads start small and double while lane batches finish well within `target_s`, and
    halve when one takes longer, between `minimum` and `maximum`. A slow handler then commits (and moves the
    checkpoint) every `target_s` or so, instead of holding a huge batch's checkpoint back."""

    def __init__(self, maximum: int, *, minimum: int, target_s: float) -> None:
        self.maximum = maximum
        self.minimum = min(minimum, maximum)
        self.target_s = target_s
        self.size = max(self.minimum, min(100, maximum))

    def observe(self, seconds: float) -> None:
        """Feed the handler time of one lane batch."""
        if seconds > self.target_s:
            self.size = max(self.minimum, self.size // 2)
        elif seconds < self.target_s / 4:
            self.size = min(self.maximum, self.size * 2)


class StreamReader:
    """Reads one stream in order and sends `Batch`es into a zero-buffer channel.

    The channel holds nothing, so while the consumer works on one batch the reader has the next one in hand:
    exactly one batch prefetched, and backpressure as soon as the consumer stops receiving.
    """

    def __init__(
        self, redis: Client, stream: str, *, sizer: BatchSizer, block_ms: int, budget_s: float, metrics: Metrics
    ) -> None:
        self.redis = redis
        self.stream = stream
        self.sizer = sizer
        self.block_ms = block_ms
        self.budget_s = budget_s
        self.metrics = metrics
        self.position: Id | None = None
        """The last ID read, or None before the first read."""

    async def run(self, send: MemoryObjectSendStream[Batch], *, after: Id, end: Id | None, replay_until: Id) -> None:
        """Read entries after `after` up to `end` (inclusive), or without end: catch up, then follow live.

        Entries up to `replay_until` are marked as replayed history, later ones as live.
        """
        async with send:
            pos = after
            if pos < replay_until:
                history_end = replay_until if end is None else min(end, replay_until)
                pos = await self._read_range(send, pos, history_end, True)
            if end is None or pos < end:
                pos = await self._read_range(send, pos, end, False)
            if end is None:
                await self._follow(send, pos)

    async def _read_range(self, send: MemoryObjectSendStream[Batch], pos: Id, end: Id | None, replaying: bool) -> Id:
        upper = format_id(end) if end is not None else "+"
        while end is None or pos < end:
            count = self.sizer.size
            command = ("XRANGE", self.stream, "(" + format_id(pos), upper, "COUNT", count)
            entries: list[Any] = await retrying(
                partial(self.redis.execute_command, *command),
                what="XRANGE",
                budget_s=self.budget_s,
                metrics=self.metrics,
            )
            if entries:
                pos = parse_id(entries[-1][0])
                self.position = pos
                await send.send(Batch(self.stream, entries, pos, replaying, time.monotonic()))
            if len(entries) < count:
                break
        return pos

    async def _follow(self, send: MemoryObjectSendStream[Batch], pos: Id) -> None:
        while True:
            command = (
                "XREAD",
                "COUNT",
                self.sizer.size,
                "BLOCK",
                self.block_ms,
                "STREAMS",
                self.stream,
                format_id(pos),
            )
            reply: list[Any] | None = await retrying(
                partial(self.redis.execute_command, *command),
                what="XREAD",
                budget_s=self.budget_s,
                metrics=self.metrics,
            )
            if not reply:
                continue
            entries = reply[0][1]
            pos = parse_id(entries[-1][0])
            self.position = pos
            await send.send(Batch(self.stream, entries, pos, False, time.monotonic()))


async def head(redis: Client, stream: str) -> Id | None:
    """The ID of the stream's last entry, or None when it is empty or missing."""
    entries: list[Any] = await redis.execute_command("XREVRANGE", stream, "+", "-", "COUNT", 1)
    return parse_id(entries[0][0]) if entries else None


async def redis_time_ms(redis: Client) -> int:
    """Redis's clock, the one that stamps entry IDs, in milliseconds."""
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000
