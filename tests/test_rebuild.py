"""Blue/green rebuilds: a new version is written beside the live one, then one atomic step flips the alias.

The oracle is the article's own rebuild of the same stream on a second server.
"""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import pytest
import redis
from redis.asyncio import Redis

from replayd.config import JobSpec, RedisConfig, Settings
from replayd.connection import text_hash
from replayd.embedded import free_port
from replayd.jobs.daemon import Daemon
from replayd.jobs.engine import Engine
from replayd.jobs.rebuild import Rebuild, rebuild_in_place
from replayd.jobs.versions import ProjectionFlipped, Versions, acurrent_namespace, current_namespace
from replayd.sample import load_history_sync, order_events
from tests.article import order_summary_rebuilder
from tests.helpers import as_text, replayd, snapshot, spawn_replayd, stream_ids, wait_for, wait_until
from tests.servers import RedisServer
from tests.test_http import fetch, samples

STREAM = "events:orders"
NAME = "order_summary"
pytestmark = pytest.mark.anyio


def job(**overrides: Any) -> JobSpec:
    values: dict[str, Any] = {"name": "orders", "streams": [STREAM], "handler": NAME, "progress_interval_s": 0.1}
    return JobSpec(**{**values, **overrides})


def version_of(r: redis.Redis, version: int) -> dict[str, tuple[str, Any]]:
    """The keys of one version, named relative to it (meta, alias and other versions left out)."""
    prefix = f"projection:{NAME}:" + (f"v{version}:" if version else "")
    keys = snapshot(r, prefix + "*")
    relative = {key[len(prefix) :]: value for key, value in keys.items()}
    if not version:
        relative = {k: v for k, v in relative.items() if k.split(":")[0] in ("order", "customer")}
    return relative


def append(r: redis.Redis, entries: list[dict[str, str]]) -> None:
    pipe = r.pipeline(transaction=False)
    for fields in entries:
        pipe.xadd(STREAM, fields)  # type: ignore[arg-type]
    pipe.execute()


@pytest.fixture
def oracle_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("oracle")).start()
    try:
        yield server
    finally:
        server.stop()


def article_rebuild(r: redis.Redis, oracle_server: RedisServer) -> dict[str, tuple[str, Any]]:
    """The article's rebuild of `r`'s whole stream, on a copy of it in a server of its own."""
    with oracle_server.client() as copy:
        copy.flushall()
        pipe = copy.pipeline(transaction=False)
        for entry_id, fields in r.xrange(STREAM):  # type: ignore[union-attr]
            pipe.xadd(STREAM, fields, id=entry_id)
        pipe.execute()
        order_summary_rebuilder(copy, STREAM).rebuild(NAME)
        return version_of(copy, 0)


async def test_rebuild_writes_a_new_version_then_flips_and_deletes_the_old(
    raw_redis: Redis, redis_cfg: RedisConfig, sync_redis: redis.Redis, oracle_server: RedisServer
) -> None:
    load_history_sync(sync_redis, STREAM, 3000)
    await rebuild_in_place(Engine(job(end="now"), raw_redis, redis_cfg=redis_cfg))  # the article's layout: v0
    expected = article_rebuild(sync_redis, oracle_server)
    assert version_of(sync_redis, 0) == expected

    rebuild = Rebuild(job(), raw_redis, redis_cfg=redis_cfg)
    await rebuild.run(retain_s=0)

    assert sync_redis.get(f"projection:{NAME}:current") == b"1"
    assert current_namespace(sync_redis, NAME) == f"projection:{NAME}:v1"
    assert version_of(sync_redis, 1) == expected
    assert version_of(sync_redis, 0) == {}, "the replaced version is deleted once its retention passed"
    assert sync_redis.hget(f"projection:{NAME}:meta", "version") == b"1"
    assert not sync_redis.exists("replayd:{orders@v1}:checkpoint", f"projection:{NAME}:next")
    # the live job resumes from the rebuild's position, on the new version
    live = Engine(job(end="now"), raw_redis, redis_cfg=redis_cfg)
    stats = await live.run()
    assert (stats.total, live.version) == (0, 1)


class ReplyLost(Versions):
    """The flip runs in Redis, then its connection drops before the reply arrives (once)."""

    lost = False

    async def flip(self, version: int, job: str, *, retain_s: float) -> int | None:
        old = await super().flip(version, job, retain_s=retain_s)
        if not self.lost:
            self.lost = True
            raise redis.ConnectionError("Connection closed by server.")
        return old


