"""Failing handlers and undecodable entries: retries with backoff, then stop (exit 65), dead-letter (with the
later events of the key parked behind), or skip."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
import pytest
import redis
from redis.asyncio import Redis

from replayd import Context, Event
from replayd.config import JobSpec, RedisConfig
from replayd.errors import DataError
from replayd.handlers import ObjectHandler
from replayd.jobs.engine import Engine
from replayd.ops.metrics import Metrics
from tests.helpers import replayd
from tests.plugins import Recorder, SyncRecorder

STREAM = "orders"


def fill(client: redis.Redis, rows: list[tuple[str, int]]) -> list[str]:
    """(customer, seq) rows as events; returns their entry IDs."""
    ids = []
    for customer, seq in rows:
        data = msgspec.json.encode({"customer_id": customer, "seq": seq}).decode()
        ids.append(client.xadd(STREAM, {"event_type": "OrderCreated", "data": data}).decode())  # type: ignore[union-attr]
    return ids


def job(**overrides: Any) -> JobSpec:
    values: dict[str, Any] = {
        "name": "dl", "streams": [STREAM], "handler": "x:y", "end": "now", "partitions": 4,
        "partition_by": "customer_id", "retry_backoff_s": 0.001,
    }  # fmt: skip
    return JobSpec(**{**values, **overrides})


async def run(raw_redis: Redis, cfg: RedisConfig, handler: Any, metrics: Metrics | None = None, **spec: Any) -> Engine:
    engine = Engine(job(**spec), raw_redis, redis_cfg=cfg, handler=ObjectHandler(handler, "r"), metrics=metrics)
    await engine.run()
    return engine


class Flaky(Recorder):
    """Fails `times` times on the events `fail_on` picks, then succeeds."""

    def __init__(self, fail_on: Callable[[Event], bool], times: int) -> None:
        super().__init__(write=True)
        self.pick = fail_on
        self.left: dict[str, int] = {}
        self.times = times

    async def handle(self, event: Event, ctx: Context) -> None:
        if self.pick(event):
            left = self.left.setdefault(event.stream_id, self.times)
            if left:
                self.left[event.stream_id] = left - 1
                ctx.tx.set("should-not-exist", 1)  # dropped with the failed attempt
                raise RuntimeError("transient")
        await super().handle(event, ctx)


@pytest.mark.anyio
async def test_transient_failures_are_retried_and_succeed(
    raw_redis: Redis, redis_cfg: RedisConfig, sync_redis: redis.Redis
) -> None:
    fill(sync_redis, [("a", i) for i in range(10)])
    metrics = Metrics()
    handler = Flaky(lambda e: e.data["seq"] == 4, times=2)
    engine = await run(raw_redis, redis_cfg, handler, metrics, retries=3)
    assert (engine.stats.processed, engine.stats.failed) == (10, 0)
    assert [e.data["seq"] for e in handler.events] == list(range(10))  # order kept through the retries
    assert not sync_redis.exists("should-not-exist")
    retried = metrics.registry.get_sample_value(
        "replayd_handler_events_total", {"stream": STREAM, "replay": "dl", "outcome": "retried"}
    )
    assert retried == 2


@pytest.mark.anyio
@pytest.mark.parametrize("recorder", [Recorder, SyncRecorder], ids=["lanes", "inline"])
async def test_stop_commits_what_came_before_and_exits_65(
    raw_redis: Redis, redis_cfg: RedisConfig, sync_redis: redis.Redis, recorder: type[Recorder]
) -> None:
    ids = fill(sync_redis, [("a", i) for i in range(10)])
    handler = recorder(write=True, fail_on=lambda e: e.data["seq"] == 6)
    with pytest.raises(DataError, match=f"{STREAM} {ids[6]}") as caught:
        await run(raw_redis, redis_cfg, handler, retries=1, partitions=1)  # a bounded job stops by default
    assert caught.value.exit_code == 65
    seen = {k.decode().rsplit(":", 1)[1] for k in sync_redis.scan_iter("projection:recorder:seen:*")}
    assert seen == set(ids[:6])
    assert sync_redis.hget("replayd:{dl}:checkpoint", f"{STREAM}#0") == ids[5].encode()


@pytest.mark.anyio
async def test_dead_letters_park_the_rest_of_the_key_and_let_other_keys_go_on(
    raw_redis: Redis, redis_cfg: RedisConfig, sync_redis: redis.Redis
) -> None:
    ids = fill(sync_redis, [("a", 0), ("b", 1), ("a", 2), ("b", 3), ("a", 4), ("b", 5)])
    metrics = Metrics()
    handler = Recorder(fail_on=lambda e: e.data["seq"] == 2)
    engine = await run(raw_redis, redis_cfg, handler, metrics, on_poison="dead-letter", retries=1)
    assert sorted(e.data["seq"] for e in handler.events) == [0, 1, 3, 5]  # a's 4 waits behind its 2
    letters: Any = sync_redis.xrange("replayd:{dl}:dlq")
    assert [(f[b"id"].decode(), f[b"key"], f[b"error_type"]) for _, f in letters] == [
        (ids[2], b"a", b"RuntimeError"),
        (ids[4], b"a", b"Parked"),
    ]
    assert letters[0][1][b"attempts"] == b"2"
    assert msgspec.json.decode(letters[0][1][b"data"]) == {"customer_id": "a", "seq": 2}
    assert sync_redis.hgetall("replayd:{dl}:parked") == {b"a": ids[2].encode()}
    assert (engine.stats.dead_lettered, engine.stats.parked, engine.stats.parked_keys) == (1, 1, 1)
    assert engine.stats.status == "completed"
    for outcome in ("dead_lettered", "parked"):  # failed for good, and waiting behind it: both letters
        labels = {"stream": STREAM, "replay": "dl", "outcome": outcome}
        assert metrics.registry.get_sample_value("replayd_handler_events_total", labels) == 1


@pytest.mark.anyio
async def test_a_parked_key_stays_parked_across_restarts(
    raw_redis: Redis, redis_cfg: RedisConfig, sync_redis: redis.Redis
) -> None:
    fill(sync_redis, [("a", 0), ("a", 1)])
    await run(raw_redis, redis_cfg, Recorder(fail_on=lambda e: e.data["seq"] == 0), on_poison="dead-letter", retries=0)
    fill(sync_redis, [("a", 2), ("b", 3)])
    handler = Recorder()
    await run(raw_redis, redis_cfg, handler, on_poison="dead-letter")
    assert [e.data["seq"] for e in handler.events] == [3]
    assert sync_redis.xlen("replayd:{dl}:dlq") == 3


@pytest.mark.anyio
async def test_undecodable_entries_stop_or_are_dead_lettered(
    raw_redis: Redis, redis_cfg: RedisConfig, sync_redis: redis.Redis
) -> None:
    fill(sync_redis, [("a", 0)])
    bad = sync_redis.xadd(STREAM, {"event_type": "X", "data": "{broken"}).decode()  # type: ignore[union-attr]
    with pytest.raises(DataError, match=f"{STREAM} {bad}"):
        await run(raw_redis, redis_cfg, Recorder(decode=True))
    engine = await run(raw_redis, redis_cfg, Recorder(decode=True), on_poison="dead-letter", name="dl2")
    assert engine.stats.poison == 1
    letters: Any = sync_redis.xrange("replayd:{dl2}:dlq")
    assert letters[0][1][b"id"] == bad.encode()
    assert msgspec.json.decode(letters[0][1][b"raw"])["data"] == "{broken"


@pytest.mark.anyio
async def test_dlq_list_retry_and_discard_from_the_command_line(
    raw_redis: Redis, redis_cfg: RedisConfig, sync_redis: redis.Redis, redis_url: str
) -> None:
    """1. a/2 fails for good, a/4 is parked behind it  2. `dlq list` shows both  3. `dlq retry` with a handler
    that works now handles both in order and unparks `a`  4. `dlq discard --all` empties what is left."""
    ids = fill(sync_redis, [("a", 0), ("b", 1), ("a", 2), ("a", 4), ("b", 5)])
    await run(raw_redis, redis_cfg, Recorder(fail_on=lambda e: e.data["seq"] == 2), on_poison="dead-letter", retries=0)
    listed = replayd("dlq", "list", "dl", "--redis-url", redis_url)
    assert listed.returncode == 0, listed.stderr
    assert ids[2] in listed.stdout and ids[3] in listed.stdout and "Parked" in listed.stdout
    retried = replayd("dlq", "retry", "dl", "--handler", "tests.lifecycle_plugins:mark_seen", "--redis-url", redis_url)
    assert retried.returncode == 0, retried.stderr
    assert "2 handled and removed, 0 left" in retried.stdout
    assert sync_redis.exists(f"seen:{ids[2]}", f"seen:{ids[3]}") == 2
    assert sync_redis.xlen("replayd:{dl}:dlq") == 0
    assert not sync_redis.exists("replayd:{dl}:parked")
    sync_redis.xadd("replayd:{dl}:dlq", {"stream": STREAM, "id": "1-1", "key": "z", "error": "x"})
    assert replayd("dlq", "discard", "dl", "--all", "--redis-url", redis_url).returncode == 2  # needs --yes
    assert replayd("dlq", "discard", "dl", "--all", "--yes", "--redis-url", redis_url).returncode == 0
    assert sync_redis.xlen("replayd:{dl}:dlq") == 0


@pytest.mark.anyio
async def test_a_retried_letter_s_command_no_redis_command_takes_is_left_out(
    raw_redis: Redis, redis_cfg: RedisConfig, sync_redis: redis.Redis, redis_url: str
) -> None:
    """As in a commit: the retry applies the letter's other writes and removes it; the bad command is logged."""
    ids = fill(sync_redis, [("a", 0), ("a", 2)])
    await run(raw_redis, redis_cfg, Recorder(fail_on=lambda e: e.data["seq"] == 2), on_poison="dead-letter", retries=0)
    handler = "tests.lifecycle_plugins:mark_seen_with_a_bad_value"
    retried = replayd("dlq", "retry", "dl", "--handler", handler, "--redis-url", redis_url)
    assert retried.returncode == 0, retried.stderr
    assert "1 handled and removed, 0 left" in retried.stdout
    assert sync_redis.exists(f"seen:{ids[1]}") and not sync_redis.exists(f"bad:{ids[1]}")
    assert "cannot be sent, left out of the retry of dead letter" in retried.stderr
