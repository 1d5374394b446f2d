"""StreamReader: XRANGE batches from an exclusive start, one batch prefetched; then, to follow, XREAD BLOCK."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from functools import partial
from itertools import chain
from operator import itemgetter
from typing import Any, NamedTuple

from anyio.streams.memory import MemoryObjectSendStream
from redis.exceptions import ResponseError

from replayd.connection import Client, OwnConnection, connects, count_received, retrying, text
from replayd.errors import DataError
from replayd.events import Id, Poison, format_id, parse_id
from replayd.ops.metrics import Metrics
from replayd.pipeline.codec import RawEntry


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
    oversized: tuple[Poison, ...] = ()
    """Entries above `max_entry_bytes`, taken out of `entries`: poison, under the job's policy."""


IN_FLIGHT_READS = 4
"""Events in flight are bounded by what this many reads of `max_batch_bytes` hold (as well as `max_in_flight`)."""

DECODE_BUDGET_S = 0.00075
"""How long decoding and routing one read may take when handlers await: reads for lanes are sized to it. The loop
receives, parses, decodes and routes a read in a few steps that never yield, and every awaiting handler's wake-up
(its I/O reply, its timer) waits behind each: reads of 1,000 entries routed by a field of `data` held the loop for
3-4 ms at a time. At this budget (about 250 entries there) 64 lanes sleeping 1 ms per event went from 0.91 to 0.97
of the benchmark's floor (8 paired rounds; 0.5 ms as well but with more spread)."""


