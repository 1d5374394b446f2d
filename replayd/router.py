"""Partition key -> partition: a stable crc32 hash, so an event lands in the same partition in every run."""

from __future__ import annotations

from collections.abc import Callable
from zlib import crc32

from replayd.events import WHOLE, Event, Id, Shard, parse_id

STREAM_KEY = "@stream"
"""`partition_by` value that partitions by the stream key (one ordered lane per stream)."""


class Router:
    """Splits a decoded batch into per-partition lists, keeping stream order within each."""

    def __init__(self, partitions: int, *, partition_by: str | None, ordering: str, shard: Shard = WHOLE) -> None:
        self.partitions = partitions
        self.shard = shard
        self.foreign = 0
        """Events that belong to other shards' partitions (read, not ours to handle)."""
        self._key = _key_function(partition_by, ordering)
        self._by_stream = ordering == "key" and partition_by in (None, STREAM_KEY)
        self._cache: dict[str, int] = {}
        """Partition of recently seen keys: most streams have far fewer keys than events."""

    def key_of(self, event: Event) -> str:
        """The partition key: events of one key are handled in stream order."""
        return self._key(event)

    def partition(self, event: Event) -> int:
        key = self._key(event)
        p = self._cache.get(key)
        if p is None:
            if len(self._cache) >= 100_000:
                self._cache.clear()
            p = self._cache[key] = crc32(key.encode()) % self.partitions
        return p

    def split(self, events: list[Event], skip: dict[int, Id] | None = None) -> dict[int, list[Event]]:
        """Group events by partition; with `skip`, drop those at or below their partition's checkpoint."""
        if not events:
            return {}
        if (self.partitions == 1 or self._by_stream) and not skip:
            p = self.partition(events[0])  # a batch comes from one stream: one partition
            if self.shard.owns(p):
                return {p: events}
            self.foreign += len(events)
            return {}
        parts: dict[int, list[Event]] = {}
        partition, owns = self.partition, self.shard.owns
        for event in events:
            p = partition(event)
            if not owns(p):
                self.foreign += 1
                continue
            if skip and p in skip and parse_id(event.stream_id) <= skip[p]:
                continue
            bucket = parts.get(p)
            if bucket is None:
                parts[p] = [event]
            else:
                bucket.append(event)
        return parts


def _key_function(partition_by: str | None, ordering: str) -> Callable[[Event], str]:
    if ordering == "none":
        # no order promised: spread entries evenly, still the same partition for an entry in every run
        return lambda e: e.stream_id
    if partition_by is None or partition_by == STREAM_KEY:
        return lambda e: e.stream
    field = partition_by
    # an event without the field goes with the others that lack it, as the article's "default" group does
    return lambda e: str(e.data.get(field, "default"))  # str(): a number and its text are one key
