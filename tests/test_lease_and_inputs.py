"""The lease's finer points (renewal, release, expiry vs takeover) and the small cases that used to end in exit 70
or a misleading message: colliding stream names, a key of another type, entry IDs beyond 2^64-1, lease_ttl_s too
short, environment errors, a shard's reset, an in-place rebuild that did not complete."""

from __future__ import annotations

import json
import re
from typing import Any

import anyio
import pytest
import redis
from pydantic import ValidationError
from redis.asyncio import Redis

from replayd.config import RedisConfig
from replayd.errors import FencingError, leaves
from replayd.events import MAX_SEQ, WHOLE, Shard, parse_id
from replayd.jobs.lease import Lease
from replayd.jobs.rebuild import rebuild_in_place
from replayd.pipeline.commit import CheckpointStore, job_key
from tests.helpers import add, checkpoint, engine, orders, replayd, spec
from tests.plugins import Recorder

BEYOND = f"{MAX_SEQ + 1}-0"


async def fenced_while_idle(r: Redis, cfg: RedisConfig, sync_redis: redis.Redis, *, steal: bool) -> str:
    """A following job with nothing to do loses its lease (stolen by another token, or gone): the message it stops
    with (FencingError, exit 75)."""
    add(sync_redis, orders(3))
    job = engine(spec(end="follow", lease_ttl_s=0.3), r, cfg, Recorder())
    with anyio.fail_after(10), pytest.raises(BaseException) as raised:
        async with anyio.create_task_group() as tg:
            tg.start_soon(job.run)
            await job.caught_up.wait()
            if steal:
                sync_redis.set(job.lease.key, "other-host:1:feed", px=60_000)
            else:
                sync_redis.delete(job.lease.key)
    (error,) = [leaf for leaf in leaves(raised.value) if isinstance(leaf, FencingError)]
    assert error.exit_code == 75
    return str(error)


@pytest.mark.anyio
async def test_an_idle_follower_whose_lease_another_owner_took_is_fenced(
    raw_redis: Redis, redis_cfg: RedisConfig, sync_redis: redis.Redis
) -> None:
    message = await fenced_while_idle(raw_redis, redis_cfg, sync_redis, steal=True)
    assert "taken over by instance other-host:1:feed" in message


@pytest.mark.anyio
async def test_an_expired_lease_says_paused_past_the_lease_not_taken_over(
    raw_redis: Redis, redis_cfg: RedisConfig, sync_redis: redis.Redis
) -> None:
    message = await fenced_while_idle(raw_redis, redis_cfg, sync_redis, steal=False)
    assert re.search(r"expired: this process was paused for [\d.]+ s past the lease", message), message
    assert "no other instance has taken it" in message
    assert "taken over" not in message


@pytest.mark.anyio
async def test_releasing_a_lease_never_deletes_another_owners_token(raw_redis: Redis, sync_redis: redis.Redis) -> None:
    lease = Lease(raw_redis, "j", WHOLE, ttl_ms=60_000, wait=False)
    assert await lease.acquire(anyio.Event())
    sync_redis.set(lease.key, "the-new-owner", px=60_000)  # ours expired meanwhile, another instance took it
    await lease.release()
    assert sync_redis.get(lease.key) == b"the-new-owner"


@pytest.mark.anyio
async def test_resetting_one_shard_leaves_the_other_shards_fields(raw_redis: Redis, sync_redis: redis.Redis) -> None:
    others = {"s#1": "1-1", "s#3": "3-1", "s#*1/2": "9-1", "seq:1/2": "4:b", "s#*": "2-0", "s#replay_until": "9-9",
              "partitions": "4", "ev%23x#1": "5-1", "seq": "7:c"}  # fmt: skip
    own = {"s#0": "1-0", "s#2": "3-0", "s#*0/2": "9-0", "seq:0/2": "4:a", "ev%23x#0": "5-0"}
    fields: Any = {**others, **own}
    sync_redis.hset(job_key("j", "checkpoint"), mapping=fields)
    await CheckpointStore(raw_redis, "j", 4, Shard(0, 2)).reset()
    assert checkpoint(sync_redis, "j") == others


