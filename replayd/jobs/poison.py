"""The poison stage: entries that cannot be decoded, under the job's `on_poison`, and what its dead letters hold back.

A read batch's poison is found at three stages: entries too large to read (the source), entries the codec cannot
decode or whose upcaster raised (the decode stage), entries whose partition key or filtered field cannot be decoded
(the router). They are settled here in stream order: `stop` hands the events before the first one down, waits
until they are committed, then fails the job naming it (exit 65); `dead-letter` writes each to the job's
dead-letter stream, in the commit that moves the floor past its batch (so exactly once); `skip` logs and counts.

Events whose handler failed for good go through the same policy, `DeadLetters` (the lanes call it): this stage
also keeps the counts of what dead letters hold back, parked keys, a stream that waits behind one, the breaker.
"""

from __future__ import annotations

import logging
from typing import Any

from replayd.connection import Client, text_hash
from replayd.errors import DataError, JobBlocked, most_telling
from replayd.events import Poison, parse_id, preview
from replayd.handlers import Outcome, Tx
from replayd.jobs.deadletter import DeadLetters, poison_letter
from replayd.jobs.progress import Stats
from replayd.ops.metrics import Metrics
from replayd.pipeline.decode import Read
from replayd.pipeline.dispatch import Dispatch
from replayd.pipeline.router import Routed

logger = logging.getLogger(__name__)


class PoisonStage:
    """The job's poison, settled batch by batch (`settle`), and its dead letters' accounting."""

    def __init__(self, job: str, dead_letters: DeadLetters, stats: Stats, metrics: Metrics) -> None:
        self.job = job
        self.dead_letters = dead_letters
        self.stats = stats
        self.metrics = metrics

    async def settle(self, read: Read, dispatch: Dispatch) -> list[tuple[Any, ...]]:
        """The dead letters of the batch's poison, to commit with its mark (none but under `dead-letter`). Under
        `stop`, the events before the first entry are handed down (`dispatch`) and committed, then DataError."""
        poison = [*read.poison, *read.routed.poison]
        if not poison:
            return []
        if len(poison) > 1:  # found at three stages: `stop` must name the first in stream order
            poison.sort(key=lambda entry: parse_id(entry.stream_id))
        if self.dead_letters.mode == "stop":
            await self._stop_at(poison[0], read, dispatch)
        self._account(poison)
        if self.dead_letters.mode != "dead-letter":
            return []
        self.stats.dead_lettered += len(poison)
        tx = Tx()
        for entry in poison:
            tx.xadd(self.dead_letters.key, poison_letter(entry.stream, entry.stream_id, entry.fields, entry.error))
        return tx.commands

    async def _stop_at(self, entry: Poison, read: Read, dispatch: Dispatch) -> None:
        """on_poison = stop: the events before the undecodable entry are handled and committed first (a handler
        may find an earlier one undecodable: that one is named), then the job stops, naming it."""
        below = parse_id(entry.stream_id)
        before = [e for e in read.events if parse_id(e.stream_id) < below]
        if before:
            parts = {p: kept for p, events in read.routed.parts.items()
                     if (kept := [e for e in events if parse_id(e.stream_id) < below])}  # fmt: skip
            batch = read.batch._replace(last_id=parse_id(before[-1].stream_id))
            await dispatch(Read(batch, before, Routed(parts, sum(map(len, parts.values())), 0, []), []), [])
        await dispatch.drained()
        self._account([entry])
        raise DataError(
            f"entry {entry.stream} {entry.stream_id} cannot be decoded ({entry.error}); on_poison = stop: "
            "the work before it is committed (on_poison = 'dead-letter' or 'skip' goes on)"
        )

    def _account(self, poison: list[Poison]) -> None:
        self.stats.poison += len(poison)
        self.stats.failed += len(poison)
        for entry in poison:
            outcome = "tombstone" if entry.error.startswith("tombstone") else "failed"
            self.metrics.handler_events.labels(entry.stream, self.job, outcome).inc()
            logger.error(
                "undecodable entry %s %s: %s (fields %s)", entry.stream, entry.stream_id, entry.error,
                preview(entry.fields),
            )  # fmt: skip

    async def load_parked(self, redis: Client) -> None:
        """At start: the keys that wait behind a dead letter (`dlq retry` and `dlq discard` free them meanwhile)."""
        parked = text_hash(await redis.hgetall(self.dead_letters.parked_key))
        self.dead_letters.parked.clear()
        self.dead_letters.parked.update(parked)
        self.note_waiting()

    def on_outcome(self, outcome: Outcome) -> None:
        """A lane batch's outcome: a handled event closes the breaker's run of failures; what parks is counted."""
        if outcome.handled > 0:
            self.dead_letters.failing = 0  # the breaker counts failures in a row
        if outcome.parked or outcome.dead_lettered:
            self.note_waiting()

    def note_waiting(self) -> None:
        """Parked counts and, when a parked key is a whole stream, why the job is blocked, for status and logs."""
        self.stats.parked_keys = len(self.dead_letters.parked)
        holding = self.dead_letters.holding()
        if holding and not self.stats.blocked:
            stream, letter = holding
            self.stats.blocked = f"stream {stream} waits behind dead letter {letter} (`replayd dlq list {self.job}`)"

    def blocked(self, exc: BaseException) -> JobBlocked | None:
        """The stop the failure policy asked for (a whole stream parked, the circuit breaker) behind `exc`."""
        error = most_telling(exc)
        if isinstance(error, JobBlocked):
            return error
        if isinstance(error, DataError) and self.dead_letters.blocked:
            return JobBlocked(f"job {self.job} blocked: {self.dead_letters.blocked}")
        return None

    def reset(self) -> None:
        """Going on after `replayd resume`: the breaker closes, the job is no longer blocked."""
        self.dead_letters.reset()
        self.stats.blocked = ""
