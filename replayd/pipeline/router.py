"""Partition key -> partition: a stable crc32 hash, so an event lands in the same partition in every run."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, NamedTuple
from zlib import crc32

from replayd.errors import DecodeError
from replayd.events import MISSING, STREAM_KEY, WHOLE, Event, Id, PartitionBy, Poison, Shard, parse_id, path_getter

__all__ = ["STREAM_KEY", "UNKEYED", "PartitionBy", "Partitioner", "Routed", "Router"]

Predicate = Callable[[Event], bool]


class _Unkeyed(str):
    __slots__ = ()


UNKEYED: str = _Unkeyed("default")
"""The partition key of an event without one: the article's "default" group, told apart by its type so that
such events are counted (`Partitioner.unkeyed`)."""


class Routed(NamedTuple):
    """This shard's share of one read batch, routed."""

    parts: dict[int, list[Event]]
    """Partition -> its events of the batch, in stream order (only this shard's partitions)."""
    routed: int
    """Events in `parts`."""
    skipped: int
    """This shard's events the filter left out, or (resuming) that its partitions had already committed."""
    poison: list[Poison]
    """This shard's entries whose filtered field or partition key cannot be decoded (`Router.keeps`)."""

    @property
    def first(self) -> Event | None:
        """The first event handed to handlers, for pacing."""
        return min((events[0] for events in self.parts.values()), key=_position, default=None)


class Partitioner:
    """Partition key -> partition (`partitioner[key]`): crc32 of the key's UTF-8 bytes, mod P.

    Computed for every event, not remembered per key: with thousands of keys, a dict of them costs more (its
    lookups miss the CPU's caches) than the hash does (16 partitions, 10,000 customers: 0.7 µs per event more,
    10 of 10 paired runs). `Codec.decode` computes it inline, the same way (tests/test_router.py checks)."""

    def __init__(self, partitions: int, mine: list[bool]) -> None:
        self.partitions = partitions
        self.mine = mine
        """Partition -> whether this shard handles it."""
        self.unkeyed = 0
        """This shard's events that had no partition key (they go with the key "default"): `take_unkeyed`."""

    def take_unkeyed(self) -> int:
        """The events without a partition key since the last call."""
        count, self.unkeyed = self.unkeyed, 0
        return count

    def __getitem__(self, key: str) -> int:
        return crc32(key.encode()) % self.partitions


