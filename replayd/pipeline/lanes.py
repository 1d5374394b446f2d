"""Lanes: one task per partition, in stream order within it; a limiter caps how many run at once.

A lane takes the slices waiting in its bounded inbox (up to the current batch size), runs the handler on them,
then hands its `ctx.tx` writes and checkpoints to the committer and waits for the transaction. A handler whose
event code never awaits (sync `@on` methods: they only queue writes, they cannot read) needs no lanes: the router
calls it on each partition's slice in turn, and does not wait for the commit: it routes and handles the next read
batch while Redis commits the previous one, whose events are released when it is committed. A handler that may
await is called so too while its calls never suspend (each read batch once the previous one is committed, as a lane
would): from its first call that suspends, the lanes run it.
The reader side waits while `max_in_flight` events are routed but not committed, so memory stays bounded.

A lane batch's writes are cut, on event boundaries, into commits of at most `max_commands` commands and
`max_bytes` bytes (each with the checkpoints of its whole events; only the last one completes the read batch's
mark), and a write Redis would refuse is blamed on the event that queued it: that event takes the poison path
(retries, then `on_poison`) and the other events commit. An event whose own writes exceed one commit is poison.
"""

from __future__ import annotations

import bisect
import gc
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Generator, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, contextmanager
from functools import partial
from types import CoroutineType
from typing import Any, NamedTuple

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from replayd.errors import DataError, RefusedWrite
from replayd.events import Event, parse_id
from replayd.handlers import Bounds, Context, FailurePolicy, Handler, Outcome, Tx
from replayd.pipeline.codec import decode_data
from replayd.pipeline.commit import (
    MAX_BYTES,
    MAX_COMMANDS,
    CommitRequest,
    Mark,
    Resolution,
    Unit,
    partition_field,
    per_event,
    shown,
    size_of,
)
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
        max_commands: int = MAX_COMMANDS,
        max_bytes: int = MAX_BYTES,
    ) -> None:
        self.handler = handler
        self.new_context = new_context
        self.commit = commit
        self.submit = submit
        """Queues a commit without waiting for it (for a handler that never awaits)."""
        # getattr: a Handler without `awaits` is taken to await
        self.inline = not getattr(handler, "awaits", True)
        """The handler never awaits: no lanes, each feed calls it (`Feed.deliver`) and does not wait for commits."""
        self.trying = not self.inline
        """A handler that may await is called inline too, until one of its calls suspends (most async handlers
        never do: waking 16 lanes per read batch cost about 0.5 us an event); from then on the lanes run it."""
        self._committed: anyio.Event | None = None
        """Set when the last read batch handled while trying is committed: an `async def` handler reads what its
        partition's previous batch wrote, as in a lane."""
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
        self.max_commands = max_commands
        self.max_bytes = max_bytes
        """What one commit carries at most: lane batches are cut into commits of these bounds."""
        self._refusals: dict[tuple[str, str], int] = {}
        """Attempts of events whose writes Redis would refuse, while they are retried."""
        self._late_letters: list[str] = []
        """Dead letters made at commit time that park their key (their entry IDs): the requests made before each
        are screened again, so that the later events of its key park behind it."""

    @property
    def calls_inline(self) -> bool:
        """Whether the handler is called by the feeds for now (it never awaits, or it is being tried)."""
        return self.inline or self.trying

    def feed(self) -> Feed:
        """A router's way in: its own handles on the lanes' inboxes (the lanes end when every feed is closed), and
        the handler itself while it is called inline."""
        return Feed([inbox.clone() for inbox in self._inboxes], self)

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
                    await self._process([(partition, piece) for piece in chunk], inline=False)
                    if partition in self._halted:
                        return

    async def handle_inline(self, work: list[tuple[int, Slice]]) -> list[tuple[int, Slice]]:
        """A read batch's slices handled and committed right here (`inline`, or `trying`); returns those left to
        the lanes (all of them once a call of the handler has suspended)."""
        if not self.calls_inline:
            return work
        if self.trying and self._committed is not None and not self._committed.is_set():
            await self._committed.wait()
        left: list[tuple[int, Slice]] = []
        await self._process(work, inline=True, left=left)
        return left

    async def _process(
        self, work: list[tuple[int, Slice]], *, inline: bool, left: list[tuple[int, Slice]] | None = None
    ) -> None:
        """Handle and commit one lane batch, or (`inline`) a read batch's slices, putting in `left` those that the
        lanes must take. A partition whose handler asked to stop, or failed for good under the `stop` policy, is
        halted: its later events are left for the next run."""
        ctx = self.new_context()
        checkpoints: dict[str, str] = {}
        done: list[Mark] = []
        units: list[Unit] = []
        stopped = False
        failure: Event | None = None
        async with self.limiter:
            began = time.monotonic()
            async for partition, piece, outcome, bounds in self._handled(work, ctx, left):
                self.on_outcome(piece.events[0].stream, outcome)
                where = partition_field(piece.events[0].stream, partition)
                _add_units(units, ctx.tx, bounds, piece.events, where)
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
        parks = len(self._late_letters)
        request = CommitRequest(ctx.tx.commands, checkpoints, done, units=tuple(units), parks=parks)
        events -= sum(len(piece.events) for _, piece in left or ())
        await self._commit(request, events, failure, stopped, inline=inline)

    async def _handled(
        self, work: list[tuple[int, Slice]], ctx: Context, left: list[tuple[int, Slice]] | None
    ) -> AsyncIterator[tuple[int, Slice, Outcome, Bounds]]:
        """The handler on each slice of `work` whose partition is not halted (checked again after each one), with
        its outcome and where its writes lie in `ctx.tx`. A handler that takes a read batch's slices at once
        (`handle_slices`: a sync function, one thread call rather than one per slice) gets them so when inline.
        Trying inline (`left` given), the slices after one whose call suspended go to `left`."""
        tx, slices = ctx.tx, getattr(self.handler, "handle_slices", None)
        if slices is not None and self.inline:
            live = [(partition, piece) for partition, piece in work if partition not in self._halted]
            for _partition, piece in live:
                decode_data(piece.events)
            if live:
                ctx.replaying = live[0][1].replaying  # inline, `work` is one read batch: history or live throughout
            handled = await slices([piece.events for _partition, piece in live], ctx)
            for (partition, piece), (outcome, bounds) in zip(live, handled, strict=True):
                yield partition, piece, outcome, bounds
            return
        for at, (partition, piece) in enumerate(work):
            if left is not None and not self.calls_inline:  # a call suspended: the lanes take the rest
                left += work[at:]
                return
            if partition in self._halted:
                continue
            ctx.replaying = piece.replaying
            before = len(tx.owners), len(tx.commands)
            decode_data(piece.events)
            if left is not None and self.trying:
                outcome = await self._tried(piece.events, ctx)
            else:
                outcome = await self.handler.handle_batch(piece.events, ctx)
            yield partition, piece, outcome, (before, (len(tx.owners), len(tx.commands)))

    async def _tried(self, events: list[Event], ctx: Context) -> Outcome:
        """The handler on a slice, right here: its coroutine is run with `send` and, if it suspends, awaited on to
        its end, and the trying is over (the lanes take the rest)."""
        call = self.handler.handle_batch(events, ctx)
        if type(call) is not CoroutineType:  # an awaitable of its own: whether it suspends cannot be seen
            self._tried_enough()
            return await call
        try:
            pending = call.send(None)
        except StopIteration as done:
            outcome: Outcome = done.value
            return outcome
        self._tried_enough()
        return await _Resumed(call, pending)

    def _tried_enough(self) -> None:
        self.trying = False
        logger.debug("handler %s may await: lanes run it from now on", self.handler.name)

    async def _commit(
        self, request: CommitRequest, events: int, failure: Event | None, stopped: bool, *, inline: bool
    ) -> None:
        size, poison = size_of(request.commands), None
        if len(request.commands) <= self.max_commands and size <= self.max_bytes:  # one commit: the usual case
            pieces = [request._replace(size=size)]
        else:
            request, poison = self._fit(request._replace(units=per_event(request.units)))
            pieces = self._pieces(request)
        *before, last = pieces
        for piece in before:
            await self.submit(piece)
        if inline and self.calls_inline and failure is None and not stopped and poison is None:
            committed = self._committed = anyio.Event() if self.trying else None
            await self.submit(last._replace(then=partial(self._released, events, committed)))
            return
        await self.commit(last)
        self.inflight.release(events)
        if poison is not None:
            raise poison
        if failure is not None:
            raise DataError(
                f"handler failed for good on {failure.stream} {failure.stream_id} (event {failure.event_id}, "
                f"{failure.event_type}); on_poison = stop: the work before it is committed "
                "(on_poison = 'dead-letter' or 'skip' goes on)"
            )
        if stopped:
            logger.info("handler asked to stop at %s", request.checkpoints)
            self.stop.set()

    def _released(self, events: int, committed: anyio.Event | None) -> None:
        """An inline read batch is committed (the lanes wait for theirs)."""
        self.inflight.release(events)
        if committed is not None:
            committed.set()

    def _fit(self, request: CommitRequest) -> Resolution:
        """The request with every event whose own writes exceed one commit settled as poison (no retries: they
        would exceed it again), and the error to stop with under `stop`."""
        at = 0
        while at < len(request.units):
            unit = request.units[at]
            commands = request.commands[unit.start : unit.end]
            size = size_of(commands)
            if not unit.settled and (len(commands) > self.max_commands or size > self.max_bytes):
                error = RefusedWrite(
                    f"its writes ({len(commands):,} commands, {size:,} bytes) exceed what one commit carries "
                    f"(max_commit_commands = {self.max_commands:,}, max_commit_bytes = {self.max_bytes:,}): "
                    "queue fewer writes per event, or raise the limits"
                )
                request, stop = self._settle(request, at, error, 1)
                if stop is not None:
                    return request, stop
            at += 1
        return request, None

    def _pieces(self, request: CommitRequest) -> list[CommitRequest]:
        """The request cut on event boundaries into commits within the bounds. Each piece carries the checkpoints
        of its events; only the last one carries the request's own checkpoints, marks and `then`, so a crash
        between pieces leaves the read batch open (replayed from the last piece committed)."""
        size = size_of(request.commands)
        if len(request.commands) <= self.max_commands and size <= self.max_bytes:
            return [request._replace(size=size)]
        pieces: list[CommitRequest] = []
        first, commands, size = 0, 0, 0
        for at, unit in enumerate(request.units):
            n, b = unit.end - unit.start, size_of(request.commands[unit.start : unit.end])
            if at > first and (commands + n > self.max_commands or size + b > self.max_bytes):
                pieces.append(_piece(request, request.units[first:at], size))
                first, commands, size = at, 0, 0
            commands += n
            size += b
        start = request.units[first].start if first < len(request.units) else len(request.commands)
        units = tuple(_rebased(unit, start) for unit in request.units[first:])
        pieces.append(request._replace(commands=request.commands[start:], units=units, size=size))
        return pieces

    async def refused(self, request: CommitRequest, index: int, reason: str) -> Resolution:
        """The committer's `on_refused`: Redis would refuse command `index` of `request`. The event that queued it
        is retried (the same writes, after a backoff: the keys may be fixed meanwhile), then given up on under
        the job's `on_poison`; a request without it (and, for `stop`, without what follows it) replaces this one."""
        request = request._replace(units=per_event(request.units))
        at = bisect.bisect_right([unit.end for unit in request.units], index)
        if at >= len(request.units) or request.units[at].start > index:
            raise DataError(f"Redis would refuse a write no event queued: {reason}")
        unit = request.units[at]
        first = unit.events[0]
        why = f"Redis would refuse {shown(request.commands[index])}: {reason}"
        if unit.settled:
            raise DataError(f"the dead letter of {first.stream} {first.stream_id} cannot be written: {why}")
        key = (first.stream, first.stream_id)
        attempts = self._refusals.get(key, 0) + 1
        policy = self._policy()
        if policy is not None and attempts <= policy.retries:
            self._refusals[key] = attempts
            logger.warning("%s (queued for %s %s, attempt %d): retrying", why, first.stream, first.stream_id,
                           attempts)  # fmt: skip
            await anyio.sleep(policy.backoff_s(attempts + 1))
            return request, None
        self._refusals.pop(key, None)
        return self._settle(request, at, RefusedWrite(why), attempts)

    def screen(self, request: CommitRequest) -> CommitRequest:
        """The committer's `screen`: a request made before keys were parked at commit time, with the events of
        those keys parked too (they must not apply ahead of the dead letter they wait behind)."""
        if request.parks == len(self._late_letters):
            return request
        request = request._replace(units=per_event(request.units))
        policy = self._policy()
        for letter in self._late_letters[request.parks :]:
            for at in range(len(request.units)):
                request = self._park(request, at, policy, letter)
        return request._replace(parks=len(self._late_letters))

    def _policy(self) -> FailurePolicy | None:
        return self.new_context().failures

    def _settle(self, request: CommitRequest, at: int, error: RefusedWrite, attempts: int) -> Resolution:
        """The request with unit `at` given up on: its writes replaced by what the poison policy queues (a dead
        letter), later events of a key parked behind it parked too; under `stop`, cut before it (the error
        says so)."""
        unit, policy = request.units[at], self._policy()
        first = unit.events[0]
        logger.error("%s %s (event %s, %s) is poison: %s", first.stream, first.stream_id, first.event_id,
                     first.event_type, error)  # fmt: skip
        tx, outcome = Tx(), Outcome(handled=-len(unit.events), failed=len(unit.events))
        for event in unit.events:
            verdict = policy.give_up(event, error, attempts, tx) if policy is not None else "skipped"
            if verdict == "stop":
                self.on_outcome(first.stream, outcome)
                return self._cut(request, at), DataError(
                    f"{error} ({first.stream} {first.stream_id}, event {first.event_id}, {first.event_type}); "
                    "on_poison = stop: the work before it is committed (on_poison = 'dead-letter' or 'skip' goes on)"
                )
            outcome.dead_lettered += int(verdict == "dead_lettered")
        self.on_outcome(first.stream, outcome)
        request = _replaced(request, at, tx.commands)
        if policy is not None and policy.parked_behind(first) == first.stream_id:  # its key waits behind it now
            self._late_letters.append(first.stream_id)
            request = self.screen(request)
        return request, None

    def _park(self, request: CommitRequest, at: int, policy: FailurePolicy | None, letter: str) -> CommitRequest:
        """Unit `at` of the request given up on when it is a later event of a key that waits behind `letter`."""
        unit = request.units[at]
        if policy is None or len(unit.events) != 1 or unit.settled:
            return request
        behind = policy.parked_behind(unit.events[0])
        if behind != letter or parse_id(unit.events[0].stream_id) <= parse_id(letter):
            return request
        tx = Tx()
        verdict = policy.give_up(unit.events[0], f"parked behind dead letter {behind} of its key", 0, tx)
        self.on_outcome(unit.events[0].stream, Outcome(handled=-1, parked=int(verdict in ("dead_lettered", "skipped"))))
        return _replaced(request, at, tx.commands)

    def _cut(self, request: CommitRequest, at: int) -> CommitRequest:
        """The request before unit `at` (policy `stop`): the checkpoints of the events kept, no mark; the unit's
        partition is halted."""
        kept = request.units[:at]
        self._halted.add(int(request.units[at].where.rpartition("#")[2]))
        end = kept[-1].end if kept else 0
        return CommitRequest(request.commands[:end], _checkpoints(kept), [], request.then, kept)


