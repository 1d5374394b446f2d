"""Progress of a job: counters in memory, the `replayd:{job}:progress` hash written at a bounded rate.

The hash keeps the article's monitoring fields (status, started_at, updated_at, total/processed/skipped/
failed events, current_stream_id, events_per_second) and adds target, percent, caught-up time and owner.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass, field

import anyio

from replayd.connection import Client, Memory, is_retriable
from replayd.events import WHOLE, Id, Shard, format_id
from replayd.pipeline.commit import job_key

logger = logging.getLogger(__name__)


@dataclass
class Stats:
    """Counters of one run of a job."""

    job: str
    streams: list[str]
    started_at: float = field(default_factory=time.time)
    status: str = "starting"
    total: int = 0
    """Entries read (the article's total_events)."""
    processed: int = 0
    """Events handled without error."""
    skipped: int = 0
    """Events filtered out, of a type the handler does not take, or already committed before a restart."""
    failed: int = 0
    """Events whose handler raised, plus poison entries."""
    poison: int = 0
    """Entries that could not be decoded."""
    dead_lettered: int = 0
    """Events and entries that failed for good and were written to the dead-letter stream."""
    parked: int = 0
    """Events not handled because their key waits behind a dead letter (dead-lettered as `Parked`, or skipped)."""
    parked_keys: int = 0
    """Partition keys waiting behind a dead letter now."""
    blocked: str = ""
    """Why the job cannot go on by itself (its stream waits behind a dead letter, the circuit breaker), or ""."""
    unkeyed: int = 0
    """Events without the job's partition key (routed with the key "default", so in one partition)."""
    start: dict[str, Id] = field(default_factory=dict)
    """Per stream: the position the run started after."""
    target: dict[str, Id | None] = field(default_factory=dict)
    """Per stream: the end bound, or the head at start for a following job (None: empty stream)."""
    position: dict[str, Id] = field(default_factory=dict)
    """Per stream: the committed floor."""
    checkpointed: bool = False
    """A checkpoint was committed in this run (so a vanished checkpoint later means a lost one)."""
    caught_up_at: float | None = None
    completed_at: float | None = None
    rate: float = 0.0
    _origin: dict[str, int] = field(default_factory=dict, repr=False)
    """Per stream started from `0-0`: the ms of the first position `percent` saw, where its span begins."""

    def state(self) -> str:
        """`status`, except that a running job held back by a dead letter or its circuit breaker is `blocked`."""
        if self.blocked and self.status in ("catching_up", "live"):
            return "blocked"
        return self.status

    def percent(self) -> float:
        """Done fraction by entry-ID time between start and target (IDs carry Redis's clock), 0-100. A run from the
        beginning starts at `0-0`, decades before the first entry: its span is measured from the first position
        seen instead (else the first batch would read as 100%)."""
        if self.status == "completed":
            return 100.0
        spans = []
        for stream, target in self.target.items():
            if target is None:
                continue
            start = self.start.get(stream, (0, 0))[0]
            pos = self.position.get(stream, self.start.get(stream, (0, 0)))[0]
            if not start:
                start = self._origin.setdefault(stream, pos) if stream in self.position else pos
            span = max(target[0] - start, 1)
            spans.append(min(max((pos - start) / span, 0.0), 1.0))
        return round(100.0 * (sum(spans) / len(spans) if spans else 1.0), 2)

    def fields(self) -> dict[str, str]:
        first = self.streams[0]
        fields = {
            "name": self.job,
            "status": self.state(),
            "streams": ",".join(self.streams),
            "started_at": repr(self.started_at),
            "updated_at": repr(time.time()),
            "total_events": str(self.total),
            "processed_events": str(self.processed),
            "skipped_events": str(self.skipped),
            "failed_events": str(self.failed),
            "poison_events": str(self.poison),
            "dead_lettered_events": str(self.dead_lettered),
            "unkeyed_events": str(self.unkeyed),
            "parked_events": str(self.parked),
            "parked_keys": str(self.parked_keys),
            "blocked": self.blocked,
            "events_per_second": f"{self.rate:.1f}",
            "current_stream_id": format_id(self.position[first]) if first in self.position else "",
            "target_id": _fmt(self.target.get(first)),
            "percent": f"{self.percent():.2f}",
            "owner": f"{socket.gethostname()}:{os.getpid()}",
        }
        for stream in self.streams:
            fields[f"position:{stream}"] = format_id(self.position[stream]) if stream in self.position else ""
            fields[f"target:{stream}"] = _fmt(self.target.get(stream))
        if self.checkpointed:
            fields["checkpointed"] = "1"
        if self.caught_up_at is not None:
            fields["caught_up_at"] = repr(self.caught_up_at)
        if self.completed_at is not None:
            fields["completed_at"] = repr(self.completed_at)
        return fields


def progress_key(job: str, shard: Shard = WHOLE) -> str:
    """`replayd:{job}:progress`, and `...:progress:i/N` for each shard of a sharded job."""
    return job_key(job, "progress") + (f":{shard}" if shard.total > 1 else "")


def _fmt(id_: Id | None) -> str:
    return format_id(id_) if id_ is not None else ""


class ProgressWriter:
    """Writes `Stats` to the progress hash every `interval_s` (never per event) and on demand."""

    def __init__(self, redis: Client, stats: Stats, interval_s: float, shard: Shard = WHOLE) -> None:
        self.redis = redis
        self.stats = stats
        self.interval_s = interval_s
        self.key = progress_key(stats.job, shard)
        self._last_total = 0
        self._last_time = time.monotonic()

    async def write(self, *, rate: float | None = None) -> None:
        """Write the hash; the rate is the one since the last write unless given (the run's average at the end)."""
        now = time.monotonic()
        elapsed = now - self._last_time
        if rate is not None:
            self.stats.rate = rate
        elif elapsed > 0:
            self.stats.rate = (self.stats.total - self._last_total) / elapsed
        self._last_total, self._last_time = self.stats.total, now
        try:
            await self.redis.hset(self.key, mapping=self.stats.fields())  # type: ignore[arg-type]
        except Exception as exc:
            if not is_retriable(exc):
                raise
            # progress is for people watching: never a reason to stop a replay. Refused for memory, it is one for
            # readiness, though: a job that follows a quiet stream writes nothing else
            Memory.note(exc)
            logger.warning("progress hash %s not written: %s", self.key, exc)
        else:
            Memory.note(None)

    async def run(self, log_every_s: float = 10.0) -> None:
        """Write every `interval_s`; log a progress line every `log_every_s` while events flow."""
        logged_at, logged_total = time.monotonic(), self.stats.total
        while True:
            await anyio.sleep(self.interval_s)
            await self.write()
            now = time.monotonic()
            if now - logged_at >= log_every_s and (self.stats.total != logged_total or self.stats.blocked):
                self._log(self.stats.total - logged_total, now - logged_at)
                logged_at, logged_total = now, self.stats.total

    def _log(self, events: int, seconds: float) -> None:
        stats = self.stats
        log = logger.warning if stats.blocked or stats.parked_keys else logger.info
        log(
            "%s: %d events read (%.0f/s), %d processed, %d skipped, %d failed, %d dead-lettered, %d parked behind "
            "%d key(s), %.1f%% at %s%s",
            stats.state(), stats.total, events / seconds, stats.processed, stats.skipped, stats.failed,
            stats.dead_lettered, stats.parked, stats.parked_keys, stats.percent(),
            ", ".join(f"{s} {format_id(p)}" for s, p in stats.position.items()),
            f" ({stats.blocked})" if stats.blocked else "",
        )  # fmt: skip