class Router:
    """Splits a decoded batch into this shard's partitions, keeping stream order within each."""

    def __init__(self, partitions: int, *, partition_by: PartitionBy, ordering: str, shard: Shard = WHOLE) -> None:
        self.partitions = partitions
        self.shard = shard
        self.partition_by = getattr(partition_by, "__qualname__", partition_by)
        """What orders events, for messages: the path, or the function's name."""
        self._key = _key_function(partition_by, ordering)
        self._by_stream = ordering == "key" and partition_by in (None, STREAM_KEY)
        by_data = partitions > 1 and ordering == "key" and not self._by_stream
        self.key_field = _data_field(partition_by) if by_data else None
        """The field of `data` routing reads from every event (for the codec to decode with the batch), or None."""
        self.key_entry_field = _entry_field(partition_by) if by_data else None
        """The entry field (`fields.<name>`) routing reads from every event (the codec reads it with the batch)."""
        self.partitioner = Partitioner(partitions, [shard.owns(p) for p in range(partitions)])
        """With `key_field`, the codec splits each batch as it decodes it (one pass), and leaves other shards'
        entries unbuilt."""

    def key_of(self, event: Event) -> str:
        """The partition key: events of one key are handled in stream order."""
        return self._key(event)

    def partition(self, event: Event) -> int:
        return self.partitioner[self._key(event)]

    def keeps(self, stream: str, stream_id: str) -> bool:
        """Whether this shard reports an entry it read and cannot place by its content (undecodable, too large):
        the owner of its partition where that does not depend on the content (one partition, by stream,
        `ordering = "none"`), else shard 0 (routing by a field of `data`, such an entry has no key to go by)."""
        if self.shard.total == 1:
            return True
        mine = self.partitioner.mine
        if self.key_field is not None or self.partitions == 1:
            return mine[0]
        return mine[self.partitioner[stream if self._by_stream else stream_id]]

    def own(self, entries: Sequence[Poison]) -> list[Poison]:
        """The entries of `entries` this shard reports (`keeps`)."""
        return [e for e in entries if self.keeps(e.stream, e.stream_id)]

    def route(
        self,
        events: list[Event],
        predicate: Predicate | None,
        skip: dict[int, Id] | None = None,
        parts: dict[int, list[Event]] | None = None,
    ) -> Routed:
        """Split a batch into this shard's partitions (`parts`: the codec's split of `events`, when it made one),
        then filter it and, resuming, drop what each partition has committed. An entry whose key or (in this
        shard) filtered field cannot be decoded is set apart as Poison; the batch is then split and filtered again
        without it (the rare, slow path)."""
        try:
            return self._filter(parts if parts is not None else self._split(events), predicate, skip, [])
        except DecodeError:
            events, poison = self._sift(events, predicate)
            return self._filter(self._split(events), predicate, skip, poison)

    def split(self, events: list[Event], skip: dict[int, Id] | None = None) -> dict[int, list[Event]]:
        """This shard's partitions of `events`; with `skip`, without those at or below their partition's checkpoint."""
        return self._filter(self._split(events), None, skip, []).parts

    def _split(self, events: list[Event]) -> dict[int, list[Event]]:
        if not events:
            return {}
        if self.partitions == 1 or self._by_stream:
            p = self.partition(events[0])  # a batch comes from one stream: one partition
            return {p: events} if self.partitioner.mine[p] else {}
        return self._group(events)

    @staticmethod
    def _filter(
        parts: dict[int, list[Event]], predicate: Predicate | None, skip: dict[int, Id] | None, poison: list[Poison]
    ) -> Routed:
        owned = sum(map(len, parts.values()))
        if predicate is not None:
            parts = {p: kept for p, events in parts.items() if (kept := [e for e in events if predicate(e)])}
        if skip:  # resuming: drop what each partition has already committed
            for p, below in skip.items():
                if p in parts:
                    parts[p] = [e for e in parts[p] if parse_id(e.stream_id) > below]
                    if not parts[p]:
                        del parts[p]
        routed = sum(map(len, parts.values())) if predicate is not None or skip else owned
        return Routed(parts, routed, owned - routed, poison)

    def _group(self, events: list[Event]) -> dict[int, list[Event]]:
        parts: dict[int, list[Event]] = {}
        key, partition, mine = self._key, self.partitioner, self.partitioner.mine
        for event in events:
            k = key(event)
            p = partition[k]
            if not mine[p]:
                continue
            if type(k) is not str:  # UNKEYED
                partition.unkeyed += 1
            bucket = parts.get(p)
            if bucket is None:
                parts[p] = [event]
            else:
                bucket.append(event)
        return parts

    def _sift(self, events: list[Event], predicate: Predicate | None) -> tuple[list[Event], list[Poison]]:
        """The events whose key and (in this shard) filter can be computed, and this shard's others as Poison."""
        good: list[Event] = []
        poison: list[Poison] = []
        for event in events:
            try:
                p = self.partition(event)
            except DecodeError as error:  # no key to route by: in no partition
                if self.keeps(event.stream, event.stream_id):
                    poison.append(Poison.of(error))
                continue
            try:
                if predicate is not None and self.partitioner.mine[p]:
                    predicate(event)
            except DecodeError as error:
                poison.append(Poison.of(error))
            else:
                good.append(event)
        return good, poison


def _position(event: Event) -> Id:
    return parse_id(event.stream_id)


def _key_function(partition_by: PartitionBy, ordering: str) -> Callable[[Event], str]:
    if ordering == "none":
        # no order promised: spread entries evenly, still the same partition for an entry in every run
        return lambda e: e.stream_id
    if partition_by is None or partition_by == STREAM_KEY:
        return lambda e: e.stream
    field = _data_field(partition_by)
    if field is not None:
        return partial(_data_key, field)
    name = _entry_field(partition_by)
    if name is not None:
        return partial(_entry_key, name)
    get = partition_by if callable(partition_by) else path_getter(partition_by, bare="data")
    return lambda e: _key_text(get(e))


def _data_field(partition_by: PartitionBy) -> str | None:
    """The field of `data` that `partition_by` names (a bare name, or `data.<name>`), or None."""
    if not isinstance(partition_by, str) or partition_by == STREAM_KEY:
        return None
    head, _, rest = partition_by.partition(".")
    if head in ("fields", "metadata") and rest:
        return None
    if head == "data":
        return rest if rest and "." not in rest else None
    return partition_by


def _entry_field(partition_by: PartitionBy) -> str | None:
    """The entry field that `partition_by` names (`fields.<name>`), or None."""
    if not isinstance(partition_by, str) or not partition_by.startswith("fields."):
        return None
    return partition_by.removeprefix("fields.") or None


def _entry_key(name: str, event: Event) -> str:
    try:
        return event.key  # type: ignore[attr-defined,no-any-return] # the codec read it with the batch
    except AttributeError:
        return _key_text(event.fields.get(name, MISSING))


def _data_key(field: str, event: Event) -> str:
    try:
        return event.key  # type: ignore[attr-defined,no-any-return] # the codec decoded it with the batch
    except AttributeError:
        value = event.data.get(field, MISSING)
        return UNKEYED if value is MISSING else str(value)  # as the codec's key: a JSON null is "None"


def _key_text(value: Any) -> str:
    # an event without a key goes with the others that lack it, as the article's "default" group does (counted)
    return UNKEYED if value is MISSING or value is None else str(value)  # str(): a number and its text are one key