class BatchSizer:
    """Adaptive batching: reads start small and double while lane batches finish well within `target_s`, and
    halve when one takes longer, between `minimum` and `maximum`. A slow handler then commits (and moves the
    checkpoint) every `target_s` or so, instead of holding a huge batch's checkpoint back.

    Reads are byte-aware too: `fit` is how many entries of the size last read fit in `max_bytes`; the size never
    exceeds it (not even `minimum`: ten 20 MB entries must not make one 200 MB reply), and the job keeps at most
    `IN_FLIGHT_READS` times that many events in flight. For handlers that await, reads are also kept to what
    decodes within `DECODE_BUDGET_S` (`read_size`); lane batches may still gather several reads.
    """

    def __init__(self, maximum: int, *, minimum: int, target_s: float, max_bytes: int = 1 << 62) -> None:
        self.maximum = maximum
        self.minimum = min(minimum, maximum)
        self.target_s = target_s
        self.max_bytes = max_bytes
        self.fit = 1
        """Entries of the size last read that fit in `max_bytes` (1 until a read tells)."""
        self.cap = maximum
        self.size = max(self.minimum, min(100, maximum))
        self.read_cap: int | None = None
        """Entries per read, for handlers that await (`observe_decode`); None: no limit."""

    @property
    def read_size(self) -> int:
        """Entries to ask for in the next read."""
        return self.size if self.read_cap is None else min(self.size, self.read_cap)

    def observe_decode(self, entries: int, seconds: float) -> None:
        """Feed how long a read of `entries` took to decode and route, for handlers that await: later reads take
        about what decodes in `DECODE_BUDGET_S` (averaged over a few reads: one read's timing is noisy)."""
        if entries and seconds > 0:  # a read whose every entry was too big to decode tells nothing
            fit = int(entries * DECODE_BUDGET_S / seconds)
            fit = fit if self.read_cap is None else (3 * self.read_cap + fit) // 4
            self.read_cap = max(self.minimum, min(self.maximum, fit))

    def observe(self, seconds: float) -> None:
        """Feed the handler time of one lane batch."""
        if seconds > self.target_s:
            self.size = max(min(self.minimum, self.cap), self.size // 2)
        elif seconds < self.target_s / 4:
            self.size = min(self.cap, self.size * 2)

    def observe_reply(self, entries: int, size: int) -> None:
        """Feed the size in bytes of a read of `entries` entries: the next reads fit `max_bytes` at that rate."""
        if entries:
            self.fit = max(1, self.max_bytes * entries // max(size, 1))
            self.cap = min(self.maximum, self.fit)
            self.size = min(self.size, self.cap)


class StreamReader:
    """Reads one stream in order and sends `Batch`es into a zero-buffer channel.

    The channel holds nothing, so while the consumer works on one batch the reader has the next one in hand:
    exactly one batch prefetched, and backpressure as soon as the consumer stops receiving.

    Each read asks for one entry more than it delivers and keeps that entry's ID: the next read must start with
    it. When it does not, entries after the position were removed before they were read (a trim overtaking
    the reader, fault matrix T13), and `on_gap(position)` decides, from XINFO STREAM, whether that lost anything.
    So does a read during which a connection was made (Redis restarted from a torn AOF, or a failover to a
    lagging replica, may have taken the stream back behind the position: T9/T10). Neither costs anything per
    event, nor a command per batch.
    """

    def __init__(
        self,
        redis: Client,
        stream: str,
        *,
        sizer: BatchSizer,
        block_ms: int,
        budget_s: float,
        metrics: Metrics,
        on_gap: Callable[[Id], Awaitable[bool]] | None = None,
        max_entry_bytes: int = 1 << 62,
    ) -> None:
        self.redis = redis
        self._own = OwnConnection(redis)
        self.stream = stream
        self.sizer = sizer
        self.block_ms = block_ms
        self.budget_s = budget_s
        self.metrics = metrics
        self.on_gap = on_gap
        self.max_entry_bytes = max_entry_bytes
        self.position: Id | None = None
        """The last ID read, or None before the first read."""
        self._successor: bytes | None = None
        """The ID the previous read saw after its last delivered entry: where the next read must start."""
        self._reported: Id | None = None
        """The position a gap was last found after: the next read may find the same gap again."""
        self._received = [0]
        """Bytes this reader's task has read from Redis (`count_received`, set when it runs)."""

    async def run(self, send: MemoryObjectSendStream[Batch], *, after: Id, end: Id | None, replay_until: Id) -> None:
        """Read entries after `after` up to `end` (inclusive), or without end: catch up, then follow live.

        Entries up to `replay_until` are marked as replayed history, later ones as live.
        """
        self._received = count_received()
        async with send, self._own:
            pos = after
            await self._probe(pos)
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
            count = self.sizer.read_size
            command = ("XRANGE", self.stream, "(" + format_id(pos), upper, "COUNT", count + 1)
            reply, connected, size = await self._call("XRANGE", command)
            entries = await self._take(reply, connected, count, pos)
            if entries:
                pos = await self._deliver(send, entries, size, replaying)
            if self._successor is None:  # nothing more when it was read
                break
        return pos

    async def _follow(self, send: MemoryObjectSendStream[Batch], pos: Id) -> None:
        while True:
            count = self.sizer.read_size
            command = ("XREAD", "COUNT", count + 1, "BLOCK", self.block_ms, "STREAMS", self.stream, format_id(pos))
            reply, connected, size = await self._call("XREAD", command)
            entries = await self._take(reply[0][1] if reply else [], connected, count, pos)
            if entries:
                pos = await self._deliver(send, entries, size, False)

    async def _probe(self, pos: Id) -> None:
        """Size the first read by one entry: a stream of 20 MB entries must not be asked for 100 at once."""
        entries, _, size = await self._call("XRANGE", ("XRANGE", self.stream, "(" + format_id(pos), "+", "COUNT", 1))
        self.sizer.observe_reply(len(entries), size)

    async def _call(self, what: str, command: tuple[Any, ...]) -> tuple[Any, bool, int]:
        """The reply, whether a connection was made meanwhile (Redis may have come back holding less), and the
        reply's size in bytes."""
        epoch, received = connects(), self._received[0]
        call = partial(self._own.call, *command)
        reply = await retrying(call, what=what, budget_s=self.budget_s, metrics=self.metrics)
        size = self._received[0] - received
        if not size and reply:  # a client whose connections do not count (none of `create_redis`'s)
            size = reply_bytes(reply if what == "XRANGE" else reply[0][1])
        return reply, connects() != epoch, size

    async def _take(self, entries: list[Any], connected: bool, count: int, pos: Id) -> list[Any]:
        """The entries to deliver: at most `count`; the one past them is kept as the next read's first."""
        if self._successor is not None and (not entries or entries[0][0] != self._successor):
            await self._recheck(pos)
        self._successor = entries.pop()[0] if len(entries) > count else None
        if connected and self.position is not None:  # from where the next read starts: a gap is reported once
            await self._recheck(parse_id(entries[-1][0]) if entries else pos)
        return entries

    async def _recheck(self, pos: Id) -> None:
        """Let `on_gap` look at the stream after `pos` (through retries: Redis may be failing right now)."""
        if self.on_gap is None or pos == self._reported:
            return
        call = partial(self.on_gap, pos)
        if await retrying(call, what="XINFO", budget_s=self.budget_s, metrics=self.metrics):
            self._reported = pos

    async def _deliver(self, send: MemoryObjectSendStream[Batch], entries: list[Any], size: int, replaying: bool) -> Id:
        pos = parse_id(entries[-1][0])
        self.position = pos
        self.sizer.observe_reply(len(entries), size)
        oversized = self._oversized(entries) if size > self.max_entry_bytes else ()
        await send.send(Batch(self.stream, entries, pos, replaying, time.monotonic(), oversized))
        return pos

    def _oversized(self, entries: list[Any]) -> tuple[Poison, ...]:
        """Take the entries above `max_entry_bytes` out of `entries` (in place); return them as poison."""
        found: list[Poison] = []
        for index in range(len(entries) - 1, -1, -1):
            raw_id, flat = entries[index]
            size = sum(map(len, flat or ()))
            if size > self.max_entry_bytes:
                del entries[index]
                shape = {_text(flat[i]): f"{len(flat[i + 1])} bytes" for i in range(0, len(flat), 2)}
                error = f"entry of {size} bytes exceeds max_entry_bytes ({self.max_entry_bytes})"
                found.append(Poison(self.stream, raw_id.decode(), shape, error))
        return tuple(reversed(found))


_fields = itemgetter(1)


def reply_bytes(entries: list[Any]) -> int:
    """Bytes of the IDs' fields and values in a stream reply (what it costs to hold), in C loops."""
    try:
        return sum(map(len, chain.from_iterable(map(_fields, entries))))
    except TypeError:  # a deleted entry's nil fields (a pending-entries read): counted as empty
        return sum(sum(map(len, flat or ())) for _, flat in entries)


def _text(value: bytes) -> str:
    return value.decode(errors="replace")


async def head(redis: Client, stream: str) -> Id | None:
    """The ID of the stream's last entry, or None when it is empty or missing; DataError when the key holds
    another type (a job is started on it, and it is looked at again every few seconds)."""
    last = await last_entry(redis, stream)
    return parse_id(last[0]) if last is not None else None


async def last_entry(redis: Client, stream: str) -> Any:
    """The stream's last entry as read (`[id, [field, value, ...]]`), or None when it is empty or missing;
    DataError when the key holds another type."""
    try:
        entries: list[Any] = await redis.execute_command("XREVRANGE", stream, "+", "-", "COUNT", 1)
    except ResponseError as exc:
        if not str(exc).startswith("WRONGTYPE"):
            raise
        kind = text(await redis.type(stream))
        raise DataError(f"key {stream} holds a {kind}, not a stream: check the job's streams") from None
    return entries[0] if entries else None


async def redis_time_ms(redis: Client) -> int:
    """Redis's clock, the one that stamps entry IDs, in milliseconds."""
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000
