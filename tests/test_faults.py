"""Network faults between replayd and Redis (fault matrix T14-T18), through tests/faultproxy.py.

A real redis-server of the test's own; replayd's Engine runs in-process and reaches Redis only through the
proxy, with a 1 s socket timeout. Each test injects a fault mid-replay and checks what the matrix promises:
the job completes, the projection equals a clean rebuild made without the proxy, no event is handled twice,
and the metrics count the errors.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import anyio
import pytest
from redis._parsers import _AsyncRESP2Parser
from redis.asyncio import Redis

from replayd import __version__
from replayd.config import JobSpec, RedisConfig
from replayd.connection import RETRIABLE, connects, count_received, create_redis
from replayd.errors import CommitError, SourceError
from replayd.handlers import Context
from replayd.handlers.builtin.order_summary import OrderSummary
from replayd.jobs.engine import Engine
from replayd.jobs.rebuild import rebuild_in_place
from replayd.ops.metrics import Metrics
from replayd.pipeline.commit import CommitRequest, Committer, Watermark
from replayd.sample import load_history_sync
from tests.faultproxy import FaultProxy
from tests.helpers import order_summaries
from tests.servers import RedisServer

STREAM = "events:orders"

pytestmark = [
    pytest.mark.parametrize("anyio_backend", [pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop")]),
    pytest.mark.anyio,
]

Fault = Callable[[Engine, FaultProxy], Awaitable[None]]


@pytest.fixture
def proxy(fresh_server: RedisServer) -> Iterator[FaultProxy]:
    with FaultProxy(("127.0.0.1", fresh_server.port)) as running:
        yield running


@pytest.fixture
def cfg(proxy: FaultProxy) -> RedisConfig:
    return RedisConfig(url=proxy.url, socket_timeout_s=1, connect_timeout_s=1, block_ms=200)


@pytest.fixture
async def client(cfg: RedisConfig) -> AsyncIterator[Redis]:
    """The data path's client, through the proxy."""
    r = create_redis(cfg)
    assert isinstance(r, Redis)  # one server
    try:
        yield r
    finally:
        await r.aclose()


async def wait_until(condition: Callable[[], bool], *, within: float = 10.0) -> None:
    """Poll until `condition()` holds; fail after `within` seconds."""
    with anyio.fail_after(within):
        while not condition():  # noqa: ASYNC110 - polls state that other tasks and the proxy's thread change
            await anyio.sleep(0.01)


def spec(**overrides: Any) -> JobSpec:
    values: dict[str, Any] = {
        "name": "order_summary", "streams": [STREAM], "handler": "order_summary", "end": "now", "resume": False,
        "batch_size": 500,
    }  # fmt: skip
    return JobSpec(**{**values, **overrides})


def errors(metrics: Metrics, *, error: str | None = None, command: str | None = None) -> float:
    """The sum of `replayd_redis_errors_total` over the series matching the labels given."""
    total = 0.0
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name != "replayd_redis_errors_total":
                continue
            if error is not None and sample.labels["error"] != error:
                continue
            if command is not None and sample.labels["command"] != command:
                continue
            total += sample.value
    return total


async def started(engine: Engine, events: int = 1000) -> None:
    """Wait until the job is mid-replay: some events handled, not all."""
    await wait_until(lambda: engine.stats.processed >= events, within=20)
    assert engine.stats.status == "catching_up", "the replay ended before the fault: give it more history"


