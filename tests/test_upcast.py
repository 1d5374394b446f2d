"""Upcasting: old versions of an event type reach filters and handlers in the newest shape."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
import redis
from redis.asyncio import Redis

from replayd.config import RedisConfig
from replayd.errors import ConfigError, DataError
from replayd.handlers.upcast import Upcasters
from replayd.jobs.engine import Engine
from replayd.pipeline.router import Partitioner
from tests.helpers import STREAM, add, checkpoint, entry, run, spec
from tests.plugins import OrderTotals, Recorder, order_v1_to_v2, order_v2_to_v3

pytestmark = pytest.mark.anyio


def mixed_history() -> list[dict[str, str]]:
    """The same kind of order in its three versions, interleaved, for customers a and b."""
    return [
        entry(data={"order": "o1", "customer": "a", "amount": "12.50"}),  # v1: no schema_version
        entry(data={"order_id": "o2", "customer_id": "b", "amount": 3.0}, metadata={"schema_version": 2}),
        entry(data={"order_id": "o3", "customer_id": "a", "total_cents": 700}, metadata={"schema_version": 3}),
        entry(data={"order": "o4", "customer": "b", "amount": "0.99"}, metadata={"schema_version": 1}),
        entry(data={"order_id": "o5", "customer_id": "a", "amount": 20}, metadata={"schema_version": "2"}),
    ]


async def test_a_projection_for_the_newest_version_replays_a_history_of_three(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig
) -> None:
    add(sync_redis, mixed_history())
    projection = OrderTotals()
    stats, _ = await run(spec(partition_by=None), raw_redis, redis_cfg, projection)
    assert (stats.processed, stats.failed) == (5, 0)
    assert projection.versions == [3, 3, 3, 3, 3]
    orders = {f"o{i}": sync_redis.hgetall(f"projection:order_totals:order:o{i}") for i in range(1, 6)}
    assert orders == {
        "o1": {b"customer": b"a", b"cents": b"1250"},
        "o2": {b"customer": b"b", b"cents": b"300"},
        "o3": {b"customer": b"a", b"cents": b"700"},
        "o4": {b"customer": b"b", b"cents": b"99"},
        "o5": {b"customer": b"a", b"cents": b"2000"},
    }
    assert sync_redis.hget("projection:order_totals:customer:a", "cents") == b"3950"


async def test_events_are_routed_by_their_upcast_partition_key(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig
) -> None:
    """v1 stores the customer as `customer`: upcast, it goes to `customer_id`'s partition, with v2 and v3."""
    add(sync_redis, mixed_history())
    projection = OrderTotals()  # partition_by = "customer_id"
    await run(spec(partitions=8), raw_redis, redis_cfg, projection)
    partition = Partitioner(8, [True] * 8)
    assert partition["default"] not in {partition["a"], partition["b"]}
    fields = {f"{STREAM}#{partition[key]}" for key in ("a", "b")}
    assert {f for f in checkpoint(sync_redis) if f[len(STREAM) + 1 :].isdigit()} == fields  # none for `default`


async def test_a_job_s_upcasters_run_before_its_filters(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig
) -> None:
    add(sync_redis, mixed_history())
    job = spec(upcasters="tests.plugins:ORDER_UPCASTERS", where=["data.total_cents>=1000"])
    _, recorder = await run(job, raw_redis, redis_cfg, Recorder())
    assert [e.data["order_id"] for e in recorder.events] == ["o1", "o5"]
    assert {e.metadata["schema_version"] for e in recorder.events} == {3}


async def test_an_upcaster_that_raises_makes_the_event_poison_without_retries(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig
) -> None:
    ids = add(sync_redis, [*mixed_history(), entry(data={"bad": True})])
    calls: list[str] = []

    def counting(data: dict[str, Any]) -> dict[str, Any]:
        calls.append(str(data))
        return order_v1_to_v2(data)

    class Counting(OrderTotals):
        upcasters = Upcasters({("OrderCreated", 1): counting, ("OrderCreated", 2): order_v2_to_v3})

    job = spec(on_poison="dead-letter", retries=3, retry_backoff_s=0.001)
    stats, _ = await run(job, raw_redis, redis_cfg, Counting())
    assert (stats.processed, stats.poison, stats.dead_lettered) == (5, 1, 1)
    assert len(calls) == 3  # o1, o4 and the bad one, once each
    letters: Any = sync_redis.xrange("replayd:{job}:dlq")
    ((_, letter),) = letters
    assert letter[b"id"].decode() == ids[-1]
    assert b"upcaster of OrderCreated v1 raised ValueError: cannot read this order" in letter[b"error"]
    assert msgspec.json.decode(msgspec.json.decode(letter[b"raw"])["data"]) == {"bad": True}


def test_a_broken_chain_or_a_bad_version_path_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="none from version 2"):
        Upcasters({("OrderCreated", 1): dict, ("OrderCreated", 3): dict})
    with pytest.raises(ConfigError, match="must be metadata"):
        Upcasters(version="headers.v")
    with pytest.raises(ConfigError, match="two upcasters of OrderCreated from version 1"):
        Upcasters({("OrderCreated", 1): dict}).register("OrderCreated", 1)(dict)


async def test_the_version_field_is_configurable(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig
) -> None:
    add(sync_redis, [entry(data={"v": 1, "n": 1}), entry(data={"v": 2, "n": 2})])
    recorder = Recorder()
    recorder.upcasters = Upcasters({("OrderCreated", 1): lambda d: {**d, "n": d["n"] * 10}}, version="data.v")  # type: ignore[attr-defined]
    await run(spec(), raw_redis, redis_cfg, recorder)
    assert [e.data for e in recorder.events] == [{"v": 2, "n": 10}, {"v": 2, "n": 2}]


async def test_under_on_poison_stop_an_upcaster_s_error_stops_the_job_after_the_events_before_it(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig
) -> None:
    ids = add(sync_redis, [*mixed_history()[:2], entry(data={"bad": True}), *mixed_history()[2:]])
    projection = OrderTotals()
    with pytest.raises(DataError, match=f"entry orders {ids[2]} cannot be decoded.*upcaster of OrderCreated v1") as e:
        await run(spec(partition_by=None), raw_redis, redis_cfg, projection)
    assert e.value.exit_code == 65
    assert projection.versions == [3, 3]
    assert checkpoint(sync_redis)[f"{STREAM}#*"] == ids[1]


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("tests.nowhere:UPCASTERS", "cannot import module"),
        ("tests.plugins:Recorder", "expected an Upcasters or a dict of"),
    ],
)
async def test_a_job_s_upcasters_that_cannot_be_used_are_a_config_error(
    path: str, message: str, raw_redis: Redis, redis_cfg: RedisConfig
) -> None:
    with pytest.raises(ConfigError, match=message):
        Engine(spec(upcasters=path), raw_redis, redis_cfg=redis_cfg, handler=OrderTotals())
