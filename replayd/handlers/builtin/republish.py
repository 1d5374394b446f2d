"""A built-in handler that copies events into another stream, for reprocessing by other services.

    REPLAYD_REPUBLISH_STREAM=events:orders:reprocess \\
        replayd replay --stream events:orders --handler republish --from 24h

Settings (environment variables, read when the handler is loaded; a bad value is a config error at start-up):
    REPLAYD_REPUBLISH_STREAM   the target stream; unset or empty: `<source stream>:replay` for each source
    REPLAYD_REPUBLISH_MAXLEN   trim the target to about this many entries (`XADD ... MAXLEN ~ N`); unset: no trim
    REPLAYD_REPUBLISH_DEDUPE   `on` (default) or `off`: skip events whose ID the target has already received

Each event becomes one entry of the target with the fields `event_id`, `event_type`, `data` (JSON),
`timestamp` (the producer's ORIGINAL time, not the replay's), `metadata` (JSON), `origin_stream` and
`origin_id` (the source entry ID). The first five are replayd's default field names, so the target can itself
be replayed by replayd and yields the same events.

Order: the target's entry IDs are assigned by Redis (`*`), in the order replayd commits. `partition_by = None`
makes each source stream one ordered lane, so the entries of one source stream keep their source order in
the target (keep the job's default `ordering = "key"` and set no `partition_by`). With several sources into
one target, each source's order is kept; how the sources interleave is not defined.

Exactly once, and idempotent by event ID:
- The XADDs are queued on `ctx.tx`, so they commit in the same atomic script as the job's checkpoint: a crash
  never leaves an entry without its checkpoint, and a resumed job does not republish anything twice.
- A second replay of the same history (another job, a reset checkpoint, `--from` further back) would copy
  events again. So each republished event ID is also added to the set `republish:<target>:seen`, in the same
  commit, and events whose ID is in it are skipped: one SMISMEMBER per batch (Redis >= 6.2). Events without a
  producer ID (whose `event_id` is their entry ID) are remembered as `<stream>@<entry ID>`, so equal entry
  IDs of different source streams are not mistaken for one event.
- The check and the commit are not one atomic step (a commit script cannot branch on a handler's reads), so
  two jobs republishing the same events into the same target at the same time can still both copy them.
  Within one run, IDs checked but not yet committed are remembered, so concurrent lanes do not both copy one.
- The set grows with every event ID republished; delete it (or set `REPLAYD_REPUBLISH_DEDUPE=off`) when
  copies are wanted.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from functools import partial

import msgspec

from replayd.connection import retrying, text
from replayd.errors import ConfigError
from replayd.events import Event
from replayd.handlers import Arg, Context, Outcome, Projection

logger = logging.getLogger(__name__)

STREAM_ENV = "REPLAYD_REPUBLISH_STREAM"
MAXLEN_ENV = "REPLAYD_REPUBLISH_MAXLEN"
DEDUPE_ENV = "REPLAYD_REPUBLISH_DEDUPE"
DEFAULT_SUFFIX = ":replay"
RECENT_LIMIT = 200_000
"""IDs checked in this run and remembered in memory (more than any number of events in flight)."""
READ_BUDGET_S = 60.0
"""How long the membership check retries a lost connection before the job fails."""

_ON = {"1", "true", "yes", "on"}
_OFF = {"0", "false", "no", "off"}


def seen_key(target: str) -> str:
    """The set of event IDs already republished into `target`."""
    return f"republish:{target}:seen"


def dedupe_member(event: Event) -> str:
    """What identifies an event in the seen set: its producer's ID, else `<stream>@<entry ID>`."""
    if event.event_id != event.stream_id:
        return event.event_id
    return f"{event.stream}@{event.stream_id}"


def _maxlen_from_env() -> int | None:
    value = os.environ.get(MAXLEN_ENV, "").strip()
    if not value:
        return None
    try:
        maxlen = int(value)
    except ValueError:
        raise ConfigError(f"{MAXLEN_ENV}={value!r}: expected a whole number of entries, e.g. 1000000") from None
    if maxlen < 1:
        raise ConfigError(f"{MAXLEN_ENV}={value!r}: must be at least 1 (unset it for no trimming)")
    return maxlen


def _dedupe_from_env() -> bool:
    value = os.environ.get(DEDUPE_ENV, "").strip().lower()
    if not value or value in _ON:
        return True
    if value in _OFF:
        return False
    raise ConfigError(f"{DEDUPE_ENV}={value!r}: expected on or off")


