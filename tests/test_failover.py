"""Redis losing acknowledged writes (fault matrix T9 torn AOF, T10 failover to a lagging replica) and a clean
failover (T11), with real redis-server processes: a primary and a `--replicaof` replica, and tests/faultproxy.py
between the replica and the primary (to blackhole replication) and between replayd and Redis (to retarget it,
as a VIP or DNS name moves at a failover). replayd's Engine runs in-process so its metrics can be read.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis

from replayd import Context, Event, Outcome
from replayd.config import JobSpec, RedisConfig
from replayd.connection import create_redis
from replayd.errors import DataError, FencingError
from replayd.events import format_id
from replayd.handlers import ObjectHandler
from replayd.jobs.engine import Engine
from replayd.jobs.rebuild import rebuild_in_place
from replayd.ops.metrics import Metrics
from replayd.sample import load_history_sync
from tests.faultproxy import FaultProxy
from tests.helpers import order_summaries, wait_for
from tests.servers import RedisServer

STREAM = "events:orders"


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("asyncio", {"use_uvloop": True})


class Effects:
    """Adds each entry ID to a set and a list in the commit's transaction (a duplicate shows in the list)."""

    name = "effects"
    partition_by = None
    event_types = None

    def __init__(self) -> None:
        self.ids: list[str] = []

    async def handle_batch(self, events: Sequence[Event], ctx: Context) -> Outcome:
        for event in events:
            ctx.tx.sadd("eff:set", event.stream_id)
            ctx.tx.rpush("eff:log", event.stream_id)
        self.ids.extend(event.stream_id for event in events)
        return Outcome(handled=len(events))


def produce(client: redis.Redis, n: int, **xadd: Any) -> list[str]:
    with client.pipeline(transaction=False) as pipe:
        for i in range(n):
            pipe.xadd(STREAM, {"event_type": "E", "data": f'{{"i": {i}}}'}, **xadd)
        return [raw.decode() for raw in pipe.execute()]


def follow_job(**overrides: Any) -> JobSpec:
    values: dict[str, Any] = {"name": "f", "streams": [STREAM], "handler": "x:y", "end": "follow", "partitions": 2}
    return JobSpec(**{**values, **overrides})


def config(url: str) -> RedisConfig:
    return RedisConfig(url=url, block_ms=200, socket_timeout_s=1, connect_timeout_s=1, unavailable_timeout_s=20)


async def wait_until(condition: Callable[[], bool], *, within: float = 10.0) -> None:
    with anyio.fail_after(within):
        while not condition():  # noqa: ASYNC110 - polls state that the engine's tasks change
            await anyio.sleep(0.01)


def committed(engine: Engine, entry_id: str) -> Callable[[], bool]:
    return lambda: format_id(engine.stats.position.get(STREAM, (0, 0))) == entry_id


def gaps(metrics: Metrics, kind: str) -> float:
    return metrics.registry.get_sample_value("replayd_gap_detected_total", {"stream": STREAM, "kind": kind}) or 0


async def run_until_failure(engine: Engine, body: Callable[[], Any], *, within: float = 20) -> BaseException | None:
    """Run the engine while `body()` (async) drives the fault; return what run() raised (None if it returned)."""
    failure: BaseException | None = None

    async def run() -> None:
        nonlocal failure
        try:
            await engine.run()
        except Exception as exc:  # noqa: BLE001 - inspected by the caller
            failure = exc

    with anyio.fail_after(within):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await body()
    return failure


# --- T9: torn AOF tail ------------------------------------------------------------------------------------------


def aof_tail_file(directory: Path) -> Path:
    """The file Redis appends to: the incr file of the multi-part AOF (7.0+), else appendonly.aof (6.2)."""
    incr = sorted((directory / "appendonlydir").glob("*.incr.aof"))
    return incr[-1] if incr else directory / "appendonly.aof"


def tear(path: Path, at: int) -> int:
    """Cut the file at byte `at` (a few bytes into a command: torn, not cleanly shortened); return bytes lost."""
    size = path.stat().st_size
    with path.open("r+b") as file:
        file.truncate(at + 5)
    return size - at - 5


def everysec_server(tmp_path: Path) -> RedisServer:
    # aof-load-truncated is yes by default: Redis loads a torn tail up to the last whole command
    return RedisServer(tmp_path / "redis", appendonly=True, extra_args=["--appendfsync", "everysec"])


def order_summary(**overrides: Any) -> JobSpec:
    values: dict[str, Any] = {"name": "order_summary", "streams": [STREAM], "handler": "order_summary", "end": "now",
                              "batch_size": 100, "min_batch_size": 100, "max_in_flight": 100,  # a commit a batch
                              "lease_ttl_s": 1}  # the torn tail loses the lease's release too  # fmt: skip
    return JobSpec(**{**values, **overrides})