async def rebuild_under(
    server: RedisServer, proxy: FaultProxy, cfg: RedisConfig, fault: Fault, *, events: int
) -> tuple[Engine, Metrics, float]:
    """Load `events` entries, rebuild order_summary through the proxy while `fault` runs; check it equals a
    clean rebuild made directly on the server. Returns the engine, its metrics and the rebuild's duration."""
    with server.client() as sync:
        load_history_sync(sync, STREAM, events)
    metrics = Metrics()
    r = create_redis(cfg)
    engine = Engine(spec(), r, redis_cfg=cfg, metrics=metrics)
    begin = time.monotonic()
    try:
        with anyio.fail_after(45):
            async with anyio.create_task_group() as tg:
                tg.start_soon(rebuild_in_place, engine)
                await fault(engine, proxy)
    finally:
        proxy.clear()
        await r.aclose()
    elapsed = time.monotonic() - begin
    assert engine.stats.status == "completed"
    assert engine.stats.total == events
    with server.client() as sync:
        through_faults = order_summaries(sync)
        direct = RedisConfig(url=server.url, socket_timeout_s=5, block_ms=200)
        clean = create_redis(direct)
        await rebuild_in_place(Engine(spec(name="clean"), clean, redis_cfg=direct))
        await clean.aclose()
        assert through_faults == order_summaries(sync)
    return engine, metrics, elapsed


# --- T14: latency above socket_timeout ------------------------------------------------------------------------


async def probe(cfg: RedisConfig, stop: anyio.Event, seen: list[int]) -> None:
    """Read-your-write probe on its own client: a reply given to the wrong command would show as a mismatch."""
    r = create_redis(cfg)
    try:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                await r.set(f"probe:{i}", i)
                value = await r.get(f"probe:{i}")
            except RETRIABLE:
                continue
            assert value == str(i).encode(), f"probe {i} got {value!r}: a reply of another command"
            seen.append(i)
            await anyio.sleep(0.02)
    finally:
        await r.aclose()


async def test_t14_latency_above_socket_timeout(fresh_server: RedisServer, proxy: FaultProxy, cfg: RedisConfig) -> None:
    """1. delay 2 s (> the 1 s socket timeout) for 3 s mid-replay  2. clear  3. the job completes, no reply
    mis-association, projection == a clean rebuild, timeouts counted."""
    seen: list[int] = []

    async def fault(engine: Engine, proxy: FaultProxy) -> None:
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(probe, cfg, stop, seen)
            await started(engine)
            proxy.delay(2000)
            await anyio.sleep(3)
            proxy.clear()
            await wait_until(lambda: engine.stats.status != "catching_up", within=30)
            stop.set()

    _, metrics, _ = await rebuild_under(fresh_server, proxy, cfg, fault, events=10_000)
    assert errors(metrics, error="timeout") > 0
    assert (metrics.registry.get_sample_value("replayd_redis_reconnects_total") or 0) > 0
    assert seen, "the probe never got a reply"


# --- T16: half-open connections ---------------------------------------------------------------------------------


async def test_t16_blackhole_then_clear_completes(
    fresh_server: RedisServer, proxy: FaultProxy, cfg: RedisConfig
) -> None:
    """1. blackhole for 2 s mid-replay  2. clear  3. completes; projection == a clean rebuild."""

    async def fault(engine: Engine, proxy: FaultProxy) -> None:
        await started(engine)
        proxy.blackhole()
        await anyio.sleep(2)
        assert engine.stats.status == "catching_up"
        proxy.clear()

    _, metrics, _ = await rebuild_under(fresh_server, proxy, cfg, fault, events=10_000)
    assert proxy.stats.discarded > 0
    assert errors(metrics, error="timeout") > 0


class RefusedAtTheEnd(OrderSummary):
    """order_summary; once the run has committed every event, Redis refuses connections for 3 s (a restart: longer
    than a stop may take to release the lease, which a run that completed need not hurry)."""

    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy

    async def shutdown(self, ctx: Context) -> None:
        self.proxy.reset(refuse=True)
        threading.Timer(3, self.proxy.clear).start()


async def test_a_restart_as_a_rebuild_ends_neither_fails_it_nor_leaves_its_lease(
    fresh_server: RedisServer, proxy: FaultProxy, cfg: RedisConfig, client: Redis
) -> None:
    """Every event committed, then Redis away for 3 s: the lease release and the meta hash, the rebuild's last
    two commands, are retried (redis-py's own retries gave up within the restart and failed the rebuild)."""
    with fresh_server.client() as sync:
        load_history_sync(sync, STREAM, 2000)
        engine = Engine(spec(), client, redis_cfg=cfg, handler=RefusedAtTheEnd(proxy))
        with anyio.fail_after(20):
            stats = await rebuild_in_place(engine)
        assert stats.status == "completed"
        assert sync.hget("projection:order_summary:meta", "total_events") == b"2000"
        assert sync.get("replayd:{order_summary}:lease") is None
        assert proxy.stats.refused > 0


def leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in leaves(inner)]
    return [exc]


async def test_t16_blackhole_forever_gives_up_after_the_budget(
    fresh_server: RedisServer, proxy: FaultProxy, cfg: RedisConfig
) -> None:
    """1. blackhole that never clears, mid-replay, budget 3 s  2. run() raises SourceError/CommitError (exit 69)
    within a bounded time, no hang."""
    with fresh_server.client() as sync:
        load_history_sync(sync, STREAM, 10_000)
    r = create_redis(cfg)
    engine = Engine(spec(batch_size=200), r, redis_cfg=cfg, unavailable_budget_s=3, metrics=Metrics())
    failure: BaseException | None = None

    async def run() -> None:
        nonlocal failure
        try:
            await engine.run()
        except BaseException as exc:  # noqa: BLE001 - inspected below
            failure = exc

    try:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(run)
                await started(engine, 200)
                proxy.blackhole()
                blackholed_at = time.monotonic()
    finally:
        proxy.clear()
        await r.aclose()
    gave_up_after = time.monotonic() - blackholed_at
    assert failure is not None, "run() returned although Redis was unreachable"
    ours = [leaf for leaf in leaves(failure) if isinstance(leaf, SourceError | CommitError)]
    assert ours, f"expected SourceError or CommitError, got {failure!r}"
    assert ours[0].exit_code == 69
    assert gave_up_after < 15, f"gave up after {gave_up_after:.1f}s with a 3 s budget"
    assert engine.stats.status == "failed"


# --- T17: connections cut mid-reply -----------------------------------------------------------------------------


async def cut_mid_reply(engine: Engine, proxy: FaultProxy) -> None:
    """limit_data: each connection is reset after n more bytes downstream, n from inside a MULTI/EXEC reply
    to inside a 1 MB XRANGE reply; a few rounds, each until a cut happened (or the job ended)."""
    await started(engine, 2000)
    for limit in (150_000, 30, 100_000, 7, 250_000):
        target = proxy.stats.cuts + 1
        proxy.limit_data(limit)
        await wait_until(lambda: proxy.stats.cuts >= target or engine.stats.status != "catching_up", within=10)  # noqa: B023
        proxy.clear()
        await anyio.sleep(0.1)
    assert proxy.stats.cuts >= 2


async def reset_repeatedly(engine: Engine, proxy: FaultProxy) -> None:
    """reset: RST every connection, 8 times at random moments."""
    await started(engine, 2000)
    rng = random.Random(17)
    for _ in range(8):
        await anyio.sleep(rng.uniform(0.05, 0.25))
        proxy.reset()


@pytest.mark.parametrize("fault", [cut_mid_reply, reset_repeatedly], ids=["limit_data", "reset"])
async def test_t17_cut_mid_reply_rereads_and_handles_each_event_once(
    fresh_server: RedisServer, proxy: FaultProxy, cfg: RedisConfig, fault: Fault
) -> None:
    """1. 20k events, XRANGE replies of 2000 entries  2. cut connections mid-reply  3. each event handled exactly
    once (effects in a set and a list, committed in the checkpoint's MULTI), nothing missing."""
    events = 20_000
    with fresh_server.client() as sync:
        load_history_sync(sync, STREAM, events)
    metrics = Metrics()
    r = create_redis(cfg)
    job = spec(name="recorder", handler="tests.lifecycle_plugins:SlowRecorder", batch_size=2000)
    engine = Engine(job, r, redis_cfg=cfg, metrics=metrics)
    try:
        with anyio.fail_after(45):
            async with anyio.create_task_group() as tg:
                tg.start_soon(engine.run)
                await fault(engine, proxy)
    finally:
        proxy.clear()
        await r.aclose()
    assert engine.stats.status == "completed"
    with fresh_server.client() as sync:
        ids = {raw for raw, _ in sync.xrange(STREAM)}
        log = sync.lrange("eff:log", 0, -1)
        handled = sync.smembers("eff:set")
    assert len(ids) == events
    assert handled == ids
    assert len(log) == len(handled), f"{len(log) - len(handled)} events handled twice"
    assert proxy.stats.cuts + proxy.stats.resets > 0
    assert errors(metrics, error="connection") > 0


