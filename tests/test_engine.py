"""The engine end to end against a real redis-server: bounds, follow, filters, partitions, handler kinds."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import redis
from redis.asyncio import Redis

from replayd.config import RedisConfig
from replayd.errors import ConfigError, DataError
from replayd.events import Event, parse_id
from replayd.handlers import Context, FunctionHandler, Handler, ObjectHandler, Outcome, Projection, on
from replayd.jobs.engine import Engine
from replayd.pipeline.commit import CommitRequest, Mark
from replayd.pipeline.lanes import InFlight, Lanes
from replayd.pipeline.router import Router
from replayd.pipeline.source import BatchSizer
from tests import plugins
from tests.helpers import (
    STREAM,
    add,
    as_text,
    checkpoint,
    engine,
    entry,
    orders,
    progress,
    run,
    spec,
    stream_ids,
    wait_until,
)
from tests.plugins import BatchRecorder, Notifier, Recorder, SyncRecorder

pytestmark = pytest.mark.anyio

FIXED_IDS = ["1000-0", "1000-1", "2000-0", "3000-0", "4000-0"]


@pytest.fixture
def fixed(sync_redis: redis.Redis) -> list[str]:
    """Five entries with known IDs: two in millisecond 1000, then one per second up to 4000."""
    return add(sync_redis, orders(5), ids=FIXED_IDS)


# --- start and end bounds


@pytest.mark.parametrize(
    ("bounds", "expected"),
    [
        ({"start": "beginning"}, FIXED_IDS),
        ({"start": "2000-0"}, ["2000-0", "3000-0", "4000-0"]),
        ({"start": "1000-1"}, ["1000-1", "2000-0", "3000-0", "4000-0"]),
        ({"start": "1000"}, FIXED_IDS),
        ({"after": "2000-0"}, ["3000-0", "4000-0"]),
        ({"after": "1000-0"}, ["1000-1", "2000-0", "3000-0", "4000-0"]),
        ({"after": "1000"}, ["2000-0", "3000-0", "4000-0"]),
        ({"start": "1970-01-01T00:00:02Z"}, ["2000-0", "3000-0", "4000-0"]),
        ({"start": "1970-01-01T00:00:02"}, ["2000-0", "3000-0", "4000-0"]),
        ({"start": "1970-01-01T01:00:03+01:00"}, ["3000-0", "4000-0"]),
        ({"end": "2000-0"}, ["1000-0", "1000-1", "2000-0"]),
        ({"end": "1000-0"}, ["1000-0"]),
        ({"end": "1000"}, ["1000-0", "1000-1"]),
        ({"end": "1970-01-01T00:00:03Z"}, ["1000-0", "1000-1", "2000-0", "3000-0"]),
        ({"start": "2000-0", "end": "3000-0"}, ["2000-0", "3000-0"]),
        ({"after": "4000-0"}, []),
    ],
)
async def test_start_and_end_bounds(
    fixed: list[str], raw_redis: Redis, redis_cfg: RedisConfig, bounds: dict[str, str], expected: list[str]
) -> None:
    _, rec = await run(spec(partitions=1, **bounds), raw_redis, redis_cfg)
    assert rec.ids == expected


@pytest.fixture
def aged(sync_redis: redis.Redis) -> list[str]:
    """Entries 3 h, 2 h and 30 min old by Redis's clock."""
    seconds, micros = sync_redis.time()
    now_ms = seconds * 1000 + micros // 1000
    return add(sync_redis, orders(3), ids=[f"{now_ms - age}-0" for age in (10_800_000, 7_200_000, 1_800_000)])


async def test_start_age_replays_the_recent_entries(aged: list[str], raw_redis: Redis, redis_cfg: RedisConfig) -> None:
    _, rec = await run(spec(start="90m"), raw_redis, redis_cfg)
    assert rec.ids == aged[2:]


async def test_end_age_replays_the_older_entries(aged: list[str], raw_redis: Redis, redis_cfg: RedisConfig) -> None:
    _, rec = await run(spec(end="1h", partitions=1), raw_redis, redis_cfg)
    assert rec.ids == aged[:2]


