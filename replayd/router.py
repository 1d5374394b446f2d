"""Partition key -> partition: a stable crc32 hash, so an event lands in the same partition in every run."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from operator import attrgetter
from typing import NamedTuple
from zlib import crc32

from replayd.codec import Poison
from replayd.errors import DecodeError
from replayd.events import WHOLE, Event, Id, Shard, parse_id

STREAM_KEY = "@stream"
"""`partition_by` value that partitions by the stream key (one ordered lane per stream)."""

Predicate = Callable[[Event], bool]


class Routed(NamedTuple):
    """One read batch, routed."""

    parts: dict[int, list[Event]]
    """Partition -> its events of the batch, in stream order (only this shard's partitions)."""
    routed: int
    """Events in `parts`."""
    foreign: int
    """Events of other shards' partitions (read, not ours to handle)."""
    poison: list[Poison]
    """Entries whose fields the filter or the partition key needed cannot be decoded."""
    first: Event | None
    """The first event that passed the filter (whatever its shard), for pacing."""
    filtered: int
    """Events the filter left out (whatever their shard)."""


class Router:
    """Splits a decoded batch into per-partition lists, keeping stream order within each."""

    def __init__(self, partitions: int, *, partition_by: str | None, ordering: str, shard: Shard = WHOLE) -> None:
        self.partitions = partitions
        self.shard = shard
        self._key = _key_function(partition_by, ordering)
        self._by_stream = ordering == "key" and partition_by in (None, STREAM_KEY)
        by_data = partitions > 1 and ordering == "key" and not self._by_stream
        self.key_field = partition_by if by_data else None
        """The field of `data` routing reads from every event (for the codec to decode with the batch), or None."""
        self._mine = [shard.owns(p) for p in range(partitions)]
        self._cache: dict[str, int] = {}
        """Partition of recently seen keys: most streams have far fewer keys than events."""

    def key_of(self, event: Event) -> str:
        """The partition key: events of one key are handled in stream order."""
        return self._key(event)

    def partition(self, event: Event) -> int:
        return self._partition_of(self._key(event))

    def _partition_of(self, key: str) -> int:
        p = self._cache.get(key)
        if p is None:
            if len(self._cache) >= 100_000:
                self._cache.clear()
            p = self._cache[key] = crc32(key.encode()) % self.partitions
        return p

    def route(self, events: list[Event], predicate: Predicate | None, skip: dict[int, Id] | None = None) -> Routed:
        """Filter and split a batch. An entry whose filtered or key field cannot be decoded is set apart as
        Poison; the batch is then filtered and split again without it (the rare, slow path)."""
        poison: list[Poison] = []
        try:
            kept = [e for e in events if predicate(e)] if predicate is not None else events
            parts, foreign = self._split(kept, skip)
        except DecodeError:
            events, poison = self._sift(events, predicate)
            kept = [e for e in events if predicate(e)] if predicate is not None else events
            parts, foreign = self._split(kept, skip)
        routed = sum(map(len, parts.values()))
        return Routed(parts, routed, foreign, poison, kept[0] if kept else None, len(events) - len(kept))

    def split(self, events: list[Event], skip: dict[int, Id] | None = None) -> dict[int, list[Event]]:
        """Group events by partition; with `skip`, drop those at or below their partition's checkpoint."""
        return self._split(events, skip)[0]

    def _split(self, events: list[Event], skip: dict[int, Id] | None) -> tuple[dict[int, list[Event]], int]:
        if not events:
            return {}, 0
        if self.partitions == 1 or self._by_stream:
            p = self.partition(events[0])  # a batch comes from one stream: one partition
            parts = {p: events} if self._mine[p] else {}
        else:
            parts = self._group(events)
        foreign = len(events) - sum(map(len, parts.values()))
        if skip:  # resuming: drop what each partition has already committed
            for p, below in skip.items():
                if p in parts:
                    parts[p] = [e for e in parts[p] if parse_id(e.stream_id) > below]
                    if not parts[p]:
                        del parts[p]
        return parts, foreign

    def _group(self, events: list[Event]) -> dict[int, list[Event]]:
        parts: dict[int, list[Event]] = {}
        cache, mine, partition_of = self._cache, self._mine, self._partition_of
        keys = self._decoded_keys(events)
        for event, k in zip(events, keys if keys is not None else map(self._key, events), strict=True):
            p = cache.get(k)
            if p is None:
                p = partition_of(k)
            if not mine[p]:
                continue
            bucket = parts.get(p)
            if bucket is None:
                parts[p] = [event]
            else:
                bucket.append(event)
        return parts

    def _decoded_keys(self, events: list[Event]) -> list[str] | None:
        """The keys the codec decoded with the batch (in one C loop), or None for events it did not make."""
        if self.key_field is None:
            return None
        try:
            return list(map(_decoded_key, events))
        except AttributeError:
            return None

    def _sift(self, events: list[Event], predicate: Predicate | None) -> tuple[list[Event], list[Poison]]:
        """The events whose filter and key can be computed, and the others as Poison."""
        good: list[Event] = []
        poison: list[Poison] = []
        for event in events:
            try:
                if predicate is None or predicate(event):
                    self._key(event)
            except DecodeError as error:
                poison.append(Poison.of(error))
            else:
                good.append(event)
        return good, poison


def _key_function(partition_by: str | None, ordering: str) -> Callable[[Event], str]:
    if ordering == "none":
        # no order promised: spread entries evenly, still the same partition for an entry in every run
        return lambda e: e.stream_id
    if partition_by is None or partition_by == STREAM_KEY:
        return lambda e: e.stream
    return partial(_data_key, partition_by)


_decoded_key = attrgetter("key")
"""The partition key `codec.LazyEvent` holds when the codec decoded it."""


def _data_key(field: str, event: Event) -> str:
    try:
        return event.key  # type: ignore[attr-defined,no-any-return] # the codec decoded it with the batch
    except AttributeError:
        # an event without the field goes with the others that lack it, as the article's "default" group does
        return str(event.data.get(field, "default"))  # str(): a number and its text are one key
