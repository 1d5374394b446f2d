"""Dead letters: events that failed for good, kept in the stream `replayd:{job}:dlq` with their origin stream and
ID, their fields, the error and the attempts. With ordering `key`, later events of the same partition key are
parked behind the first dead letter (a sequenced dead-letter queue), so nothing of that key is applied out of
order; `replayd dlq retry` re-runs a key's parked sequence in order, `dlq discard` drops it.

Dead letters are queued on the batch's `ctx.tx`, so they commit atomically with the checkpoint that moves past
the event: a crash never loses one nor writes it twice.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

import msgspec
from redis.asyncio import RedisCluster

from replayd.connection import Client, close_reads_client, reads_client, text, text_hash
from replayd.errors import DecodeError
from replayd.events import Event
from replayd.handlers import Context, Handler, Tx, projection_prefix
from replayd.pipeline.commit import job_key, sendable


class DeadLetters:
    """The job's failure policy: retries with backoff, then `stop`, `dead-letter` or `skip`."""

    def __init__(
        self,
        job: str,
        mode: str,
        *,
        retries: int,
        backoff_s: float,
        key_of: Callable[[Event], str] | None,
        parked: dict[str, str] | None = None,
    ) -> None:
        self.mode = mode
        self.retries = retries
        self.base_s = backoff_s
        self.key_of = key_of
        self.parked: dict[str, str] = parked if parked is not None else {}
        """Partition key -> entry ID of its first dead letter (persisted in `parked_key`)."""
        self.key = job_key(job, "dlq")
        self.parked_key = job_key(job, "parked")

    def backoff_s(self, attempt: int) -> float:
        return float(min(self.base_s * 2 ** (attempt - 2), 5.0) * random.uniform(0.5, 1.0))

    @property
    def parks(self) -> bool:
        return bool(self.parked) and self.key_of is not None

    def parked_behind(self, event: Event) -> str | None:
        if not self.parked or self.key_of is None:
            return None
        try:
            key = self.key_of(event)
        except DecodeError:  # its key cannot be known: not parked (the handler finds it undecodable)
            return None
        return self.parked.get(key)

    def give_up(self, event: Event, error: BaseException | str, attempts: int, tx: Tx) -> str:
        if self.mode != "dead-letter":
            return "stop" if self.mode == "stop" else "skipped"
        key = ""
        if self.key_of is not None and not isinstance(error, DecodeError):
            try:
                key = self.key_of(event)
            except DecodeError as undecodable:  # a handler that failed before reading its (broken) key field
                error = undecodable
        if isinstance(error, DecodeError):
            # its raw fields, as for entries found undecodable while routing; nothing parks behind it (such a
            # letter cannot be retried, only discarded)
            tx.xadd(self.key, poison_letter(event.stream, event.stream_id, error.fields, error.reason))
            return "dead_lettered"
        tx.xadd(self.key, dead_letter(event, error, attempts, key))
        if self.key_of is not None and key not in self.parked:
            self.parked[key] = event.stream_id
            tx.hset(self.parked_key, key, event.stream_id)
        return "dead_lettered"


def dead_letter(event: Event, error: BaseException | str, attempts: int, key: str) -> dict[str, Any]:
    """The fields of a dead-letter entry: origin, the event as the article's schema has it, the error."""
    kind, message = (type(error).__name__, str(error)) if isinstance(error, BaseException) else ("Parked", error)
    return {
        "stream": event.stream,
        "id": event.stream_id,
        "key": key,
        "event_id": event.event_id,
        "event_type": event.event_type,
        "data": msgspec.json.encode(event.data),
        "timestamp": repr(event.timestamp),
        "metadata": msgspec.json.encode(event.metadata),
        "error_type": kind,
        "error": message[:2000],
        "attempts": attempts,
        "failed_at": repr(time.time()),
    }


def poison_letter(stream: str, stream_id: str, fields: dict[str, str], error: str) -> dict[str, Any]:
    """The fields of a dead letter for an entry that could not be decoded: its raw fields, JSON-encoded."""
    return {
        "stream": stream,
        "id": stream_id,
        "key": "",
        "raw": msgspec.json.encode(fields),
        "error_type": "DecodeError",
        "error": error[:2000],
        "attempts": 1,
        "failed_at": repr(time.time()),
    }


def letter_event(fields: dict[str, str]) -> Event:
    """The event a dead letter holds (for `dlq retry`)."""
    return Event(
        fields["id"],
        fields.get("event_id", fields["id"]),
        fields.get("event_type", "unknown"),
        msgspec.json.decode(fields.get("data", "{}")),
        float(fields.get("timestamp", 0)),
        msgspec.json.decode(fields.get("metadata", "{}")),
        fields["stream"],
    )


class Letters:
    """The dead-letter stream of a job, for `replayd dlq`: list, retry in order, discard."""

    def __init__(self, redis: Client, job: str) -> None:
        self.client = redis
        self.redis = reads_client(redis)  # redis-py's usual reply parsing
        self.cluster = isinstance(redis, RedisCluster)
        self.job = job
        self.key = job_key(job, "dlq")
        self.parked_key = job_key(job, "parked")

    async def entries(self) -> list[tuple[str, dict[str, str]]]:
        raw: Any = await self.redis.xrange(self.key)
        return [(text(entry_id), text_hash(fields)) for entry_id, fields in raw]

    async def discard(self, ids: list[str]) -> int:
        removed = int(await self.redis.xdel(self.key, *ids)) if ids else 0
        await self._unpark()
        return removed

    async def retry(self, handler: Handler, ids: list[str] | None) -> tuple[int, int]:
        """Re-run the handler on the letters (all, or `ids`) in order; a key stops at its first failure.
        Each success commits its writes and removes its letter in one transaction. Returns (done, left)."""
        done, blocked = 0, set()
        letters = [(i, f) for i, f in await self.entries() if ids is None or i in ids]
        for letter_id, fields in letters:
            if "raw" in fields or fields.get("key") in blocked:
                continue
            ctx = Context(self.job, self.redis, projection_prefix(handler.name, cluster=self.cluster), replaying=True)
            outcome = await handler.handle_batch([letter_event(fields)], ctx)
            if outcome.handled != 1:
                blocked.add(fields.get("key"))
                continue
            async with self.redis.pipeline(transaction=True) as tx:
                for command in sendable(ctx.tx.commands, f"the retry of dead letter {letter_id}"):
                    tx.execute_command(*command)
                tx.xdel(self.key, letter_id)
                await tx.execute()
            done += 1
        await self._unpark()
        return done, len(letters) - done

    async def aclose(self) -> None:
        """Close the reads client (one of its own on a cluster)."""
        await close_reads_client(self.redis, self.client)

    async def _unpark(self) -> None:
        """A key is parked while it has letters; drop the others from the parked hash."""
        keys = {fields.get("key", "") for _, fields in await self.entries()}
        parked = text_hash(await self.redis.hgetall(self.parked_key))
        free = [key for key in parked if key not in keys]
        if free:
            await self.redis.hdel(self.parked_key, *free)
