"""Projection versions and the alias readers follow, for rebuilds that never show a half-built model.

Keys of projection <name> (version 0 is the unversioned namespace the article and `rebuild --in-place` use):
    projection:<name>:current    string  N: the live version; readers and the live job use projection:<name>:vN:
    projection:<name>:next       string  the version a rebuild is writing; the next rebuild resumes it
    projection:<name>:retired    zset    replaced versions, scored by the time after which they are deleted

A rebuild writes version N+1 under its own job `<job>@vN+1` and checkpoint. The flip is one script: it moves
the alias, gives the live job the rebuild's positions, and bumps the live job's commit sequences so that a
commit it had in flight for version N is refused; the live job then starts again on N+1 (`ProjectionFlipped`).
A crash anywhere leaves either the old or the new version current, never a mix.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import redis

from replayd.connection import Client, text
from replayd.errors import ReplaydError, RestartJob
from replayd.handlers import projection_prefix
from replayd.pipeline.commit import job_key

logger = logging.getLogger(__name__)

RESERVED = ("current", "next", "retired", "meta")
"""Keys of a projection that belong to no version."""
_VERSIONED = re.compile(r"v\d+:")


class ProjectionFlipped(RestartJob):
    """Raised in a live job whose projection was flipped to a new version under it: start again on it."""


def namespace(name: str, version: int, *, cluster: bool = False) -> str:
    """The key prefix of a version: `projection:<name>` for 0, else `projection:<name>:v<N>` (with the name as
    a hash tag under Redis Cluster, as `handlers.projection_prefix`)."""
    return projection_prefix(name, cluster=cluster) + (f":v{version}" if version else "")


def build_job(job: str, version: int) -> str:
    """The job that writes `version` for the live job `job`: its own checkpoint, progress and lease."""
    return f"{job}@v{version}"


def current_namespace(client: redis.Redis, name: str) -> str:
    """For readers: the prefix of the live version of projection `name` (`projection:<name>[:vN]`)."""
    return namespace(name, int(client.get(f"projection:{name}:current") or 0))


async def acurrent_namespace(client: Client, name: str) -> str:
    """`current_namespace` for a `redis.asyncio` client."""
    return namespace(name, int(await client.get(f"projection:{name}:current") or 0))


class Versions:
    """The alias, the rebuild marker and the retired versions of one projection."""

    def __init__(self, redis: Client, name: str) -> None:
        if not name:
            raise ReplaydError("a versioned rebuild needs a projection with a name (keys projection:<name>:...)")
        self.redis = redis
        self.name = name
        self.current_key, self.next_key, self.retired_key = (f"projection:{name}:{k}" for k in RESERVED[:3])

    async def current(self) -> int:
        return int(await self.redis.get(self.current_key) or 0)

    async def unversioned(self) -> bool:
        """Whether readers may be reading `projection:<name>:*` directly: no version is current, none is being
        built, and the unversioned namespace holds keys. A first versioned rebuild moves them to `:v1:`."""
        if await self.current() or await self.redis.exists(self.next_key):
            return False
        async for _ in version_keys(self.redis, self.name, 0):
            return True
        return False

    async def begin(self) -> int:
        """The version a rebuild writes: the one an interrupted rebuild left, else current + 1."""
        version = await self.current() + 1
        await self.redis.set(self.next_key, version, nx=True)
        return int(await self.redis.get(self.next_key) or version)

    async def flip(self, version: int, job: str, *, retain_s: float) -> int | None:
        """Make `version` current for readers and for the live `job`; return the version it replaced, or None
        when `next` no longer names `version` (another rebuild took over, or this flip happened already)."""
        build = build_job(job, version)
        keys = [self.current_key, self.next_key, self.retired_key, job_key(job, "checkpoint"),
                job_key(build, "checkpoint"), job_key(build, "progress")]  # fmt: skip
        status, old = await self.redis.eval(_FLIP_SCRIPT, len(keys), *keys, version, time.time() + retain_s)
        return int(old) if text(status) == "ok" else None

    async def discard(self, version: int, job: str) -> None:
        """Drop an unflipped version: its keys, its marker and its rebuild job's state."""
        build = build_job(job, version)
        await self.redis.unlink(*(job_key(build, kind) for kind in ("checkpoint", "progress", "lease")))
        await self.redis.eval(_DISCARD_SCRIPT, 1, self.next_key, version)
        await self.delete(version)

    async def sweep(self, now: float | None = None) -> list[int]:
        """Delete the retired versions whose retention has passed; return them."""
        due: list[Any] = await self.redis.zrangebyscore(self.retired_key, "-inf", now or time.time())
        swept = []
        for member in due:
            version = int(member)
            if version == await self.current():  # flipped back to it since: it is live again
                await self.redis.zrem(self.retired_key, member)
                continue
            deleted = await self.delete(version)
            await self.redis.zrem(self.retired_key, member)
            logger.info("deleted v%d of projection %s (%d keys): its retention passed", version, self.name, deleted)
            swept.append(version)
        return swept

    async def delete(self, version: int, *, keys_per_s: float = 20_000) -> int:
        """UNLINK a version's keys, a SCAN batch at a time and at most `keys_per_s`, so Redis stays responsive."""
        deleted = 0
        prefix = namespace(self.name, version) + ":"
        async for names in version_keys(self.redis, self.name, version):
            deleted += await self.redis.unlink(*(prefix + name for name in names))
            await anyio.sleep(len(names) / keys_per_s)
        return deleted