async def test_a_flip_whose_reply_was_lost_is_sent_again_and_not_taken_for_another_rebuilds(
    raw_redis: Redis, redis_cfg: RedisConfig, sync_redis: redis.Redis
) -> None:
    load_history_sync(sync_redis, STREAM, 1000)
    await rebuild_in_place(Engine(job(end="now"), raw_redis, redis_cfg=redis_cfg))
    rebuild = Rebuild(job(), raw_redis, redis_cfg=redis_cfg)
    rebuild.versions = ReplyLost(raw_redis, NAME)
    assert await rebuild.run(retain_s=0) == (rebuild.engines[0].stats, 0)
    assert rebuild.versions.lost
    assert sync_redis.get(f"projection:{NAME}:current") == b"1"
    assert sync_redis.hget(f"projection:{NAME}:meta", "version") == b"1"
    assert version_of(sync_redis, 0) == {}, "the replaced version is deleted"


async def test_readers_never_miss_a_key_during_a_rebuild(
    raw_redis: Redis, redis_cfg: RedisConfig, sync_redis: redis.Redis
) -> None:
    load_history_sync(sync_redis, STREAM, 5000)
    await Rebuild(job(), raw_redis, redis_cfg=redis_cfg).run(retain_s=0)  # v1 is live
    orders = [as_text(k).rsplit(":", 1)[1] for k in sync_redis.scan_iter(f"projection:{NAME}:v1:order:*")][:50]
    seen: set[str] = set()
    missing: list[str] = []
    done = anyio.Event()

    async def reader() -> None:
        while not done.is_set():
            ns = await acurrent_namespace(raw_redis, NAME)
            seen.add(ns)
            keys = [f"{ns}:order:{order}" for order in orders]
            missing.extend([key for key in keys if not await raw_redis.exists(key)])
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        tg.start_soon(reader)
        await Rebuild(job(), raw_redis, redis_cfg=redis_cfg).run(retain_s=1)
        await anyio.sleep(0.2)
        done.set()
    assert missing == []
    assert seen == {f"projection:{NAME}:v1", f"projection:{NAME}:v2"}


async def test_the_live_job_goes_on_on_the_new_version(
    redis_server: RedisServer, raw_redis: Redis, redis_cfg: RedisConfig, sync_redis: redis.Redis,
    oracle_server: RedisServer,
) -> None:  # fmt: skip
    history = list(order_events(5000))  # one history: order IDs are unique and shipped follows created
    append(sync_redis, history[:4000])
    settings = Settings(redis=redis_cfg, http={"enabled": False}, jobs=[job(end="follow")])
    daemon = Daemon(settings, handle_signals=False)
    async with anyio.create_task_group() as tg:
        tg.start_soon(daemon.run)
        with anyio.fail_after(20):
            await daemon.engines[0].caught_up.wait()
        append(sync_redis, history[4000:4500])  # live events while the rebuild runs
        await Rebuild(job(), raw_redis, redis_cfg=redis_cfg).run(retain_s=0)
        append(sync_redis, history[4500:])  # live events after the flip
        last = tuple(map(int, stream_ids(sync_redis, STREAM)[-1].split("-")))
        await wait_until(
            lambda: daemon.engines[0].version == 1 and daemon.engines[0].stats.position.get(STREAM, (0, 0)) >= last
        )
        daemon.stop()
    assert version_of(sync_redis, 1) == article_rebuild(sync_redis, oracle_server)


async def test_a_commit_for_the_old_version_is_refused_after_the_flip(
    raw_redis: Redis, redis_cfg: RedisConfig, sync_redis: redis.Redis
) -> None:
    """A live engine writing v0 while the flip happens: its next commit is fenced, and it says why."""
    load_history_sync(sync_redis, STREAM, 1000)
    live = Engine(job(end="follow"), raw_redis, redis_cfg=redis_cfg)
    flipped = anyio.Event()

    async def run_live() -> None:
        with pytest.raises(ProjectionFlipped):
            await live.run()
        flipped.set()

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run_live)
            await live.caught_up.wait()
            await Rebuild(job(), raw_redis, redis_cfg=redis_cfg).run(retain_s=60)
            load_history_sync(sync_redis, STREAM, 10, seed=8)
            await flipped.wait()
    assert version_of(sync_redis, 0), "the old version is kept for its retention"


def finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


