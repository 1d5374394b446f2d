"""Scale-out: shards i/N own disjoint partitions; `--workers K` runs and supervises K shard processes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from replayd.config import JobSpec, RedisConfig
from replayd.embedded import free_port
from replayd.jobs.engine import Engine
from replayd.jobs.rebuild import rebuild_in_place
from replayd.sample import load_history_sync
from tests.helpers import order_summaries

STREAM = "events:orders"


def spec(**overrides: Any) -> JobSpec:
    values: dict[str, Any] = {"name": "orders", "streams": [STREAM], "handler": "order_summary", "end": "now"}
    return JobSpec(**{**values, **overrides})


@pytest.mark.anyio
@pytest.mark.parametrize("partition_by", [None, "@stream"])
async def test_three_shards_build_the_same_projection_as_one_process(
    raw_redis: Redis, redis_cfg: RedisConfig, sync_redis: redis.Redis, partition_by: str | None
) -> None:
    load_history_sync(sync_redis, STREAM, 6000)
    sync_redis.xadd(STREAM, {"event_type": "OrderCreated", "data": "{not json"})  # no key to route by
    sync_redis.xadd(STREAM, {"event_type": b"\xff", "data": '{"customer_id": "c1"}'})  # in one partition
    single_stats = await rebuild_in_place(
        Engine(spec(name="single", partition_by=partition_by, on_poison="skip"), raw_redis, redis_cfg=redis_cfg)
    )
    single = order_summaries(sync_redis)
    for key in sync_redis.scan_iter(match="projection:*"):
        sync_redis.delete(key)
    engines = [
        Engine(spec(shard=f"{i}/3", partition_by=partition_by, on_poison="skip"), raw_redis, redis_cfg=redis_cfg)
        for i in range(3)
    ]
    async with anyio.create_task_group() as tg:
        for engine in engines:
            tg.start_soon(engine.run)
    assert order_summaries(sync_redis) == single
    assert sum(engine.stats.processed for engine in engines) == single_stats.processed
    assert sum(engine.stats.skipped for engine in engines) == single_stats.skipped > 0, "filtered: counted once"
    assert sum(engine.stats.poison for engine in engines) == single_stats.poison == 2, "undecodable: counted once"


@pytest.mark.anyio
async def test_shards_resume_from_their_own_checkpoints(
    raw_redis: Redis, redis_cfg: RedisConfig, sync_redis: redis.Redis
) -> None:
    load_history_sync(sync_redis, STREAM, 2000)
    for i in range(2):
        await Engine(spec(shard=f"{i}/2"), raw_redis, redis_cfg=redis_cfg).run()
    fields = sync_redis.hgetall("replayd:{orders}:checkpoint")
    assert f"{STREAM}#*0/2".encode() in fields and f"{STREAM}#*1/2".encode() in fields
    load_history_sync(sync_redis, STREAM, 100, seed=3)
    new: Any = sync_redis.xrevrange(STREAM, count=100)
    handled = sum(1 for _, fields in new if fields[b"event_type"].startswith(b"Order"))
    again = [await Engine(spec(shard=f"{i}/2"), raw_redis, redis_cfg=redis_cfg).run() for i in range(2)]
    assert sum(s.processed for s in again) == handled


def replayd_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "replayd", *args]


@pytest.mark.timeout(120)
def test_workers_restart_a_dead_worker_and_stop_on_sigterm(redis_url: str, sync_redis: redis.Redis) -> None:
    """1. `run --workers 2` following live  2. SIGKILL one worker  3. it is restarted  4. SIGTERM: all exit 0."""
    load_history_sync(sync_redis, STREAM, 500)
    env = {k: v for k, v in os.environ.items() if not k.startswith("REPLAYD_")}
    config = (
        f'[redis]\nurl = "{redis_url}"\nblock_ms = 100\n[http]\nenabled = false\n'
        f'[[jobs]]\nname = "orders"\nstreams = ["{STREAM}"]\nhandler = "order_summary"\nlease_ttl_s = 1\n'
    )
    path = f"/tmp/replayd-workers-{os.getpid()}.toml"  # noqa: S108 - a test's own file
    with open(path, "w") as file:
        file.write(config)
    supervisor = subprocess.Popen(replayd_cmd("run", "--config", path, "--workers", "2"), env=env)
    try:
        deadline = time.monotonic() + 30
        while not all(sync_redis.hget(f"replayd:{{orders}}:progress:{i}/2", "status") == b"live" for i in range(2)):
            assert time.monotonic() < deadline, "workers did not go live"
            time.sleep(0.1)
        owner: Any = sync_redis.hget("replayd:{orders}:progress:1/2", "owner")
        assert owner is not None
        os.kill(int(owner.decode().rsplit(":", 1)[1]), signal.SIGKILL)
        deadline = time.monotonic() + 30
        while sync_redis.hget("replayd:{orders}:progress:1/2", "owner") == owner:
            assert time.monotonic() < deadline, "the killed worker was not restarted"
            time.sleep(0.1)
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(timeout=30) == 0
        assert all(sync_redis.hget(f"replayd:{{orders}}:progress:{i}/2", "status") == b"stopped" for i in range(2))
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
        os.unlink(path)


@pytest.mark.anyio
async def test_shards_starting_over_keep_each_others_checkpoints(
    raw_redis: Redis, redis_cfg: RedisConfig, sync_redis: redis.Redis
) -> None:
    """`--from beginning --workers 2`: each shard forgets only its own positions, never the other's sequence."""
    load_history_sync(sync_redis, STREAM, 3000)
    for i in range(2):  # a first run leaves checkpoints and commit sequences of both shards
        await Engine(spec(shard=f"{i}/2"), raw_redis, redis_cfg=redis_cfg).run()
    engines = [Engine(spec(shard=f"{i}/2", resume=False), raw_redis, redis_cfg=redis_cfg) for i in range(2)]
    async with anyio.create_task_group() as tg:
        for engine in engines:
            tg.start_soon(engine.run)
    assert all(engine.stats.status == "completed" for engine in engines)
    entries: Any = sync_redis.xrange(STREAM)
    handled = sum(1 for _, fields in entries if fields[b"event_type"].startswith(b"Order"))
    assert sum(engine.stats.processed for engine in engines) == handled


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - http://127.0.0.1 only
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def run_two_workers(redis_url: str, tmp_path: Path, port: int) -> subprocess.Popen[bytes]:
    """`replayd run --workers 2` of the order_summary job, its one HTTP listener on `port`."""
    path = tmp_path / "replayd.toml"
    path.write_text(
        f'[redis]\nurl = "{redis_url}"\nblock_ms = 100\n[http]\nhost = "127.0.0.1"\nport = {port}\n'
        f'[[jobs]]\nname = "orders"\nstreams = ["{STREAM}"]\nhandler = "order_summary"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("REPLAYD_")}
    return subprocess.Popen(replayd_cmd("run", "--config", str(path), "--workers", "2"), env=env)


@pytest.mark.timeout(120)
def test_workers_share_one_listener_whose_health_reflects_every_worker(
    redis_url: str, sync_redis: redis.Redis, tmp_path: Path
) -> None:
    """`run --workers 2` with HTTP on (the default config): one listener on the configured port serves both
    workers' metrics (labelled worker="0" and "1") and fails /healthz naming a worker whose loop does not answer."""
    load_history_sync(sync_redis, STREAM, 500)
    port = free_port()
    supervisor = run_two_workers(redis_url, tmp_path, port)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while not all(sync_redis.hget(f"replayd:{{orders}}:progress:{i}/2", "status") == b"live" for i in range(2)):
            assert supervisor.poll() is None, f"exited {supervisor.returncode}: a worker could not bind?"
            assert time.monotonic() < deadline, "workers did not go live"
            time.sleep(0.1)
        status, body = _get(f"{url}/healthz")
        assert status == 200 and json.loads(body)["workers"] == {"0": 200, "1": 200}, body
        assert _get(f"{url}/readyz")[0] == 200
        families = {f.name: f for f in text_string_to_metric_families(_get(f"{url}/metrics")[1])}
        live = {
            s.labels["worker"] for s in families["replayd_state"].samples if s.labels["state"] == "live" and s.value
        }
        assert live == {"0", "1"}
        owner: Any = sync_redis.hget("replayd:{orders}:progress:1/2", "owner")
        worker = int(owner.decode().rsplit(":", 1)[1])
        os.kill(worker, signal.SIGSTOP)  # its loop and its listener stop answering
        try:
            status, body = _get(f"{url}/healthz")
            assert status == 503 and "worker 1: no answer" in body, body
        finally:
            os.kill(worker, signal.SIGCONT)
        assert _get(f"{url}/healthz")[0] == 200
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(timeout=30) == 0
    finally:
        if supervisor.poll() is None:
            supervisor.kill()


@pytest.mark.timeout(120)
def test_workers_and_their_listener_stop_when_the_supervisor_is_killed(
    redis_url: str, sync_redis: redis.Redis, tmp_path: Path
) -> None:
    """SIGKILL the supervisor of `run --workers 2`: the workers drain (their progress says stopped) and the
    listener frees the port, rather than running on as orphans that hold the port against the next start."""
    load_history_sync(sync_redis, STREAM, 200)
    port = free_port()
    supervisor = run_two_workers(redis_url, tmp_path, port)
    statuses = [f"replayd:{{orders}}:progress:{i}/2" for i in range(2)]
    try:
        deadline = time.monotonic() + 30
        while not (all(sync_redis.hget(key, "status") == b"live" for key in statuses) and _serving(port)):
            assert supervisor.poll() is None and time.monotonic() < deadline, "workers did not go live"
            time.sleep(0.1)
        supervisor.kill()
        supervisor.wait()
        deadline = time.monotonic() + 20
        while any(sync_redis.hget(key, "status") != b"stopped" for key in statuses) or _serving(port):
            assert time.monotonic() < deadline, "workers or listener outlived their supervisor"
            time.sleep(0.1)
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
        for key in statuses:  # orphans left by a failure: their owners' PIDs
            owner: Any = sync_redis.hget(key, "owner")
            if owner and sync_redis.hget(key, "status") != b"stopped":
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(owner.decode().rsplit(":", 1)[1]), signal.SIGKILL)


def _serving(port: int) -> bool:
    try:
        return _get(f"http://127.0.0.1:{port}/healthz")[0] == 200
    except OSError:
        return False
