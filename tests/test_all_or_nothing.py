"""A commit applies all of its writes or none (FAULTS T33, T34, T37, T38): out of memory is an outage to wait out,
a write Redis would refuse makes the event that queued it poison, an evicting maxmemory-policy is refused at start,
and commits stay bounded (split between events) so that Redis never answers another client BUSY."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis
from redis.asyncio import Redis

from replayd.config import JobSpec, RedisConfig
from replayd.connection import Memory, create_redis
from replayd.errors import CheckpointLost, CommitError, ConfigError, DataError, leaves
from replayd.events import Event, parse_id
from replayd.handlers import CHECKED_COMMANDS, Context, FunctionHandler, Projection, on
from replayd.jobs.engine import Engine
from replayd.ops.metrics import Metrics
from replayd.pipeline.commit import CommitRequest, Committer, Watermark
from replayd.pipeline.script import COMMIT_SCRIPT, script_args
from tests.faultproxy import FaultProxy
from tests.helpers import STREAM, add, checkpoint, orders, replayd, spawn_replayd, wait_for, wait_until
from tests.servers import RedisServer

# --- the check pass of the commit script against what Redis does


SEEDED: list[tuple[Any, ...]] = [
    ("HSET", "h", "n", 5, "s", "x", "f", "1.5", "big", 9223372036854775806),
    ("SET", "str", "abc"), ("SET", "num", 10), ("SADD", "set", "a"), ("RPUSH", "list", "a"), ("ZADD", "z", 1, "a"),
    ("XADD", "st", "5-5", "a", 1),
]  # fmt: skip

CASES: list[list[tuple[Any, ...]]] = [
    [("HINCRBY", "h", "n", 1), ("EXPIRE", "h", 100)],
    [("HINCRBY", "h", "s", 1)],
    [("HINCRBY", "str", "n", 1)],
    [("HSET", "h", "s", "7"), ("HINCRBY", "h", "s", 1)],
    [("HINCRBYFLOAT", "h", "f", 1.5), ("HINCRBY", "h", "f", 1)],
    [("HINCRBYFLOAT", "h", "f", 0.5), ("HINCRBY", "h", "f", 1)],
    [("HINCRBYFLOAT", "h", "s", 1)],
    [("HINCRBYFLOAT", "h", "n", "inf")],
    [("INCRBY", "h", 1)],
    [("INCRBY", "str", 1)],
    [("INCRBY", "num", 1), ("INCRBY", "new", 2), ("DECRBY", "num", 3), ("SET", "num", "x", "NX"), ("INCR", "num")],
    [("INCRBY", "num", "01")],
    [("INCRBY", "num", "9223372036854775807")],
    [("DEL", "h"), ("SADD", "h", "x")],
    [("SET", "h", 1), ("INCR", "h")],
    [("SET", "h", "x"), ("INCR", "h")],
    [("SET", "k", "v", "EX", 0)],
    [("SET", "hh", "v", "XX"), ("HSET", "hh", "a", 1)],
    [("SADD", "list", "x")],
    [("RPUSH", "set", "x")],
    [("ZADD", "z", "nan", "m")],
    [("ZADD", "z", "1.5", "m", 2, "n"), ("ZINCRBY", "z", 1, "m"), ("ZREM", "z", "m")],
    [("ZADD", "h", 1, "m")],
    [("XADD", "st", "5-5", "a", 1)],
    [("XADD", "st", "5-6", "a", 1), ("XADD", "st", "5-6", "a", 1)],
    [("XADD", "st", "MAXLEN", "~", 10, "*", "a", 1)],
    [("XADD", "h", "*", "a", 1)],
    [("XADD", "new", "0-0", "a", 1)],
    [("XADD", "st", "*", "a")],
    [("EXPIRE", "h", "x")],
    [("EXPIRE", "h", -1), ("SADD", "h", "x")],
    [("HDEL", "h", "n"), ("HINCRBY", "h", "n", 1)],
    [("HSET", "h", "only")],
    [("hset", "h", "a", "b"), ("hincrby", "h", "a", 1)],
    [("HSETNX", "h", "n", "x"), ("HINCRBY", "h", "n", 1)],
    [("HSETNX", "h", "q", "x"), ("HINCRBY", "h", "q", 1)],
    [("UNLINK", "set", "list"), ("HSET", "set", "a", 1), ("SADD", "list", 1), ("LPUSH", "list", 2)],
    [("PEXPIRE", "str", 1000), ("HMSET", "h", "a", 1), ("SREM", "set", "a")],
    [("HSET", "h", "n", "x", "n", "2"), ("HSET", "h", "m", 1), ("HINCRBY", "h", "n", 1)],
    [("HSET", "h", "n", "2", "n", "x"), ("HSET", "h", "m", 1), ("HINCRBY", "h", "n", 1)],
    [("HSET", "h", "n", "x"), ("HSET", "h", "n", "3"), ("HINCRBY", "h", "n", 1)],
    [("HSET", "h", "n", "3"), ("HSET", "h", "n", "x"), ("HINCRBY", "h", "n", 1)],
    [("HSET", "new", "f", "abc"), ("HINCRBYFLOAT", "new", "f", 1)],
    [("HINCRBY", "new", "n", 1), ("HINCRBY", "new", "n", "1"), ("HINCRBY", "new", "n", "01")],
    [("HINCRBYFLOAT", "h", "f", "2 ")],
    [("HINCRBYFLOAT", "h", "f", "\t2")],
    [("HINCRBYFLOAT", "str", "f", 1)],
]


def _script_reply(r: redis.Redis, commands: list[tuple[Any, ...]]) -> list[Any]:
    reply: list[Any] = r.eval(COMMIT_SCRIPT, *script_args("cp", "seq", "1:a", "2:a", {"s#0": "9-9"}, commands))
    return [part.decode() if isinstance(part, bytes) else part for part in reply]


def _seed(r: redis.Redis) -> None:
    r.flushall()
    r.hset("cp", "seq", "1:a")
    for command in SEEDED:
        r.execute_command(*command)  # type: ignore[no-untyped-call]


def _first_refused(r: redis.Redis, commands: list[tuple[Any, ...]]) -> int | None:
    for index, command in enumerate(commands):
        try:
            r.execute_command(*command)  # type: ignore[no-untyped-call]
        except redis.ResponseError:
            return index
    return None


def test_the_check_pass_refuses_what_redis_would_refuse_and_nothing_else(sync_redis: redis.Redis) -> None:
    """Each case: the script's verdict (first command refused, or all applied) is the one Redis gives when the same
    commands run one by one on the same data; a refused commit writes nothing at all."""
    for commands in CASES:
        _seed(sync_redis)
        reply = _script_reply(sync_redis, commands)
        if reply[0] == "refused":
            assert sync_redis.hgetall("cp") == {b"seq": b"1:a"} and sync_redis.hget("h", "n") == b"5", commands
        _seed(sync_redis)
        expected = _first_refused(sync_redis, commands)
        assert (reply[0], reply[1] if reply[0] == "refused" else None) == (
            ("ok", None) if expected is None else ("refused", expected)
        ), (commands, reply)


def test_every_command_tx_can_queue_is_checked(sync_redis: redis.Redis) -> None:
    """CHECKED_COMMANDS (what `Tx.execute_command` takes) is exactly what the script has a rule for."""
    for name in CHECKED_COMMANDS:
        sync_redis.hset("cp", "seq", "1:a")
        assert not _script_reply(sync_redis, [(name,)])[2].startswith("replayd does not check"), name
    sync_redis.hset("cp", "seq", "1:a")
    assert _script_reply(sync_redis, [("FLUSHALL",)])[2].startswith("replayd does not check FLUSHALL")


# --- out of memory (T33)


class Expiring(Projection):
    """The operators' handler: a counter, then its TTL (EXPIRE is not refused for memory; HINCRBY is)."""

    name = "expiring"
    partition_by = "customer_id"

    @on("OrderCreated")
    def created(self, event: Event, ctx: Context) -> None:
        key = ctx.key("customer", event.data["customer_id"])
        ctx.tx.hincrby(key, "orders", 1)
        ctx.tx.expire(key, 3600)


