"""`replayd verify`: rebuild the projection into a shadow version and diff it against the current one.

Both must have seen the same events. The shadow is built up to the live job's position; then the live job is
paused (through its progress hash: it drains and commits, then says `paused`), the shadow catches up to the
exact position it stopped at, the two versions are compared key by key, and the live job is resumed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio

from replayd.connection import Client, text, text_hash
from replayd.errors import ReplaydError
from replayd.events import ZERO, Id
from replayd.jobs.rebuild import Rebuild
from replayd.jobs.versions import namespace, scan_batches, version_keys
from replayd.pipeline.commit import job_key, stream_positions

logger = logging.getLogger(__name__)

RUNNING = ("catching_up", "live")


@dataclass
class Diff:
    """How two versions of a projection differ."""

    left: str
    right: str
    same: int = 0
    only_left: int = 0
    only_right: int = 0
    different: int = 0
    examples: list[str] = field(default_factory=list)
    """The first differences, one line each, with field-level detail for hashes."""

    @property
    def equal(self) -> bool:
        return not (self.only_left or self.only_right or self.different)

    def summary(self) -> str:
        return (
            f"{self.left} (current) against {self.right} (rebuilt): {self.same:,} keys equal, {self.only_left:,} "
            f"only in current, {self.only_right:,} only in rebuilt, {self.different:,} different"
        )

    def note(self, line: str, show: int) -> None:
        if len(self.examples) < show:
            self.examples.append(line)


async def verify(rebuild: Rebuild, *, keep: bool = False, show: int = 10, pause_timeout_s: float = 30.0) -> Diff:
    """Build (or finish) a shadow version at the live job's position and compare it with the current version."""
    redis, job = rebuild.redis, rebuild.spec.name
    current = await rebuild.versions.current()
    await rebuild.begin()
    try:
        await rebuild.engine(ends=await live_positions(redis, job, rebuild.spec.streams)).run()
        async with paused(redis, job, pause_timeout_s):
            await rebuild.engine(ends=await live_positions(redis, job, rebuild.spec.streams)).run()
            return await compare(redis, rebuild.handler.name, current, rebuild.version, show=show)
    finally:
        if not keep:
            with anyio.CancelScope(shield=True):
                await rebuild.versions.discard(rebuild.version, job)


async def live_positions(redis: Client, job: str, streams: list[str]) -> dict[str, Id] | None:
    """Per stream, where the live job's projection is; None when the job has no positions (read to the head)."""
    known = stream_positions(text_hash(await redis.hgetall(job_key(job, "checkpoint"))))
    return {stream: known.get(stream, ZERO) for stream in streams} if known else None


@asynccontextmanager
async def paused(redis: Client, job: str, timeout_s: float) -> AsyncIterator[None]:
    """Pause every running shard of `job` and wait until each has drained; resume them on exit."""
    keys = [key async for keys in scan_batches(redis, job_key(job, "progress") + "*") for key in keys]
    ours = [key for key in keys if await _running(redis, key)]
    for key in ours:
        await redis.hset(key, "paused", "1")
    try:
        with anyio.move_on_after(timeout_s) as waited:
            for key in ours:
                while await redis.hget(key, "status") != b"paused":  # noqa: ASYNC110 - another process writes it
                    await anyio.sleep(0.1)
        if waited.cancelled_caught:
            raise ReplaydError(f"job {job} did not confirm a pause within {timeout_s:g} s: is it stuck?")
        yield
    finally:
        with anyio.CancelScope(shield=True):
            for key in ours:
                await redis.hdel(key, "paused")


async def _running(redis: Client, key: str | bytes) -> bool:
    """A shard that is running now: it says so and has written its progress lately (not a crashed one)."""
    progress = text_hash(await redis.hgetall(key))
    if progress.get("status") not in RUNNING or "paused" in progress:
        return False
    return time.time() - float(progress.get("updated_at") or 0) < 30


async def compare(redis: Client, name: str, left: int, right: int, *, show: int = 10) -> Diff:
    """Key by key and value by value: `left` (the current version) against `right` (the rebuilt one)."""
    diff = Diff(namespace(name, left), namespace(name, right))
    async for names in version_keys(redis, name, left):
        mine = await _values(redis, [f"{diff.left}:{n}" for n in names])
        theirs = await _values(redis, [f"{diff.right}:{n}" for n in names])
        for key, a, b in zip(names, mine, theirs, strict=True):
            if a is None:  # deleted since the SCAN
                continue
            if b is None:
                diff.only_left += 1
                diff.note(f"only in {diff.left}: {key}", show)
            elif a != b:
                diff.different += 1
                diff.note(f"different: {key}: {_detail(a, b)}", show)
            else:
                diff.same += 1
    async for names in version_keys(redis, name, right):
        async with redis.pipeline(transaction=False) as pipe:
            for key in names:
                pipe.exists(f"{diff.left}:{key}")
            found = await pipe.execute()
        for key, exists in zip(names, found, strict=True):
            if not exists:
                diff.only_right += 1
                diff.note(f"only in {diff.right}: {key}", show)
    return diff


_READERS = {
    "string": lambda p, k: p.get(k),
    "hash": lambda p, k: p.hgetall(k),
    "set": lambda p, k: p.smembers(k),
    "zset": lambda p, k: p.zrange(k, 0, -1, withscores=True),
    "list": lambda p, k: p.lrange(k, 0, -1),
    "stream": lambda p, k: p.execute_command("XRANGE", k, "-", "+"),
}


async def _values(redis: Client, keys: list[str]) -> list[tuple[str, Any] | None]:
    """(type, value) of each key, None when it does not exist; two pipelined round trips."""
    async with redis.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.type(key)
        kinds = [text(kind) for kind in await pipe.execute()]
        for key, kind in zip(keys, kinds, strict=True):
            if kind in _READERS:
                _READERS[kind](pipe, key)
        values = iter(await pipe.execute())
    return [(kind, next(values)) if kind in _READERS else None for kind in kinds]


def _detail(a: tuple[str, Any], b: tuple[str, Any]) -> str:
    if a[0] != b[0]:
        return f"a {a[0]} here, a {b[0]} there"
    if a[0] != "hash":
        return f"{_short(a[1])} vs {_short(b[1])}"
    fields = sorted(set(a[1]) | set(b[1]))
    changed = [f for f in fields if a[1].get(f) != b[1].get(f)]
    return ", ".join(f"{text(f)}: {_short(a[1].get(f))} vs {_short(b[1].get(f))}" for f in changed[:5])


def _short(value: Any, limit: int = 60) -> str:
    shown = text(value) if isinstance(value, bytes) else repr(value)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."