@pytest.mark.anyio
async def test_t9_torn_aof_checkpoint_rollback_replays_a_bounded_tail(tmp_path: Path) -> None:
    """1. everysec AOF; 3000 orders; order_summary replayed to the end (transactional: effects and checkpoint in one
    MULTI in the AOF)  2. SIGKILL Redis; tear the AOF inside its third-last transaction; restart  3. checkpoint and
    effects rolled back together, the stream intact  4. the job resumes: a few batches replayed (bounded), and
    the projection equals a clean rebuild (no effect applied twice)."""
    server = everysec_server(tmp_path).start()
    try:
        with server.client() as client:
            load_history_sync(client, STREAM, 3000)
        cfg = config(server.url)
        r = create_redis(cfg)
        try:
            await Engine(order_summary(), r, redis_cfg=cfg).run()
        finally:
            await r.aclose()
        with server.client() as client:
            before = client.hget("replayd:{order_summary}:checkpoint", f"{STREAM}#*")
        server.stop(kill=True)
        tail = aof_tail_file(server.dir)
        data = tail.read_bytes()
        multi = b"*1\r\n$5\r\nMULTI\r\n"
        third_last = data.rfind(multi, 0, data.rfind(multi, 0, data.rfind(multi)))
        assert third_last > 0, "commits are not MULTI/EXEC blocks in the AOF"
        tear(tail, third_last)
        server.start()
        with server.client() as client:
            after = client.hget("replayd:{order_summary}:checkpoint", f"{STREAM}#*")
            assert client.xlen(STREAM) == 3000
        assert after is not None and before is not None
        assert after.decode() < before.decode() or len(after) < len(before), "the checkpoint did not roll back"
        r = create_redis(cfg)
        try:
            stats = await Engine(order_summary(), r, redis_cfg=cfg).run()
        finally:
            await r.aclose()
        assert stats.status == "completed"
        assert 0 < stats.processed <= 3 * 100, f"{stats.processed} events replayed after a 3-commit rollback"
        with server.client() as client:
            resumed = order_summaries(client)
            clean = create_redis(cfg)
            try:
                await rebuild_in_place(Engine(order_summary(name="clean", resume=False), clean, redis_cfg=cfg))
            finally:
                await clean.aclose()
            assert resumed == order_summaries(client)
    finally:
        server.stop()


@pytest.mark.anyio
async def test_t9_torn_aof_stream_rolled_back_below_the_position_is_divergence(tmp_path: Path) -> None:
    """1. everysec AOF; a following job has handled and committed 220 entries  2. SIGKILL Redis; tear the AOF
    inside the XADD of entry 201; restart on the same port  3. the running job reconnects, finds the stream's
    last-generated-id (entry 200) below its position (220) and stops: DataError, exit 65, naming stream, position
    and head; gap_detected_total{kind="diverged"}."""
    server = everysec_server(tmp_path).start()
    try:
        with server.client() as client:
            ids = produce(client, 200)
        cfg = config(server.url)
        metrics = Metrics()
        r = create_redis(cfg)
        engine = Engine(follow_job(), r, redis_cfg=cfg, handler=ObjectHandler(Effects(), "effects"), metrics=metrics)

        async def fault() -> None:
            await wait_until(committed(engine, ids[-1]))
            with server.client() as client:
                ids.extend(produce(client, 20))
            await wait_until(committed(engine, ids[-1]))
            server.stop(kill=True)
            tail = aof_tail_file(server.dir)
            tear(tail, tail.read_bytes().find(ids[200].encode()))  # in its XADD: its first mention
            await anyio.to_thread.run_sync(server.start)

        try:
            failure = await run_until_failure(engine, fault)
        finally:
            await r.aclose()
        with server.client() as client:
            assert client.xinfo_stream(STREAM)["last-generated-id"].decode() == ids[199]
    finally:
        server.stop()
    assert isinstance(failure, DataError), failure
    assert failure.exit_code == 65
    message = str(failure)
    assert f"stream {STREAM}" in message and f"read position {ids[-1]}" in message
    assert f"last-generated-id {ids[199]}" in message and "went back" in message
    assert gaps(metrics, "diverged") == 1


