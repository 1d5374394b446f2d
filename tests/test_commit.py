"""Checkpoints: what a run leaves in `replayd:{job}:checkpoint`, and how the next run resumes from it."""

from __future__ import annotations

import anyio
import pytest
import redis
from redis.asyncio import Redis

from replayd.config import RedisConfig
from replayd.errors import ConfigError, DataError, leaves
from replayd.events import ZERO, Event, parse_id
from replayd.handlers import MAX_ARGS, Arg, Context, FunctionHandler, Tx
from replayd.pipeline.commit import CheckpointStore, CommitRequest, Committer, Resume, Watermark
from replayd.pipeline.router import Router
from tests.helpers import STREAM, add, checkpoint, engine, orders, run, spec, wait_until
from tests.plugins import Recorder

CHECKPOINT = "replayd:{job}:checkpoint"


# --- Watermark (pure)


def test_watermark_waits_for_the_oldest_open_batch() -> None:
    marks = Watermark()
    a = marks.add("s", (10, 0), slices=1)
    b = marks.add("s", (20, 0), slices=2)
    marks.add("s", (30, 0), slices=1)
    b.remaining = 0  # B's slices commit first
    assert marks.advance([]) == {}
    a.remaining = 0
    assert marks.advance([]) == {"s": (20, 0)}  # A and B done; C still open
    assert marks.pending() == 1


def test_watermark_passes_a_batch_with_nothing_routed_at_once() -> None:
    marks = Watermark()
    marks.add("s", (10, 0), slices=0)
    assert marks.advance([]) == {"s": (10, 0)}
    assert marks.pending() == 0


def test_watermark_streams_are_independent() -> None:
    marks = Watermark()
    marks.add("a", (10, 0), slices=1)
    marks.add("b", (5, 0), slices=0)
    assert marks.advance([]) == {"b": (5, 0)}


# --- CheckpointStore.resume (pure: fields as loaded)


def store(fields: dict[str, str], partitions: int = 4) -> CheckpointStore:
    cps = CheckpointStore(None, "job", partitions)  # type: ignore[arg-type]
    cps.fields = fields
    return cps


def test_no_checkpoint_means_no_resume_point() -> None:
    assert store({"partitions": "4"}).resume("s") is None


def test_resume_from_the_floor_when_some_partitions_have_no_position() -> None:
    resume = store({"s#*": "10-0", "s#1": "30-0", "s#2": "5-0"}).resume("s")
    assert resume == Resume((10, 0), {1: (30, 0)})


def test_resume_from_the_lowest_partition_when_all_have_positions() -> None:
    fields = {"s#*": "10-0", "s#0": "12-0", "s#1": "30-0", "s#2": "15-0", "s#3": "12-0"}
    assert store(fields).resume("s") == Resume((12, 0), {1: (30, 0), 2: (15, 0)})


def test_partition_positions_without_a_floor() -> None:
    assert store({"s#2": "7-0"}).resume("s") == Resume(ZERO, {2: (7, 0)})


# --- runs against Redis


@pytest.mark.anyio
async def test_a_completed_run_leaves_partition_positions_and_the_floor(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig
) -> None:
    ids = add(sync_redis, orders(100))
    await run(spec(partition_by="customer_id"), raw_redis, redis_cfg)
    saved = checkpoint(sync_redis)
    assert saved["orders#*"] == ids[-1]
    assert saved["partitions"] == "4"
    positions = {f: v for f, v in saved.items() if f[len("orders#") :].isdigit()}
    assert positions
    assert max(positions.values(), key=parse_id) == ids[-1]
    assert set(positions.values()) <= set(ids)


@pytest.mark.anyio
async def test_resuming_a_finished_job_handles_nothing(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig
) -> None:
    add(sync_redis, orders(50))
    await run(spec(partition_by="customer_id"), raw_redis, redis_cfg)
    stats, rec = await run(spec(partition_by="customer_id", resume=True), raw_redis, redis_cfg)
    assert rec.events == []
    assert (stats.status, stats.total, stats.failed) == ("completed", 0, 0)


@pytest.mark.anyio
async def test_resume_handles_only_what_was_appended(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig
) -> None:
    add(sync_redis, orders(50))
    await run(spec(partition_by="customer_id"), raw_redis, redis_cfg)
    new = add(sync_redis, orders(20, start=50))
    _, rec = await run(spec(partition_by="customer_id"), raw_redis, redis_cfg)
    assert sorted(rec.ids, key=parse_id) == new
    assert checkpoint(sync_redis)["orders#*"] == new[-1]


@pytest.mark.anyio
async def test_resume_after_stop_replay_continues_after_the_stopping_event(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig
) -> None:
    ids = add(sync_redis, orders(60))
    await run(spec(partitions=1, batch_size=10), raw_redis, redis_cfg, Recorder(stop_on=lambda e: e.data["seq"] == 25))
    _, rec = await run(spec(partitions=1, batch_size=10), raw_redis, redis_cfg)
    assert rec.ids == ids[26:]


