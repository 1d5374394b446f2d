"""Handler forms: `@on("*")`, and plain sync functions run in worker threads, a read batch (all its
partitions' slices) per thread call."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine, Generator, Sequence
from contextvars import ContextVar
from functools import partial
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import redis
from redis.asyncio import Redis

from replayd import Context, Event, Outcome, Projection, StopReplay, on
from replayd.config import RedisConfig
from replayd.handlers import FunctionHandler
from replayd.pipeline.router import Partitioner
from tests.helpers import STREAM, add, checkpoint, engine, entry, orders, run, spec, wait_until
from tests.plugins import Recorder

pytestmark = pytest.mark.anyio


class Tally(Projection):
    """OrderCreated has a method of its own; every other type falls to `@on("*")`."""

    name = "tally"

    @on("OrderCreated")
    def created(self, event: Event, ctx: Context) -> None:
        ctx.tx.hincrby(ctx.key("count"), "created", 1)

    @on("*")
    def other(self, event: Event, ctx: Context) -> None:
        ctx.tx.hincrby(ctx.key("count"), event.event_type, 1)


async def test_catch_all_takes_every_type_no_other_method_handles(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig
) -> None:
    types = ["OrderCreated", "OrderShipped", "OrderCreated", "PaymentReceived", "OrderShipped", "Unheard"]
    add(sync_redis, [entry(t) for t in types])
    assert Tally().event_types is None  # the job's filter keeps every type
    stats, _ = await run(spec(), raw_redis, redis_cfg, Tally())
    assert (stats.processed, stats.skipped) == (6, 0)
    counts = sync_redis.hgetall("projection:tally:count")
    assert counts == {b"created": b"2", b"OrderShipped": b"2", b"PaymentReceived": b"1", b"Unheard": b"1"}


class Quiet(Projection):
    """A side effect of its own type, and a catch-all, neither run for replayed history."""

    name = "quiet"

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    @on("OrderCreated")
    def created(self, event: Event, ctx: Context) -> None:
        self.calls.append(("created", event.event_type))

    @on("OrderShipped", replay=False)
    def shipped(self, event: Event, ctx: Context) -> None:
        self.calls.append(("shipped", event.event_type))

    @on("*", replay=False)
    def other(self, event: Event, ctx: Context) -> None:
        self.calls.append(("other", event.event_type))


@pytest.mark.parametrize("replaying", [True, False])
async def test_a_batch_dispatches_as_each_event_would_be(replaying: bool) -> None:
    """`handle_batch` (its method table picked once per batch) calls what `handle` calls event by event: a type's
    own method, never the catch-all in place of one that skips replayed history."""
    types = ["OrderCreated", "OrderShipped", "Unheard"]
    events = [Event(f"{i}-0", f"e{i}", t, {}, 0.0, {}, STREAM) for i, t in enumerate(types, 1)]
    ctx = Context("quiet", None, "projection:quiet", replaying=replaying)  # type: ignore[arg-type] # no reads
    one, batch = Quiet(), Quiet()
    for event in events:
        await one.handle(event, ctx)
    await batch.handle_batch(events, ctx)
    assert batch.calls == one.calls
    assert one.calls == ([("created", "OrderCreated")] if replaying else
                         [("created", "OrderCreated"), ("shipped", "OrderShipped"), ("other", "Unheard")])  # fmt: skip


thread_call: ContextVar[int] = ContextVar("thread_call", default=0)


async def test_a_sync_function_runs_many_events_per_thread_call(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig
) -> None:
    """Each worker-thread call runs in a fresh copy of the loop's context: a ContextVar the function sets is seen
    by the next event only when both are in one thread call."""
    ids = add(sync_redis, orders(300))
    seen: list[int] = []

    def count(event: Event) -> None:
        seen.append(thread_call.get())
        thread_call.set(thread_call.get() + 1)

    stats, _ = await run(spec(partitions=1), raw_redis, redis_cfg, FunctionHandler(count, "count"))
    assert stats.processed == len(ids) == len(seen)
    calls = seen.count(0)
    assert calls < len(ids) / 10, f"{calls} thread calls for {len(ids)} events"


async def test_a_sync_function_takes_a_read_batch_of_16_partitions_in_one_thread_call(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig
) -> None:
    """All 16 slices of a read batch run in one thread call, not one each (which doubled a no-op's CPU time)."""
    ids = add(sync_redis, orders(320, customers=32))
    seen: list[int] = []

    def count(event: Event) -> None:
        seen.append(thread_call.get())
        thread_call.set(thread_call.get() + 1)

    job = spec(partitions=16, partition_by="customer_id", batch_size=1000, min_batch_size=1000)
    stats, _ = await run(job, raw_redis, redis_cfg, FunctionHandler(count, "count"))
    assert stats.processed == len(ids) == len(seen)
    assert seen.count(0) == 1, f"{seen.count(0)} thread calls for one read batch of 16 slices"


@pytest.mark.parametrize("on_poison", ["dead-letter", "stop"])
async def test_a_sync_function_s_failure_and_stop_in_one_slice_leave_the_other_partitions_right(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig, on_poison: str
) -> None:
    """One read batch, 16 partitions, one thread call: c3's 4th event fails for good (its later ones park behind
    its dead letter, or, under `stop`, its partition halts there), c7's 6th raises StopReplay (the rest of its
    partition waits for the next run). Every other event is handled, and each partition's checkpoint is its own."""
    ids = add(sync_redis, orders(320, customers=32))
    partition = Partitioner(16, [True] * 16)
    part = [partition[f"c{seq % 32}"] for seq in range(320)]
    failing, stopping = 3 + 32 * 3, 7 + 32 * 5

    def write(event: Event, ctx: Context) -> None:
        seq = event.data["seq"]
        ctx.tx.sadd(ctx.key("seen"), seq)
        if seq == failing:
            raise RuntimeError("always")
        if seq == stopping:
            raise StopReplay

    job = spec(partitions=16, partition_by="customer_id", batch_size=1000, min_batch_size=1000,
               on_poison=on_poison, retries=1, retry_backoff_s=0.001)  # fmt: skip
    held = {part[failing]} if on_poison == "stop" else set()
    if on_poison == "stop":
        with pytest.raises(Exception, match="on_poison = stop"):
            await run(job, raw_redis, redis_cfg, FunctionHandler(write, "w"))
    else:
        stats, _ = await run(job, raw_redis, redis_cfg, FunctionHandler(write, "w"))
        assert (stats.dead_lettered, stats.parked) == (1, 6)  # c3's 131, 163, ... 291 wait behind its 99

    def settled(seq: int) -> bool:
        """Whether its partition got to it: not after the stop, nor (under `stop`) from the failure on."""
        if part[seq] == part[stopping]:
            return seq <= stopping
        return not (part[seq] in held and seq >= failing)

    reached = [seq for seq in range(320) if settled(seq)]
    members: Any = sync_redis.smembers("projection:w:seen")
    assert sorted(int(m) for m in members) == [seq for seq in reached if not (seq % 32 == 3 and seq >= failing)]
    expected = {f"{STREAM}#{part[seq]}": ids[seq] for seq in reached}  # each partition's last one
    assert {k: v for k, v in checkpoint(sync_redis).items() if k.startswith(f"{STREAM}#")} == expected


async def test_a_blocking_sync_function_blocks_neither_the_loop_nor_another_job(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig
) -> None:
    """`time.sleep` in the function (50 ms per event, 1 s in all; 0.5 s per partition's slice, which would stall
    the loop that long if it ran there): the event loop goes on (a ticker's gaps stay well below that), and
    another job on the same loop finishes its run meanwhile."""
    add(sync_redis, orders(20, customers=2))
    add(sync_redis, orders(200), stream="other")
    sleep_s = 0.05

    def slow(event: Event) -> None:
        time.sleep(sleep_s)

    gaps: list[float] = []
    done: dict[str, float] = {}

    async def tick() -> None:
        last = time.monotonic()
        while True:
            await anyio.sleep(0.005)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    async def job(name: str, handler: object, **overrides: Any) -> None:
        await run(spec(name=name, **overrides), raw_redis, redis_cfg, handler)
        done[name] = time.monotonic()

    async with anyio.create_task_group() as tg:
        tg.start_soon(tick)
        async with anyio.create_task_group() as jobs:
            jobs.start_soon(partial(job, "slow", FunctionHandler(slow, "slow"), partition_by="customer_id"))
            jobs.start_soon(partial(job, "other", Recorder(), streams=["other"]))
        tg.cancel_scope.cancel()
    assert done["other"] < done["slow"]
    assert max(gaps) < 5 * sleep_s, f"the event loop stalled {max(gaps):.3f}s"


async def test_a_sync_function_s_failures_and_stop_take_the_slow_path_in_a_batch(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig
) -> None:
    """Within one thread call: the event that fails is retried, then skipped with its writes dropped; the events
    after it are handled; StopReplay ends the run with its event committed."""
    ids = add(sync_redis, orders(30))
    attempts: dict[int, int] = {}

    def write(event: Event, ctx: Context) -> None:
        seq = event.data["seq"]
        ctx.tx.sadd(ctx.key("seen"), seq)
        if seq == 5:
            attempts[seq] = attempts.get(seq, 0) + 1
            raise RuntimeError("always")
        if seq == 20:
            raise StopReplay

    job = spec(partitions=1, on_poison="skip", retries=2, retry_backoff_s=0.001)
    stats, _ = await run(job, raw_redis, redis_cfg, FunctionHandler(write, "w"))
    assert (stats.processed, stats.failed) == (20, 1)
    assert attempts == {5: 3}
    members: Any = sync_redis.smembers("projection:w:seen")
    assert sorted(int(m) for m in members) == [s for s in range(21) if s != 5]
    assert checkpoint(sync_redis)[f"{STREAM}#0"] == ids[20]


async def test_a_sync_function_s_parked_key_waits_behind_its_dead_letter(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig
) -> None:
    add(sync_redis, [entry(data={"customer_id": c, "seq": i}) for i, c in enumerate("abababab")])
    handled: list[int] = []

    def fail_a2(event: Event) -> None:
        if event.data["seq"] == 2:
            raise RuntimeError("a's 2")
        handled.append(event.data["seq"])

    job = spec(partition_by="customer_id", partitions=1, on_poison="dead-letter", retries=0)
    stats, _ = await run(job, raw_redis, redis_cfg, FunctionHandler(fail_a2, "f"))
    assert handled == [0, 1, 3, 5, 7]  # a's 4 and 6 wait behind its 2
    assert (stats.dead_lettered, stats.parked) == (1, 2)  # a's 2 failed; its 4 and 6 are parked letters


async def test_a_sync_function_stopped_mid_run_resumes_without_losing_or_doubling_writes(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig
) -> None:
    """A stop lands while the function runs in a worker thread: that batch is left uncommitted, and the next run
    handles it again; what its `ctx.tx` queued commits once."""
    add(sync_redis, orders(60))
    calls: list[int] = []

    def slow(event: Event, ctx: Context) -> None:
        time.sleep(0.005)
        calls.append(event.data["seq"])
        ctx.tx.rpush(ctx.key("seen"), event.data["seq"])

    job = spec(partitions=2, partition_by="customer_id", batch_size=10)
    first = engine(job, raw_redis, redis_cfg, FunctionHandler(slow, "slow"))
    async with anyio.create_task_group() as tg:
        tg.start_soon(first.run)
        await wait_until(lambda: len(calls) >= 15)
        first.stop()
    assert first.stats.status == "stopped"
    assert first.stats.processed < 60
    await run(job.model_copy(update={"start": "checkpoint"}), raw_redis, redis_cfg, FunctionHandler(slow, "slow"))
    seen: Any = sync_redis.lrange("projection:slow:seen", 0, -1)
    assert sorted(int(s) for s in seen) == list(range(60))
    assert set(calls) == set(range(60))


class _Later:
    """An awaitable that is not a coroutine."""

    def __init__(self, ctx: Context, event: Event) -> None:
        self.ctx, self.event = ctx, event

    def __await__(self) -> Any:
        yield from anyio.lowlevel.checkpoint().__await__()
        self.ctx.tx.hincrby(self.ctx.key("count"), "awaited", 1)


class Returning(Projection):
    """Sync methods returning a value (ignored) or an awaitable (awaited)."""

    name = "returning"

    @on("OrderCreated")
    def created(self, event: Event, ctx: Context) -> dict[str, Any]:
        ctx.tx.hincrby(ctx.key("count"), "returned", 1)
        return event.data

    @on("*")
    def other(self, event: Event, ctx: Context) -> _Later:
        return _Later(ctx, event)


async def test_what_a_sync_method_returns_is_awaited_only_when_awaitable(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig
) -> None:
    add(sync_redis, [entry(t) for t in ["OrderCreated", "OrderShipped", "OrderCreated"]])
    stats, _ = await run(spec(), raw_redis, redis_cfg, Returning())
    assert (stats.processed, stats.failed) == (3, 0)
    assert sync_redis.hgetall("projection:returning:count") == {b"returned": b"2", b"awaited": b"1"}


async def test_handlers_get_their_events_with_data_decoded(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig
) -> None:
    """Each form's events come with `data` decoded, in one loop per slice (a lazy read per event cost as much again
    as the decode), whatever the partitioning."""
    add(sync_redis, orders(50, customers=5))
    seen: list[bool] = []

    def note(event: Event) -> None:
        seen.append("data" in vars(event))

    async def note_async(event: Event) -> None:
        note(event)

    for partitions, partition_by in [(1, None), (4, None), (1, "customer_id"), (4, "customer_id")]:
        for func in (note, note_async):
            job = f"note-{func.__name__}-{partitions}-{partition_by}"
            handler = FunctionHandler(func, job)
            job_spec = spec(name=job, partitions=partitions, partition_by=partition_by)
            stats, _ = await run(job_spec, raw_redis, redis_cfg, handler)
            assert stats.processed == 50
    assert seen == [True] * 400


class AwaitableOfItsOwn:
    """What `WrappedFunction.handle_batch` returns: an awaitable that is no coroutine."""

    def __init__(self, call: Coroutine[Any, Any, Outcome]) -> None:
        self.call = call

    def __await__(self) -> Generator[Any, Any, Outcome]:
        return self.call.__await__()


class WrappedFunction(FunctionHandler):
    def handle_batch(self, events: Sequence[Event], ctx: Context) -> Any:
        return AwaitableOfItsOwn(super().handle_batch(events, ctx))


@pytest.mark.parametrize(("adapter", "in_lanes"), [(FunctionHandler, False), (WrappedFunction, True)],
                         ids=["coroutine", "awaitable-of-its-own"])  # fmt: skip
async def test_an_async_function_that_never_suspends_runs_inline_unless_its_awaitable_cannot_tell(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig, adapter: type[FunctionHandler], in_lanes: bool
) -> None:
    """An `async def` whose calls complete without suspending is called by the router, slice after slice, as a
    sync Projection is: waking a lane task per partition and read batch cost more than the handler's work. Whether
    an awaitable that is no coroutine suspends cannot be seen: the lanes run that handler, as before."""
    ids = add(sync_redis, orders(200, customers=20))
    tasks: set[object] = set()

    async def note(event: Event) -> None:
        tasks.add(asyncio.current_task())

    job = spec(partitions=8, partition_by="customer_id")
    stats, _ = await run(job, raw_redis, redis_cfg, adapter(note, "note"))
    assert stats.processed == len(ids)
    if in_lanes:
        assert len(tasks) > 1
    else:
        assert len(tasks) == 1, f"{len(tasks)} tasks ran the handler"


class ReadsItsCommits:
    """An async batch handler that from entry `awaits_from` on reads its partition's count of events (committed by
    earlier lane batches) before adding its own: a read that ran ahead of the previous lane batch's commit shows.
    A lane batch (one `ctx`) may hold several slices of a partition: their reads see what was committed before
    it."""

    name = "reads_its_commits"
    partition_by = "customer_id"

    def __init__(self, partitions: int, awaits_from: int) -> None:
        self.partition = Partitioner(partitions, [True] * partitions)
        self.awaits_from = awaits_from
        self.handled: dict[int, int] = {}
        self.before: dict[tuple[int, int], int] = {}
        """(the lane batch's ctx, partition) -> events of the partition handled before that lane batch."""
        self.contexts: list[Context] = []
        """Kept alive: their ids key `before`."""
        self.tasks: set[object] = set()
        self.stale: list[tuple[int, int, int]] = []
        """(partition, committed count read, events handled before the lane batch) where they differ."""
        self.order: dict[str, list[int]] = {}

    async def handle_batch(self, events: list[Event], ctx: Context) -> None:
        part = self.partition[events[0].data["customer_id"]]
        key = ctx.key("part", part)
        self.contexts.append(ctx)
        before = self.before.setdefault((id(ctx), part), self.handled.get(part, 0))
        if events[0].data["seq"] >= self.awaits_from:
            committed = int(await ctx.redis.get(key) or 0)
            if committed != before:
                self.stale.append((part, committed, before))
        self.tasks.add(asyncio.current_task())
        for event in events:
            self.order.setdefault(event.data["customer_id"], []).append(event.data["seq"])
        self.handled[part] = self.handled.get(part, 0) + len(events)
        ctx.tx.incrby(key, len(events))


async def test_an_async_handler_that_starts_awaiting_moves_to_lanes_reading_what_it_committed(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig
) -> None:
    """Called inline while its calls never suspend, then by lanes from the first that does: every event once, in
    order per key, and each batch reads what its partition's previous batches committed (as in a lane), across
    the move too."""
    ids = add(sync_redis, orders(600, customers=12))
    handler = ReadsItsCommits(4, awaits_from=150)
    job = spec(partitions=4, partition_by="customer_id", batch_size=50, min_batch_size=50)
    stats, _ = await run(job, raw_redis, redis_cfg, handler)
    assert stats.processed == len(ids)
    assert handler.stale == []
    assert all(seqs == sorted(seqs) for seqs in handler.order.values())
    assert sum(len(seqs) for seqs in handler.order.values()) == len(ids)
    counts = [int(sync_redis.get(f"projection:reads_its_commits:part:{p}") or 0) for p in range(4)]
    assert counts == [handler.handled.get(p, 0) for p in range(4)] and sum(counts) == len(ids)
    assert len(handler.tasks) > 1, "the lanes never took over"
