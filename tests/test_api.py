"""The Python API: `replayd.replay`, `replayd.Replay` and `replayd.run`, on a real Redis."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import anyio
import pytest
import redis

import replayd
from replayd import Context, Event
from replayd.config import HttpConfig, JobSpec, RedisConfig, Settings
from replayd.errors import ConfigError
from tests.helpers import STREAM, add, checkpoint, orders, stream_ids, wait_until

pytestmark = pytest.mark.anyio


def count(event: Event, ctx: Context) -> None:
    ctx.tx.hincrby(ctx.key("by_customer"), event.data["customer_id"], 1)


async def test_replay_runs_a_function_and_returns_the_run_s_stats(sync_redis: redis.Redis, redis_url: str) -> None:
    ids = add(sync_redis, orders(20))
    stats = await replayd.replay(redis_url, streams=[STREAM], handler=count, partition_by="customer_id")
    assert (stats.status, stats.total, stats.processed) == ("completed", 20, 20)
    totals = sync_redis.hgetall("projection:count:by_customer")
    assert sum(int(v) for v in totals.values()) == 20
    assert checkpoint(sync_redis, "replay-count")[f"{STREAM}#*"] == ids[-1]


async def test_replay_resumes_a_named_job_from_its_checkpoint(sync_redis: redis.Redis, redis_url: str) -> None:
    add(sync_redis, orders(10))
    first = await replayd.replay(redis_url, streams=[STREAM], handler=count, job="counts", start="checkpoint")
    add(sync_redis, orders(5, start=10))
    again = await replayd.replay(redis_url, streams=[STREAM], handler=count, job="counts", start="checkpoint")
    assert (first.processed, again.processed) == (10, 5)
    assert sum(int(v) for v in sync_redis.hgetall("projection:count:by_customer").values()) == 15


async def test_replay_takes_a_plugin_path_and_a_time_range(sync_redis: redis.Redis, redis_url: str) -> None:
    ids = add(sync_redis, orders(10))
    stats = await replayd.replay(
        redis_url, streams=[STREAM], handler="tests.plugins:Recorder", start=ids[3], end=ids[6]
    )
    assert stats.processed == 4
    assert list(checkpoint(sync_redis, "replay-Recorder")) != []


async def test_bad_arguments_are_config_errors_naming_them(redis_url: str) -> None:
    with pytest.raises(ConfigError, match="partitions"):
        await replayd.replay(redis_url, streams=[STREAM], handler=count, partitions=0)
    with pytest.raises(ConfigError, match="surprise"):
        await replayd.replay(redis_url, streams=[STREAM], handler=count, surprise=1)
    with pytest.raises(ConfigError, match="must start with redis://"):
        await replayd.replay("http://localhost", streams=[STREAM], handler=count)
    with pytest.raises(ConfigError, match="is not a Projection, function or handler object"):
        await replayd.replay(redis_url, streams=[STREAM], handler=42)


async def test_a_replay_s_stats_move_and_stop_ends_a_following_run(sync_redis: redis.Redis, redis_url: str) -> None:
    add(sync_redis, orders(10))
    run = replayd.Replay(replayd.job_spec(streams=[STREAM], handler=count, end="follow"), redis_url, handler=count)
    async with anyio.create_task_group() as tg:
        tg.start_soon(run.run)
        await wait_until(lambda: run.stats.processed == 10)
        add(sync_redis, orders(3, start=10))
        await wait_until(lambda: run.stats.processed == 13)
        run.stop()
    assert run.stats.status == "stopped"


async def test_run_runs_a_daemon_s_jobs_in_process(sync_redis: redis.Redis, redis_url: str) -> None:
    add(sync_redis, orders(12))
    settings = Settings(
        redis=RedisConfig(url=redis_url),
        http=HttpConfig(enabled=False),
        jobs=[JobSpec(name="order_totals_job", streams=[STREAM], handler="tests.plugins:Recorder", end="now")],
    )
    with anyio.fail_after(20):
        await replayd.run(settings)
    assert checkpoint(sync_redis, "order_totals_job")[f"{STREAM}#*"] == stream_ids(sync_redis)[-1]


async def test_run_runs_the_jobs_it_names(sync_redis: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    add(sync_redis, orders(3))
    config = tmp_path / "replayd.toml"
    config.write_text(
        f'[redis]\nurl = "{redis_url}"\n[http]\nenabled = false\n'
        + "".join(
            f'[[jobs]]\nname = "{name}"\nstreams = ["{STREAM}"]\nhandler = "tests.plugins:Recorder"\nend = "now"\n'
            for name in ("one", "two")
        )
    )
    with anyio.fail_after(20):
        await replayd.run(config, jobs=["two"])
    assert checkpoint(sync_redis, "two")
    assert not checkpoint(sync_redis, "one")


async def test_run_without_jobs_or_with_an_unknown_one_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="no jobs configured"):
        await replayd.run(Settings())
    with pytest.raises(ConfigError, match="no job named nope in the settings"):
        await replayd.run(Settings(jobs=[JobSpec(name="one", streams=[STREAM], handler="x:y")]), jobs=["nope"])


def test_import_replayd_loads_names_on_first_use() -> None:
    """`import replayd` (and a plugin's `from replayd import Projection, on`) leaves the engine, its settings and
    its clients unloaded; every exported name still resolves."""
    probe = (
        "import sys, replayd\n"
        "from replayd import Projection, on\n"
        "heavy = [m for m in ('replayd.jobs.engine', 'replayd.api', 'replayd.config', 'pydantic') if m in sys.modules]"
        "\n"
        "assert not heavy, heavy\n"
        "assert all(getattr(replayd, name) is not None for name in replayd.__all__)\n"
        "assert replayd.replay.__module__ == 'replayd.api' and 'replayd.jobs.engine' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", probe], check=True)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        replayd.nothing  # noqa: B018
