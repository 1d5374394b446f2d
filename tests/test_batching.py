"""Adaptive batching: batches grow while handlers keep up and shrink when a lane batch takes too long."""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import pytest
import redis
from redis.asyncio import Redis

from replayd import Context, Event, Outcome
from replayd.config import JobSpec, RedisConfig
from replayd.engine import Engine
from replayd.handlers import ObjectHandler
from replayd.metrics import Metrics
from replayd.source import BatchSizer


class Sleepy:
    """Takes `per_event_s` per event and records the size of every lane batch it gets."""

    name = "sleepy"
    partition_by = None
    event_types = None

    def __init__(self, per_event_s: float) -> None:
        self.per_event_s = per_event_s
        self.sizes: list[int] = []

    async def handle_batch(self, events: Sequence[Event], ctx: Context) -> Outcome:
        self.sizes.append(len(events))
        await anyio.sleep(self.per_event_s * len(events))
        return Outcome(handled=len(events))


def fill(client: redis.Redis, n: int) -> None:
    with client.pipeline(transaction=False) as pipe:
        for i in range(n):
            pipe.xadd("s", {"event_type": "E", "data": f'{{"i": {i}}}'})
        pipe.execute()


def test_the_sizer_halves_on_slow_batches_and_doubles_on_quick_ones() -> None:
    sizer = BatchSizer(1000, minimum=10, target_s=1.0)
    assert sizer.size == 100
    sizer.observe(2.0)
    assert sizer.size == 50
    for _ in range(10):
        sizer.observe(0.01)
    assert sizer.size == 1000
    for _ in range(10):
        sizer.observe(5.0)
    assert sizer.size == 10


@pytest.mark.anyio
async def test_a_slow_handler_gets_small_batches_and_frequent_checkpoints(
    raw_redis: Redis, redis_cfg: RedisConfig, sync_redis: redis.Redis
) -> None:
    fill(sync_redis, 600)
    handler = Sleepy(per_event_s=0.002)  # a batch of 100 takes 0.2 s: four times the target
    spec = JobSpec(name="slow", streams=["s"], handler="x:y", end="now", partitions=1, batch_target_s=0.05,
                   min_batch_size=5)  # fmt: skip
    metrics = Metrics()
    engine = Engine(spec, raw_redis, redis_cfg=redis_cfg, handler=ObjectHandler(handler, "slow"), metrics=metrics)
    await engine.run()
    assert engine.stats.processed == 600
    assert handler.sizes[0] == 100
    assert max(handler.sizes[4:]) <= 50  # about target / time per event (25), once the first slow batches ran
    commits = metrics.registry.get_sample_value("replayd_checkpoint_commits_total", {"replay": "slow", "result": "ok"})
    assert commits is not None and commits >= 8  # many small commits, not a few big ones


@pytest.mark.anyio
async def test_a_quick_handler_grows_batches_to_the_maximum(
    raw_redis: Redis, redis_cfg: RedisConfig, sync_redis: redis.Redis
) -> None:
    fill(sync_redis, 5000)
    handler = Sleepy(per_event_s=0.0)
    spec = JobSpec(name="quick", streams=["s"], handler="x:y", end="now", partitions=1, batch_size=800)
    engine = Engine(spec, raw_redis, redis_cfg=redis_cfg, handler=ObjectHandler(handler, "quick"))
    await engine.run()
    assert engine.sizer.size == 800
    assert max(handler.sizes) == 800