def _counted(client: redis.Redis, name: str = "expiring") -> int:
    return sum(int(client.hget(key, "orders") or 0) for key in client.scan_iter(f"projection:{name}:customer:*"))


def _committed(client: redis.Redis, ids: list[str], job: str = "oom") -> int:
    """Events at or below the checkpoint of the job's one partition."""
    saved = checkpoint(client, job)
    position = max((parse_id(saved[f]) for f in (f"{STREAM}#0", f"{STREAM}#*") if f in saved), default=(0, 0))
    return sum(parse_id(i) <= position for i in ids)


def _job(**overrides: Any) -> JobSpec:
    values: dict[str, Any] = {
        "name": "oom", "streams": [STREAM], "handler": "tests.test_all_or_nothing:Expiring", "end": "now",
        "partitions": 1, "batch_size": 20, "progress_interval_s": 0.05, "retry_backoff_s": 0.01,
    }  # fmt: skip
    return JobSpec(**{**values, **overrides})


def _cfg(server: RedisServer, **overrides: Any) -> RedisConfig:
    values: dict[str, Any] = {"url": server.url, "block_ms": 100, "socket_timeout_s": 2, "connect_timeout_s": 1}
    return RedisConfig(**{**values, **overrides})


@pytest.fixture
def no_memory_noted() -> Iterator[None]:
    Memory.refused = None
    yield
    Memory.refused = None