def _add_units(units: list[Unit], tx: Tx, bounds: Bounds, events: Sequence[Event], where: str) -> None:
    """Append the unit of a slice the handler handled (its writes within `bounds`): its events packed with where
    each one's writes end when it said which commands are whose (`Tx.owners`; `per_event` unpacks them), else (a
    handler of whole batches) the slice's writes as one."""
    (owners, start), (last, end) = bounds
    done = tx.owners[owners:last]
    if done and done[-1][0] == end:
        ends, owned = zip(*done, strict=True)  # C iterators: a Unit per event cost 0.15 us an event
        units.append(Unit(start, end, owned, where, False, ends))
    elif end > start:
        units.append(Unit(start, end, tuple(events), where))


def _rebased(unit: Unit, start: int) -> Unit:
    return unit._replace(start=unit.start - start, end=unit.end - start)


def _checkpoints(units: Sequence[Unit]) -> dict[str, str]:
    return {unit.where: unit.events[-1].stream_id for unit in units}


def _piece(request: CommitRequest, units: Sequence[Unit], size: int) -> CommitRequest:
    """A piece of `request` that is not its last: its units' commands and checkpoints, no mark, no `then`."""
    start, end = units[0].start, units[-1].end
    rebased = tuple(_rebased(unit, start) for unit in units)
    return CommitRequest(request.commands[start:end], _checkpoints(units), [], None, rebased, size)