class AddsOnStartup(Recorder):
    """Appends entries to the stream once the job has resolved its end."""

    async def startup(self, ctx: Context) -> None:
        await super().startup(ctx)
        for fields in orders(3, start=100):
            await ctx.redis.xadd(STREAM, fields)  # type: ignore[arg-type]


async def test_end_now_is_the_head_at_start(
    fixed: list[str], sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig
) -> None:
    stats, rec = await run(spec(end="now"), raw_redis, redis_cfg, AddsOnStartup())
    assert sorted(rec.ids, key=parse_id) == fixed
    assert sync_redis.xlen(STREAM) == 8  # the three added after the start are there, but not replayed
    assert stats.status == "completed"
    assert checkpoint(sync_redis)["orders#*"] == fixed[-1]


async def test_history_is_replaying(fixed: list[str], raw_redis: Redis, redis_cfg: RedisConfig) -> None:
    _, rec = await run(spec(), raw_redis, redis_cfg)
    assert rec.replaying == [True] * 5


async def test_a_completed_run_writes_progress(
    fixed: list[str], sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig
) -> None:
    _, rec = await run(spec(), raw_redis, redis_cfg)
    written = progress(sync_redis)
    assert written["status"] == "completed"
    assert (written["total_events"], written["processed_events"], written["failed_events"]) == ("5", "5", "0")
    assert rec.hooks == ["startup", "shutdown"]


# --- follow: catch up, then live


async def test_follow_switches_from_history_to_live_without_skipping_or_repeating(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig
) -> None:
    add(sync_redis, orders(300))
    rec = Recorder()
    job = engine(spec(end="follow", partitions=1, batch_size=50), raw_redis, redis_cfg, rec)

    async def produce() -> None:  # appends while the job is still catching up, and after
        for burst in range(30):
            for fields in orders(10, start=300 + 10 * burst):
                await raw_redis.xadd(STREAM, fields)  # type: ignore[arg-type]
            await anyio.sleep(0.002)

    async with anyio.create_task_group() as tg:
        tg.start_soon(job.run)
        tg.start_soon(produce)
        await wait_until(lambda: len(rec.events) >= 600)
        job.stop()
    assert rec.ids == stream_ids(sync_redis)
    assert [e.data["seq"] for e in rec.events] == list(range(600))
    replay_until = parse_id(checkpoint(sync_redis)["orders#replay_until"])
    assert rec.replaying == [parse_id(i) <= replay_until for i in rec.ids]
    assert rec.replaying[:300] == [True] * 300
    assert job.stats.status == "stopped"


async def test_follow_hands_live_events_with_replaying_false_and_announces_caught_up_once(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig
) -> None:
    history = add(sync_redis, orders(10))
    rec = Recorder()
    job = engine(spec(end="follow"), raw_redis, redis_cfg, rec)
    async with anyio.create_task_group() as tg:
        tg.start_soon(job.run)
        await wait_until(lambda: "on_caught_up" in rec.hooks and len(rec.events) == 10)
        for fields in orders(5, start=10):
            await raw_redis.xadd(STREAM, fields)  # type: ignore[arg-type]
        await wait_until(lambda: len(rec.events) == 15)
        await anyio.sleep(0.1)  # a second caught-up announcement would come now
        job.stop()
    assert sorted(rec.ids, key=parse_id) == stream_ids(sync_redis)
    flags = dict(zip(rec.ids, rec.replaying, strict=True))
    assert [flags[i] for i in stream_ids(sync_redis)] == [True] * 10 + [False] * 5
    assert rec.hooks == ["startup", "on_caught_up", "shutdown"]
    written = progress(sync_redis)
    assert float(written["caught_up_at"]) >= job.stats.started_at
    assert written["status"] == "stopped"
    assert checkpoint(sync_redis)["orders#replay_until"] == history[-1]


async def test_follow_on_an_empty_stream_is_caught_up_at_once(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig
) -> None:
    rec = Recorder()
    job = engine(spec(end="follow"), raw_redis, redis_cfg, rec)
    async with anyio.create_task_group() as tg:
        tg.start_soon(job.run)
        await wait_until(lambda: "on_caught_up" in rec.hooks)
        await raw_redis.xadd(STREAM, entry())  # type: ignore[arg-type]
        await wait_until(lambda: len(rec.events) == 1)
        job.stop()
    assert rec.replaying == [False]