@pytest.mark.anyio
@pytest.mark.usefixtures("no_memory_noted")
async def test_out_of_memory_mid_replay_applies_nothing_then_everything_once(fresh_server: RedisServer) -> None:
    """1. a replay runs  2. maxmemory is reached (noeviction): commits are refused whole, retried; the counters
    match the checkpoint (no HINCRBY lost while its EXPIRE applied), readiness and the metric say oom  3. memory is
    freed: the job goes on by itself; every event counted once."""
    with fresh_server.client() as client:
        ids = add(client, orders(400))
        cfg, metrics = _cfg(fresh_server), Metrics()
        raw = create_redis(cfg)
        engine = Engine(_job(), raw, redis_cfg=cfg, metrics=metrics, handler=Expiring())
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            await wait_until(lambda: _committed(client, ids) > 0)
            client.config_set("maxmemory", 1)
            oom = {"command": "checkpoint", "error": "oom"}
            await wait_until(lambda: (metrics.registry.get_sample_value("replayd_redis_errors_total", oom) or 0) > 2)
            assert Memory.refused is not None  # /readyz: not ready
            held = _counted(client)
            await anyio.sleep(0.5)
            assert _counted(client) == held == _committed(client, ids) < len(ids)
            client.config_set("maxmemory", 0)
        await raw.aclose()
        assert engine.stats.status == "completed" and Memory.refused is None
        assert _counted(client) == len(ids) and _committed(client, ids) == len(ids)
        assert 0 < client.ttl("projection:expiring:customer:c0") <= 3600


