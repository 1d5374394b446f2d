"""Replay control: pause and resume a running job through its progress hash."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import anyio
import pytest
import redis
from redis.asyncio import Redis

from replayd import Context, Event
from replayd.config import JobSpec, RedisConfig
from replayd.handlers import ObjectHandler
from replayd.jobs.engine import Engine
from replayd.jobs.plan import plan
from tests.helpers import as_text, replayd
from tests.plugins import Recorder


async def eventually(condition: Callable[[], bool], within: float = 10) -> None:
    with anyio.fail_after(within):
        while not condition():  # noqa: ASYNC110 - polling state another process writes
            await anyio.sleep(0.05)


@pytest.mark.anyio
async def test_pause_holds_new_events_and_resume_lets_them_through(
    raw_redis: Redis, redis_cfg: RedisConfig, sync_redis: redis.Redis, redis_url: str
) -> None:
    """1. a following job is live  2. `replayd pause`: status paused, new events wait  3. `replayd resume`: they
    are handled, in order."""
    sync_redis.xadd("s", {"event_type": "E", "data": '{"i": 0}'})
    handler = Recorder()
    spec = JobSpec(name="ctl", streams=["s"], handler="x:y", end="follow", progress_interval_s=0.05)
    engine = Engine(spec, raw_redis, redis_cfg=redis_cfg, handler=ObjectHandler(handler, "r"))
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        await eventually(lambda: engine.stats.status == "live" and len(handler.events) == 1)
        paused = await anyio.to_thread.run_sync(replayd, "pause", "ctl", "--redis-url", redis_url)
        assert paused.returncode == 0, paused.stderr
        await eventually(lambda: sync_redis.hget("replayd:{ctl}:progress", "status") == b"paused")
        for i in range(1, 4):
            sync_redis.xadd("s", {"event_type": "E", "data": f'{{"i": {i}}}'})
        await anyio.sleep(0.8)
        assert len(handler.events) == 1
        resumed = await anyio.to_thread.run_sync(replayd, "resume", "ctl", "--redis-url", redis_url)
        assert resumed.returncode == 0, resumed.stderr
        await eventually(lambda: len(handler.events) == 4)
        assert [e.data["i"] for e in handler.events] == [0, 1, 2, 3]
        assert engine.stats.status == "live"
        engine.stop()
    started = time.monotonic()
    assert replayd("pause", "nope", "--redis-url", redis_url).returncode == 2
    assert time.monotonic() - started < 30


@pytest.mark.anyio
async def test_plan_counts_entries_by_type_and_changes_nothing(
    raw_redis: Redis, redis_cfg: RedisConfig, sync_redis: redis.Redis, redis_url: str
) -> None:
    for i in range(30):
        sync_redis.xadd("s", {"event_type": "A" if i % 3 else "B", "data": "{}"})
    before = sorted(sync_redis.keys())
    done = await anyio.to_thread.run_sync(
        replayd, "plan", "--redis-url", redis_url, "--stream", "s", "--handler", "order_summary", "--json"
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["streams"]["s"]["entries"] == 30
    assert report["streams"]["s"]["types"] == {"A": 20, "B": 10}
    assert report["streams"]["s"]["exact"] is True
    assert sorted(sync_redis.keys()) == before  # read-only


def test_dry_run_runs_the_handlers_from_the_checkpoint_and_writes_nothing(
    sync_redis: redis.Redis, redis_url: str
) -> None:
    ids = [sync_redis.xadd("s", {"event_type": "OrderShipped", "data": json.dumps({"order_id": f"o{i % 3}"})})
           for i in range(10)]  # fmt: skip
    where = ("--redis-url", redis_url, "--stream", "s", "--handler", "order_summary", "--job", "j")
    assert replayd("replay", *where, "--to", as_text(ids[3])).returncode == 0  # the job's checkpoint: 4 done
    state = {k: sync_redis.dump(k) for k in sync_redis.keys()}
    done = replayd("replay", *where, "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "dry run: read 6 events" in done.stderr
    assert "projection:order_summary:order:*: 6 commands (HSET 6) on 3 keys" in done.stdout
    assert {k: sync_redis.dump(k) for k in sync_redis.keys()} == state, "nothing written, nothing left behind"
    rebuild = replayd("rebuild", *where, "--dry-run")
    assert "projection:order_summary:v1:order:*: 10 commands (HSET 10) on 3 keys" in rebuild.stdout


@pytest.mark.anyio
async def test_plan_extrapolates_beyond_the_exact_bound(
    raw_redis: Redis, redis_cfg: RedisConfig, sync_redis: redis.Redis
) -> None:
    for i in range(1, 401):
        sync_redis.xadd("s", {"event_type": "A"}, id=f"{i}-0")
    spec = JobSpec(name="p", streams=["s"], handler="order_summary", end="now")
    report = await plan(Engine(spec, raw_redis, redis_cfg=redis_cfg), exact_up_to=100, page=50)
    about = report["streams"]["s"]
    assert about["exact"] is False
    assert 300 <= about["entries"] <= 500


@pytest.mark.anyio
async def test_rate_limit_spaces_the_reads(raw_redis: Redis, redis_cfg: RedisConfig, sync_redis: redis.Redis) -> None:
    for i in range(300):
        sync_redis.xadd("s", {"event_type": "E", "data": f'{{"i": {i}}}'})
    spec = JobSpec(name="rl", streams=["s"], handler="x:y", end="now", batch_size=100, min_batch_size=100,
                   rate_limit=1000)  # fmt: skip
    engine = Engine(spec, raw_redis, redis_cfg=redis_cfg, handler=ObjectHandler(Recorder(), "r"))
    started = time.monotonic()
    await engine.run()
    assert engine.stats.processed == 300
    assert time.monotonic() - started >= 0.18  # 300 entries at 1000/s: the 2nd and 3rd batch wait 0.1 s each


@pytest.mark.anyio
async def test_speed_plays_events_back_at_their_original_pace(
    raw_redis: Redis, redis_cfg: RedisConfig, sync_redis: redis.Redis
) -> None:
    """Producer timestamps 1 s apart, played at 10x: about 0.1 s apart, in order."""
    for i in range(5):
        sync_redis.xadd("s", {"event_type": "E", "data": f'{{"i": {i}}}', "timestamp": str(1_700_000_000 + i)})
    seen: list[float] = []

    class Clock(Recorder):
        async def handle(self, event: Event, ctx: Context) -> None:
            seen.append(time.monotonic())
            await super().handle(event, ctx)

    spec = JobSpec(name="sp", streams=["s"], handler="x:y", end="now", speed=10, min_batch_size=1, batch_size=1)
    await Engine(spec, raw_redis, redis_cfg=redis_cfg, handler=ObjectHandler(Clock(), "r")).run()
    assert len(seen) == 5
    assert seen[-1] - seen[0] >= 0.35
    assert seen == sorted(seen)


def test_speed_must_be_positive(redis_url: str) -> None:
    done = replayd("replay", "--redis-url", redis_url, "--stream", "s", "--handler", "order_summary", "--speed", "0x")
    assert done.returncode == 2
    assert "speed" in done.stderr