def test_a_killed_rebuild_leaves_one_whole_version_current_and_resumes(redis_url: str, sync_redis: redis.Redis) -> None:
    load_history_sync(sync_redis, STREAM, 40_000)  # a build takes 0.3 s or more: the kills below land in it
    args = ("rebuild", "--redis-url", redis_url, "--stream", STREAM, "--handler", NAME, "--retain-old", "0",
            "--batch-size", "200")  # fmt: skip
    assert finish(spawn_replayd(*args))[0] == 0
    expected = version_of(sync_redis, 1)  # a whole rebuild (the tests above compare it with the article's)
    rng = random.Random(5)
    for version, moment in ((2, "building"), (3, "building"), (4, "flipped")):
        proc = spawn_replayd(*args)
        building = f"replayd:{{{NAME}@v{version}}}:checkpoint"  # the rebuild job of the job named after NAME
        if moment == "building":  # killed mid-build, at a random point after its first commit
            wait_for(lambda: bool(sync_redis.exists(building)) or proc.poll() is not None)  # noqa: B023
            time.sleep(rng.uniform(0, 0.15))
        else:  # killed right after the flip, before the old version is deleted
            wait_for(lambda: sync_redis.get(f"projection:{NAME}:current") == str(version).encode())  # noqa: B023
        assert moment == "flipped" or proc.poll() is None, "killed while it builds"
        proc.send_signal(signal.SIGKILL)
        finish(proc)
        sync_redis.delete(f"replayd:{{{NAME}@v{version}}}:lease")  # would expire in lease_ttl_s (15 s)
        resumable = sync_redis.exists(building)
        current = int(sync_redis.get(f"projection:{NAME}:current") or 0)
        assert current in (version - 1, version), "the alias names the old version or the new one"
        assert version_of(sync_redis, current) == expected, f"v{current} is whole"
        assert (current == version) == (moment == "flipped")
        if current == version - 1:  # killed before the flip: the next run resumes this version's rebuild
            assert sync_redis.get(f"projection:{NAME}:next") == str(version).encode()
            code, err = finish(spawn_replayd(*args))
            assert code == 0, err
            assert resumable
            replayed = re.search(r"([\d,]+) events in ", err)
            assert replayed and int(replayed[1].replace(",", "")) < 40_000, "it resumed from its own checkpoint"
        assert version_of(sync_redis, version) == expected
        assert int(sync_redis.get(f"projection:{NAME}:current") or 0) == version


def test_a_rebuild_stopped_by_sigint_drains_flips_nothing_and_resumes(redis_url: str, sync_redis: redis.Redis) -> None:
    """Ctrl-C during a build: what is routed commits to the new version's checkpoint, the alias still names the
    old version (whole), exit 130; the same command then resumes the build and flips."""
    load_history_sync(sync_redis, STREAM, 20_000)
    args = ("rebuild", "--redis-url", redis_url, "--stream", STREAM, "--handler", NAME, "--retain-old", "0",
            "--batch-size", "200")  # fmt: skip
    assert finish(spawn_replayd(*args))[0] == 0
    expected = version_of(sync_redis, 1)  # a whole rebuild (the tests above compare it with the article's)
    proc = spawn_replayd(*args)
    building = f"replayd:{{{NAME}@v2}}:checkpoint"
    wait_for(lambda: any(b"#" in field for field in sync_redis.hkeys(building)), proc=proc)  # a batch committed
    proc.send_signal(signal.SIGINT)
    code, err = finish(proc)
    assert code == 130, err
    assert "nothing flipped: the same `replayd rebuild` resumes projection:order_summary:v2" in err
    assert sync_redis.get(f"projection:{NAME}:current") == b"1"
    assert version_of(sync_redis, 1) == expected
    assert sync_redis.get(f"projection:{NAME}:next") == b"2"
    code, err = finish(spawn_replayd(*args))
    assert code == 0, err
    replayed = re.search(r"([\d,]+) events in ", err)
    assert replayed and int(replayed[1].replace(",", "")) < 20_000, "it resumed from its own checkpoint"
    assert sync_redis.get(f"projection:{NAME}:current") == b"2"
    assert version_of(sync_redis, 2) == expected


# --- verify ----------------------------------------------------------------------------------------------------


