"""Data-loss signals at start: trimmed past the checkpoint, stream gone back behind it, checkpoint lost."""

from __future__ import annotations

from typing import Any

import pytest
import redis
from redis.asyncio import Redis

from replayd.config import JobSpec, RedisConfig
from replayd.errors import DataError
from replayd.jobs.engine import Engine
from replayd.ops.metrics import Metrics

STREAM = "s"


def job(**overrides: Any) -> JobSpec:
    values: dict[str, Any] = {"name": "g", "streams": [STREAM], "handler": "tests.plugins:Recorder", "end": "now"}
    return JobSpec(**{**values, **overrides})


def fill(client: redis.Redis, n: int, **xadd: Any) -> None:
    for i in range(n):
        client.xadd(STREAM, {"event_type": "E", "data": f'{{"i": {i}}}'}, **xadd)


async def run(raw_redis: Redis, cfg: RedisConfig, metrics: Metrics | None = None, **overrides: Any) -> Engine:
    engine = Engine(job(**overrides), raw_redis, redis_cfg=cfg, metrics=metrics)
    await engine.run()
    return engine


@pytest.mark.anyio
async def test_trimmed_past_the_checkpoint_stops_with_exit_65(
    raw_redis: Redis, redis_cfg: RedisConfig, sync_redis: redis.Redis
) -> None:
    """1. replay 20 entries  2. while stopped, 200 more arrive under MAXLEN 10  3. restart: a trim gap."""
    fill(sync_redis, 20)
    await run(raw_redis, redis_cfg)
    fill(sync_redis, 200, maxlen=10, approximate=False)
    metrics = Metrics()
    with pytest.raises(DataError, match="trimmed") as caught:
        await run(raw_redis, redis_cfg, metrics)
    assert caught.value.exit_code == 65
    assert STREAM in str(caught.value)
    assert metrics.registry.get_sample_value("replayd_gap_detected_total", {"stream": STREAM, "kind": "trimmed"}) == 1


@pytest.mark.anyio
async def test_skip_policy_goes_on_from_the_first_entry(
    raw_redis: Redis, redis_cfg: RedisConfig, sync_redis: redis.Redis
) -> None:
    fill(sync_redis, 20)
    await run(raw_redis, redis_cfg)
    fill(sync_redis, 200, maxlen=10, approximate=False)
    engine = await run(raw_redis, redis_cfg, on_gap="skip")
    assert engine.stats.processed == 10


@pytest.mark.anyio
async def test_a_stream_gone_back_behind_the_checkpoint_is_divergence(
    raw_redis: Redis, redis_cfg: RedisConfig, sync_redis: redis.Redis
) -> None:
    """1. replay entries with high IDs  2. the stream is recreated with lower IDs (a lagging replica)  3. refused:
    the new entries would otherwise hide below the checkpoint."""
    for i in range(1, 6):
        sync_redis.xadd(STREAM, {"event_type": "E"}, id=f"5000-{i}")
    await run(raw_redis, redis_cfg)
    sync_redis.delete(STREAM)
    for i in range(1, 4):
        sync_redis.xadd(STREAM, {"event_type": "E"}, id=f"4000-{i}")
    with pytest.raises(DataError, match="went back"):
        await run(raw_redis, redis_cfg)


@pytest.mark.anyio
async def test_a_lost_checkpoint_is_refused_unless_allowed(
    raw_redis: Redis, redis_cfg: RedisConfig, sync_redis: redis.Redis
) -> None:
    fill(sync_redis, 30)
    await run(raw_redis, redis_cfg)
    sync_redis.delete("replayd:{g}:checkpoint")
    with pytest.raises(DataError, match="allow_reset"):
        await run(raw_redis, redis_cfg)
    engine = await run(raw_redis, redis_cfg, allow_reset=True)
    assert engine.stats.processed == 30


@pytest.mark.anyio
async def test_a_run_that_committed_nothing_is_no_lost_checkpoint(
    raw_redis: Redis, redis_cfg: RedisConfig, sync_redis: redis.Redis
) -> None:
    await run(raw_redis, redis_cfg)  # empty stream: no checkpoint, a progress hash
    fill(sync_redis, 5)
    engine = await run(raw_redis, redis_cfg)
    assert engine.stats.processed == 5


@pytest.mark.anyio
async def test_entries_with_future_ids_keep_their_order_and_lag_stays_non_negative(
    raw_redis: Redis, redis_cfg: RedisConfig, sync_redis: redis.Redis
) -> None:
    """Fault matrix T31: a producer writes an explicit ID far in the future, then `*` (Redis continues from it)."""
    fill(sync_redis, 3)
    sync_redis.xadd(STREAM, {"event_type": "E", "data": '{"i": 3}'}, id="9999999999999-0")
    sync_redis.xadd(STREAM, {"event_type": "E", "data": '{"i": 4}'})
    metrics = Metrics()
    engine = Engine(job(name="future"), raw_redis, redis_cfg=redis_cfg, metrics=metrics)
    await engine.run()
    assert engine.stats.processed == 5
    lag = metrics.registry.get_sample_value("replayd_lag_seconds", {"stream": STREAM, "replay": "future"})
    assert lag is not None and lag >= 0
