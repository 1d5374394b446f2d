"""Fencing across shard layouts (FAULTS T35): processes of one job under different layouts (unsharded, 0/2, 0/3)
never apply a partition at the same time, and resharding (stop the old layout, start the new one) applies every
event once. Each event's effect is a counter in the commit's script: a count of 2 is an event applied twice."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anyio
import pytest
import redis
from redis.asyncio import Redis

from replayd import Context, Event, Outcome
from replayd.config import JobSpec, RedisConfig
from replayd.errors import FencingError, leaves
from replayd.handlers import ObjectHandler
from replayd.jobs.engine import Engine
from replayd.jobs.lease import lease_key
from replayd.pipeline.commit import job_key
from tests.helpers import STREAM, add, orders, wait_until

JOB = "lay"
OWNERS = job_key(JOB, "owners")
EVENTS = 1200


class Outcomes(dict[int, BaseException | None]):
    """What each engine ended with, by its id(): None when it completed."""


class Applied:
    """Counts each event it applies (in the commit), once `gate` (when given) is open."""

    name = "applied"
    partition_by = "customer_id"
    event_types = None

    def __init__(self, gate: anyio.Event | None = None) -> None:
        self.gate = gate

    async def handle_batch(self, events: Sequence[Event], ctx: Context) -> Outcome:
        if self.gate is not None:
            await self.gate.wait()
        for event in events:
            ctx.tx.hincrby("applied", event.stream_id, 1)
        return Outcome(handled=len(events))


def engine(r: Redis, cfg: RedisConfig, shard: str | None, gate: anyio.Event | None = None, **job: Any) -> Engine:
    values = {"name": JOB, "streams": [STREAM], "handler": "x:y", "end": "now", "partitions": 12, "batch_size": 50}
    spec = JobSpec(**values | {"shard": shard, **job})
    return Engine(spec, r, redis_cfg=cfg, handler=ObjectHandler(Applied(gate), "applied"))


def layout(r: Redis, cfg: RedisConfig, total: int, gate: anyio.Event | None = None, **job: Any) -> list[Engine]:
    """Every shard of the layout of `total` shards (1: unsharded)."""
    return [engine(r, cfg, f"{i}/{total}" if total > 1 else None, gate, **job) for i in range(total)]


async def run(engines: list[Engine], outcomes: Outcomes) -> None:
    """Run the engines concurrently, each one's outcome (None: completed) into `outcomes` by its id()."""

    async def one(engine: Engine) -> None:
        try:
            await engine.run()
            outcomes[id(engine)] = None
        except BaseException as exc:  # noqa: BLE001 - the test inspects what each instance ended with
            outcomes[id(engine)] = exc

    async with anyio.create_task_group() as tg:
        for engine in engines:
            tg.start_soon(one, engine)


def assert_applied_once(sync_redis: redis.Redis, ids: list[str]) -> None:
    counts = {k.decode(): int(v) for k, v in sync_redis.hgetall("applied").items()}  # type: ignore[union-attr]
    twice = {entry: n for entry, n in counts.items() if n != 1}
    assert not twice, f"{len(twice)} events applied more than once"
    assert sorted(counts) == sorted(ids)


def fenced_message(exc: BaseException | None) -> str:
    found = [leaf for leaf in leaves(exc) if isinstance(leaf, FencingError)] if exc else []
    assert found, f"expected FencingError (exit 75), got {exc!r}"
    return str(found[0])


async def holding(engines: list[Engine]) -> None:
    """Wait until every engine holds its lease (it has claimed its commit sequence and is gated)."""
    await wait_until(lambda: all(e.stats.status == "catching_up" for e in engines))


@pytest.mark.anyio
@pytest.mark.parametrize(("old", "new"), [(1, 2), (2, 3), (3, 1)], ids=["whole+0/2", "0/2+0/3", "0/3+whole"])
async def test_a_newcomer_of_another_layout_exits_75_naming_the_live_one(
    raw_redis: Redis, redis_cfg: RedisConfig, sync_redis: redis.Redis, old: int, new: int
) -> None:
    """1. the old layout's shards hold their leases, gated  2. a shard of the new layout starts (on_lease_held =
    exit): it exits 75 naming the layout that holds the job  3. the old layout finishes: every event once."""
    ids = add(sync_redis, orders(EVENTS, customers=24))
    gate, outcomes = anyio.Event(), Outcomes()
    olds = layout(raw_redis, redis_cfg, old, gate)
    newcomer = engine(raw_redis, redis_cfg, "0/2" if new == 2 else ("0/3" if new == 3 else None),
                      on_lease_held="exit")  # fmt: skip
    async with anyio.create_task_group() as tg:
        tg.start_soon(run, olds, outcomes)
        await holding(olds)
        await run([newcomer], outcomes)
        gate.set()
    message = fenced_message(outcomes[id(newcomer)])
    assert "another shard layout" in message
    assert ("the whole job (unsharded)" if old == 1 else f"shard 0/{old}") in message
    assert all(outcomes[id(e)] is None for e in olds)
    assert newcomer.stats.processed == 0
    assert_applied_once(sync_redis, ids)