async def test_side_effects_do_not_run_for_history(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig
) -> None:
    old = add(sync_redis, [entry("OrderCreated"), entry("OrderShipped")])
    notifier = Notifier()
    job = engine(spec(end="follow"), raw_redis, redis_cfg, notifier)
    async with anyio.create_task_group() as tg:
        tg.start_soon(job.run)
        await wait_until(job.caught_up.is_set)
        new = [await raw_redis.xadd(STREAM, fields) for fields in (entry("OrderCreated"), entry("OrderShipped"))]  # type: ignore[arg-type]
        await wait_until(lambda: len(notifier.notified) == 1 and len(notifier.applied) == 2)
        job.stop()
    assert notifier.applied == [old[0], as_text(new[0])]
    assert notifier.notified == [as_text(new[1])]


# --- filters


@pytest.fixture
def mixed(sync_redis: redis.Redis) -> list[str]:
    return add(
        sync_redis,
        [
            entry("OrderCreated", {"order_id": "42", "total": 150}, {"entity_type": "order"}),
            entry("OrderCreated", {"order_id": "43", "total": 20}, {"entity_type": "order"}),
            entry("OrderShipped", {"aggregate_type": "order", "aggregate_id": "42"}),
            entry("PaymentReceived", {"payment_id": "p1", "order_id": "42", "total": 150}, {"entity_type": "payment"}),
            entry("OrderShipped", {"order_id": "43"}, {"entity_type": "order"}),
        ],
    )


@pytest.mark.parametrize(
    ("condition", "picked"),
    [
        ({"types": ["OrderShipped"]}, [2, 4]),
        ({"types": ["OrderShipped", "PaymentReceived"]}, [2, 3, 4]),
        ({"entity": "order:42"}, [0, 2]),
        ({"where": ["data.total>=100"]}, [0, 3]),
        ({"where": ["data.total>=100", "metadata.entity_type=order"]}, [0]),
        ({"filter": "tests.plugins:big_orders"}, [0, 3]),
        ({"types": ["OrderCreated"], "filter": "tests.plugins:big_orders"}, [0]),
    ],
)
async def test_filters(
    mixed: list[str], raw_redis: Redis, redis_cfg: RedisConfig, condition: dict[str, Any], picked: list[int]
) -> None:
    stats, rec = await run(spec(partitions=1, **condition), raw_redis, redis_cfg)
    assert rec.ids == [mixed[i] for i in picked]
    assert (stats.total, stats.processed, stats.skipped) == (5, len(picked), 5 - len(picked))


async def test_entity_with_its_own_stream_reads_that_stream(
    mixed: list[str], sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig
) -> None:
    own = add(sync_redis, [entry("OrderCreated"), entry("OrderShipped")], stream="events:order:42")
    _, rec = await run(spec(partitions=1, entity="order:42"), raw_redis, redis_cfg)
    assert rec.ids == own
    assert {e.stream for e in rec.events} == {"events:order:42"}


async def test_a_bad_plugin_predicate_is_a_config_error(raw_redis: Redis, redis_cfg: RedisConfig) -> None:
    with pytest.raises(ConfigError, match="no attribute"):
        engine(spec(filter="tests.plugins:nope"), raw_redis, redis_cfg, Recorder())


async def test_custom_field_names_through_the_engine(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig
) -> None:
    ids = add(sync_redis, [{"type": "Paid", "payload": '{"n": 1}', "ts": "5"}, {"type": "Other"}])
    _, rec = await run(
        spec(fields={"event_type": "type", "data": "payload", "timestamp": "ts"}, types=["Paid"]), raw_redis, redis_cfg
    )
    assert [(e.stream_id, e.event_type, e.data, e.timestamp) for e in rec.events] == [(ids[0], "Paid", {"n": 1}, 5.0)]


# --- streams