def test_verify_finds_a_rebuild_equal_and_discards_its_shadow(redis_url: str, sync_redis: redis.Redis) -> None:
    load_history_sync(sync_redis, STREAM, 3000)
    where = ("--redis-url", redis_url, "--stream", STREAM, "--handler", NAME)
    assert replayd("rebuild", *where, "--in-place").returncode == 0
    done = replayd("verify", *where)
    assert done.returncode == 0, done.stderr
    assert f"projection:{NAME} (current) against projection:{NAME}:v1 (rebuilt)" in done.stdout
    assert "0 only in current, 0 only in rebuilt, 0 different" in done.stdout
    assert not list(sync_redis.scan_iter(f"projection:{NAME}:v1:*")), "the shadow is gone"
    assert not sync_redis.exists(f"projection:{NAME}:next", "replayd:{order_summary@v1}:checkpoint")


def test_verify_reports_each_kind_of_difference_and_exits_1(redis_url: str, sync_redis: redis.Redis) -> None:
    load_history_sync(sync_redis, STREAM, 3000)
    where = ("--redis-url", redis_url, "--stream", STREAM, "--handler", NAME)
    assert replayd("rebuild", *where, "--retain-old", "0").returncode == 0  # v1 current
    sync_redis.hset(f"projection:{NAME}:v1:order:ord_1", "status", "lost")
    sync_redis.delete(f"projection:{NAME}:v1:order:ord_2")
    sync_redis.set(f"projection:{NAME}:v1:stray", "1")
    done = replayd("verify", *where, "--json", "--keep")
    report = json.loads(done.stdout)
    assert done.returncode == 1
    assert (report["only_left"], report["only_right"], report["different"]) == (1, 1, 1)
    assert "only in projection:order_summary:v1: stray" in report["examples"]
    assert "only in projection:order_summary:v2: order:ord_2" in report["examples"]
    assert any(line.startswith("different: order:ord_1: status: lost vs ") for line in report["examples"])
    # the kept shadow is what the next rebuild finishes and flips to
    assert replayd("rebuild", *where, "--retain-old", "0").returncode == 0
    assert sync_redis.get(f"projection:{NAME}:current") == b"2"
    assert replayd("verify", *where).returncode == 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_verify_stopped_by_a_signal_withdraws_its_pause_and_deletes_its_shadow(
    signum: signal.Signals, redis_url: str, sync_redis: redis.Redis
) -> None:
    """SIGTERM or Ctrl-C while verify waits for the live job to pause: it exits 128 + the signal at once, having
    withdrawn the pause it asked for and deleted its shadow version (a SIGTERM used to kill it there, leaving the
    job paused)."""
    load_history_sync(sync_redis, STREAM, 3000)
    where = ("--redis-url", redis_url, "--stream", STREAM, "--handler", NAME)
    assert replayd("rebuild", *where, "--retain-old", "0").returncode == 0  # v1 current
    progress = f"replayd:{{{NAME}}}:progress"  # a live job's, which never confirms a pause
    sync_redis.hset(progress, mapping={"status": "live", "updated_at": str(time.time())})
    proc = spawn_replayd("verify", *where)
    wait_for(lambda: bool(sync_redis.hexists(progress, "paused")), proc=proc)
    proc.send_signal(signum)
    code, err = finish(proc)
    assert code == 128 + signum, err
    assert "verify stopped before its comparison: the live job runs on, its shadow is deleted" in err
    assert not sync_redis.hexists(progress, "paused")
    assert not list(sync_redis.scan_iter(f"projection:{NAME}:v2:*"))
    assert not sync_redis.exists(f"projection:{NAME}:next")
    assert sync_redis.get(f"projection:{NAME}:current") == b"1"


async def test_verify_pauses_a_running_job_and_compares_at_its_position(
    raw_redis: Redis, redis_cfg: RedisConfig, sync_redis: redis.Redis, redis_url: str
) -> None:
    history = list(order_events(6000))
    append(sync_redis, history[:3000])
    settings = Settings(redis=redis_cfg, http={"enabled": False}, jobs=[job(end="follow")])
    daemon = Daemon(settings, handle_signals=False)
    where = ("--redis-url", redis_url, "--stream", STREAM, "--handler", NAME, "--job", "orders")
    async with anyio.create_task_group() as tg:
        tg.start_soon(daemon.run)
        with anyio.fail_after(20):
            await daemon.engines[0].caught_up.wait()

        async def produce() -> None:  # live events all along the verification
            for start in range(3000, 6000, 100):
                append(sync_redis, history[start : start + 100])
                await anyio.sleep(0.05)

        statuses: set[str] = set()

        async def watch() -> None:
            while True:
                statuses.add(daemon.engines[0].stats.status)
                await anyio.sleep(0.01)

        tg.start_soon(produce)
        tg.start_soon(watch)
        done = await anyio.to_thread.run_sync(lambda: replayd("verify", *where))
        assert "paused" in statuses
        assert done.returncode == 0, done.stdout + done.stderr
        assert "0 only in current, 0 only in rebuilt, 0 different" in done.stdout
        last = tuple(map(int, stream_ids(sync_redis, STREAM)[-1].split("-")))
        await wait_until(lambda: daemon.engines[0].stats.position.get(STREAM, (0, 0)) >= last, within=30)
        assert daemon.engines[0].stats.status == "live", "resumed after the comparison"
        daemon.stop()
        tg.cancel_scope.cancel()


