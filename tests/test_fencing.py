"""Two instances of one job and shard: the commit sequence lets only one of them commit."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anyio
import pytest
import redis
from redis.asyncio import Redis

from replayd import Context, Event, Outcome
from replayd.config import JobSpec, RedisConfig
from replayd.errors import FencingError
from replayd.events import WHOLE
from replayd.handlers import ObjectHandler
from replayd.jobs.engine import Engine
from replayd.jobs.lease import Lease
from replayd.sample import load_history_sync


class Counter:
    """Counts every handled event in Redis, in the commit's script."""

    name = "counter"
    partition_by = None
    event_types = None

    async def handle_batch(self, events: Sequence[Event], ctx: Context) -> Outcome:
        await anyio.sleep(0.01)
        ctx.tx.incrby("handled", len(events))
        return Outcome(handled=len(events))


async def run_all(engines: list[Engine]) -> dict[int, BaseException | None]:
    """Run the engines concurrently; what each ended with (None: completed)."""
    outcomes: dict[int, BaseException | None] = {}

    async def run(index: int) -> None:
        try:
            await engines[index].run()
            outcomes[index] = None
        except BaseException as exc:  # noqa: BLE001 - the test inspects what each instance ended with
            outcomes[index] = exc

    async with anyio.create_task_group() as tg:
        for index in range(len(engines)):
            tg.start_soon(run, index)
            await anyio.sleep(0.05)  # the first one takes the lease
    return outcomes


def counters(raw_redis: Redis, redis_cfg: RedisConfig, n: int, **job: Any) -> list[Engine]:
    spec = JobSpec(name="twin", streams=["s"], handler="x:y", end="now", batch_size=100, **job)
    return [Engine(spec, raw_redis, redis_cfg=redis_cfg, handler=ObjectHandler(Counter(), "c")) for _ in range(n)]


@pytest.mark.anyio
async def test_a_second_instance_exits_75_while_the_lease_is_held(
    raw_redis: Redis, redis_cfg: RedisConfig, sync_redis: redis.Redis
) -> None:
    load_history_sync(sync_redis, "s", 3000)
    outcomes = await run_all(counters(raw_redis, redis_cfg, 2, on_lease_held="exit"))
    assert outcomes[0] is None
    assert any(isinstance(leaf, FencingError) and "held by" in str(leaf) for leaf in _leaves(outcomes[1]))
    assert int(sync_redis.get("handled") or 0) == 3000


@pytest.mark.anyio
async def test_a_second_instance_waits_for_the_lease_then_resumes(
    raw_redis: Redis, redis_cfg: RedisConfig, sync_redis: redis.Redis
) -> None:
    load_history_sync(sync_redis, "s", 2000)
    engines = counters(raw_redis, redis_cfg, 2, lease_ttl_s=0.3)
    outcomes = await run_all(engines)
    assert outcomes == {0: None, 1: None}
    assert engines[1].stats.processed == 0  # it started after the first had committed everything
    assert int(sync_redis.get("handled") or 0) == 2000


@pytest.mark.anyio
async def test_an_owner_whose_lease_was_taken_over_is_fenced(
    raw_redis: Redis, redis_cfg: RedisConfig, sync_redis: redis.Redis
) -> None:
    """1. A holds the lease and replays slowly  2. its lease vanishes (a pause past the TTL), B takes it  3. A
    stops with FencingError, its later commits refused; B finishes  4. every event counted exactly once."""
    load_history_sync(sync_redis, "s", 3000)
    first, second = counters(raw_redis, redis_cfg, 2, lease_ttl_s=0.6)
    outcomes: dict[str, BaseException | None] = {}

    async def run(name: str, engine: Engine) -> None:
        try:
            await engine.run()
            outcomes[name] = None
        except BaseException as exc:  # noqa: BLE001 - inspected below
            outcomes[name] = exc

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, "a", first)
        await anyio.sleep(0.3)
        sync_redis.delete("replayd:{twin}:lease")  # as if A had been paused past its TTL
        tg.start_soon(run, "b", second)
    assert outcomes["b"] is None
    assert any(isinstance(leaf, FencingError) for leaf in _leaves(outcomes["a"]))
    assert int(sync_redis.get("handled") or 0) == 3000


@pytest.mark.anyio
async def test_a_lease_set_whose_reply_was_lost_is_held(raw_redis: Redis, sync_redis: redis.Redis) -> None:
    """The SET NX applied but its reply lost with the connection: the retried acquire finds its own token and
    holds the lease, instead of waiting out its own TTL (or exiting 75 as if another instance held it)."""
    lease = Lease(raw_redis, "twin", WHOLE, ttl_ms=60_000, wait=False)
    sync_redis.set(lease.key, lease.token, px=60_000)
    with anyio.fail_after(1):
        assert await lease.acquire(anyio.Event())
    await lease.release()
    assert sync_redis.get(lease.key) is None


def _leaves(exc: BaseException | None) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc] if exc is not None else []


@pytest.mark.anyio
async def test_stop_while_waiting_for_the_lease_returns_at_once(
    raw_redis: Redis, redis_cfg: RedisConfig, sync_redis: redis.Redis
) -> None:
    sync_redis.set("replayd:{twin}:lease", "someone-else", px=60_000)
    (engine,) = counters(raw_redis, redis_cfg, 1)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            await anyio.sleep(0.2)
            engine.stop()
    assert engine.stats.status == "stopped"
    assert sync_redis.get("replayd:{twin}:lease") == b"someone-else"