# --- T18: fragmented RESP ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("parser", ["hiredis", "python"])
async def test_t18_fragmented_replies_give_identical_results(
    fresh_server: RedisServer, proxy: FaultProxy, cfg: RedisConfig, parser: str
) -> None:
    """1. slice(1): every write in 1-byte pieces, both ways  2. rebuild 300 events  3. == a clean rebuild."""
    with fresh_server.client() as sync:
        load_history_sync(sync, STREAM, 300)
    r = create_redis(cfg)
    assert isinstance(r, Redis)  # one server
    if parser == "python":
        r.connection_pool.connection_kwargs["parser_class"] = _AsyncRESP2Parser
    engine = Engine(spec(batch_size=50), r, redis_cfg=cfg)
    try:
        with anyio.fail_after(90):  # byte-by-byte delivery is slow on a loaded CI machine
            proxy.slice(1)
            await rebuild_in_place(engine)
    finally:
        proxy.clear()
        await r.aclose()
    assert engine.stats.status == "completed"
    with fresh_server.client() as sync:
        fragmented = order_summaries(sync)
        direct = RedisConfig(url=fresh_server.url, socket_timeout_s=5, block_ms=200)
        clean = create_redis(direct)
        await rebuild_in_place(Engine(spec(name="clean"), clean, redis_cfg=direct))
        await clean.aclose()
        assert fragmented == order_summaries(sync)
    assert proxy.stats.bytes_down > 300 * 100


# --- T15: cancel mid-command (CVE-2023-28858/28859 regression) ---------------------------------------------------


@pytest.mark.parametrize("direction", ["downstream", "both"])
async def test_t15_cancel_mid_command_discards_the_connection(proxy: FaultProxy, client: Redis, direction: str) -> None:
    """1. a command cancelled by fail_after(0.05) while its reply is delayed 500 ms  2. every following command
    on the same client (plain, raw XRANGE, pipeline, commit transaction) gets its own reply."""
    await client.set("foo", "foo")
    await client.set("bar", "bar")
    await client.xadd("s", {"f": "v"}, id="1-1")
    handler_client = Redis(connection_pool=client.connection_pool)  # what the engine gives handlers

    async def cancelled(call: Callable[[], Awaitable[object]]) -> None:
        proxy.delay(500, direction)  # type: ignore[arg-type]
        with pytest.raises(TimeoutError):
            with anyio.fail_after(0.05):
                await call()
        proxy.clear()

    await cancelled(lambda: client.get("foo"))
    assert await client.get("bar") == b"bar"
    assert await client.ping()
    assert await client.get("foo") == b"foo"

    await cancelled(lambda: client.execute_command("XRANGE", "s", "-", "+"))  # type: ignore[no-untyped-call]
    assert await handler_client.get("bar") == b"bar"
    assert await client.execute_command("XRANGE", "s", "-", "+") == [[b"1-1", [b"f", b"v"]]]  # type: ignore[no-untyped-call]

    pipe = client.pipeline(transaction=True)

    async def pipelined() -> list[Any]:
        pipe.get("foo")
        return await pipe.execute()

    await cancelled(pipelined)
    await pipe.reset()  # type: ignore[no-untyped-call]
    assert await client.get("bar") == b"bar"
    pipe.get("bar")
    pipe.ping()
    assert await pipelined() == [b"bar", True, b"foo"]

    send, receive = anyio.create_memory_object_stream[Any](1)
    committer = Committer(client, "t15", Watermark(), send)
    await cancelled(lambda: committer._transaction([("SET", "foo", "committed")], {"f": "1"}))
    send.close()
    receive.close()
    assert await client.get("bar") == b"bar"
    assert await client.get("foo") in (b"foo", b"committed")  # applied or not, never a reply of another command
    assert await client.ping()

    # no connection was leaked: the blocking pool can still hand out all of them
    pool = client.connection_pool
    conns = [await pool.get_connection() for _ in range(pool.max_connections)]  # type: ignore[no-untyped-call]
    for conn in conns:
        await pool.release(conn)