@pytest.mark.anyio
@pytest.mark.usefixtures("no_memory_noted")
async def test_out_of_memory_that_lasts_exits_69_naming_maxmemory(fresh_server: RedisServer) -> None:
    with fresh_server.client() as client:
        ids = add(client, orders(200))
        cfg = _cfg(fresh_server)
        raw = create_redis(cfg)
        # paced (1 s for the 200): memory runs out part way, however fast this machine commits
        engine = Engine(_job(rate_limit=200), raw, redis_cfg=cfg, handler=Expiring(), unavailable_budget_s=1.5)
        with pytest.raises(BaseExceptionGroup) as caught:
            async with anyio.create_task_group() as tg:
                tg.start_soon(engine.run)
                await wait_until(lambda: _committed(client, ids) > 0)
                client.config_set("maxmemory", 1)
        await raw.aclose()
        [error] = leaves(caught.value)
        assert isinstance(error, CommitError) and error.exit_code == 69 and "maxmemory" in str(error)
        assert _counted(client) == _committed(client, ids) < len(ids)


def test_out_of_memory_at_start_exits_69_not_70(fresh_server: RedisServer) -> None:
    with fresh_server.client() as client:
        add(client, orders(10))
        client.config_set("maxmemory", 1)
        done = replayd("replay", "--redis-url", fresh_server.url, "--stream", STREAM, "--handler",
                       "tests.test_all_or_nothing:Expiring", "--job", "oom",
                       env={"REPLAYD_REDIS__UNAVAILABLE_TIMEOUT_S": "1.5"})  # fmt: skip
        assert done.returncode == 69, done.stderr
        assert "maxmemory" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.anyio
@pytest.mark.usefixtures("no_memory_noted")
async def test_a_following_job_with_nothing_to_commit_is_not_ready_while_writes_are_refused(
    fresh_server: RedisServer,
) -> None:
    """1. a following job catches up and idles at the head: it writes only its progress hash  2. maxmemory is
    reached: that write is refused, readiness says so (Redis still answers PING)  3. memory is freed: ready again."""
    with fresh_server.client() as client:
        add(client, orders(10))
        cfg = _cfg(fresh_server)
        raw = create_redis(cfg)
        engine = Engine(_job(end="follow"), raw, redis_cfg=cfg, handler=Expiring())
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            await wait_until(lambda: engine.stats.status == "live")
            client.config_set("maxmemory", 1)
            try:
                await wait_until(lambda: Memory.refused is not None, within=5)
            finally:
                client.config_set("maxmemory", 0)
            await wait_until(lambda: Memory.refused is None)
            tg.cancel_scope.cancel()
        await raw.aclose()


@pytest.mark.anyio
@pytest.mark.usefixtures("no_memory_noted")
async def test_out_of_memory_at_start_is_waited_out(fresh_server: RedisServer) -> None:
    with fresh_server.client() as client:
        ids = add(client, orders(50))
        client.config_set("maxmemory", 1)
        cfg = _cfg(fresh_server)
        raw = create_redis(cfg)
        async with anyio.create_task_group() as tg:
            engine = Engine(_job(), raw, redis_cfg=cfg, handler=Expiring())
            tg.start_soon(engine.run)
            await anyio.sleep(0.5)
            assert engine.stats.status == "starting" and Memory.refused is not None
            client.config_set("maxmemory", 0)
        await raw.aclose()
        assert engine.stats.status == "completed" and _counted(client) == len(ids)


@pytest.mark.anyio
@pytest.mark.usefixtures("no_memory_noted")
async def test_out_of_memory_in_progress_writes_is_waited_out(fresh_server: RedisServer) -> None:
    """A following job, caught up, writes only its progress hash: refused for memory, it goes on (no exit 70),
    and handles what comes once memory is freed."""
    with fresh_server.client() as client:
        ids = add(client, orders(30))
        cfg = _cfg(fresh_server)
        raw = create_redis(cfg)
        engine = Engine(_job(end="follow"), raw, redis_cfg=cfg, handler=Expiring())
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            await wait_until(lambda: _committed(client, ids) == len(ids))
            client.config_set("maxmemory", 1)
            await anyio.sleep(0.5)  # ten progress writes refused
            client.config_set("maxmemory", 0)
            more = add(client, orders(5, start=30))
            await wait_until(lambda: _committed(client, ids + more) == len(ids) + len(more))
            engine.stop()
        await raw.aclose()
        assert engine.stats.status == "stopped" and _counted(client) == len(ids) + len(more)