@pytest.mark.anyio
async def test_streams_whose_names_would_collide_in_the_checkpoint(
    raw_redis: Redis, redis_cfg: RedisConfig, sync_redis: redis.Redis, redis_url: str
) -> None:
    """Streams `ev` and `ev#*` (and `a%23b`, `a#b`): each keeps its own checkpoint; a restart resumes (it used to
    exit 70 on every start), and `replayd status` shows each position (it crashed)."""
    names = ["ev", "ev#*", "a%23b", "a#b"]
    heads = {name: add(sync_redis, orders(20), stream=name)[-1] for name in names}
    job = spec(streams=names, partition_by="customer_id")
    first = await engine(job, raw_redis, redis_cfg, Recorder()).run()
    again = await engine(job, raw_redis, redis_cfg, Recorder()).run()
    assert (first.processed, again.processed) == (80, 0)
    done = replayd("status", job.name, "--json", "--redis-url", redis_url)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)[job.name]["positions"] == heads


def test_a_stream_key_of_another_type_exits_65_naming_key_and_type(redis_url: str, sync_redis: redis.Redis) -> None:
    sync_redis.set("notastream", "x")
    done = replayd("replay", "--stream", "notastream", "--handler", "tests.plugins:Recorder", "--redis-url", redis_url)
    assert done.returncode == 65, done.stderr
    assert "notastream holds a string, not a stream" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("checkpoint", "set", "j", "--stream", "s", "--to", BEYOND, "--yes"),
        ("checkpoint", "set", "j", "--stream", "s", "--to", f"1-{MAX_SEQ + 1}", "--yes"),
        ("replay", "--stream", "s", "--handler", "tests.plugins:Recorder", "--after", BEYOND),
        ("replay", "--stream", "s", "--handler", "tests.plugins:Recorder", "--to", BEYOND),
    ],
    ids=["checkpoint-set-ms", "checkpoint-set-seq", "replay-after", "replay-to"],
)
def test_an_entry_id_beyond_2_64_is_a_usage_error(
    args: tuple[str, ...], redis_url: str, sync_redis: redis.Redis
) -> None:
    done = replayd(*args, "--redis-url", redis_url)
    assert done.returncode == 2, done.stderr
    assert str(MAX_SEQ) in done.stderr
    assert not sync_redis.exists(job_key("j", "checkpoint"))


def test_parse_id_refuses_parts_beyond_2_64() -> None:
    assert parse_id(f"{MAX_SEQ}-{MAX_SEQ}") == (MAX_SEQ, MAX_SEQ)
    for text in (BEYOND, f"0-{MAX_SEQ + 1}", str(MAX_SEQ + 1)):
        with pytest.raises(ValueError, match="at most"):
            parse_id(text)


def test_a_lease_ttl_shorter_than_its_renewals_need_is_refused() -> None:
    with pytest.raises(ValidationError, match="renewed every third"):
        spec(lease_ttl_s=0.001)
    jobs = json.dumps([{"name": "j", "streams": ["s"], "handler": "x:y", "lease_ttl_s": 0.001}])
    done = replayd("status", env={"REPLAYD_JOBS": jobs})
    assert done.returncode == 78
    assert "jobs.0.lease_ttl_s: " in done.stderr and "(from REPLAYD_JOBS)" in done.stderr


def test_an_environment_error_names_the_variable() -> None:
    done = replayd("status", env={"REPLAYD_JOBS__0__BATCH_SIZE": "x"})
    assert done.returncode == 78
    assert "REPLAYD_JOBS__0__BATCH_SIZE" in done.stderr
    assert "as JSON in REPLAYD_JOBS" in done.stderr


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["StopReplay", "stop", "completed"])
async def test_an_in_place_rebuild_writes_its_meta_only_when_it_completed(
    raw_redis: Redis, redis_cfg: RedisConfig, sync_redis: redis.Redis, how: str
) -> None:
    ids = add(sync_redis, orders(40))
    recorder = Recorder(write=True, stop_on=(lambda event: event.stream_id == ids[10]) if how == "StopReplay" else None)
    rebuild = engine(spec(name="rb", resume=False, start="beginning"), raw_redis, redis_cfg, recorder)
    if how == "stop":
        rebuild.stop()
    await rebuild_in_place(rebuild)
    assert bool(sync_redis.exists("projection:recorder:meta")) == (how == "completed")