async def test_multi_stream_job_keeps_a_checkpoint_per_stream(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig
) -> None:
    a = add(sync_redis, orders(30), stream="a")
    b = add(sync_redis, orders(20), stream="b")
    _, rec = await run(spec(streams=["a", "b"]), raw_redis, redis_cfg)
    assert sorted(e.stream_id for e in rec.events if e.stream == "a") == sorted(a)
    assert sorted(e.stream_id for e in rec.events if e.stream == "b") == sorted(b)
    saved = checkpoint(sync_redis)
    assert (saved["a#*"], saved["b#*"]) == (a[-1], b[-1])


async def test_empty_and_missing_streams_complete_without_a_position(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig
) -> None:
    add(sync_redis, [entry()], stream="empty")
    sync_redis.xtrim("empty", maxlen=0)
    stats, rec = await run(spec(streams=["empty", "missing"]), raw_redis, redis_cfg)
    assert stats.status == "completed"
    assert rec.events == []
    assert not [f for f in checkpoint(sync_redis) if f.startswith(("empty#", "missing#"))]


async def test_entries_deleted_mid_range_are_skipped(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig
) -> None:
    ids = add(sync_redis, orders(20))
    sync_redis.xdel(STREAM, ids[3], ids[4], ids[10], ids[19])
    stats, rec = await run(spec(partitions=1, batch_size=5), raw_redis, redis_cfg)
    assert rec.ids == [i for n, i in enumerate(ids) if n not in (3, 4, 10, 19)]
    assert stats.total == 16
    assert checkpoint(sync_redis)["orders#*"] == ids[18]


async def test_poison_entries_are_counted_and_passed_under_skip(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig
) -> None:
    ids = add(sync_redis, [entry(), {"event_type": "X", "data": "{broken"}, entry()])
    stats, rec = await run(spec(on_poison="skip"), raw_redis, redis_cfg, Recorder(decode=True))
    assert sorted(rec.ids) == [ids[0], ids[2]]
    assert (stats.poison, stats.failed, stats.processed) == (1, 1, 2)
    assert checkpoint(sync_redis)["orders#*"] == ids[2]


async def test_a_field_nobody_reads_is_never_decoded(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig
) -> None:
    """Lazy decoding: a broken `metadata` is poison only to a job that reads it."""
    ids = add(sync_redis, [entry(), {"event_type": "X", "data": "{}", "metadata": "{broken"}, entry()])
    stats, rec = await run(spec(on_poison="skip"), raw_redis, redis_cfg)
    assert rec.ids == ids
    assert (stats.poison, stats.failed, stats.processed) == (0, 0, 3)


class DataBatches:
    """A batch handler that reads `data`: the batch is handed over again without what cannot be decoded."""

    name = "data_batches"

    def __init__(self) -> None:
        self.ids: list[str] = []

    def handle_batch(self, events: list[Event], ctx: Context) -> None:
        totals = [e.data.get("total", 0) for e in events]
        assert len(totals) == len(events)
        self.ids += [e.stream_id for e in events]


@pytest.mark.parametrize("policy", ["skip", "stop"])
async def test_a_batch_handler_that_reads_an_undecodable_field(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig, policy: str
) -> None:
    ids = add(sync_redis, [entry(), entry(), {"event_type": "X", "data": "{broken"}, entry()])
    handler = DataBatches()
    job = spec(on_poison=policy, partitions=1, batch_size=10)
    if policy == "skip":
        stats, _ = await run(job, raw_redis, redis_cfg, handler)
        assert handler.ids == [ids[0], ids[1], ids[3]]
        assert (stats.poison, stats.failed, stats.processed) == (1, 1, 3)
        assert checkpoint(sync_redis)["orders#*"] == ids[3]
    else:
        with pytest.raises(DataError, match=f"orders {ids[2]}"):
            await run(job, raw_redis, redis_cfg, handler)
        assert handler.ids == [ids[0], ids[1]]
        assert checkpoint(sync_redis)["orders#0"] == ids[1]