async def test_an_in_place_rebuild_clears_nothing_before_it_holds_the_lease(
    raw_redis: Redis, redis_cfg: RedisConfig, sync_redis: redis.Redis
) -> None:
    load_history_sync(sync_redis, STREAM, 500)
    await rebuild_in_place(Engine(job(end="now", name=NAME), raw_redis, redis_cfg=redis_cfg))
    before = version_of(sync_redis, 0)
    sync_redis.set(f"replayd:{{{NAME}}}:lease", "another-instance", px=1500)  # a daemon job of the projection
    rebuild = Engine(job(end="now", name=NAME, lease_ttl_s=1.5), raw_redis, redis_cfg=redis_cfg)  # retries 0.5 s
    async with anyio.create_task_group() as tg:
        tg.start_soon(rebuild_in_place, rebuild)
        await anyio.sleep(0.8)
        assert version_of(sync_redis, 0) == before, "nothing cleared while the other instance holds the lease"
        assert rebuild.stats.status == "starting"
    assert rebuild.stats.status == "completed"
    assert version_of(sync_redis, 0) == before


@pytest.mark.parametrize("command", [["rebuild"], ["rebuild", "--in-place"], ["verify"]])
def test_one_shot_rebuilds_serve_metrics_while_they_run(
    tmp_path: Path, redis_url: str, sync_redis: redis.Redis, command: list[str]
) -> None:
    """`rebuild` / `verify --metrics-port P` (a Kubernetes Job is scraped while it runs): /metrics says
    replayd_rebuild_running 1 and the head it runs to, /healthz answers; the command then ends as usual."""
    load_history_sync(sync_redis, STREAM, 3000)
    path = tmp_path / "replayd.toml"
    path.write_text(
        f'[redis]\nurl = "{redis_url}"\n[[jobs]]\nname = "order_summary"\nstreams = ["{STREAM}"]\n'
        'handler = "order_summary"\nrate_limit = 1500\n'
    )
    port = free_port()
    proc = spawn_replayd(*command, "--config", str(path), "--job", "order_summary", "--metrics-port", str(port))
    try:

        def rebuilding() -> bool:
            try:
                parsed = samples(fetch(port, "/metrics").body.decode())
            except OSError:
                return False
            running = [labels for (name, labels), v in parsed.items() if name == "replayd_rebuild_running" and v == 1]
            return bool(running) and any(name == "replayd_rebuild_target_timestamp_seconds" for name, _ in parsed)

        wait_for(rebuilding, proc=proc)
        assert fetch(port, "/healthz").status == 200
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == (1 if command == ["verify"] else 0), stderr  # verify: no live projection to equal
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


async def test_a_flip_moves_commit_sequences_only_not_the_fields_of_a_stream_named_seq(
    raw_redis: Redis, redis_cfg: RedisConfig, sync_redis: redis.Redis
) -> None:
    """The flip bumps the live job's `seq` and `seq:i/N` fields; the fields of a stream whose name starts with
    `seq` are positions (the flip once took every field starting with `seq` for a commit sequence, and turned a
    following job's `replay_until` into `<n>:flip`)."""
    stream = "sequence:orders"
    load_history_sync(sync_redis, stream, 500)
    await Engine(job(streams=[stream], end="now"), raw_redis, redis_cfg=redis_cfg).run()
    key = "replayd:{orders}:checkpoint"
    until = stream_ids(sync_redis, stream)[-1]
    sync_redis.hset(key, f"{stream}#replay_until", until)  # as a following job writes it
    await Rebuild(job(streams=[stream], end="now"), raw_redis, redis_cfg=redis_cfg).run(retain_s=0)
    checkpoint = text_hash(sync_redis.hgetall(key))
    assert checkpoint[f"{stream}#replay_until"] == until
    assert checkpoint["seq"].endswith(":flip")