@pytest.mark.anyio
async def test_resume_false_starts_over(sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig) -> None:
    ids = add(sync_redis, orders(30))
    await run(spec(), raw_redis, redis_cfg)
    _, rec = await run(spec(resume=False, partitions=1), raw_redis, redis_cfg)
    assert rec.ids == ids


@pytest.mark.anyio
async def test_a_filter_that_matches_nothing_still_moves_the_floor_to_the_head(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig
) -> None:
    ids = add(sync_redis, orders(300))
    stats, rec = await run(spec(types=["NoSuchType"], batch_size=50), raw_redis, redis_cfg)
    assert rec.events == []
    assert stats.skipped == 300
    assert checkpoint(sync_redis)["orders#*"] == ids[-1]
    again, _ = await run(spec(types=["NoSuchType"], batch_size=50), raw_redis, redis_cfg)
    assert again.total == 0


@pytest.mark.anyio
async def test_filtered_tail_still_moves_the_floor(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig
) -> None:
    add(sync_redis, orders(30))
    tail = add(sync_redis, [{"event_type": "Other", "data": "{}"}] * 30)
    await run(spec(types=["OrderCreated"], batch_size=10, partition_by="customer_id"), raw_redis, redis_cfg)
    assert checkpoint(sync_redis)["orders#*"] == tail[-1]


@pytest.mark.anyio
async def test_partitions_without_events_do_not_hold_the_floor_back(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig
) -> None:
    ids = add(sync_redis, orders(100, customers=1))
    await run(spec(partition_by="customer_id", partitions=16), raw_redis, redis_cfg)
    saved = checkpoint(sync_redis)
    assert saved["orders#*"] == ids[-1]
    assert len([f for f in saved if f[len("orders#") :].isdigit()]) == 1
    _, rec = await run(spec(partition_by="customer_id", partitions=16), raw_redis, redis_cfg)
    assert rec.events == []


@pytest.mark.anyio
async def test_resume_skips_what_a_partition_ahead_of_the_floor_committed(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig
) -> None:
    ids = add(sync_redis, orders(60, customers=7))
    router = Router(4, partition_by="customer_id", ordering="key")
    partition_of = {i: router.partition(_keyed(f"c{n % 7}")) for n, i in enumerate(ids)}
    assert 3 in partition_of.values() and len(set(partition_of.values())) > 1
    # committed: every partition up to ids[9], partition 3 up to ids[39]
    sync_redis.hset(CHECKPOINT, mapping={"partitions": 4, "orders#*": ids[9], "orders#3": ids[39]})
    _, rec = await run(spec(partition_by="customer_id"), raw_redis, redis_cfg)
    expected = [i for n, i in enumerate(ids) if n > 39 or (n > 9 and partition_of[i] != 3)]
    assert sorted(rec.ids, key=parse_id) == expected
    assert checkpoint(sync_redis)["orders#*"] == ids[-1]


@pytest.mark.anyio
async def test_changing_partitions_between_runs_is_a_config_error(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig
) -> None:
    add(sync_redis, orders(10))
    await run(spec(partitions=4), raw_redis, redis_cfg)
    with pytest.raises(ConfigError, match="partitions = 4"):
        await run(spec(partitions=8), raw_redis, redis_cfg)


@pytest.mark.anyio
async def test_a_restarted_following_job_keeps_its_history_mark(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig
) -> None:
    first = add(sync_redis, orders(5))
    # an earlier run started when first[-1] was the head, and committed up to first[1]
    sync_redis.hset(CHECKPOINT, mapping={"partitions": 1, "orders#replay_until": first[-1], "orders#*": first[1]})
    later = add(sync_redis, orders(3, start=5))
    rec = Recorder()
    job = engine(spec(end="follow", partitions=1), raw_redis, redis_cfg, rec)
    async with anyio.create_task_group() as tg:
        tg.start_soon(job.run)
        await wait_until(lambda: len(rec.events) == 6)
        job.stop()
    assert rec.ids == first[2:] + later
    assert rec.replaying == [True] * 3 + [False] * 3


def _keyed(customer: str) -> Event:
    return Event("0-0", "", "", {"customer_id": customer}, 0.0, {}, STREAM)


class Slow(Recorder):
    """A Recorder that takes its time, so a stop lands mid-run."""

    async def handle(self, event: Event, ctx: Context) -> None:
        await anyio.sleep(0.001)
        await super().handle(event, ctx)


@pytest.mark.anyio
async def test_a_stopped_run_drains_and_the_next_run_neither_loses_nor_repeats(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig
) -> None:
    ids = add(sync_redis, orders(1500, customers=50))
    first = Slow()
    job = engine(spec(partition_by="customer_id", batch_size=50), raw_redis, redis_cfg, first)
    async with anyio.create_task_group() as tg:
        tg.start_soon(job.run)
        await wait_until(lambda: len(first.events) >= 200)
        job.stop()
    assert job.stats.status == "stopped"
    assert len(first.events) < 1500
    _, second = await run(spec(partition_by="customer_id", batch_size=50), raw_redis, redis_cfg)
    assert not set(first.ids) & set(second.ids)
    assert sorted(first.ids + second.ids, key=parse_id) == ids