@pytest.mark.parametrize("partition_by", [None, "customer_id"])
async def test_undecodable_fields_found_by_the_router_or_the_handler_are_poison(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig, partition_by: str | None
) -> None:
    """`data` is read by the router (partitioned by customer) or first by the handler; either way the entry
    goes to the poison policy, is counted, and is not retried."""
    ids = add(sync_redis, [entry(), {"event_type": "X", "data": "{broken"}, entry(), {"timestamp": "soon"}])
    job = spec(on_poison="skip", partition_by=partition_by, retries=3)
    stats, rec = await run(job, raw_redis, redis_cfg, Recorder(decode=True))
    assert sorted(rec.ids) == [ids[0], ids[2]]
    assert (stats.poison, stats.failed, stats.processed) == (2, 2, 2)
    assert checkpoint(sync_redis)["orders#*"] == ids[3]


# --- partitions and backpressure


class KeyOrder:
    """Records (customer, seq) per event; yields to the loop so partitions interleave."""

    name = "key_order"
    partition_by = "customer_id"

    def __init__(self) -> None:
        self.seen: dict[str, list[int]] = defaultdict(list)
        self.running = 0
        self.most = 0

    async def handle(self, event: Event, ctx: Context) -> None:
        self.running += 1
        self.most = max(self.most, self.running)
        await anyio.lowlevel.checkpoint()
        self.seen[event.data["customer_id"]].append(event.data["seq"])
        self.running -= 1


async def test_partitions_keep_per_key_order(sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig) -> None:
    add(sync_redis, orders(3000, customers=37))
    handler = KeyOrder()
    stats, _ = await run(spec(partitions=16, concurrency=4, batch_size=100), raw_redis, redis_cfg, handler)
    assert stats.processed == 3000
    assert len(handler.seen) == 37
    for customer, seqs in handler.seen.items():
        assert seqs == sorted(seqs), customer
        assert len(seqs) == len(set(seqs))
    assert 1 < handler.most <= 4
    saved = checkpoint(sync_redis)
    assert {f for f in saved if f.startswith("orders#") and f[7:].isdigit()} <= {f"orders#{p}" for p in range(16)}


async def test_small_max_in_flight_still_completes(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig
) -> None:
    ids = add(sync_redis, orders(1000))
    job = spec(partition_by="customer_id", partitions=8, batch_size=20, max_in_flight=50)
    stats, rec = await run(job, raw_redis, redis_cfg)
    assert sorted(rec.ids, key=parse_id) == ids
    assert stats.status == "completed"
    assert checkpoint(sync_redis)["orders#*"] == ids[-1]


# --- handler failures and StopReplay


RECORDERS = pytest.mark.parametrize("recorder", [Recorder, SyncRecorder], ids=["lanes", "inline"])
"""Handlers that await run in lanes; those that never await are called inline by the router."""


@RECORDERS
async def test_a_failing_event_is_counted_and_its_writes_are_dropped_under_skip(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig, recorder: type[Recorder]
) -> None:
    ids = add(sync_redis, orders(40))
    rec = recorder(write=True, fail_on=lambda e: e.data["seq"] % 10 == 3)
    stats, _ = await run(spec(partition_by="customer_id", on_poison="skip", retries=0), raw_redis, redis_cfg, rec)
    failing = {ids[i] for i in (3, 13, 23, 33)}
    assert (stats.processed, stats.failed, stats.status) == (36, 4, "completed")
    assert set(rec.ids) == set(ids) - failing
    written = {k.decode().rsplit(":", 1)[1] for k in sync_redis.scan_iter("projection:recorder:seen:*")}
    assert written == set(ids) - failing
    assert checkpoint(sync_redis)["orders#*"] == ids[-1]


@RECORDERS
async def test_stop_replay_ends_the_run_at_the_stopping_event(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig, recorder: type[Recorder]
) -> None:
    ids = add(sync_redis, orders(100))
    rec = recorder(write=True, stop_on=lambda e: e.data["seq"] == 25)
    stats, _ = await run(spec(partitions=1, batch_size=10), raw_redis, redis_cfg, rec)
    assert rec.ids == ids[:26]
    assert stats.status in ("completed", "stopped")
    assert checkpoint(sync_redis)["orders#0"] == ids[25]
    assert sync_redis.exists(f"projection:recorder:seen:{ids[25]}")  # its own work is committed
    assert not sync_redis.exists(f"projection:recorder:seen:{ids[26]}")