async def version_keys(redis: Client, name: str, version: int, batch: int = 500) -> AsyncIterator[list[str]]:
    """The keys of one version, named relative to its namespace, a SCAN batch at a time."""
    prefix = namespace(name, version) + ":"
    async for keys in scan_batches(redis, prefix + "*", batch):
        names = [text(key)[len(prefix) :] for key in keys]
        if not version:  # the unversioned namespace holds the other versions and the alias too
            names = [rest for rest in names if rest not in RESERVED and not _VERSIONED.match(rest)]
        if names:
            yield names


async def scan_batches(redis: Client, pattern: str, batch: int = 500) -> AsyncIterator[list[bytes | str]]:
    """The keys matching `pattern`, a SCAN batch at a time (never KEYS, which blocks Redis)."""
    cursor = 0
    while True:
        cursor, keys = await redis.scan(cursor=cursor, match=pattern, count=batch)
        if keys:
            yield keys
        if cursor == 0:
            return


# KEYS: current, next, retired, live checkpoint, build checkpoint, build progress; ARGV: version, delete-after.
# The live job's positions become the build's; its commit sequences move on, so its in-flight commit for the
# old version is refused; its `replay_until` (what counts as history) stays.
_FLIP_SCRIPT = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return {'moved', 0} end
local old = redis.call('GET', KEYS[1]) or '0'
local live = redis.call('HGETALL', KEYS[4])
for i = 1, #live, 2 do
  local f = live[i]
  if f == 'seq' or string.match(f, '^seq:%d+/%d+$') then
    redis.call('HSET', KEYS[4], f, ((tonumber(string.match(live[i + 1], '^(%d+)')) or 0) + 1) .. ':flip')
  elseif string.find(f, '#', 1, true) and not string.find(f, '#replay_until', 1, true) then
    redis.call('HDEL', KEYS[4], f)
  end
end
local built = redis.call('HGETALL', KEYS[5])
for i = 1, #built, 2 do
  local f = built[i]
  if (string.find(f, '#', 1, true) and not string.find(f, '#replay_until', 1, true)) or f == 'partitions' then
    redis.call('HSET', KEYS[4], f, built[i + 1])
  end
end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2], KEYS[5], KEYS[6])
redis.call('ZADD', KEYS[3], ARGV[2], old)
return {'ok', old}
"""

_DISCARD_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""
