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
from collections import deque
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
    """The job's failure policy: retries with backoff, then `stop`, `dead-letter` or `skip`; and its circuit
    breaker. Two things stop a job here rather than let it dead-letter (or skip) its stream: a dead letter whose
    key is a whole stream (no `partition_by`: every later event would wait behind it), and `breaker` events in a
    row failing for good. `blocked` then says why, and the event that met it is not given up on (`stop`)."""

    def __init__(
        self,
        job: str,
        mode: str,
        *,
        retries: int,
        backoff_s: float,
        key_of: Callable[[Event], str] | None,
        parked: dict[str, str] | None = None,
        whole_stream: bool = False,
        breaker: int = 0,
        max_backoff_s: float = 5.0,
    ) -> None:
        self.mode = mode
        self.retries = retries
        self.base_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.key_of = key_of
        self.parked: dict[str, str] = parked if parked is not None else {}
        """Partition key -> entry ID of its first dead letter (persisted in `parked_key`)."""
        self.whole_stream = whole_stream and key_of is not None
        """Keys are streams (no `partition_by`): a parked key holds back a whole stream."""
        self.breaker = breaker
        self.failing = 0
        """Events failed for good one after another (the engine resets it when a lane batch handles one)."""
        self.errors: deque[str] = deque(maxlen=3)
        """The last errors, for the breaker's message."""
        self.blocked = ""
        """Why the job stopped here (a whole stream parked, the breaker): set with the `stop` verdict."""
        self.key = job_key(job, "dlq")
        self.parked_key = job_key(job, "parked")

    def backoff_s(self, attempt: int) -> float:
        return float(min(self.base_s * 2 ** (attempt - 2), self.max_backoff_s) * random.uniform(0.5, 1.0))

    @property
    def parks(self) -> bool:
        return bool(self.parked) and self.key_of is not None

    def holding(self) -> tuple[str, str] | None:
        """(stream, dead letter) when a parked key holds back a whole stream, else None."""
        if self.whole_stream and self.parked:
            return next(iter(self.parked.items()))
        return None

    def parked_behind(self, event: Event) -> str | None:
        if not self.parked or self.key_of is None:
            return None
        try:
            key = self.key_of(event)
        except DecodeError:  # its key cannot be known: not parked (the handler finds it undecodable)
            return None
        return self.parked.get(key)

    def give_up(self, event: Event, error: BaseException | str, attempts: int, tx: Tx) -> str:
        if isinstance(error, str):  # parked behind a dead letter of its key
            if self.whole_stream:
                return self._block(
                    f"stream {event.stream} waits behind dead letter {self.parked_behind(event)} (handler error on "
                    "that event): without partition_by every event of a stream has one key, so all later events "
                    "would wait. Fix the cause, then `replayd dlq retry` (or `dlq discard`) and `replayd resume`; "
                    "or set partition_by so that only one entity waits"
                )
        elif self._trips(event, error):
            return self._block(
                f"circuit breaker: {self.failing} events in a row failed for good (breaker_failures = "
                f"{self.breaker}); last errors: {'; '.join(self.errors)}. Fix the cause, then `replayd resume` "
                "(following) or run again: the event it stopped at is retried"
            )
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

    def _trips(self, event: Event, error: BaseException) -> bool:
        self.failing += 1
        self.errors.append(f"{event.stream} {event.stream_id}: {type(error).__name__}: {str(error)[:200]}")
        return self.mode != "stop" and 0 < self.breaker <= self.failing

    def _block(self, why: str) -> str:
        self.blocked = self.blocked or why
        return "stop"

    def reset(self) -> None:
        """Going on after `replayd resume`: the breaker closes; what is parked is read again at start."""
        self.failing, self.blocked = 0, ""
        self.errors.clear()


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