@RECORDERS
async def test_stop_replay_halts_its_partition_and_the_others_commit_their_slices(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig, recorder: type[Recorder]
) -> None:
    ids = add(sync_redis, orders(50))
    rec = recorder(write=True, stop_on=lambda e: e.data["seq"] == 12, partition_by="customer_id")
    stats, _ = await run(spec(partitions=4, batch_size=10, min_batch_size=10), raw_redis, redis_cfg, rec)
    assert stats.status in ("completed", "stopped")
    router = Router(4, partition_by="customer_id", ordering="key")

    def partition(seq: int) -> int:  # orders(): event `seq` is customer c<seq % 7>'s
        return router.partition(Event(ids[seq], "e", "t", {"customer_id": f"c{seq % 7}"}, 0.0, {}, STREAM))

    handled = {e.data["seq"] for e in rec.events}
    assert max(seq for seq in handled if partition(seq) == partition(12)) == 12
    assert handled >= {seq for seq in range(20) if seq <= 12 or partition(seq) != partition(12)}  # its read batch
    written = {k.decode().rsplit(":", 1)[1] for k in sync_redis.scan_iter("projection:recorder:seen:*")}
    assert written == set(rec.ids)  # what was handled was committed, in every partition
    assert checkpoint(sync_redis)[f"{STREAM}#{partition(12)}"] == ids[12]


# --- handler kinds


async def test_sync_function_runs_in_a_worker_thread(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig
) -> None:
    ids = add(sync_redis, orders(30))
    seen: list[tuple[str, int]] = []
    handler = FunctionHandler(lambda e: seen.append((e.stream_id, threading.get_ident())), "fn")
    await run(spec(partitions=1), raw_redis, redis_cfg, handler)
    assert [i for i, _ in seen] == ids
    assert threading.get_ident() not in {t for _, t in seen}


async def test_async_function_with_context_commits_its_writes(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig
) -> None:
    ids = add(sync_redis, orders(30))

    async def count(event: Event, ctx: Context) -> None:
        ctx.tx.hincrby(ctx.key("by_customer"), event.data["customer_id"], 1)

    await run(spec(partition_by="customer_id"), raw_redis, redis_cfg, FunctionHandler(count, "counter"))
    totals = sync_redis.hgetall("projection:counter:by_customer")
    assert sum(int(v) for v in totals.values()) == len(ids)
    assert totals[b"c0"] == b"5"


async def test_a_command_no_redis_command_takes_makes_its_event_poison_and_the_rest_commits(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig
) -> None:
    """A handler bug (a dict where Redis takes text or a number) is the fault of the event that queued it: that
    event is dead-lettered, naming the value, and the later events of its key park behind it (ordering `key`); the
    other events of its batch commit, once."""
    ids = add(sync_redis, orders(30))

    async def count(event: Event, ctx: Context) -> None:
        amount: Any = {"not": "a Redis value"} if event.data["seq"] == 7 else 1
        ctx.tx.hincrby(ctx.key("by_customer"), event.data["customer_id"], amount)

    job = spec(partition_by="customer_id", on_poison="dead-letter", retries=0)
    stats, _ = await run(job, raw_redis, redis_cfg, FunctionHandler(count, "counter"))
    assert (stats.status, stats.processed, stats.failed, stats.dead_lettered, stats.parked) == (
        "completed", 26, 1, 1, 3,
    )  # fmt: skip
    totals = sync_redis.hgetall("projection:counter:by_customer")  # c0 is seq 0, 7, 14, 21, 28: 7 on are parked
    assert sum(int(v) for v in totals.values()) == len(ids) - 4 and totals[b"c0"] == b"1"
    assert checkpoint(sync_redis)["orders#*"] == ids[-1]
    entries: list[tuple[bytes, dict[bytes, bytes]]] = sync_redis.xrange("replayd:{job}:dlq")  # type: ignore[assignment]
    letters = [fields for _, fields in entries]
    assert [letter[b"id"] for letter in letters] == [ids[n].encode() for n in (7, 14, 21, 28)]
    assert b"{'not': 'a Redis value'}" in letters[0][b"error"] and b"parked behind" in letters[1][b"error"]