# --- a write Redis would refuse (T37)


def count_by_customer(event: Event, ctx: Context) -> None:
    ctx.tx.incrby(ctx.key("total", event.data["customer_id"]), 1)
    ctx.tx.rpush(ctx.key("log"), event.data["seq"])


class CountByCustomer(Projection):
    """`count_by_customer` as a Projection of sync methods: called inline, its commits not waited for."""

    name = "counter"
    partition_by = "customer_id"

    @on("OrderCreated")
    def created(self, event: Event, ctx: Context) -> None:
        count_by_customer(event, ctx)


async def count_by_customer_async(event: Event, ctx: Context) -> None:
    await anyio.lowlevel.checkpoint()
    count_by_customer(event, ctx)


def _counter(handler: Any) -> Any:
    return handler() if isinstance(handler, type) else FunctionHandler(handler, "counter")


def _totals(client: redis.Redis) -> dict[str, int]:
    return {
        key.decode().rpartition(":")[2]: int(client.get(key) or 0)
        for key in client.scan_iter("projection:counter:total:*")
        if client.type(key) == b"string"
    }


@pytest.mark.anyio
@pytest.mark.parametrize("handler", [CountByCustomer, count_by_customer_async], ids=["inline", "lanes"])
async def test_a_wrong_type_write_dead_letters_its_event_and_the_batch_commits_once(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig, handler: Any
) -> None:
    """c3's counter key holds a hash: INCRBY on it would be refused. Its events are dead-lettered (the first after
    a retry, the later ones parked behind it), the other events of each batch commit, and a second run re-applies
    nothing."""
    ids = add(sync_redis, orders(70))
    sync_redis.hset("projection:counter:total:c3", "not", "a string")
    job = JobSpec(name="job", streams=[STREAM], handler="x:y", end="now", partitions=1, batch_size=50,
                  min_batch_size=50, partition_by="customer_id", on_poison="dead-letter", retries=1,
                  retry_backoff_s=0.01)  # fmt: skip
    engine = Engine(job, raw_redis, redis_cfg=redis_cfg, handler=_counter(handler))
    stats = await engine.run()
    c3 = [i for n, i in enumerate(ids) if n % 7 == 3]
    assert (stats.status, stats.processed, stats.failed, stats.dead_lettered, stats.parked) == (
        "completed", 60, 1, 1, 9,
    )  # fmt: skip
    assert _totals(sync_redis) == {f"c{c}": 10 for c in range(7) if c != 3}
    log = [int(seq) for seq in sync_redis.lrange("projection:counter:log", 0, -1)]
    assert log == [n for n in range(70) if n % 7 != 3]
    entries: list[tuple[bytes, dict[bytes, bytes]]] = sync_redis.xrange("replayd:{job}:dlq")  # type: ignore[assignment]
    letters = [fields for _, fields in entries]
    assert [letter[b"id"].decode() for letter in letters] == c3
    assert b"WRONGTYPE" in letters[0][b"error"] and letters[0][b"attempts"] == b"2"
    assert checkpoint(sync_redis)[f"{STREAM}#*"] == ids[-1]
    again = await Engine(job, raw_redis, redis_cfg=redis_cfg, handler=_counter(handler)).run()
    assert again.total == 0 and len(sync_redis.lrange("projection:counter:log", 0, -1)) == 60