# --- exactly once under lost replies and late attempts, made deterministic ---------------------------------------


async def commit_incr(client: Redis, proxy: FaultProxy, fault: Callable[[], Awaitable[None]]) -> int:
    """Run one commit (INCR + checkpoint HSET) while `fault` runs, on the connection an earlier commit made (the
    fault hits the connections open when it starts); return how many times the INCR applied."""
    send, receive = anyio.create_memory_object_stream[Any](1)
    committer = Committer(client, "rb", Watermark(), send, budget_s=20, timeout_s=1)

    async def incr() -> None:
        async with send:
            await committer.commit(CommitRequest([("INCR", "applied")], {"s#0": "1-1"}, []))

    try:
        with anyio.fail_after(25):
            async with anyio.create_task_group() as tg:
                tg.start_soon(committer.run, receive)
                await committer.commit(CommitRequest([], {"s#0": "1-0"}, []))
                tg.start_soon(incr)
                await fault()
    finally:
        proxy.clear()
    return int(await client.get("applied") or 0)


async def test_commit_with_every_reply_lost_applies_once(proxy: FaultProxy, client: Redis) -> None:
    """1. limit_data(0): requests reach Redis, no reply comes back  2. clear after 3 cuts  3. the commit applied
    exactly once (each resend finds the commit sequence moved)."""

    async def fault() -> None:
        proxy.limit_data(0)
        await wait_until(lambda: proxy.stats.cuts >= 3, within=15)
        proxy.clear()

    assert await commit_incr(client, proxy, fault) == 1


async def test_commit_late_attempt_is_fenced(proxy: FaultProxy, client: Redis) -> None:
    """1. the commit's connection stalls upstream (its request held, like TCP retransmission back-off); new
    connections are clean  2. timeout, resend  3. the held request is released and lands late  4. applied once."""

    async def fault() -> None:
        proxy.stall("upstream")
        await wait_until(lambda: proxy.stats.accepted >= 2, within=15)  # timed out, resent on a fresh connection
        await anyio.sleep(0.5)
        proxy.clear()  # the first attempt lands now
        await anyio.sleep(0.3)

    assert await commit_incr(client, proxy, fault) == 1


@pytest.mark.anyio
async def test_connections_are_counted_when_made_and_replies_by_their_bytes(raw_redis: Redis) -> None:
    """`connects()` moves when a connection is made (a reader then checks its stream for a gap), not on every
    command; `count_received` counts the bytes of the calling task's replies (a reader sizes its reads by them)."""
    await raw_redis.ping()
    before, received = connects(), count_received()
    for _ in range(5):
        await raw_redis.ping()
    assert connects() == before
    assert received[0] == 5 * len(b"+PONG\r\n")
    await raw_redis.connection_pool.disconnect()
    await raw_redis.ping()
    assert connects() == before + 1


async def test_connections_name_replayd(raw_redis: Redis) -> None:
    """CLIENT SETINFO (Redis 7.2+ lists it in CLIENT LIST) names replayd beside redis-py; given, the name also
    spares each new connection redis-py's look-up of its version in the installed packages' metadata."""
    pytest.importorskip("redis.driver_info")
    connection = raw_redis.connection_pool.make_connection()  # type: ignore[no-untyped-call]
    assert connection.driver_info.formatted_name == f"redis-py(replayd_v{__version__})"