class Republish(Projection):
    """XADDs each event into the target stream, with its original fields, timestamp and origin."""

    name = "republish"
    writes_projection = False  # its keys are the target stream and seen set (per-commit slot check on a cluster)
    partition_by = None

    def __init__(self) -> None:
        self.stream = os.environ.get(STREAM_ENV, "").strip() or None
        """The configured target; None: `<source>:replay` per source stream."""
        self.maxlen = _maxlen_from_env()
        self.dedupe = _dedupe_from_env()
        self.published = 0
        """Events queued for the target (committed with their checkpoint)."""
        self.skipped = 0
        """Events skipped because the target had them already."""
        self._checked: set[str] = set()
        """Targets whose key types were checked in this run."""
        self._recent: dict[str, None] = {}
        """Seen-set members claimed in this run, oldest first (committed, or in a commit on its way)."""

    def target_of(self, stream: str) -> str:
        return self.stream or f"{stream}{DEFAULT_SUFFIX}"

    async def startup(self, ctx: Context) -> None:
        # a new run: claims of an earlier run on this instance were committed or are lost with it
        self._recent.clear()
        self._checked.clear()

    async def handle(self, event: Event, ctx: Context) -> None:
        await self.handle_batch([event], ctx)

    async def handle_batch(self, events: Sequence[Event], ctx: Context) -> Outcome:
        by_target: dict[str, list[Event]] = {}
        for event in events:
            target = self.target_of(event.stream)
            if target == event.stream:  # in follow mode it would copy its own copies forever
                raise ConfigError(f"{self.name}: the target stream {target!r} is a source stream: set {STREAM_ENV}")
            by_target.setdefault(target, []).append(event)
        for target, batch in by_target.items():
            await self._check_target(target, ctx)
            fresh = await self._unseen(target, batch, ctx) if self.dedupe else batch
            for event in fresh:
                self._queue(target, event, ctx)
            self.published += len(fresh)
            self.skipped += len(batch) - len(fresh)
        return Outcome(handled=len(events))

    async def shutdown(self, ctx: Context) -> None:
        logger.info("%s: %d event(s) republished, %d skipped as already there", self.name, self.published,
                    self.skipped)  # fmt: skip

    def _queue(self, target: str, event: Event, ctx: Context) -> None:
        fields: list[Arg] = [
            "event_id", event.event_id,
            "event_type", event.event_type,
            "data", msgspec.json.encode(event.data),
            "timestamp", repr(event.timestamp),
            "metadata", msgspec.json.encode(event.metadata),
            "origin_stream", event.stream,
            "origin_id", event.stream_id,
        ]  # fmt: skip
        trim: tuple[Arg, ...] = ("MAXLEN", "~", self.maxlen) if self.maxlen else ()
        ctx.tx.execute_command("XADD", target, *trim, "*", *fields)
        if self.dedupe:
            ctx.tx.sadd(seen_key(target), dedupe_member(event))

    async def _unseen(self, target: str, batch: list[Event], ctx: Context) -> list[Event]:
        """The events of `batch` the target has not received, nor will by a commit of this run; claims them."""
        candidates: dict[str, Event] = {}
        for event in batch:
            member = dedupe_member(event)
            if member not in self._recent and member not in candidates:  # first of repeats within the batch
                candidates[member] = event
        if not candidates:
            return []
        members = list(candidates)
        key = seen_key(target)
        found = await retrying(partial(ctx.redis.smismember, key, members), what="republish check",
                               budget_s=READ_BUDGET_S)  # fmt: skip
        fresh: list[Event] = []
        for member, present in zip(members, found, strict=True):
            if not present:
                fresh.append(candidates[member])
                self._claim(member)
        return fresh

    def _claim(self, member: str) -> None:
        recent = self._recent
        recent[member] = None
        if len(recent) > RECENT_LIMIT:
            del recent[next(iter(recent))]

    async def _check_target(self, target: str, ctx: Context) -> None:
        """Once per target and run: its keys are of the right types (or do not exist yet)."""
        if target in self._checked:
            return
        keys = {target: ("none", "stream"), seen_key(target): ("none", "set")}
        for key, allowed in keys.items():
            kind = text(await retrying(partial(ctx.redis.type, key), what="republish check", budget_s=READ_BUDGET_S))
            if kind not in allowed:
                raise ConfigError(f"{self.name}: {key!r} is a {kind}, not a {allowed[1]}: choose another {STREAM_ENV}")
        self._checked.add(target)
