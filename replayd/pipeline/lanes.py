"""Lanes: one task per partition, in stream order within it; a limiter caps how many run at once.

A lane takes the slices waiting in its bounded inbox (up to the current batch size), runs the handler on them,
then hands its `ctx.tx` writes and checkpoints to the committer and waits for the transaction. A handler whose
event code never awaits (sync `@on` methods: they only queue writes, they cannot read) needs no lanes: the router
calls it on each partition's slice in turn, and does not wait for the commit: it routes and handles the next read
batch while Redis commits the previous one, whose events are released when it is committed.
The reader side waits while `max_in_flight` events are routed but not committed, so memory stays bounded.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, contextmanager
from functools import partial
from typing import Any, NamedTuple

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from replayd.errors import DataError
from replayd.events import Event
from replayd.handlers import Context, Handler, Outcome
from replayd.pipeline.commit import CommitRequest, Mark, partition_field
from replayd.pipeline.source import BatchSizer

logger = logging.getLogger(__name__)


class Slice(NamedTuple):
    """The events of one read batch that belong to one partition."""

    events: list[Event]
    """In stream order."""
    mark: Mark | None
    """The read batch's mark, done when all its slices are committed (None on a piece cut off a slice's front)."""
    replaying: bool
    """History or live."""


class InFlight:
    """Counts events routed but not yet committed; `acquire` waits while the limit is reached."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0
        self._changed = anyio.Event()

    async def acquire(self, n: int) -> None:
        # one batch may overshoot the limit: a batch larger than the limit must still get through
        while self.count and self.count + n > self.limit:
            if self._changed.is_set():
                self._changed = anyio.Event()
            await self._changed.wait()
        self.count += n

    def release(self, n: int) -> None:
        self.count -= n
        self._changed.set()

    async def drained(self) -> None:
        """Wait until every routed event is committed."""
        while self.count:
            if self._changed.is_set():
                self._changed = anyio.Event()
            await self._changed.wait()


class Lanes:
    """P lanes, fed by one `Feed` per router; they close when every feed is closed."""

    def __init__(
        self,
        partitions: int,
        handler: Handler,
        new_context: Callable[[], Context],
        commit: Callable[[CommitRequest], Awaitable[None]],
        *,
        submit: Callable[[CommitRequest], Awaitable[None]],
        concurrency: int,
        sizer: BatchSizer,
        inflight: InFlight,
        on_outcome: Callable[[str, Outcome], None],
        on_batch: Callable[[float], None],
        stop: anyio.Event,
    ) -> None:
        self.handler = handler
        self.new_context = new_context
        self.commit = commit
        self.submit = submit
        """Queues a commit without waiting for it (for a handler that never awaits)."""
        # getattr: a Handler without `awaits` is taken to await
        self.inline = not getattr(handler, "awaits", True)
        """The handler never awaits: no lanes, each feed calls it (`Feed.deliver`) and does not wait for commits."""
        self.sizer = sizer
        self.inflight = inflight
        self.on_outcome = on_outcome
        """Called with each slice's outcome."""
        self.on_batch = on_batch
        """Called with the handler time of each lane batch (of each read batch, inline)."""
        # a limiter that can never be full is skipped: every lane batch would pay for it for nothing
        self.limiter: AbstractAsyncContextManager[Any] = (
            anyio.CapacityLimiter(concurrency) if concurrency < partitions else _Unlimited()
        )
        self.stop = stop
        """Set when a handler raised StopReplay: the engine stops reading."""
        lanes = 0 if self.inline else partitions
        pairs = [anyio.create_memory_object_stream[Slice](max_buffer_size=16) for _ in range(lanes)]
        self._inboxes: list[MemoryObjectSendStream[Slice]] = [send for send, _ in pairs]
        self._outboxes: list[MemoryObjectReceiveStream[Slice]] = [receive for _, receive in pairs]
        self._halted: set[int] = set()
        """Partitions whose handler asked to stop or failed for good: the job is ending."""

    def feed(self) -> Feed:
        """A router's way in: its own handles on the lanes' inboxes (the lanes end when every feed is closed), or,
        for a handler that never awaits, the handler itself."""
        return Feed([inbox.clone() for inbox in self._inboxes], self._process if self.inline else None)

    async def run(self) -> None:
        for inbox in self._inboxes:  # only the routers' clones keep the inboxes open now
            inbox.close()
        async with anyio.create_task_group() as tg:
            for partition, outbox in enumerate(self._outboxes):
                tg.start_soon(self._lane, partition, outbox)

    async def _lane(self, partition: int, outbox: MemoryObjectReceiveStream[Slice]) -> None:
        async with outbox:
            async for first in outbox:
                slices = [first]
                size = len(first.events)
                while size < self.sizer.size:
                    try:
                        more = outbox.receive_nowait()
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                    slices.append(more)
                    size += len(more.events)
                for chunk in _chunks(slices, self.sizer):
                    await self._process([(partition, piece) for piece in chunk])
                    if partition in self._halted:
                        return

    async def _process(self, work: list[tuple[int, Slice]]) -> None:
        """Handle and commit one lane batch, or a read batch's slices of a handler that never awaits. A partition
        whose handler asked to stop, or failed for good under the `stop` policy, is halted: its later events are
        left for the next run."""
        ctx = self.new_context()
        checkpoints: dict[str, str] = {}
        done: list[Mark] = []
        stopped = False
        failure: Event | None = None
        async with self.limiter:
            began = time.monotonic()
            for partition, piece in work:
                if partition in self._halted:
                    continue
                ctx.replaying = piece.replaying
                outcome = await self.handler.handle_batch(piece.events, ctx)
                self.on_outcome(piece.events[0].stream, outcome)
                where = partition_field(piece.events[0].stream, partition)
                if outcome.failed_at is not None:  # policy `stop`: commit what came before, then fail the job
                    if failure is None:
                        failure = piece.events[outcome.failed_at]
                    if outcome.failed_at:
                        checkpoints[where] = piece.events[outcome.failed_at - 1].stream_id
                    self._halted.add(partition)
                elif outcome.stopped_at is not None:
                    checkpoints[where] = piece.events[outcome.stopped_at].stream_id
                    self._halted.add(partition)
                    stopped = True
                else:
                    checkpoints[where] = piece.events[-1].stream_id
                    if piece.mark is not None:
                        done.append(piece.mark)
            took = time.monotonic() - began
        self.sizer.observe(took)
        self.on_batch(took)
        events = sum(len(piece.events) for _, piece in work)
        await self._commit(CommitRequest(ctx.tx.commands, checkpoints, done), events, failure, stopped)

    async def _commit(self, request: CommitRequest, events: int, failure: Event | None, stopped: bool) -> None:
        if self.inline and failure is None and not stopped:  # released once it is committed
            await self.submit(request._replace(then=partial(self.inflight.release, events)))
            return
        await self.commit(request)
        self.inflight.release(events)
        if failure is not None:
            raise DataError(
                f"handler failed for good on {failure.stream} {failure.stream_id} (event {failure.event_id}, "
                f"{failure.event_type}); on_poison = stop: the work before it is committed "
                "(on_poison = 'dead-letter' or 'skip' goes on)"
            )
        if stopped:
            logger.info("handler asked to stop at %s", request.checkpoints)
            self.stop.set()


