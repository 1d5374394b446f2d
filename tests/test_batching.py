"""Adaptive batching: batches grow while handlers keep up and shrink when a lane batch takes too long."""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import pytest
import redis
from redis.asyncio import Redis

from replayd import Context, Event, Outcome
from replayd.config import JobSpec, RedisConfig
from replayd.handlers import ObjectHandler
from replayd.jobs.engine import Engine
from replayd.ops.metrics import Metrics
from replayd.pipeline import source
from replayd.pipeline.source import DECODE_BUDGET_S, BatchSizer


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


class Quick:
    """Never awaits (handled inline) and records the size of every batch it gets."""

    name = "quick"
    partition_by = None
    event_types = None

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def handle_batch(self, events: Sequence[Event], ctx: Context) -> Outcome:
        self.sizes.append(len(events))
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
    handler = Quick()
    spec = JobSpec(name="quick", streams=["s"], handler="x:y", end="now", partitions=1, batch_size=800)
    engine = Engine(spec, raw_redis, redis_cfg=redis_cfg, handler=ObjectHandler(handler, "quick"))
    await engine.run()
    assert engine.sizer.size == 800
    assert max(handler.sizes) == 800
    assert engine.sizer.read_cap is None  # it never awaits: reads are not sized by their decoding


def test_reads_for_handlers_that_await_are_sized_to_decode_within_the_budget() -> None:
    sizer = BatchSizer(1000, minimum=10, target_s=1.0)
    sizer.size = 1000
    assert sizer.read_size == 1000  # no read timed yet
    sizer.observe_decode(1000, 4 * DECODE_BUDGET_S)
    assert sizer.read_cap == sizer.read_size == 250
    sizer.observe_decode(250, DECODE_BUDGET_S / 4)  # quicker now: 1000 would fit, averaged with what was
    assert sizer.read_cap == (3 * 250 + 1000) // 4
    for _ in range(30):
        sizer.observe_decode(10, 1.0)
    assert sizer.read_size == 10  # never below the minimum
    sizer.size = 5
    assert sizer.read_size == 5  # nor above what the lanes' batches (and `max_batch_bytes`) allow


@pytest.mark.anyio
async def test_an_awaiting_handler_gets_reads_it_decodes_within_the_budget(
    raw_redis: Redis, redis_cfg: RedisConfig, sync_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(source, "DECODE_BUDGET_S", 1e-9)  # every read decodes too slowly
    fill(sync_redis, 1000)
    spec = JobSpec(name="awaits", streams=["s"], handler="x:y", end="now", partitions=4, batch_size=500,
                   min_batch_size=20)  # fmt: skip
    metrics = Metrics()
    handler = Sleepy(per_event_s=0.0)
    engine = Engine(spec, raw_redis, redis_cfg=redis_cfg, handler=ObjectHandler(handler, "awaits"), metrics=metrics)
    await engine.run()
    assert engine.stats.processed == 1000
    assert engine.sizer.read_cap == 20
    reads = metrics.registry.get_sample_value("replayd_read_batch_entries_count", {"stream": "s"})
    # without the budget, 1000 entries in about 6 reads; with it, reads of 20 once the first ones (sent while the
    # one before was decoded) are in
    assert reads is not None and reads >= 30
    assert max(handler.sizes) <= 20 * 16  # a lane batch may gather reads waiting in its inbox (16 at most)
