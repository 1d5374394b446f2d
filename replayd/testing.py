"""Test your projection in your own test suite: events in, the keys and values it wrote out, through the real
engine on a real Redis (an embedded redis-server, started once per test session).

    from replayd.testing import replay_events

    def test_totals():
        result = replay_events(OrderTotals(), [
            {"event_type": "OrderCreated", "data": {"customer_id": "c1", "total": 20}},
        ])
        assert result.projection == {"customer:c1": {"orders": "1", "total": "20"}}

`replay_events` is for plain (sync) tests, `await run_events(...)` for async ones. Both flush the harness's own
Redis, write the events to a stream, replay them into the handler as `replayd replay` would (filters, upcasters,
partitions, `ctx.tx` commits) and return what is in Redis afterwards. A handler that fails on an event, or an
event that cannot be decoded, raises as the CLI's bounded replay stops (DataError), unless `on_poison` says
otherwise. With pytest, the fixture `replayd_harness` (import it into your conftest.py) stops the server at the
end of the session; without it the server is stopped when the process exits.
"""

from __future__ import annotations

import atexit
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import anyio
import msgspec
from redis.asyncio import Redis

from replayd.api import Replay, job_spec
from replayd.embedded import EmbeddedRedis
from replayd.errors import ConfigError
from replayd.events import Event
from replayd.jobs.progress import Stats

__all__ = ["Harness", "Written", "harness", "replay_events", "replayd_harness", "run_events"]

STREAM = "events"
"""The stream events go to unless they name one (`"stream"` in a dict, `Event.stream`)."""
JOB = "test"

EventLike = Event | Mapping[str, Any]


@dataclass
class Written:
    """What a replay left in Redis: every key but the source streams and replayd's own (`replayd:...`)."""

    keys: dict[str, Any]
    """Key -> value as text: a hash as a dict, a set as a set, a list as a list, a sorted set as a dict of scores,
    a stream as a list of (entry ID, fields)."""
    namespace: str
    """The projection's key prefix, e.g. `projection:order_totals`."""
    stats: Stats
    """The run's counters (`processed`, `failed`, `skipped`, ...)."""
    projection: dict[str, Any] = field(init=False)
    """The keys under the projection's prefix, named without it: `order:42` for `projection:<name>:order:42`."""

    def __post_init__(self) -> None:
        prefix = self.namespace + ":"
        self.projection = {k.removeprefix(prefix): v for k, v in self.keys.items() if k.startswith(prefix)}


class Harness:
    """An embedded Redis for projection tests: each run starts from an empty database."""

    def __init__(self) -> None:
        self.server = EmbeddedRedis()
        self.server.start()

    @property
    def url(self) -> str:
        return self.server.url

    def stop(self) -> None:
        self.server.stop()

    async def run(self, handler: object, events: Sequence[EventLike], **options: Any) -> Written:
        """Replay `events`, in order, into `handler` (a Projection, a function, a handler object or a
        `package.module:attr` string); `options` are job settings (`partitions`, `partition_by`, `upcasters`,
        `types`, `where`, `on_poison`, ...)."""
        spec = job_spec(streams=_streams(events), handler=handler, job=JOB, **options)
        run = Replay(spec, self.url, handler=None if isinstance(handler, str) else handler)
        client = Redis.from_url(self.url, decode_responses=True)
        try:
            await client.flushall()
            await _write(client, events)
            stats = await run.run()
            keys = await _read_all(client, set(spec.streams))
        finally:
            with anyio.move_on_after(2, shield=True):
                await client.aclose()
        return Written(keys, run.engine.namespace, stats)

    def run_sync(self, handler: object, events: Sequence[EventLike], **options: Any) -> Written:
        """`run` from sync code (not from inside a running event loop: await `run` there)."""
        result: Written = anyio.run(partial(self.run, handler, events, **options))
        return result


_shared: list[Harness] = []


def harness() -> Harness:
    """The process's harness: its Redis starts on first use and stops when the process exits."""
    if not _shared:
        _shared.append(Harness())
        atexit.register(_shared[0].stop)
    return _shared[0]


async def run_events(handler: object, events: Sequence[EventLike], **options: Any) -> Written:
    """Replay `events` into `handler` on the shared harness (see `Harness.run`)."""
    return await harness().run(handler, events, **options)


def replay_events(handler: object, events: Sequence[EventLike], **options: Any) -> Written:
    """`run_events` for sync tests."""
    return harness().run_sync(handler, events, **options)


try:
    import pytest
except ImportError:  # the functions above need no pytest; only the fixture does
    pass
else:

    @pytest.fixture(scope="session")
    def replayd_harness() -> Iterator[Harness]:
        """The shared harness, stopped at the end of the test session."""
        shared = harness()
        yield shared
        shared.stop()
        _shared.clear()


def _streams(events: Sequence[EventLike]) -> list[str]:
    """The streams the events name, in first-seen order."""
    return list(dict.fromkeys(_stream(event) for event in events)) or [STREAM]


def _stream(event: EventLike) -> str:
    return (event.stream if isinstance(event, Event) else event.get("stream")) or STREAM


async def _write(client: Redis, events: Sequence[EventLike]) -> None:
    """XADD the events, in order, in replayd's default schema."""
    pipe = client.pipeline(transaction=False)
    for index, event in enumerate(events):
        pipe.xadd(_stream(event), _entry(event, index))  # type: ignore[arg-type]
    await pipe.execute()


def _entry(event: EventLike, index: int) -> dict[str, str]:
    if isinstance(event, Event):
        event = {"event_id": event.event_id, "event_type": event.event_type, "data": event.data,
                 "timestamp": event.timestamp, "metadata": event.metadata}  # fmt: skip
    if "event_type" not in event:
        raise ConfigError(f"event {index}: needs an event_type (and optionally data, metadata, timestamp, event_id)")
    fields = {
        "event_type": str(event["event_type"]),
        "data": msgspec.json.encode(event.get("data", {})).decode(),
        "metadata": msgspec.json.encode(event.get("metadata", {})).decode(),
        "timestamp": repr(float(event.get("timestamp", time.time()))),
    }
    if event.get("event_id"):
        fields["event_id"] = str(event["event_id"])
    return fields


async def _read_all(client: Redis, streams: set[str]) -> dict[str, Any]:
    keys = sorted([key async for key in client.scan_iter(count=1000)])
    return {key: await _value(client, key) for key in keys if key not in streams and not key.startswith("replayd:")}


async def _value(client: Redis, key: str) -> Any:
    kind = await client.type(key)
    if kind == "hash":
        return await client.hgetall(key)
    if kind == "string":
        return await client.get(key)
    if kind == "set":
        return await client.smembers(key)
    if kind == "list":
        return await client.lrange(key, 0, -1)
    if kind == "zset":
        scored: list[tuple[str, float]] = await client.zrange(key, 0, -1, withscores=True)  # type: ignore[assignment]
        return dict(scored)
    return await client.xrange(key)
