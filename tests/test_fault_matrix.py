"""Fault-matrix rows T2, T13, T20, T21, T23, T28, T29 and T32, each against real redis-server processes on loopback.

Jobs run in-process (an Engine, so metrics can be read from its registry) or as `replayd` subprocesses where
the exit code, the stderr line or the process's memory is what the row promises.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis
from redis.asyncio import Redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from replayd import Context, Event, Outcome
from replayd.config import JobSpec, RedisConfig
from replayd.connection import create_redis
from replayd.errors import DataError
from replayd.events import parse_id
from replayd.handlers import ObjectHandler
from replayd.jobs.engine import Engine
from replayd.ops.metrics import Metrics
from tests.helpers import replayd, spawn_replayd, wait_for
from tests.servers import RedisServer
from tests.trial_plugins import EFFECT_LOG, EFFECTS, SEEN

STREAM = "s"
MB = 1 << 20


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    """uvloop only (as `replayd` runs): these tests are about Redis and processes, not the event loop."""
    return ("asyncio", {"use_uvloop": True})


class Slow:
    """Records the entry IDs it handles; sleeps per event, so the reader stays ahead of it."""

    name = "slow"
    partition_by = None
    event_types = None

    def __init__(self, per_event_s: float = 0.002) -> None:
        self.per_event_s = per_event_s
        self.ids: list[str] = []

    async def handle_batch(self, events: Sequence[Event], ctx: Context) -> Outcome:
        self.ids.extend(event.stream_id for event in events)
        await anyio.sleep(self.per_event_s * len(events))
        return Outcome(handled=len(events))


def fill(client: redis.Redis, n: int, *, stream: str = STREAM, **fields: bytes) -> list[str]:
    with client.pipeline(transaction=False) as pipe:
        for i in range(n):
            entry: dict[str, bytes] = {"event_type": b"E", "data": b'{"i": %d}' % i, **fields}
            pipe.xadd(stream, entry)  # type: ignore[arg-type]
        return [raw.decode() for raw in pipe.execute()]


def job(**overrides: Any) -> JobSpec:
    values: dict[str, Any] = {"name": "m", "streams": [STREAM], "handler": "x:y", "end": "now", "partitions": 1}
    return JobSpec(**{**values, **overrides})


def gaps(metrics: Metrics, kind: str) -> float:
    return metrics.registry.get_sample_value("replayd_gap_detected_total", {"stream": STREAM, "kind": kind}) or 0


async def wait_until(condition: Callable[[], bool], *, within: float = 10.0) -> None:
    with anyio.fail_after(within):
        while not condition():  # noqa: ASYNC110 - polls what the engine's tasks change
            await anyio.sleep(0.005)


# --- T13: a live trim overtakes the reader ----------------------------------------------------------------------


async def trim_ahead_of_reader(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig, on_gap: str
) -> tuple[Engine, Slow, Metrics, list[str], str, BaseException | None]:
    """1. 1000 entries; a slow handler, reads of 20  2. once 100 are handled, XTRIM MINID 150 entries past them
    (beyond anything read: at most 40 in flight, one batch prefetched, one lookahead entry)  3. run to the end."""
    ids = fill(sync_redis, 1000)
    handler = Slow()
    metrics = Metrics()
    spec = job(on_gap=on_gap, batch_size=20, min_batch_size=20, max_in_flight=40)
    engine = Engine(spec, raw_redis, redis_cfg=redis_cfg, handler=ObjectHandler(handler, "slow"), metrics=metrics)
    failure: BaseException | None = None
    minid = ""

    async def run() -> None:
        nonlocal failure
        try:
            await engine.run()
        except DataError as exc:
            failure = exc

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await wait_until(lambda: len(handler.ids) >= 100)
            minid = ids[ids.index(handler.ids[-1]) + 150]
            sync_redis.xtrim(STREAM, minid=minid, approximate=False)
    return engine, handler, metrics, ids, minid, failure


@pytest.mark.anyio
async def test_t13_live_trim_overtakes_reader(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig
) -> None:
    """Default policy: the next read after the trim stops the job with exit 65, naming stream and position."""
    engine, handler, metrics, _, minid, failure = await trim_ahead_of_reader(sync_redis, raw_redis, redis_cfg, "fail")
    assert isinstance(failure, DataError)
    assert failure.exit_code == 65
    message = str(failure)
    assert f"stream {STREAM}" in message and "read position" in message and f"first entry {minid}" in message
    assert "estimated loss" in message
    assert gaps(metrics, "trimmed") == 1
    assert engine.stats.status == "failed"
    assert all(parse_id(i) < parse_id(minid) for i in handler.ids), "nothing past the trim point is handled"


@pytest.mark.anyio
async def test_t13_live_trim_overtakes_reader_skip_goes_on(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig, caplog: pytest.LogCaptureFixture
) -> None:
    """on_gap = warn: counted and logged with the estimated loss, then every surviving entry, in order."""
    with caplog.at_level(logging.WARNING, logger="replayd.jobs.engine"):
        engine, handler, metrics, ids, minid, failure = await trim_ahead_of_reader(
            sync_redis, raw_redis, redis_cfg, "warn"
        )
    assert failure is None
    assert engine.stats.status == "completed"
    assert gaps(metrics, "trimmed") == 1
    assert any("estimated loss" in r.getMessage() and "read position" in r.getMessage() for r in caplog.records)
    assert handler.ids == sorted(handler.ids, key=parse_id)
    survivors = ids[ids.index(minid) :]
    assert handler.ids[-len(survivors) :] == survivors
    assert 0 < len(ids) - len(handler.ids) <= 150, "lost no more than the trimmed span"


# --- T23: entries deleted while they are pending in the reader --------------------------------------------------


@pytest.mark.anyio
async def test_t23_entries_deleted_while_pending_are_skipped_without_a_gap(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig
) -> None:
    """1. a slow replay of 600 entries  2. XDEL the 200 entries after the last handled one: some are in flight
    already, the rest (the reader's lookahead entry among them) not read yet  3. no crash, no gap reported (XDEL
    is not a trim): what was read before is handled, the rest of the deleted ones never, every other entry is."""
    ids = fill(sync_redis, 600)
    handler = Slow()
    metrics = Metrics()
    spec = job(batch_size=20, min_batch_size=20, max_in_flight=40)
    engine = Engine(spec, raw_redis, redis_cfg=redis_cfg, handler=ObjectHandler(handler, "slow"), metrics=metrics)
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            await wait_until(lambda: len(handler.ids) >= 100)
            at = ids.index(handler.ids[-1])
            deleted = ids[at + 1 : at + 201]
            sync_redis.xdel(STREAM, *deleted)
    assert engine.stats.status == "completed"
    handled_deleted = [i for i in deleted if i in set(handler.ids)]
    assert handled_deleted == deleted[: len(handled_deleted)] and len(handled_deleted) < 100, "read before the XDEL"
    assert handler.ids == [i for i in ids if i not in set(deleted[len(handled_deleted) :])]
    assert gaps(metrics, "trimmed") == gaps(metrics, "diverged") == 0


# --- T21: huge entries and huge batches -------------------------------------------------------------------------


@pytest.mark.anyio
async def test_t21_huge_batch_reads_stay_within_max_batch_bytes(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig
) -> None:
    """500 entries of 100 KB, batch_size 1000, max_batch_bytes 1 MB: every read holds about 10 entries (never
    the 100 the sizer starts at), and all are replayed."""
    fill(sync_redis, 500, blob=b"x" * 100_000)
    handler = Slow(per_event_s=0)
    metrics = Metrics()
    spec = job(batch_size=1000, max_batch_bytes=MB)
    engine = Engine(spec, raw_redis, redis_cfg=redis_cfg, handler=ObjectHandler(handler, "slow"), metrics=metrics)
    with anyio.fail_after(20):
        await engine.run()
    assert engine.stats.processed == 500
    reads = metrics.registry.get_sample_value("replayd_read_batch_entries_count", {"stream": STREAM}) or 0
    assert reads >= 500 / 11
    over_ten = reads - (metrics.registry.get_sample_value("replayd_read_batch_entries_bucket",
                                                          {"stream": STREAM, "le": "10.0"}) or 0)  # fmt: skip
    assert over_ten == 0, "a read held more than max_batch_bytes"
    assert engine.sizer.size <= 10


@pytest.mark.anyio
@pytest.mark.parametrize("policy", ["stop", "dead-letter"])
async def test_t21_entry_over_max_entry_bytes_is_poison(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig, policy: str
) -> None:
    """One 12 MB entry between small ones, max_entry_bytes 8 MB: `stop` fails with its ID (exit 65) after
    committing the entries before it; `dead-letter` records it (without the payload) and goes on."""
    before = fill(sync_redis, 50)
    big = fill(sync_redis, 1, blob=b"x" * (12 * MB))[0]
    after = fill(sync_redis, 50)
    handler = Slow(per_event_s=0)
    spec = job(on_poison=policy, max_entry_bytes=8 * MB, batch_size=30)
    engine = Engine(spec, raw_redis, redis_cfg=redis_cfg, handler=ObjectHandler(handler, "slow"))
    if policy == "stop":
        with pytest.raises(DataError, match=f"{STREAM} {big}.*exceeds max_entry_bytes") as caught:
            await engine.run()
        assert caught.value.exit_code == 65
        assert handler.ids == before[: len(handler.ids)], "the batches before the entry's are committed"
        return
    await engine.run()
    assert handler.ids == before + after
    letters: Any = sync_redis.xrange("replayd:{m}:dlq")
    assert [fields[b"id"].decode() for _, fields in letters] == [big]
    assert b"exceeds max_entry_bytes" in letters[0][1][b"error"]
    assert len(letters[0][1][b"raw"]) < 1000, "the dead letter holds the entry's shape, not its payload"


def write_config(path: Path, url: str, **job: Any) -> Path:
    lines = [f'[redis]\nurl = "{url}"\nblock_ms = 100\nsocket_timeout_s = 2', "[[jobs]]"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in job.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def peak_rss_mb(
    tmp_path: Path, url: str, name: str = "big", **job: Any
) -> tuple[subprocess.CompletedProcess[str], float]:
    """`replayd replay --job NAME` with the PeakRss handler; its VmHWM (from /proc/self/status) in MB.

    replayd holds glibc's mmap threshold at 4 MiB (`cli._hold_mmap_threshold`): left to rise to the size of the
    largest block freed, multi-MB buffers freed early (a 16 MB reply's) came back from the heap later and the peak
    moved between 103 and 129 MB from run to run of the same code; so held, 95-99 MB."""
    rss = tmp_path / f"vmhwm-{name}"
    config = write_config(tmp_path / f"{name}.toml", url, name=name, streams=[STREAM], end="now",
                          handler="tests.lifecycle_plugins:PeakRss", **job)  # fmt: skip
    done = replayd("replay", "--config", str(config), "--job", name, env={"REPLAYD_TEST_RSS_PATH": str(rss)})
    return done, int(rss.read_text().split()[0]) / 1024 if rss.exists() else -1.0


def test_t21_huge_entry_and_huge_batch_keep_rss_bounded(
    redis_server: RedisServer, sync_redis: redis.Redis, tmp_path: Path
) -> None:
    """`replayd replay` with max_batch_bytes 2 MB and a 2 s socket timeout; peak RSS from /proc/self/status.

    1. 600 entries of 100 KB (scaled down from 10k): reads of ~20 entries, peak RSS near the idle process's
       (~50 MB; 70 MB without the byte budget, 110 MB when the lag gauge still read 1000 entries)
    2. one 16 MB entry (scaled down from 50 MB) after 50 small ones: replayed, no timeout loop, one reply of it
       in memory at a time (~95 MB; 166 MB without the budget)."""
    fill(sync_redis, 600, blob=b"x" * 100_000)
    done, peak = peak_rss_mb(tmp_path, redis_server.url, max_batch_bytes=2 * MB, batch_size=1000)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "replayed 600 events" in done.stderr
    assert 0 < peak < 75, f"peak RSS {peak:.0f} MB for 600 x 100 KB"
    sync_redis.delete(STREAM)
    fill(sync_redis, 50)
    fill(sync_redis, 1, blob=b"y" * (16 * MB))
    done, peak = peak_rss_mb(tmp_path, redis_server.url, max_batch_bytes=2 * MB, batch_size=1000, name="huge")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "replayed 51 events" in done.stderr
    assert "retrying" not in done.stderr and "Traceback" not in done.stderr
    assert 0 < peak < 125, f"peak RSS {peak:.0f} MB with a 16 MB entry"


def test_t21_entry_over_max_entry_bytes_exits_65_naming_it(
    redis_server: RedisServer, sync_redis: redis.Redis, tmp_path: Path
) -> None:
    fill(sync_redis, 10)
    big = fill(sync_redis, 1, blob=b"y" * (4 * MB))[0]
    done, _ = peak_rss_mb(tmp_path, redis_server.url, max_entry_bytes=MB)
    assert done.returncode == 65, done.stderr[-2000:]
    assert f"{STREAM} {big}" in done.stderr and "max_entry_bytes" in done.stderr
    assert "Traceback" not in done.stderr


# --- T20: pool exhaustion ---------------------------------------------------------------------------------------


def test_t20_pool_exhaustion_waits_and_status_still_works(
    redis_server: RedisServer, sync_redis: redis.Redis, tmp_path: Path
) -> None:
    """1. max_connections 2 (reader, committer, lease, progress and 8 lanes reading through ctx.redis share them)
    2. status from another process while it runs  3. completes; no "Too many connections", nothing lost."""
    fill(sync_redis, 3000)
    config = write_config(tmp_path / "replayd.toml", redis_server.url, name="pool", streams=[STREAM], end="now",
                          handler="tests.lifecycle_plugins:reads_through_pool", partitions=8, concurrency=8,
                          partition_by="i")  # fmt: skip
    env = {"REPLAYD_REDIS__MAX_CONNECTIONS": "2"}
    proc = spawn_replayd("replay", "--config", str(config), "--job", "pool", env=env)
    try:
        wait_for(lambda: sync_redis.hget("replayd:{pool}:progress", "status") == b"catching_up", 15, proc)
        status = replayd("status", "pool", "--json", "--redis-url", redis_server.url)
        assert proc.poll() is None, "status must run during the replay"
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["pool"]["progress"]["status"] == "catching_up"
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr[-2000:]
    assert "replayed 3,000 events" in stderr
    assert "Too many connections" not in stderr and "No connection available" not in stderr
    assert sync_redis.scard("pool:seen") == 3000


# --- T28: ACL users that may not read ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def acl_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """Users `ro` (read-only: +@read -@write) and `noxread` (everything but XREAD and XRANGE)."""
    server = RedisServer(tmp_path_factory.mktemp("redis-acl")).start()
    try:
        with server.client() as client:
            client.execute_command("ACL", "SETUSER", "ro", "on", ">pw", "~*", "&*", "+@read", "-@write", "+ping")
            client.execute_command("ACL", "SETUSER", "noxread", "on", ">pw", "~*", "&*", "+@all", "-xread", "-xrange")
            fill(client, 20, stream="events:orders")
        yield server
    finally:
        server.stop()


# the read-only user's first refused command is the lease's script (EVAL, in @scripting)
@pytest.mark.parametrize(("user", "command"), [("ro", "eval"), ("noxread", "xrange")])
def test_t28_acl_without_read_or_write_permission_exits_78(acl_server: RedisServer, user: str, command: str) -> None:
    """Not retried through the 30 s budget: one clear line naming the permission, exit 78, no traceback."""
    url = f"redis://{user}:pw@127.0.0.1:{acl_server.port}/0"
    started = time.monotonic()
    done = replayd("replay", "--redis-url", url, "--stream", "events:orders", "--handler", "order_summary",
                   "--job", f"acl-{user}", env={"REPLAYD_REDIS__UNAVAILABLE_TIMEOUT_S": "30"})  # fmt: skip
    assert done.returncode == 78, done.stderr
    assert time.monotonic() - started < 10
    assert "Traceback" not in done.stderr
    assert "ACL" in done.stderr and f"'{command}'" in done.stderr.lower(), done.stderr
    assert ":pw@" not in done.stderr


# --- T29: LOADING after a restart with a big dataset -----------------------------------------------------------


def loading(server: RedisServer, within: float = 5.0) -> bool:
    """Whether the server answers LOADING, asked by a client that does not retry (redis-py retries it)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            with redis.Redis(port=server.port, socket_timeout=1, retry=Retry(NoBackoff(), 0)) as client:
                return not client.set("probe", 1)
        except redis.BusyLoadingError:
            return True
        except redis.ConnectionError:  # not listening yet
            time.sleep(0.01)
    return False


@pytest.mark.anyio
async def test_t29_loading_after_restart_is_retried_until_loaded(tmp_path: Path) -> None:
    """1. 3000 keys of 4 KB (12 MB: Redis serves clients between 2 MB chunks while loading) and 500 entries, saved
    2. restart with key-load-delay (about 1.5 s of LOADING)  3. a job started while the server answers LOADING
    waits it out and replays everything. BusyLoadingError is a ConnectionError: redis-py's own retries (with
    backoff) and replayd's `retrying` both wait it out; which of them saw it decides whether LOADING shows in
    replayd_redis_errors_total, so the count is not asserted."""
    server = RedisServer(tmp_path / "redis").start()
    try:
        with server.client() as client:
            with client.pipeline(transaction=False) as pipe:
                for i in range(3000):
                    pipe.set(f"k{i}", os.urandom(4000))  # random: the RDB must not compress it away
                pipe.execute()
            fill(client, 500)
            client.save()
        server.stop()
        server.extra_args = ["--key-load-delay", "500"]  # microseconds per key while loading
        cfg = RedisConfig(url=server.url, block_ms=100, socket_timeout_s=2, connect_timeout_s=1)
        client = create_redis(cfg)
        handler = Slow(per_event_s=0)
        engine = Engine(job(), client, redis_cfg=cfg, handler=ObjectHandler(handler, "slow"))
        try:
            with anyio.fail_after(20):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(anyio.to_thread.run_sync, server.start)
                    assert await anyio.to_thread.run_sync(loading, server), "the server never answered LOADING"
                    tg.start_soon(engine.run)
        finally:
            await client.aclose()
    finally:
        server.stop()
    assert engine.stats.status == "completed"
    assert engine.stats.processed == 500


# --- T32: a stream that does not exist yet ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_t32_missing_stream_reads_as_empty_until_it_appears(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig
) -> None:
    """A following job on a missing key: no error, caught up at once; entries are handled once it is created."""
    handler = Slow(per_event_s=0)
    engine = Engine(job(end="follow"), raw_redis, redis_cfg=redis_cfg, handler=ObjectHandler(handler, "slow"))
    with anyio.fail_after(15):
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            await engine.caught_up.wait()
            ids = fill(sync_redis, 5)
            await wait_until(lambda: len(handler.ids) == 5)
            engine.stop()
    assert handler.ids == ids
    assert engine.stats.status == "stopped"