# --- commands a Lua call could not take: Redis's Lua passes at most ~8,000 values to one call, and an error there
# ends the commit script after the commands before it ran


def test_tx_splits_long_variadic_commands_into_commands_of_the_same_effect() -> None:
    tx = Tx()
    mapping: dict[str, Arg] = {f"f{i}": i for i in range(5000)}
    tx.hset("h", "first", 0, mapping=mapping)
    tx.sadd("s", *range(10_000))
    tx.zadd("z", {f"m{i}": float(i) for i in range(4000)})
    tx.delete(*(f"k{i}" for i in range(MAX_ARGS)))
    assert all(len(command) <= MAX_ARGS for command in tx.commands)
    hsets = [c for c in tx.commands if c[0] == "HSET"]
    assert len(hsets) == 2 and all(c[1] == "h" and len(c) % 2 == 0 for c in hsets)
    assert dict(zip(*[iter(arg for c in hsets for arg in c[2:])] * 2, strict=True)) == {"first": 0, **mapping}
    assert [m for c in tx.commands if c[0] == "SADD" for m in c[2:]] == list(range(10_000))
    assert all(len(c) % 2 == 0 for c in tx.commands if c[0] == "ZADD")
    assert sum(len(c) - 1 for c in tx.commands if c[0] == "DEL") == MAX_ARGS


def test_tx_refuses_a_command_it_cannot_split_or_that_has_no_arguments() -> None:
    tx = Tx()
    with pytest.raises(ValueError, match="arguments"):
        tx.execute_command("SADD", "s", *range(MAX_ARGS))
    with pytest.raises(ValueError, match="arguments"):
        tx.xadd("x", {f"f{i}": i for i in range(MAX_ARGS // 2)})
    with pytest.raises(ValueError, match="arguments"):
        tx.execute_command()
    assert not tx.commands


@pytest.mark.anyio
async def test_a_handler_writing_a_hash_of_5000_fields_commits_it_whole(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig
) -> None:
    ids = add(sync_redis, orders(3))

    def wide(event: Event, ctx: Context) -> None:
        ctx.tx.hset(ctx.key("wide", event.stream_id), mapping={f"f{i}": i for i in range(5000)})
        ctx.tx.sadd(ctx.key("members"), *(f"{event.stream_id}:{i}" for i in range(9000)))

    stats, _ = await run(spec(partitions=1), raw_redis, redis_cfg, FunctionHandler(wide, "wide"))
    assert (stats.status, stats.processed, stats.failed) == ("completed", 3, 0)
    assert [sync_redis.hlen(f"projection:wide:wide:{i}") for i in ids] == [5000] * 3
    assert sync_redis.scard("projection:wide:members") == 27_000
    assert checkpoint(sync_redis)[f"{STREAM}#*"] == ids[-1]


@pytest.mark.anyio
async def test_a_commit_holding_a_command_the_script_cannot_run_applies_nothing(
    raw_redis: Redis, sync_redis: redis.Redis
) -> None:
    """A command put on `ctx.tx.commands` directly, past `Tx`'s checks (one of MAX_ARGS + 1 arguments): the commit is
    refused whole (no event queued it here, so nothing can be blamed: the job stops); none of its writes applies.
    Without it, the rest applies once with the checkpoint, 5,000 fields of it."""
    send, receive = anyio.create_memory_object_stream[CommitRequest](1)
    committer = Committer(raw_redis, "big", Watermark(), send)
    fields = {f"s#{p}": f"1-{p}" for p in range(5000)}
    commands = [("INCR", "a"), ("SADD", "s", *range(MAX_ARGS - 1)), ("INCR", "b")]
    with pytest.raises(BaseExceptionGroup) as caught:
        async with anyio.create_task_group() as tg:
            tg.start_soon(committer.run, receive)
            async with send:
                await committer.commit(CommitRequest(commands, fields, []))
    [error] = leaves(caught.value)
    assert isinstance(error, DataError) and "a command of 7001 arguments" in str(error)
    assert (sync_redis.get("a"), sync_redis.exists("s"), sync_redis.exists(CHECKPOINT.replace("job", "big"))) == (
        None, 0, 0,
    )  # fmt: skip
    send, receive = anyio.create_memory_object_stream[CommitRequest](1)
    committer = Committer(raw_redis, "big", Watermark(), send)
    async with anyio.create_task_group() as tg:
        tg.start_soon(committer.run, receive)
        async with send:
            await committer.commit(CommitRequest([commands[0], commands[2]], fields, []))
    assert (sync_redis.get("a"), sync_redis.get("b")) == (b"1", b"1")
    stored = checkpoint(sync_redis, "big")
    assert all(stored[name] == value for name, value in fields.items())