@pytest.mark.anyio
async def test_t9_torn_aof_checkpoint_rollback_under_a_running_job(tmp_path: Path) -> None:
    """1. everysec AOF; 300 entries written first, then a following job commits them in batches of 20  2. SIGKILL
    Redis; tear the AOF inside its second-last commit; restart: the stream is whole, the checkpoint went back
    3. the next commit of the running job finds its commit sequence went back: FencingError (exit 75) saying
    Redis lost acknowledged commits, not "another instance"  4. a restart replays the lost tail, exactly once."""
    server = everysec_server(tmp_path).start()
    try:
        with server.client() as client:
            ids = produce(client, 300)
        cfg = config(server.url)
        r = create_redis(cfg)
        spec = follow_job(batch_size=20, min_batch_size=20, lease_ttl_s=1)
        engine = Engine(spec, r, redis_cfg=cfg, handler=ObjectHandler(Effects(), "effects"))

        async def fault() -> None:
            await wait_until(committed(engine, ids[-1]))
            server.stop(kill=True)
            tail = aof_tail_file(server.dir)
            data = tail.read_bytes()
            multi = b"*1\r\n$5\r\nMULTI\r\n"
            tear(tail, data.rfind(multi, 0, data.rfind(multi)))
            await anyio.to_thread.run_sync(server.start)
            with server.client() as client:
                ids.extend(produce(client, 5))

        try:
            failure = await run_until_failure(engine, fault)
        finally:
            await r.aclose()
        assert isinstance(failure, FencingError), failure
        assert failure.exit_code == 75
        assert "lost commits it had acknowledged" in str(failure)
        with server.client() as client:
            assert client.xlen(STREAM) == 305
        effects = await restart(cfg)
        assert 5 < len(effects.ids) <= 5 + 2 * 20 + 20, "the rolled-back commits' batches and the new entries"
        with server.client() as client:
            assert client.smembers("eff:set") == {i.encode() for i in ids}
            assert client.llen("eff:log") == len(ids), "effects rolled back with their checkpoint: none twice"
    finally:
        server.stop()


async def restart(cfg: RedisConfig) -> Effects:
    """Run the job again, to now, as a restarted process would; return what it handled."""
    effects = Effects()
    r = create_redis(cfg)
    engine = Engine(follow_job(end="now"), r, redis_cfg=cfg, handler=ObjectHandler(effects, "effects"))
    try:
        with anyio.fail_after(15):
            await engine.run()
    finally:
        await r.aclose()
    return effects


# --- T10 and T11: failovers -------------------------------------------------------------------------------------


class Pair:
    """A primary and a replica that replicates through a fault proxy; replayd reaches Redis through another."""

    def __init__(self, tmp_path: Path) -> None:
        # Redis 7 syncs replicas disk-less after a 5 s delay (to batch them) by default
        self.primary = RedisServer(tmp_path / "primary", extra_args=["--repl-diskless-sync-delay", "0"]).start()
        self.replication = FaultProxy(("127.0.0.1", self.primary.port)).start()
        self.replica = RedisServer(
            tmp_path / "replica", extra_args=["--replicaof", "127.0.0.1", str(self.replication.port)]
        ).start()
        self.front = FaultProxy(("127.0.0.1", self.primary.port)).start()
        self.wait_synced()

    def wait_synced(self, within: float = 10.0) -> None:
        deadline = time.monotonic() + within
        with self.replica.client() as client:
            while client.info("replication").get("master_link_status") != "up":
                assert time.monotonic() < deadline, "the replica never synced"
                time.sleep(0.02)

    def caught_up(self, within: float = 10.0) -> None:
        """Wait until the replica has applied everything the primary has written: its replication offset reaches
        the primary's. (`WAIT 1` would not do: on a connection that wrote nothing, Redis 7.4 and Valkey answer at
        once, and the replica promoted next was found empty.)"""
        with self.primary.client() as primary:
            written = primary.info("replication")["master_repl_offset"]
        with self.replica.client() as replica:
            wait_for(lambda: replica.info("replication")["master_repl_offset"] >= written, timeout=within)

    def promote(self) -> None:
        """`REPLICAOF NO ONE` on the replica, then move replayd's proxy to it (open connections reset)."""
        with self.replica.client() as client:
            client.replicaof("NO", "ONE")
        self.front.retarget("127.0.0.1", self.replica.port, reset_existing=True)

    def switch_over(self) -> None:
        """Promote the replica and demote the primary to its replica; replayd's proxy sends new connections to the
        new primary and leaves the open ones on the old: their writes now get READONLY."""
        with self.replica.client() as client:
            client.replicaof("NO", "ONE")
        with self.primary.client() as client:
            client.replicaof("127.0.0.1", self.replica.port)
        self.front.retarget("127.0.0.1", self.replica.port)

    def close(self) -> None:
        for proxy in (self.front, self.replication):
            proxy.stop()
        for server in (self.replica, self.primary):
            server.stop()


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    running = Pair(tmp_path)
    try:
        yield running
    finally:
        running.close()