@pytest.mark.anyio
async def test_a_wrong_type_write_under_stop_commits_what_came_before_and_stops_65(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig
) -> None:
    ids = add(sync_redis, orders(70))
    sync_redis.hset("projection:counter:total:c3", "not", "a string")
    job = JobSpec(name="job", streams=[STREAM], handler="x:y", end="now", partitions=1, batch_size=50,
                  on_poison="stop", retries=0)  # fmt: skip
    with pytest.raises(DataError, match=r"WRONGTYPE.*on_poison = stop") as caught:
        await Engine(job, raw_redis, redis_cfg=redis_cfg, handler=FunctionHandler(count_by_customer, "counter")).run()
    assert caught.value.exit_code == 65
    assert [int(seq) for seq in sync_redis.lrange("projection:counter:log", 0, -1)] == [0, 1, 2]
    assert checkpoint(sync_redis)[f"{STREAM}#0"] == ids[2]
    sync_redis.delete("projection:counter:total:c3")  # the operator fixes the key; the rerun applies the rest once
    await Engine(job, raw_redis, redis_cfg=redis_cfg, handler=FunctionHandler(count_by_customer, "counter")).run()
    assert [int(seq) for seq in sync_redis.lrange("projection:counter:log", 0, -1)] == list(range(70))
    assert _totals(sync_redis) == {f"c{c}": 10 for c in range(7)}


# --- maxmemory-policy and a vanished checkpoint (T34)


@pytest.mark.anyio
async def test_an_evicting_policy_is_refused_at_start_unless_allowed(fresh_server: RedisServer) -> None:
    with fresh_server.client() as client:
        ids = add(client, orders(20))
        client.config_set("maxmemory-policy", "allkeys-lru")
        cfg = _cfg(fresh_server)
        raw = create_redis(cfg)
        with pytest.raises(ConfigError, match=r"maxmemory-policy allkeys-lru.*noeviction or volatile-lru"):
            await Engine(_job(), raw, redis_cfg=cfg, handler=Expiring()).run()
        assert not client.exists("projection:expiring:customer:c0")
        allowed = _cfg(fresh_server, allow_allkeys_eviction=True)
        stats = await Engine(_job(), raw, redis_cfg=allowed, handler=Expiring()).run()
        await raw.aclose()
        assert stats.status == "completed" and _counted(client) == len(ids)
        args = ("replay", "--redis-url", fresh_server.url, "--stream", STREAM, "--handler",
                "tests.test_all_or_nothing:Expiring", "--job", "cli")  # fmt: skip
        done = replayd(*args)
        assert done.returncode == 78 and "maxmemory-policy" in done.stderr and "Traceback" not in done.stderr
        client.config_set("maxmemory-policy", "volatile-lru")
        assert replayd(*args).returncode == 0


@pytest.mark.anyio
async def test_a_checkpoint_that_vanishes_while_running_is_reported_lost(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig
) -> None:
    ids = add(sync_redis, orders(20))
    metrics = Metrics()
    engine = Engine(_job(name="job", end="follow"), raw_redis, redis_cfg=redis_cfg, handler=Expiring(),
                    metrics=metrics)  # fmt: skip
    with pytest.raises(BaseExceptionGroup) as caught:
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            await wait_until(lambda: checkpoint(sync_redis).get(f"{STREAM}#*") == ids[-1])
            sync_redis.delete("replayd:{job}:checkpoint")  # evicted
            add(sync_redis, orders(5, start=20))
    [error] = leaves(caught.value)
    assert isinstance(error, CheckpointLost) and "checkpoint missing" in str(error) and error.exit_code == 65
    missing = {"stream": STREAM, "kind": "checkpoint_missing"}
    assert metrics.registry.get_sample_value("replayd_gap_detected_total", missing) == 1
    assert _counted(sync_redis, "expiring") == 20


# --- bounded commits (T38)


class Writer:
    """Each event queues `data.writes` SADDs, one member each (a batch of them is the 2M-write batch)."""

    name = "writer"

    async def handle(self, event: Event, ctx: Context) -> None:
        key, seq = ctx.key("seen", event.data["seq"] % 10), event.data["seq"]
        for n in range(event.data["writes"]):
            ctx.tx.sadd(key, f"{seq}:{n}")


