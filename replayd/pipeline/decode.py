"""The decode stage: a read batch of one stream -> this shard's events, upcast, routed to partitions, counted.

The codec decodes the entries (splitting them by partition as it goes, when it can), the upcasters bring old
shapes up to date (before the filters: they see the newest shape too), the router filters and splits what the
codec did not and, resuming, drops what each partition has committed. What cannot be decoded is set apart as
`Poison`, for the poison stage.
"""

from __future__ import annotations

import logging
import time
from typing import NamedTuple, Protocol

from replayd.events import ZERO, Event, Id, Poison
from replayd.handlers.upcast import Upcasters
from replayd.ops.metrics import Metrics
from replayd.pipeline.codec import Codec
from replayd.pipeline.filters import Predicate
from replayd.pipeline.router import Routed, Router
from replayd.pipeline.source import Batch, BatchSizer

logger = logging.getLogger(__name__)


class Counts(Protocol):
    """What the stage counts into: the job's `Stats`."""

    total: int
    """Entries read."""
    skipped: int
    """Events filtered out, or already committed before a restart."""
    unkeyed: int
    """Events without the partition key."""


class Read(NamedTuple):
    """A read batch, decoded and routed: what the later stages hand down."""

    batch: Batch
    events: list[Event]
    """Every event decoded, in stream order (the filtered-out ones too)."""
    routed: Routed
    """This shard's share, by partition."""
    poison: list[Poison]
    """This shard's entries set apart before routing: too large to read, undecodable, or an upcaster raised (the
    router sets apart those whose key or filtered field cannot be decoded, in `routed.poison`)."""

    @property
    def first(self) -> Event | None:
        """The first event handed to handlers (for pacing)."""
        return self.routed.first


class Decoder:
    """The decode stage of one stream (`decoder(batch)`: the batch decoded and routed)."""

    def __init__(
        self,
        codec: Codec,
        router: Router,
        *,
        predicate: Predicate | None,
        upcasters: Upcasters | None,
        skip: dict[int, Id],
        counts: Counts,
        metrics: Metrics,
        job: str,
        sizer: BatchSizer | None,
    ) -> None:
        self.stream = codec.stream
        self.codec, self.router, self.predicate, self.upcasters = codec, router, predicate, upcasters
        self._skip = skip or None
        """Resuming: per partition, the checkpoint at or below which its events are already committed."""
        self._skip_until = max(skip.values()) if skip else ZERO
        self.counts, self.metrics, self.job = counts, metrics, job
        self.sizer = sizer
        """Reads are sized to their decoding time (None: they are not, the handler never awaits)."""
        self._events_read = metrics.events_read.labels(self.stream)
        self._read_batch = metrics.read_batch.labels(self.stream)

    def __call__(self, batch: Batch) -> Read:
        began = time.perf_counter()
        events, poison, parts = self.codec.decode(batch.entries)
        if self.upcasters is not None:
            events, parts, poison = self._upcast(events, parts, poison)
        routed = self.router.route(events, self.predicate, self._skip, parts)
        if self.router.partitioner.unkeyed:
            self._count_unkeyed()
        if self.sizer is not None:
            self.sizer.observe_decode(len(batch.entries), time.perf_counter() - began)
        self._count(batch, routed.skipped)
        if self._skip and batch.last_id >= self._skip_until:
            self._skip = None
        return Read(batch, events, routed, [*self.router.own(batch.oversized), *poison])

    def _upcast(
        self, events: list[Event], parts: dict[int, list[Event]] | None, poison: list[Poison]
    ) -> tuple[list[Event], dict[int, list[Event]] | None, list[Poison]]:
        """Upcast a decoded batch: an event whose upcaster raised is poison. When any `data` changed, the codec's
        split by partition key (read from the stored `data`) is dropped: the router splits the batch again."""
        assert self.upcasters is not None
        kept, failed, changed = self.upcasters.apply(events)
        if failed:
            poison = [*poison, *map(Poison.of, failed)]
        if parts is not None and (changed or failed):
            self.router.partitioner.take_unkeyed()  # the router splits the batch again, counting what has no key
        return kept, None if changed or failed else parts, poison

    def _count(self, batch: Batch, skipped: int) -> None:
        read = len(batch.entries) + len(batch.oversized)
        self.counts.total += read
        self._events_read.inc(read)
        self._read_batch.observe(read)
        if skipped:
            self.counts.skipped += skipped
            self.metrics.handler_events.labels(self.stream, self.job, "skipped").inc(skipped)

    def _count_unkeyed(self) -> None:
        """Events without the partition key all go with the key "default": counted, and said once per run."""
        missing = self.router.partitioner.take_unkeyed()
        if not self.counts.unkeyed:
            by = self.router.partition_by
            hint = f"; a bare name is a field of data: for the entry's own field, use fields.{by}" if (
                isinstance(by, str) and by.isidentifier()) else ""  # fmt: skip
            logger.warning(
                "job %s: %d events of %s have no partition key (partition_by %s): they all share the key 'default', "
                "one partition; counted in unkeyed_events (progress hash) and replayd_unkeyed_events%s",
                self.job, missing, self.stream, by, hint,
            )  # fmt: skip
        self.counts.unkeyed += missing
        self.metrics.unkeyed.labels(self.stream, self.job).inc(missing)
