"""replayd's order_summary rebuild leaves exactly what the article's ProjectionRebuilder leaves.

The oracle (tests/article.py) is slow, so these run on one backend only.
"""

from __future__ import annotations

from typing import Any

import pytest
import redis
from redis.asyncio import Redis

from replayd.config import JobSpec, RedisConfig
from replayd.jobs.engine import Engine
from replayd.jobs.rebuild import rebuild_in_place
from replayd.sample import load_history_sync
from tests.article import order_summary_rebuilder
from tests.helpers import snapshot

pytestmark = pytest.mark.anyio

STREAM = "events:orders"
PATTERN = "projection:order_summary:*"
META = "projection:order_summary:meta"


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("asyncio", {"use_uvloop": True})


def job(**overrides: Any) -> JobSpec:
    values: dict[str, Any] = {"name": "rebuild", "streams": [STREAM], "handler": "order_summary", "end": "now"}
    values.update(overrides)
    return JobSpec(**values)


def clear(r: redis.Redis) -> None:
    keys = list(r.scan_iter(match=PATTERN, count=1000))
    if keys:
        r.delete(*keys)


async def rebuild(r: Redis, cfg: RedisConfig, **overrides: Any) -> None:
    stats = await rebuild_in_place(Engine(job(**overrides), r, redis_cfg=cfg))
    assert (stats.status, stats.failed, stats.poison) == ("completed", 0, 0)


def split_meta(snap: dict[str, Any]) -> tuple[dict[str, Any], dict[bytes, bytes]]:
    kind, meta = snap.pop(META)
    assert kind == "hash"
    return snap, meta


def assert_same_projection(expected: dict[str, Any], actual: dict[str, Any]) -> None:
    assert actual.keys() == expected.keys()
    differing = [key for key in expected if actual[key] != expected[key]]
    assert not differing, [(key, expected[key], actual[key]) for key in differing[:5]]


def assert_same_meta(expected: dict[bytes, bytes], actual: dict[bytes, bytes]) -> None:
    assert actual.keys() == expected.keys() == {b"rebuilt_at", b"total_events", b"processed_events"}
    assert actual[b"total_events"] == expected[b"total_events"]
    assert actual[b"processed_events"] == expected[b"processed_events"]
    float(actual[b"rebuilt_at"])


async def test_rebuild_equals_the_article_on_50k_events(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig
) -> None:
    load_history_sync(sync_redis, STREAM, 50_000)
    order_summary_rebuilder(sync_redis, STREAM).rebuild("order_summary")
    article, article_meta = split_meta(snapshot(sync_redis, PATTERN))
    statuses = {fields[b"status"] for _, fields in article.values() if b"status" in fields}
    assert statuses == {b"created", b"shipped", b"cancelled"}
    assert int(article_meta[b"total_events"]) == 50_000

    clear(sync_redis)
    await rebuild(raw_redis, redis_cfg, partitions=16)
    ours, ours_meta = split_meta(snapshot(sync_redis, PATTERN))

    assert_same_projection(article, ours)
    assert_same_meta(article_meta, ours_meta)


async def test_one_partition_and_64_partitions_build_the_same_projection(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig
) -> None:
    load_history_sync(sync_redis, STREAM, 5_000, seed=11, customers=300)
    await rebuild(raw_redis, redis_cfg, partitions=1, concurrency=1)
    serial, serial_meta = split_meta(snapshot(sync_redis, PATTERN))

    await rebuild(raw_redis, redis_cfg, partitions=64, concurrency=64, batch_size=100)
    parallel, parallel_meta = split_meta(snapshot(sync_redis, PATTERN))

    assert len(serial) > 1000
    assert_same_projection(serial, parallel)
    assert_same_meta(serial_meta, parallel_meta)
