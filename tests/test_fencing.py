"""Two instances of one job and shard: the commit sequence lets only one of them commit."""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import pytest
import redis
from redis.asyncio import Redis

from replayd import Context, Event, Outcome
from replayd.config import JobSpec, RedisConfig
from replayd.engine import Engine
from replayd.errors import FencingError
from replayd.handlers import ObjectHandler
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


@pytest.mark.anyio
async def test_a_second_instance_of_the_same_job_cannot_commit(
    raw_redis: Redis, redis_cfg: RedisConfig, sync_redis: redis.Redis
) -> None:
    """1. two engines, same job, started together  2. one is fenced out (FencingError, exit 75)  3. every
    event's effect exists exactly once: the fenced one committed nothing after the other's first commit."""
    load_history_sync(sync_redis, "s", 3000)
    spec = JobSpec(name="twin", streams=["s"], handler="x:y", end="now", batch_size=100)
    engines = [Engine(spec, raw_redis, redis_cfg=redis_cfg, handler=ObjectHandler(Counter(), "c")) for _ in range(2)]
    outcomes: dict[int, BaseException | None] = {}

    async def run(index: int) -> None:
        try:
            await engines[index].run()
            outcomes[index] = None
        except BaseException as exc:  # noqa: BLE001 - the test inspects what each instance ended with
            outcomes[index] = exc

    async with anyio.create_task_group() as tg:
        for index in range(2):
            tg.start_soon(run, index)
    fenced = [exc for exc in outcomes.values() if exc is not None]
    assert len(fenced) == 1
    assert any(isinstance(leaf, FencingError) for leaf in _leaves(fenced[0]))
    assert int(sync_redis.get("handled") or 0) == 3000  # the fenced instance's script applied nothing
    winner = next(index for index, exc in outcomes.items() if exc is None)
    assert engines[winner].stats.status == "completed"


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]