@pytest.mark.anyio
async def test_t32_require_stream_exits_65(sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig) -> None:
    engine = Engine(job(require_stream=True), raw_redis, redis_cfg=redis_cfg, handler=ObjectHandler(Slow(), "slow"))
    with pytest.raises(DataError, match=f"stream {STREAM} does not exist") as caught:
        await engine.run()
    assert caught.value.exit_code == 65


def test_t2_crash_after_the_effect_before_the_checkpoint(sync_redis: redis.Redis, redis_url: str) -> None:
    """The handler dies after a batch's effects, before its commit: the direct (idempotent) effect of that batch
    is there, its `ctx.tx` effect is not, the checkpoint is before it; a restart replays exactly that batch."""
    ids = fill(sync_redis, 1000)
    where = ("replay", "--redis-url", redis_url, "--stream", STREAM, "--job", "t2", "--partitions", "1",
             "--batch-size", "100", "--handler", "tests.trial_plugins:CrashAfterEffect")  # fmt: skip
    env = {"TRIAL_REDIS_URL": redis_url, "TRIAL_CRASH_AFTER": "450"}
    crashed = replayd(*where, env=env)
    assert crashed.returncode == 1, crashed.stderr
    seen = {m.decode() for m in sync_redis.smembers(SEEN)}  # type: ignore[union-attr]
    effects = {m.decode() for m in sync_redis.smembers(EFFECTS)}  # type: ignore[union-attr]
    position = parse_id(sync_redis.hget("replayd:{t2}:checkpoint", f"{STREAM}#*").decode())  # type: ignore[union-attr]
    assert effects == {i for i in ids if parse_id(i) <= position}, "committed effects end at the checkpoint"
    lost_batch = seen - effects
    assert lost_batch and all(parse_id(i) > position for i in lost_batch), "the crashed batch: effect, no commit"

    sync_redis.delete("replayd:{t2}:lease")  # the dead process's lease, which would expire in lease_ttl_s (15 s)
    assert replayd(*where, env=env).returncode == 0
    assert {m.decode() for m in sync_redis.smembers(SEEN)} == set(ids)  # type: ignore[union-attr]
    log = [m.decode() for m in sync_redis.lrange(EFFECT_LOG, 0, -1)]  # type: ignore[union-attr]
    assert sorted(log) == sorted(ids), "every transactional effect exactly once"