def _replaced(request: CommitRequest, at: int, commands: list[tuple[Any, ...]]) -> CommitRequest:
    """The request with unit `at`'s commands replaced by `commands` (settled), the later units moved along."""
    unit = request.units[at]
    shift = len(commands) - (unit.end - unit.start)
    units = (
        *request.units[:at],
        unit._replace(end=unit.start + len(commands), settled=True),
        *(later._replace(start=later.start + shift, end=later.end + shift) for later in request.units[at + 1 :]),
    )
    return request._replace(commands=[*request.commands[: unit.start], *commands, *request.commands[unit.end :]],
                            units=units)  # fmt: skip


class Feed:
    """One router's handles on the lanes' inboxes, and its way to call the handler inline."""

    def __init__(self, inboxes: list[MemoryObjectSendStream[Slice]], lanes: Lanes) -> None:
        self._inboxes = inboxes
        self._lanes = lanes

    @property
    def inline(self) -> bool:
        """Whether the handler is always called right here (it never awaits) rather than by lanes."""
        return self._lanes.inline

    async def deliver(self, parts: dict[int, list[Event]], mark: Mark, replaying: bool) -> None:
        """Hand a read batch's slices to their lanes, all before yielding: the lanes then run together and their
        commits meet in the committer's queue, so they share one transaction (one per read batch when handlers
        are quick) instead of each lane committing alone. Waits only while an inbox is full.

        A handler that never awaits is called right here instead, partition after partition, and the read batch
        commits as one request: lanes could not run it concurrently anyway, and waking a lane costs more than
        handling a slice of 60 events. Such a call yields only in a retry's backoff or while the committer's
        queue is full: a stop that lands there leaves the batch uncommitted, for the next run. A handler that may
        await is called so too until one of its calls suspends (`Lanes.trying`); the lanes take the rest."""
        work = [(p, Slice(events, mark, replaying)) for p, events in parts.items()]
        for partition, piece in await self._lanes.handle_inline(work):
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


class _Resumed:
    """A coroutine that suspended (yielding `pending` to the event loop) once it was started with `send`, driven on
    to its end: what awaiting it from the start would have done, cancellations thrown into it included."""

    def __init__(self, coroutine: Coroutine[Any, Any, Outcome], pending: Any) -> None:
        self._coroutine = coroutine
        self._pending = pending

    def __await__(self) -> Generator[Any, Any, Outcome]:
        coroutine, pending = self._coroutine, self._pending
        while True:
            try:
                sent = yield pending
            except BaseException as exc:  # noqa: BLE001 - thrown in, as `await` passes it on
                step = partial(coroutine.throw, exc)
            else:
                step = partial(coroutine.send, sent)
            try:
                pending = step()
            except StopIteration as done:
                outcome: Outcome = done.value
                return outcome


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