@pytest.mark.anyio
@pytest.mark.parametrize(("old", "new"), [(1, 2), (2, 3)], ids=["whole+0/2", "0/2+0/3"])
async def test_a_newcomer_of_another_layout_waits_until_the_old_one_is_gone(
    raw_redis: Redis, redis_cfg: RedisConfig, sync_redis: redis.Redis, old: int, new: int
) -> None:
    """1. the old layout holds the job, gated  2. the new layout's shards start and wait: nothing applied  3. the
    old layout completes and releases; the new one then runs from its checkpoints: every event once."""
    ids = add(sync_redis, orders(EVENTS, customers=24))
    gate, outcomes = anyio.Event(), Outcomes()
    olds, news = layout(raw_redis, redis_cfg, old, gate), layout(raw_redis, redis_cfg, new, lease_ttl_s=0.6)
    async with anyio.create_task_group() as tg:
        tg.start_soon(run, olds, outcomes)
        await holding(olds)
        tg.start_soon(run, news, outcomes)
        await anyio.sleep(0.5)
        assert all(e.stats.status not in ("catching_up", "completed") for e in news)
        gate.set()
    assert all(outcome is None for outcome in outcomes.values())
    assert sum(e.stats.processed for e in news) == 0
    assert_applied_once(sync_redis, ids)


@pytest.mark.anyio
async def test_resharding_stop_the_old_layout_then_start_the_new_one(
    raw_redis: Redis, redis_cfg: RedisConfig, sync_redis: redis.Redis
) -> None:
    """The documented procedure, layout after layout (unsharded -> 2 -> 3 -> unsharded): each runs to a later ID,
    then stops; the next resumes from the checkpoints the others left. Every event is applied once."""
    ids = add(sync_redis, orders(EVENTS, customers=24))
    cuts = [ids[300], ids[650], ids[900], ids[-1]]
    for total, cut in zip([1, 2, 3, 1], cuts, strict=True):
        outcomes = Outcomes()
        await run(layout(raw_redis, redis_cfg, total, end=cut), outcomes)
        assert all(outcome is None for outcome in outcomes.values())
    assert_applied_once(sync_redis, ids)


@pytest.mark.anyio
async def test_a_late_owner_of_the_old_layout_cannot_commit_beside_the_new_one(
    raw_redis: Redis, redis_cfg: RedisConfig, sync_redis: redis.Redis
) -> None:
    """1. shard 0/2 reads and is gated (a process paused with work in flight)  2. its lease expires (deleted
    here), the 3-shard layout runs the job to its end  3. 0/2 wakes up: its commit is refused (the new layout's
    claim moved its commit sequence), it stops with FencingError  4. every event once."""
    ids = add(sync_redis, orders(EVENTS, customers=24))
    gate, outcomes = anyio.Event(), Outcomes()
    (paused,) = [engine(raw_redis, redis_cfg, "0/2", gate, lease_ttl_s=60)]
    async with anyio.create_task_group() as tg:
        tg.start_soon(run, [paused], outcomes)
        await holding([paused])
        sync_redis.delete(lease_key(JOB, paused.shard), OWNERS)  # as if paused past its TTL
        news = layout(raw_redis, redis_cfg, 3)
        await run(news, outcomes)
        assert all(outcomes[id(e)] is None for e in news)
        gate.set()
    assert "committed by another instance" in fenced_message(outcomes[id(paused)])
    assert_applied_once(sync_redis, ids)


@pytest.mark.anyio
async def test_a_late_commit_between_the_new_owners_claim_and_its_checkpoint_read_is_refused(
    raw_redis: Redis, redis_cfg: RedisConfig, sync_redis: redis.Redis
) -> None:
    """The new owner claims the commit sequence before it reads the checkpoint. 1. A reads, gated, then its lease
    expires  2. B takes the lease; right after B has read the checkpoint, A commits its batches  3. A's commit is
    refused (B's claim came first), so nothing B resumes from is stale  4. every event once."""
    ids = add(sync_redis, orders(EVENTS, customers=24))
    gate, a_done, outcomes = anyio.Event(), anyio.Event(), Outcomes()
    a, b = engine(raw_redis, redis_cfg, None, gate, lease_ttl_s=60), engine(raw_redis, redis_cfg, None)
    read_checkpoint = b.store.load

    async def load_then_late_commit() -> dict[str, str]:
        fields = await read_checkpoint()
        gate.set()  # A's lanes handle their batches and commit now
        await a_done.wait()
        return fields

    b.store.load = load_then_late_commit  # type: ignore[method-assign]

    async def run_a() -> None:
        await run([a], outcomes)
        a_done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run_a)
        await holding([a])
        sync_redis.delete(lease_key(JOB, a.shard), OWNERS)
        await run([b], outcomes)
    assert outcomes[id(b)] is None
    fenced_message(outcomes[id(a)])
    assert_applied_once(sync_redis, ids)
    assert sync_redis.hget(job_key(JOB, "checkpoint"), "seq") is not None
