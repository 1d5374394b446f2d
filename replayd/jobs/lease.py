"""The lease: one live owner per (job, shard), and one shard layout per job at a time.

A process takes its shard's lease (SET NX PX) and, in the same script, joins the job's *owners*: a sorted set
`replayd:{job}:owners` of `<holder> <token>` members scored by their expiry (Redis's clock), renewed with the
lease (the set itself expires with its last member). The holder is the process's shard (`0/1` unsharded, `i/N`)
or `cmd:<command>` for an operator command. Shards of one layout (the same N) run side by side; a member of
another layout, or an operator command, keeps a newcomer out: two layouts would apply the same partitions
(unsharded and 0/2 share partition 0), and a command that moves a checkpoint or retries dead letters must not
race the job's owner. The newcomer waits (or exits 75) until those members are gone: released, or expired past
their TTL.

The commit sequence (commit.py) is what fences a late owner's writes; its claim moves every other layout's
sequence too. The lease makes a second instance wait (or exit 75) before it reads anything, instead of doing
work that cannot commit.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio

from replayd.connection import Client, is_retriable, text
from replayd.errors import FencingError
from replayd.events import WHOLE, Shard
from replayd.pipeline.commit import fence_commits, job_key

logger = logging.getLogger(__name__)

T = TypeVar("T")

COMMAND_TTL_MS = 15_000
"""The lease of an operator command (`dlq retry`, `checkpoint set`...), renewed while it runs."""

# KEYS: lease, owners; ARGV: token, ttl ms, holder. Members of another layout (or a command, or we are one) keep
# us out; then the shard's own lease, SET NX PX, whose holder may be ourselves (a retry after a lost reply).
_ACQUIRE = """
local t = redis.call('TIME') local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local layout = string.match(ARGV[3], '/(%d+)$')
local others = {}
for _, member in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  local holder, token = string.match(member, '^(%S+) (.*)$')
  if token ~= ARGV[1] and (layout == nil or string.match(holder, '/(%d+)$') ~= layout) then
    others[#others + 1] = member
  end
end
if #others > 0 then return {'layout', unpack(others)} end
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local holder = redis.call('GET', KEYS[1])
  if holder ~= ARGV[1] then return {'held', holder} end
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[3] .. ' ' .. ARGV[1])
if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[2], ARGV[2]) end
return {'ok'}
"""

# KEYS: lease, owners; ARGV: token, ttl ms, member. Renewed only while both the lease and the membership are ours.
_RENEW = """
local t = redis.call('TIME') local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return {'taken', holder} end
if not holder or not redis.call('ZSCORE', KEYS[2], ARGV[3]) then return {'expired'} end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[3])
if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[2], ARGV[2]) end
return {'ok'}
"""

# KEYS: lease, owners; ARGV: token, member. Another owner's token is never deleted.
_RELEASE = """
redis.call('ZREM', KEYS[2], ARGV[2])
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def lease_key(job: str, shard: Shard = WHOLE) -> str:
    return job_key(job, "lease") + (f":{shard}" if shard.total > 1 else "")


def owners_key(job: str) -> str:
    return job_key(job, "owners")


