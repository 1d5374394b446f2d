"""The lease: one live owner per (job, shard). SET NX PX to take it, a script to renew and release it only
while it is ours. The commit sequence (commit.py) is what fences a late owner's writes; the lease makes a second
instance wait (or exit 75) before it reads anything, instead of doing work that cannot commit."""

from __future__ import annotations

import logging
import os
import secrets
import socket

import anyio

from replayd.connection import Client, is_retriable
from replayd.errors import FencingError
from replayd.events import WHOLE, Shard
from replayd.pipeline.commit import job_key

logger = logging.getLogger(__name__)

_RENEW = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


def lease_key(job: str, shard: Shard = WHOLE) -> str:
    return job_key(job, "lease") + (f":{shard}" if shard.total > 1 else "")


class Lease:
    """Held from `acquire` to `release`; `keep` renews it every third of its TTL and raises FencingError
    the moment it finds the lease gone to someone else (a pause longer than the TTL)."""

    def __init__(self, redis: Client, job: str, shard: Shard, *, ttl_ms: int, wait: bool) -> None:
        self.redis = redis
        self.key = lease_key(job, shard)
        self.ttl_ms = ttl_ms
        self.wait = wait
        self.token = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"

    async def acquire(self, stop: anyio.Event) -> bool:
        """Take the lease, waiting for it if so configured; False when `stop` is set meanwhile."""
        announced = False
        while not await self.redis.set(self.key, self.token, nx=True, px=self.ttl_ms):
            if stop.is_set():
                return False
            owner = await self.redis.get(self.key)
            holder = owner.decode() if isinstance(owner, bytes) else owner
            if holder == self.token:  # our SET applied, its reply lost: `acquire` is retried on a lost connection
                break
            if not self.wait:
                raise FencingError(f"{self.key} is held by {holder}: another instance runs this job (exit 75)")
            if not announced:
                logger.info("waiting for %s, held by %s", self.key, holder)
                announced = True
            with anyio.move_on_after(self.ttl_ms / 3000):
                await stop.wait()
        logger.info("holding %s", self.key)
        return True

    async def keep(self) -> None:
        while True:
            await anyio.sleep(self.ttl_ms / 3000)
            try:
                renewed = await self.redis.eval(_RENEW, 1, self.key, self.token, self.ttl_ms)
            except Exception as exc:
                if not is_retriable(exc):
                    raise
                logger.warning("%s not renewed (%s): trying again", self.key, exc)
                continue
            if not renewed:
                raise FencingError(f"{self.key} was taken over by another instance: stopping (exit 75)")

    async def release(self) -> None:
        await self.redis.eval(_RELEASE, 1, self.key, self.token)