def _pinger(client: redis.Redis, stop: threading.Event, errors: list[str], latencies: list[float]) -> None:
    while not stop.is_set():
        started = time.monotonic()
        try:
            client.ping()
        except redis.RedisError as exc:
            errors.append(str(exc))
        latencies.append(time.monotonic() - started)
        time.sleep(0.01)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("anyio_backend", [pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop")])
@pytest.mark.anyio
async def test_a_batch_of_2m_writes_commits_in_bounded_pieces_while_redis_answers_others(
    fresh_server: RedisServer,
) -> None:
    """200 events of 10,000 writes each, one lane batch: commits of at most max_commit_commands (10,000) each.
    Another client PINGs all along with Redis's busy threshold at 1 s (5 s by default): never BUSY."""
    with fresh_server.client() as client:
        client.config_set("lua-time-limit", 1000)
        ids = add(client, [{"event_type": "W", "data": json.dumps({"seq": n, "writes": 10_000})} for n in range(200)])
        cfg = _cfg(fresh_server, socket_timeout_s=30)
        raw = create_redis(cfg)
        stop, errors, latencies = threading.Event(), list[str](), list[float]()
        with redis.Redis(port=fresh_server.port, socket_timeout=30) as other:
            pinger = threading.Thread(target=_pinger, args=(other, stop, errors, latencies))
            pinger.start()
            try:
                job = _job(name="big", handler="x:y", batch_size=200, min_batch_size=200, partitions=1)
                stats = await Engine(job, raw, redis_cfg=cfg, handler=_adapted(Writer())).run()
            finally:
                stop.set()
                pinger.join()
        await raw.aclose()
        assert (stats.status, stats.processed, stats.failed) == ("completed", 200, 0)
        assert sum(client.scard(f"projection:writer:seen:{n}") for n in range(10)) == 2_000_000
        assert checkpoint(client, "big")[f"{STREAM}#*"] == ids[-1]
        assert not errors and max(latencies) < 2.0, (errors[:3], max(latencies))


def _adapted(handler: object) -> Any:
    from replayd.handlers import ObjectHandler

    return ObjectHandler(handler, "writer")


@pytest.mark.anyio
async def test_one_event_over_the_bound_is_poison_naming_the_limit(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig
) -> None:
    writes = [3, 3, 101, 3, 100]
    ids = add(sync_redis, [{"event_type": "W", "data": json.dumps({"seq": n, "writes": w})} for n, w in
                           enumerate(writes)])  # fmt: skip
    job = _job(name="job", handler="x:y", max_commit_commands=100, on_poison="dead-letter", retries=0, ordering="none")
    stats = await Engine(job, raw_redis, redis_cfg=redis_cfg, handler=_adapted(Writer())).run()
    assert (stats.processed, stats.failed, stats.dead_lettered) == (4, 1, 1)
    assert [sync_redis.scard(f"projection:writer:seen:{n}") for n in range(5)] == [3, 3, 0, 3, 100]
    entries: list[tuple[bytes, dict[bytes, bytes]]] = sync_redis.xrange("replayd:{job}:dlq")  # type: ignore[assignment]
    [(_, letter)] = entries
    assert letter[b"id"] == ids[2].encode() and b"max_commit_commands = 100" in letter[b"error"]


class Logged:
    """An async handler (it runs on lanes): three writes per event, one of them a log of the order they came in."""

    name = "logged"

    async def handle(self, event: Event, ctx: Context) -> None:
        await anyio.lowlevel.checkpoint()
        seq = event.data["seq"]
        ctx.tx.rpush(ctx.key("log"), seq)
        ctx.tx.sadd(ctx.key("seen"), seq)
        ctx.tx.hincrby(ctx.key("count"), "events", 1)


def test_a_crash_between_the_pieces_of_a_lane_batch_loses_nothing(fresh_server: RedisServer, tmp_path: Path) -> None:
    """1. one lane batch of 50 events, 3 writes each, commits of at most 30 writes: 5 pieces  2. after the first
    piece (its events' checkpoint moved, the read batch's floor not: only the last piece carries the mark)
    SIGKILL  3. a rerun applies each event once."""
    config = tmp_path / "replayd.toml"
    with FaultProxy(("127.0.0.1", fresh_server.port)) as proxy, fresh_server.client() as client:
        ids = add(client, orders(50))
        config.write_text(
            f'[redis]\nurl = "{proxy.url}"\n\n[[jobs]]\nname = "pieces"\nstreams = ["{STREAM}"]\n'
            'handler = "tests.test_all_or_nothing:Logged"\nend = "now"\npartitions = 1\nbatch_size = 50\n'
            "min_batch_size = 50\nmax_commit_commands = 30\nlease_ttl_s = 2\n"
        )
        proxy.delay(300, "upstream")  # every command is late: time to see a piece committed before the next
        proc = spawn_replayd("replay", "--config", str(config), "--job", "pieces")
        try:
            wait_for(lambda: f"{STREAM}#0" in checkpoint(client, "pieces"), timeout=60, proc=proc)
            saved = checkpoint(client, "pieces")
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.communicate()
        assert saved[f"{STREAM}#0"] == ids[9] and f"{STREAM}#*" not in saved
        assert client.lrange("projection:logged:log", 0, -1) == [str(n).encode() for n in range(10)]
        proxy.clear()
        done = replayd("replay", "--config", str(config), "--job", "pieces")
        assert done.returncode == 0, done.stderr
        assert client.lrange("projection:logged:log", 0, -1) == [str(n).encode() for n in range(50)]
        assert client.hget("projection:logged:count", "events") == b"50"
        assert checkpoint(client, "pieces")[f"{STREAM}#*"] == ids[-1]


@pytest.mark.anyio
async def test_the_committer_reports_a_batch_committed_only_after_redis_replied(
    redis_server: RedisServer, sync_redis: redis.Redis
) -> None:
    with FaultProxy(("127.0.0.1", redis_server.port)) as proxy:
        client = create_redis(RedisConfig(url=proxy.url, socket_timeout_s=5))
        send, receive = anyio.create_memory_object_stream[CommitRequest](1)
        committer = Committer(client, "late", Watermark(), send)
        committed = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(committer.run, receive)
            async with send:
                proxy.delay(1000, "downstream")  # Redis runs the script at once; its reply is a second late
                await committer.submit(CommitRequest([("INCR", "applied")], {"s#0": "1-1"}, [], committed.set))
                await anyio.to_thread.run_sync(lambda: wait_for(lambda: sync_redis.get("applied") == b"1"))
                assert not committed.is_set()
                with anyio.fail_after(5):
                    await committed.wait()
        await client.aclose()
    assert sync_redis.get("applied") == b"1" and checkpoint(sync_redis, "late")["s#0"] == "1-1"


@pytest.mark.anyio
async def test_an_oom_refused_commit_is_retried_and_a_retry_applies_once(
    fresh_server: RedisServer,
) -> None:
    """The Committer alone: refused for memory, it sends the commit again until Redis takes it, once."""
    cfg = _cfg(fresh_server)
    client = create_redis(cfg)
    with fresh_server.client() as sync:
        sync.config_set("maxmemory", 1)
        send, receive = anyio.create_memory_object_stream[CommitRequest](1)
        committer = Committer(client, "oom", Watermark(), send, budget_s=30)
        async with anyio.create_task_group() as tg:
            tg.start_soon(committer.run, receive)
            async with send:
                async with anyio.create_task_group() as inner:
                    inner.start_soon(committer.commit, CommitRequest([("INCR", "n")], {"s#0": "1-1"}, []))
                    await anyio.sleep(0.5)
                    assert sync.get("n") is None
                    sync.config_set("maxmemory", 0)
        assert sync.get("n") == b"1"
    await client.aclose()
