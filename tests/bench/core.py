"""What every measurement shares: its result type, the event loop it runs on, state resets."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import redis

from replayd.connection import Client
from replayd.jobs.rebuild import clear_namespace
from replayd.pipeline.commit import job_key

BATCH = 1000
"""Entries per XRANGE and commands per round trip, wherever a measurement has the choice."""

PROJECTION = "order_summary"


@dataclass
class Sample:
    """One timed run: `events` handled in `seconds` (only the replay or the writes are timed)."""

    events: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


def run_async(func: Callable[[], Awaitable[Sample]]) -> Sample:
    """Run a measurement on a fresh uvloop event loop, as replayd's CLI runs its engine."""
    result: Sample = anyio.run(func, backend="asyncio", backend_options={"use_uvloop": True})
    return result


async def reset_job(client: Client, job: str) -> None:
    """Delete the job's `replayd:{job}:*` keys (checkpoint, progress, lease, dlq)."""
    await clear_namespace(client, job_key(job, "*"))


def clear_projection(client: redis.Redis, name: str = PROJECTION) -> None:
    """Delete `projection:<name>:*` with SCAN + UNLINK (blocking client, outside any timed region)."""
    keys: list[Any] = []
    for key in client.scan_iter(match=f"projection:{name}:*", count=1000):
        keys.append(key)
        if len(keys) >= 1000:
            client.unlink(*keys)
            keys.clear()
    if keys:
        client.unlink(*keys)


def snapshot_projection(client: redis.Redis, name: str = PROJECTION) -> dict[bytes, dict[bytes, bytes]]:
    """Every hash of the projection, without the meta hash's `rebuilt_at` (a time)."""
    keys = sorted(client.scan_iter(match=f"projection:{name}:*", count=1000))
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.hgetall(key)
    values: list[dict[bytes, bytes]] = pipe.execute()
    result = dict(zip(keys, values, strict=True))
    meta = result.get(f"projection:{name}:meta".encode())
    if meta is not None:
        meta.pop(b"rebuilt_at", None)
    return result