def test_caught_up_waits_for_a_replica_that_lags(pair: Pair) -> None:
    """The check T10 and T11 rely on before they promote the replica: with replication held, a write leaves the
    replica behind and `caught_up` waits (fails here, after 1 s); released, it returns with the write there.
    `WAIT 1` from a new connection returned at once on Redis 7.4 and Valkey 8/9."""
    with pair.primary.client() as primary:
        primary.set("k", "v")
        pair.caught_up()
        pair.replication.stall()
        primary.set("k", "w")
    with pytest.raises(AssertionError, match="condition not met"):
        pair.caught_up(within=1)
    pair.replication.clear()
    pair.caught_up()
    with pair.replica.client() as replica:
        assert replica.get("k") == b"w"


@pytest.mark.anyio
async def test_t10_failover_to_a_lagging_replica(pair: Pair) -> None:
    """1. a following job commits 100 entries, replicated  2. replication blackholed; 50 more, handled and
    committed on the primary only  3. SIGKILL the primary, promote the replica, retarget replayd's proxy
    4. the job finds its position above the new primary's last-generated-id: DataError (exit 65), diverged
    5. entries written to the new primary below the old position (a clock behind) are handled after a restart,
    not silently skipped."""
    cfg = config(pair.front.url)
    metrics = Metrics()
    r = create_redis(cfg)
    engine = Engine(follow_job(), r, redis_cfg=cfg, handler=ObjectHandler(Effects(), "effects"), metrics=metrics)
    with pair.primary.client() as primary:
        ids = produce(primary, 100)

    async def fault() -> None:
        await wait_until(committed(engine, ids[-1]))
        pair.caught_up()
        pair.replication.blackhole()
        with pair.primary.client() as primary:
            ids.extend(produce(primary, 50))
        await wait_until(committed(engine, ids[-1]))
        pair.primary.stop(kill=True)
        pair.promote()

    try:
        failure = await run_until_failure(engine, fault)
    finally:
        await r.aclose()
    assert isinstance(failure, DataError), failure
    assert failure.exit_code == 65
    assert f"read position {ids[-1]}" in str(failure) and f"last-generated-id {ids[99]}" in str(failure)
    assert gaps(metrics, "diverged") == 1

    with pair.replica.client() as new_primary:
        assert new_primary.xinfo_stream(STREAM)["last-generated-id"].decode() == ids[99]
        # a producer whose clock is behind reuses IDs the lost entries had, below the old position
        late = [produce(new_primary, 1, id=entry_id)[0] for entry_id in ids[100:103]]
    effects = await restart(cfg)
    assert effects.ids == late


@pytest.mark.anyio
@pytest.mark.parametrize("failover", ["promote", "switch_over"])
async def test_t11_clean_failover_continues_without_loss(pair: Pair, failover: str) -> None:
    """1. a following job commits 200 entries; the replica catches up  2. it is promoted and replayd's proxy moved
    to it: `promote` resets replayd's connections (the old primary is left out of reach); `switch_over` demotes the
    old primary to a replica and leaves them open on it, so its writes fail READONLY and its blocking reads end
    UNBLOCKED  3. 200 more on the new primary: all handled exactly once (set == list), the job never stops (the
    commit, lease and progress writes move to the new primary), no gap reported."""
    cfg = config(pair.front.url)
    metrics = Metrics()
    r = create_redis(cfg)
    engine = Engine(follow_job(lease_ttl_s=3), r, redis_cfg=cfg, handler=ObjectHandler(Effects(), "effects"),
                    metrics=metrics)  # fmt: skip
    with pair.primary.client() as primary:
        ids = produce(primary, 200)
    try:
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(engine.run)
                await wait_until(committed(engine, ids[-1]))
                pair.caught_up()
                getattr(pair, failover)()
                with pair.replica.client() as new_primary:
                    ids.extend(produce(new_primary, 200))
                await wait_until(committed(engine, ids[-1]))
                await anyio.sleep(1)  # a lease renewal or two after the failover
                assert engine.stats.status == "live"
                engine.stop()
    finally:
        await r.aclose()
    assert engine.stats.status == "stopped"
    assert (pair.front.stats.resets > 0) == (failover == "promote")
    with pair.replica.client() as new_primary:
        assert new_primary.smembers("eff:set") == {i.encode() for i in ids}
        assert new_primary.llen("eff:log") == len(ids)
    assert gaps(metrics, "diverged") == gaps(metrics, "trimmed") == 0