class Feed:
    """One router's handles on the lanes' inboxes, or (`handle`) the way to call a handler that never awaits."""

    def __init__(
        self,
        inboxes: list[MemoryObjectSendStream[Slice]],
        handle: Callable[[list[tuple[int, Slice]]], Awaitable[None]] | None = None,
    ) -> None:
        self._inboxes = inboxes
        self._handle = handle

    @property
    def inline(self) -> bool:
        """Whether the handler is called right here (it never awaits) rather than by lanes."""
        return self._handle is not None

    async def deliver(self, parts: dict[int, list[Event]], mark: Mark, replaying: bool) -> None:
        """Hand a read batch's slices to their lanes, all before yielding: the lanes then run together and their
        commits meet in the committer's queue, so they share one transaction (one per read batch when handlers
        are quick) instead of each lane committing alone. Waits only while an inbox is full.

        A handler that never awaits is called right here instead, partition after partition, and the read batch
        commits as one request: lanes could not run it concurrently anyway, and waking a lane costs more than
        handling a slice of 60 events. Such a call yields only in a retry's backoff or while the committer's
        queue is full: a stop that lands there leaves the batch uncommitted, for the next run."""
        if self._handle is not None:
            await self._handle([(p, Slice(events, mark, replaying)) for p, events in parts.items()])
            return
        for partition, events in parts.items():
            piece = Slice(events, mark, replaying)
            inbox = self._inboxes[partition]
            try:
                try:
                    inbox.send_nowait(piece)
                except anyio.WouldBlock:
                    await inbox.send(piece)
            except anyio.BrokenResourceError:  # that lane stopped (StopReplay): the job is ending
                return

    def close(self) -> None:
        for inbox in self._inboxes:
            inbox.close()


YOUNG_THRESHOLD = 100_000
"""Allocations between two collections of the collector's young generation while a job runs (Python: 700)."""


class _Collector:
    jobs = 0
    """Jobs whose pipeline runs now."""
    saved = gc.get_threshold()
    """The process's own thresholds, restored when the last of them stops."""


@contextmanager
def fewer_collections() -> Iterator[None]:
    """While any job's pipeline runs, raise the garbage collector's young-generation threshold.

    Every entry read allocates a few container objects (hiredis's lists, the event) that live until their
    batch commits: with the default threshold the collector examines the same in-flight batches over and over
    and promotes them, so full collections (which scan the whole heap) come often; that was a third of a no-op
    replay's CPU time. At 100,000 (not 10,000) a job's in-flight events (up to `max_in_flight` = 20,000, a few
    containers each) mostly die young: the I/O-bound benchmark spent 30-50 ms of its 0.6 s in the collector,
    now 3-4 ms. Nothing leaks: these objects are freed by reference counting, only cycles wait a little longer.
    """
    if _Collector.jobs == 0:
        _Collector.saved = young, older, oldest = gc.get_threshold()
        gc.set_threshold(max(young, YOUNG_THRESHOLD), older, oldest)
    _Collector.jobs += 1
    try:
        yield
    finally:
        _Collector.jobs -= 1
        if _Collector.jobs == 0:
            gc.set_threshold(*_Collector.saved)


class _Unlimited:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc_info: object) -> None:
        return None


def _chunks(slices: list[Slice], sizer: BatchSizer) -> Iterator[list[Slice]]:
    """Lane batches of at most the current batch size (read afresh for each), cutting slices where needed.

    Only the piece that ends a slice carries its mark: a read batch is done when all of it is committed.
    """
    chunk: list[Slice] = []
    room = sizer.size
    for whole in slices:
        piece = whole
        while len(piece.events) > room:
            chunk.append(Slice(piece.events[:room], None, piece.replaying))
            yield chunk
            piece = piece._replace(events=piece.events[room:])
            chunk, room = [], sizer.size
        chunk.append(piece)
        room -= len(piece.events)
        if room <= 0:
            yield chunk
            chunk, room = [], sizer.size
    if chunk:
        yield chunk