class Lease:
    """Held from `acquire` to `release`; `keep` renews it every third of its TTL and raises FencingError
    the moment it finds the lease gone (expired after a pause longer than the TTL, or taken by someone else)."""

    def __init__(
        self, redis: Client, job: str, shard: Shard, *, ttl_ms: int, wait: bool, command: str | None = None
    ) -> None:
        self.redis = redis
        self.job = job
        self.key = job_key(job, f"lease:{command}") if command else lease_key(job, shard)
        self.owners = owners_key(job)
        self.ttl_ms = ttl_ms
        self.wait = wait
        self.holder = f"cmd:{command}" if command else str(shard)
        """What this process is to the job: its shard `i/N` (`0/1` unsharded), or `cmd:<command>`."""
        self.token = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.member = f"{self.holder} {self.token}"
        self._renewed = time.monotonic()

    async def acquire(self, stop: anyio.Event) -> bool:
        """Take the lease, waiting for it if so configured; False when `stop` is set meanwhile."""
        announced = ""
        while True:
            reply = await self.redis.eval(_ACQUIRE, 2, self.key, self.owners, self.token, self.ttl_ms, self.holder)
            status, *rest = (text(part) for part in reply)
            if status == "ok":
                break
            if stop.is_set():
                return False
            why = self._refusal(status, rest)
            if not self.wait:
                raise FencingError(f"{why} (exit 75)")
            if why != announced:
                logger.info("%s: waiting until it is released", why)
                announced = why
            with anyio.move_on_after(self.ttl_ms / 3000):
                await stop.wait()
        self._renewed = time.monotonic()
        logger.info("holding %s", self.key)
        return True

    def _refusal(self, status: str, rest: list[str]) -> str:
        """Who keeps this process out, in words."""
        me = self._described(self.holder)
        if status == "held":
            return f"{self.key} is held by {rest[0]}: another instance runs job {self.job} as {me}"
        holders = sorted(member.partition(" ") for member in rest)
        owners = ", ".join(f"{self._described(holder)} on {token}" for holder, _, token in holders)
        if any(holder.startswith("cmd:") for holder, _, _ in holders):
            return f"job {self.job} is being changed by {owners}: {me} runs once that is done"
        if self.holder.startswith("cmd:"):
            return f"job {self.job} runs ({owners}): {me} changes its state only while nothing runs it; stop it first"
        return (
            f"job {self.job} runs under another shard layout ({owners}) and this process would run it as {me}: "
            "two layouts would apply the same partitions. To reshard, stop every process of the old layout, then "
            "start the new one"
        )

    @staticmethod
    def _described(holder: str) -> str:
        if holder.startswith("cmd:"):
            return f"`replayd {holder[4:].replace('_', ' ')}`"
        return "the whole job (unsharded)" if holder == "0/1" else f"shard {holder}"

    async def keep(self) -> None:
        while True:
            await anyio.sleep(self.ttl_ms / 3000)
            try:
                reply = await self.redis.eval(_RENEW, 2, self.key, self.owners, self.token, self.ttl_ms, self.member)
            except Exception as exc:
                if not is_retriable(exc):
                    raise
                logger.warning("%s not renewed (%s): trying again", self.key, exc)
                continue
            status, *rest = (text(part) for part in reply)
            if status == "taken":
                raise FencingError(f"{self.key} was taken over by instance {rest[0]}: stopping (exit 75)")
            if status == "expired":
                past_s = max(time.monotonic() - self._renewed - self.ttl_ms / 1000, 0.0)
                raise FencingError(
                    f"{self.key} expired: this process was paused for {past_s:.1f} s past the lease (lease_ttl_s = "
                    f"{self.ttl_ms / 1000:g}; or cut off from Redis that long); no other instance has taken it. "
                    "Stopping (exit 75): a restart resumes from the checkpoint"
                )
            self._renewed = time.monotonic()

    async def release(self) -> None:
        await self.redis.eval(_RELEASE, 2, self.key, self.owners, self.token, self.member)


async def fenced(redis: Client, job: str, command: str, work: Callable[[], Awaitable[T]]) -> T:
    """Run an operator command's `work` on `job` while no instance runs the job and no other command changes it:
    under a lease of its own that keeps them out (exit 75 naming them when one is there), with every commit
    sequence of the job moved first, so an owner paused past its lease cannot commit meanwhile either."""
    lease = Lease(redis, job, WHOLE, ttl_ms=COMMAND_TTL_MS, wait=False, command=command)
    await lease.acquire(anyio.Event())
    result: list[Any] = []
    try:
        await fence_commits(redis, job, lease.token.rpartition(":")[2])

        async def run(scope: anyio.CancelScope) -> None:
            result.append(await work())
            scope.cancel()

        async with anyio.create_task_group() as tg:
            tg.start_soon(lease.keep)
            tg.start_soon(run, tg.cancel_scope)
    finally:
        with anyio.move_on_after(5, shield=True):
            await lease.release()
    value: T = result[0]
    return value
