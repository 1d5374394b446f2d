"""Redis going away mid-replay: the job retries with backoff, resumes, and commits nothing twice or out of order."""

from __future__ import annotations

import signal
from typing import Any

import anyio
import pytest

from replayd.config import JobSpec, RedisConfig
from replayd.connection import create_redis
from replayd.jobs.engine import Engine
from replayd.jobs.rebuild import rebuild_in_place
from replayd.ops.metrics import Metrics
from replayd.sample import load_history_sync
from tests.helpers import order_summaries
from tests.servers import RedisServer

STREAM = "events:orders"


def spec(**overrides: Any) -> JobSpec:
    values: dict[str, Any] = {
        "name": "order_summary", "streams": [STREAM], "handler": "order_summary", "end": "now", "resume": False,
        "batch_size": 200,
    }  # fmt: skip
    return JobSpec(**{**values, **overrides})


@pytest.mark.parametrize("anyio_backend", [pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop")])
@pytest.mark.anyio
async def test_redis_restart_mid_rebuild_completes_with_the_same_projection(fresh_server: RedisServer) -> None:
    """1. 40k events, AOF always  2. rebuild; SIGKILL + restart Redis twice meanwhile  3. == a clean rebuild."""
    with fresh_server.client() as client:
        load_history_sync(client, STREAM, 40_000)
    cfg = RedisConfig(url=fresh_server.url, block_ms=100, socket_timeout_s=2, connect_timeout_s=1)
    metrics = Metrics()
    redis_client = create_redis(cfg)
    engine = Engine(spec(), redis_client, redis_cfg=cfg, metrics=metrics)
    async with anyio.create_task_group() as tg:
        tg.start_soon(rebuild_in_place, engine)
        for _ in range(2):
            await anyio.sleep(0.4)
            await anyio.to_thread.run_sync(fresh_server.restart, signal.SIGKILL)
    await redis_client.aclose()
    assert engine.stats.status == "completed"
    assert (metrics.registry.get_sample_value("replayd_redis_reconnects_total") or 0) > 0
    with fresh_server.client() as client:
        resumed = order_summaries(client)
        clean = create_redis(cfg)
        await rebuild_in_place(Engine(spec(name="clean"), clean, redis_cfg=cfg))
        await clean.aclose()
        assert resumed == order_summaries(client)