async def test_function_loaded_by_name(sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig) -> None:
    ids = add(sync_redis, orders(5))
    plugins.record_event_log.clear()
    await Engine(spec(handler="tests.plugins:record_event", partitions=1), raw_redis, redis_cfg=redis_cfg).run()
    assert [i for i, _ in plugins.record_event_log] == ids


async def test_handler_class_loaded_by_name(sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig) -> None:
    ids = add(sync_redis, orders(5))
    job = Engine(spec(handler="tests.plugins:Recorder", partitions=1), raw_redis, redis_cfg=redis_cfg)
    await job.run()
    assert isinstance(job.handler, ObjectHandler)
    assert job.handler.obj.ids == ids


async def test_handle_batch_object(sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig) -> None:
    ids = add(sync_redis, orders(250))
    handler = BatchRecorder()
    stats, _ = await run(spec(partitions=1, batch_size=100), raw_redis, redis_cfg, handler)
    assert [i for batch in handler.batches for i in batch] == ids
    assert max(map(len, handler.batches)) <= 100
    assert stats.processed == 250
    assert {as_text(m) for m in sync_redis.smembers("projection:batches:ids")} == set(ids)


# --- commits: waited for by handlers that may read, overlapped for those that only queue writes


class ReadsItsTotal(Projection):
    """Adds each order to its customer's total, reading the committed total first (an async handler may read)."""

    name = "reads_total"
    partition_by = "customer_id"

    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []

    @on("OrderCreated")
    async def created(self, event: Event, ctx: Context) -> None:
        key = ctx.key("total", event.data["customer_id"])
        self.seen.append((event.data["seq"], int(await ctx.redis.get(key) or 0)))
        ctx.tx.incrby(key, event.data["total"])


class QueuesOnly(Projection):
    name = "queues_only"
    partition_by = "customer_id"

    @on("OrderCreated")
    def created(self, event: Event, ctx: Context) -> None:
        ctx.tx.rpush(ctx.key("seqs", event.data["customer_id"]), event.data["seq"])


def test_only_handlers_that_never_await_overlap_their_commits() -> None:
    assert ReadsItsTotal().awaits
    assert not QueuesOnly().awaits
    assert ObjectHandler(type("A", (), {"handle": lambda self, e, c: None})(), "a").awaits is False


class PermittedCommits:
    """As the Committer: one task commits the queued requests in order, each once it is given a permit. In front of
    it, `lanes` of one partition."""

    def __init__(self) -> None:
        self.committed: list[list[str]] = []
        """The checkpoints of each commit, in order."""
        self.queue, self._requests = anyio.create_memory_object_stream[CommitRequest](10)
        self.permits, self._permitted = anyio.create_memory_object_stream[None](10)
        self.inflight = InFlight(100)

    def lanes(self, handler: Handler) -> Lanes:
        return Lanes(
            1, handler, lambda: Context("job", None, "projection:x"), self.commit,  # type: ignore[arg-type]
            submit=self.queue.send, concurrency=1, sizer=BatchSizer(1, minimum=1, target_s=1.0),
            inflight=self.inflight, on_outcome=lambda stream, outcome: None, on_batch=lambda seconds: None,
            stop=anyio.Event(),
        )  # fmt: skip

    async def run(self) -> None:
        async with self._requests, self._permitted:
            async for request in self._requests:
                await self._permitted.receive()
                self.committed.append(list(request.checkpoints.values()))
                if request.then is not None:
                    request.then()

    async def commit(self, request: CommitRequest) -> None:
        done = anyio.Event()
        await self.queue.send(request._replace(then=done.set))
        await done.wait()


@asynccontextmanager
async def fed(commits: PermittedCommits, lanes: Lanes, seqs: Sequence[int]) -> AsyncIterator[list[Event]]:
    """The committer and the lanes running while an event of each `seqs` is handed to partition 0, a slice each,
    as a router hands them over (to the lane, or to the handler itself)."""
    events = [Event(f"{i}-0", f"e{i}", "OrderCreated", {"customer_id": "c", "seq": i}, 0.0, {}, "s") for i in seqs]
    await commits.inflight.acquire(len(events))

    feed = lanes.feed()  # before the lanes run: they close all but the feeds' handles on their inboxes

    async def route() -> None:
        for event in events:
            await feed.deliver({0: [event]}, Mark("s", parse_id(event.stream_id), 1), True)
        feed.close()

    async with anyio.create_task_group() as outer:
        outer.start_soon(commits.run)
        async with commits.queue, commits.permits, anyio.create_task_group() as tg:
            tg.start_soon(lanes.run)
            tg.start_soon(route)
            yield events


