"""Operator commands are fenced (FAULTS T36): `dlq retry|discard`, `checkpoint set|reset` and `rebuild --in-place`
refuse (exit 75, naming the owner) while an instance runs the job, and two of them at once never both apply."""

from __future__ import annotations

import subprocess
from functools import partial
from typing import Any

import anyio
import pytest
import redis
from redis.asyncio import Redis

from replayd.config import RedisConfig
from replayd.events import Event
from replayd.jobs.deadletter import dead_letter
from replayd.pipeline.commit import job_key
from tests.helpers import STREAM, add, checkpoint, engine, orders, replayd, spawn_replayd, spec, wait_for
from tests.plugins import Recorder

JOB = "ops"
DLQ = job_key(JOB, "dlq")
GATED = "tests.operator_plugins:GatedApplied"


def letters(r: redis.Redis, n: int) -> list[str]:
    """`n` dead letters of job `ops` (keys k0..k9, each parked); returns their origin entry IDs."""
    origins = []
    for i in range(n):
        origin = f"{1_700_000_000_000 + i}-0"
        event = Event(origin, f"e{i}", "OrderCreated", {"customer_id": f"k{i % 10}"}, 1.0, {}, STREAM)
        fields: Any = dead_letter(event, "boom", 4, f"k{i % 10}")
        r.xadd(DLQ, fields)
        r.hsetnx(job_key(JOB, "parked"), f"k{i % 10}", origin)
        origins.append(origin)
    return origins


def test_two_dlq_retries_at_once_apply_each_letter_once(
    redis_url: str, sync_redis: redis.Redis, processes: list[subprocess.Popen[str]]
) -> None:
    """1. `dlq retry --all` starts and is held at its first letter  2. a second one starts: it exits 75 naming the
    first (before this fix it retried the same letters)  3. the first goes on: every letter applied once, none left."""
    origins = letters(sync_redis, 40)
    command = ("dlq", "retry", JOB, "--all", "--yes", "--handler", GATED, "--redis-url", redis_url)
    first = spawn_replayd(*command)
    processes.append(first)
    wait_for(lambda: bool(sync_redis.exists("waiting")), proc=first)
    second = spawn_replayd(*command)
    processes.append(second)
    try:
        second.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pass  # held at the gate too: it is retrying the same letters
    sync_redis.set("gate", 1)
    _, first_err = first.communicate(timeout=60)
    _, second_err = second.communicate(timeout=60)
    assert first.returncode == 0, first_err
    assert second.returncode == 75, second_err
    assert "`replayd dlq retry`" in second_err and "stop it first" not in second_err
    counts = {k.decode(): int(v) for k, v in sync_redis.hgetall("applied").items()}  # type: ignore[union-attr]
    assert counts == dict.fromkeys(origins, 1)
    assert sync_redis.xlen(DLQ) == 0
    assert not sync_redis.exists(job_key(JOB, "parked"))


@pytest.mark.anyio
async def test_state_changing_commands_refuse_while_the_job_runs(
    raw_redis: Redis, redis_cfg: RedisConfig, sync_redis: redis.Redis, redis_url: str
) -> None:
    """1. a following job runs (it holds the lease)  2. `dlq retry`, `dlq discard`, `checkpoint set`, `checkpoint
    reset` and `rebuild --in-place` each exit 75 naming the running instance, and change nothing (before this fix
    they reported success, and the job's next commit overwrote the checkpoint set, or parked new events behind
    letters that were gone)  3. once the job is stopped, `checkpoint set` applies."""
    add(sync_redis, orders(50))
    letters(sync_redis, 5)
    job = engine(spec(name=JOB, end="follow"), raw_redis, redis_cfg, Recorder(partition_by="customer_id"))
    commands = [
        ("dlq", "retry", JOB, "--handler", GATED),
        ("dlq", "discard", JOB, "--all", "--yes"),
        ("checkpoint", "set", JOB, "--stream", STREAM, "--to", "0-1", "--yes"),
        ("checkpoint", "reset", JOB, "--yes"),
        ("rebuild", "--in-place", "--job", JOB, "--stream", STREAM, "--handler", "tests.plugins:Recorder"),
    ]
    async with anyio.create_task_group() as tg:
        tg.start_soon(job.run)
        with anyio.fail_after(20):
            await job.caught_up.wait()
        before = checkpoint(sync_redis, JOB)
        for command in commands:
            done = await anyio.to_thread.run_sync(partial(replayd, *command, "--redis-url", redis_url, timeout=30))
            assert done.returncode == 75, (command, done.stderr)
            assert job.lease.token in done.stderr, done.stderr
        assert checkpoint(sync_redis, JOB) == before
        assert sync_redis.xlen(DLQ) == 5
        job.stop()
    done = replayd("checkpoint", "set", JOB, "--stream", STREAM, "--to", "0-1", "--yes", "--redis-url", redis_url)
    assert done.returncode == 0, done.stderr
    assert checkpoint(sync_redis, JOB)[f"{STREAM}#*"] == "0-1"
    assert not any(field.startswith(f"{STREAM}#") and field[-1].isdigit() for field in checkpoint(sync_redis, JOB))