async def settled() -> None:
    """Let every task that can run go as far as it can."""
    for _ in range(20):
        await anyio.lowlevel.checkpoint()


@pytest.mark.parametrize("handler", [ReadsItsTotal(), QueuesOnly()], ids=["async", "sync"])
async def test_a_lane_waits_for_its_commit_only_when_its_handler_may_read(handler: Projection) -> None:
    """1. Two slices of one partition are delivered; the committer holds the first commit.
    2. An async handler (called inline while it never suspends, as here, or by its lane) waits: the second slice
    is not handled until the first commit is done.
    3. A sync handler (called by `deliver`, no lane) goes on to the second slice meanwhile; both commit, in
    order, and release."""
    commits, handled = PermittedCommits(), list[int]()
    original = handler.handle_batch

    async def handle_batch(events: Sequence[Event], ctx: Context) -> Outcome:
        handled.extend(e.data["seq"] for e in events)
        return Outcome(handled=len(events))

    handler.handle_batch = handle_batch  # type: ignore[method-assign]
    with anyio.fail_after(5):
        async with fed(commits, commits.lanes(handler), [1, 2]):
            await wait_until(lambda: bool(handled))
            await settled()
            assert handled == ([1] if handler.awaits else [1, 2])
            for _ in range(2):
                await commits.permits.send(None)
    assert handled == [1, 2]
    assert commits.committed == [["1-0"], ["2-0"]]
    assert commits.inflight.count == 0
    handler.handle_batch = original  # type: ignore[method-assign]


async def test_an_async_handler_that_starts_to_suspend_goes_to_its_lane_after_its_commit() -> None:
    """1. Slice 1 is handled inline (its call never suspends); the committer holds its commit.
    2. Slice 2 waits for that commit, then suspends: the lanes run the handler from now on, and that commit is
    held too. 3. Slice 3, in the lane now, waits until commit 2 is done: handled in order, committed in order."""
    commits, handled = PermittedCommits(), list[int]()

    async def handle_batch(events: Sequence[Event], ctx: Context) -> Outcome:
        for event in events:
            if event.data["seq"] >= 2:
                await anyio.lowlevel.checkpoint()  # suspends
            handled.append(event.data["seq"])
        return Outcome(handled=len(events))

    handler = ObjectHandler(type("Suspends", (), {"handle_batch": staticmethod(handle_batch)})(), "suspends")
    lanes = commits.lanes(handler)
    with anyio.fail_after(5):
        async with fed(commits, lanes, [1, 2, 3]):
            await wait_until(lambda: bool(handled))
            await settled()
            assert (handled, lanes.trying) == ([1], True)
            await commits.permits.send(None)
            await wait_until(lambda: len(handled) == 2)
            await settled()
            assert (handled, commits.committed, lanes.trying) == ([1, 2], [["1-0"]], False)
            await commits.permits.send(None)
            await commits.permits.send(None)
    assert handled == [1, 2, 3]
    assert commits.committed == [["1-0"], ["2-0"], ["3-0"]]
    assert commits.inflight.count == 0


async def test_a_handler_that_only_queues_writes_commits_every_batch_in_order(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig
) -> None:
    add(sync_redis, orders(300, customers=5))
    stats, _ = await run(spec(partitions=4, batch_size=7, min_batch_size=1), raw_redis, redis_cfg, QueuesOnly())
    assert stats.processed == 300
    for customer in range(5):
        seqs = [int(v) for v in sync_redis.lrange(f"projection:queues_only:seqs:c{customer}", 0, -1)]
        assert seqs == list(range(customer, 300, 5))
    assert checkpoint(sync_redis)[f"{STREAM}#*"] == stream_ids(sync_redis)[-1]  # the floor reached the end
