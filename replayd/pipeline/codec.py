"""Entry fields -> `Event`, with the article's defaults; what cannot be decoded becomes a `Poison` record.

Decoding is lazy where it costs: the entry ID, `event_id` and `event_type` (short texts every stage may log or
filter on) are decoded with the batch, `data`, `metadata` (JSON) and `timestamp` when first read. When the router
partitions by a field of `data`, that one field is decoded with the batch (the rest of the document is only
checked, not built) and the batch is split by partition in the same pass; a shard leaves the entries of other
shards' partitions unbuilt. An entry whose text fields cannot be decoded, or that has no fields (a tombstone), or
whose partition key cannot be read, is Poison at once; a JSON or timestamp field that cannot be decoded raises
`DecodeError` where it is first read: in a filter (the engine turns it into Poison before any handler runs) or in a
handler (`handlers` sends it to the same `on_poison` policy). A field nobody reads is never decoded, so it never
makes an entry poison.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, NamedTuple

import msgspec

from replayd.config import FieldNames
from replayd.errors import DecodeError
from replayd.events import Event, Poison
from replayd.pipeline.router import Partitioner, Router

RawEntry = Sequence[Any]
"""An XRANGE/XREAD reply element as hiredis returns it: `[id, [field, value, field, value, ...]]`."""


_decode_json = msgspec.json.Decoder().decode

_UNDECODABLE = (ValueError, TypeError, RecursionError)
"""What decoding a field raises: msgspec's errors and UnicodeDecodeError are ValueErrors; nesting deeper than
msgspec goes is a RecursionError."""


def _json_object(raw: bytes) -> dict[str, Any]:
    value = _decode_json(raw)
    if type(value) is not dict:
        raise TypeError(f"must be a JSON object, not {type(value).__name__}")
    return value


class _Lazy:
    """A field of `LazyEvent` decoded on its first read and kept in the event's `__dict__`.

    A non-data descriptor: once the value is in the instance dict, reads find it there and never call this.
    """

    __slots__ = ("decode", "default", "name")

    def __init__(self, decode: Callable[[bytes], Any], default: Callable[[], Any]) -> None:
        self.decode = decode
        self.default = default
        """The value when the entry lacks the field: a fresh `{}`, or 0.0."""
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, event: LazyEvent | None, owner: type | None = None) -> Any:
        if event is None:
            return self
        index = event._layout.get(self.name)
        try:
            value = self.default() if index is None else self.decode(event._flat[index])
        except _UNDECODABLE as exc:
            reason = f"{type(exc).__name__}: {self.name}: {exc}"
            raise DecodeError(event.stream, event.stream_id, _lenient(event._flat), reason) from None
        event.__dict__[self.name] = value
        return value


class LazyEvent(Event):
    """An `Event` whose `data`, `timestamp` and `metadata` are decoded when first read.

    Their values live in the instance dict, filled by `_Lazy` on the first read; later reads find them there.
    No `__getattr__`: on Python 3.11 a class with one pays for it on every attribute read, and a first read that
    falls through to it first builds an AttributeError. Only `Codec` makes them.
    """

    __slots__ = ("__dict__", "_flat", "_layout", "key")

    key: str
    """The partition key, when the codec decoded it with the batch (see `Codec`)."""

    _flat: list[bytes]
    """The entry's fields and values, as read."""
    _layout: dict[str, int]
    """Lazy field -> index of its value in `_flat` (absent: the entry lacks the field)."""

    data = _Lazy(_json_object, dict)
    timestamp = _Lazy(float, float)
    metadata = _Lazy(_json_object, dict)


def key_decoder(field: str) -> Callable[[bytes], Any]:
    """Decodes `field` of a JSON object into `.value` (`default` when absent), checking the rest of the document
    without building it: about half the cost of a full decode, and nothing to free."""

    class Key(msgspec.Struct, rename={"value": field}, gc=False):  # gc=False: freed at once, never in a cycle
        value: Any = "default"

    return msgspec.json.Decoder(Key).decode


class Decoded(NamedTuple):
    """A read batch, decoded."""

    events: list[Event]
    """In stream order: routing by a field of `data`, only this shard's; else every entry that decoded."""
    poison: list[Poison]
    """This shard's entries that could not be decoded (`Router.keeps`)."""
    parts: dict[int, list[Event]] | None
    """Routing by a field of `data`: `events` split by partition."""


class Codec:
    """Decodes the entries of one stream. Field names are configurable for other producers.

    A producer writes its fields in the same order every time, so the positions of the five fields are
    learnt once per field layout and each entry is then read by index: no per-entry dict (the hot path).
    Given the `router`: when it routes by a field of `data`, that field is decoded into each event's `key` and
    the batch is split by partition in the same pass, an entry of another shard's partition left unbuilt (that
    shard decodes it); an entry that cannot be decoded is reported by the shard the router says keeps it.
    """

    def __init__(self, stream: str, names: FieldNames, router: Router | None = None) -> None:
        self.stream = stream
        self._names = names
        self._key: Callable[[bytes], Any] | None = None
        self._partitioner: Partitioner | None = None
        """Routing by a field of `data`: the events' partitions, and which are this shard's."""
        self._keeps: Callable[[str], bool] = _always
        """Whether this shard reports an undecodable entry (by its ID) that no key places in its partitions."""
        if router is not None:
            self._keeps = partial(router.keeps, stream)
            if router.key_field is not None:
                self._key, self._partitioner = key_decoder(router.key_field), router.partitioner
        self._keys: list[bytes] = []
        self._texts: tuple[int | None, int | None] = (None, None)
        self._layout: dict[str, int] = {}

    def decode(self, entries: Sequence[RawEntry]) -> Decoded:
        events: list[Event] = []
        poison: list[Poison] = []
        append, decode_key, new = events.append, self._key, object.__new__
        split = self._partitioner
        parts: dict[int, list[Event]] = {}
        mine = split.mine if split is not None else []
        stream, keys, layout, (i_id, i_type) = self.stream, self._keys, self._layout, self._texts
        i_data = layout.get("data")
        for raw_id, flat in entries:
            try:
                if flat[::2] != keys:
                    keys = self._learn(flat[::2])
                    layout, (i_id, i_type) = self._layout, self._texts
                    i_data = layout.get("data")
                if decode_key is not None:
                    key = decode_key(flat[i_data]).value if i_data is not None else "default"
                    key = key if type(key) is str else str(key)  # a number and its text are one key
            except _UNDECODABLE as exc:  # no fields (a tombstone), or `data` no key can be read from
                self._reject(poison, raw_id, flat, exc)
                continue
            if split is not None:
                p = split[key]
                if not mine[p]:
                    continue  # another shard's partition: that shard decodes this entry
            try:
                # the slots filled here, not in an __init__: a class call costs a third of the rest of the loop
                event = new(LazyEvent)
                event.stream_id = stream_id = raw_id.decode()
                event.event_id = flat[i_id].decode() if i_id is not None else stream_id
                event.event_type = flat[i_type].decode() if i_type is not None else "unknown"
            except _UNDECODABLE as exc:  # a text field that is not UTF-8; with a split, in this shard's partition
                self._reject(poison, raw_id, flat, exc, placed=split is not None)
                continue
            event.stream = stream
            event._flat = flat
            event._layout = layout
            append(event)
            if split is not None:
                event.key = key
                bucket = parts.get(p)
                if bucket is None:
                    parts[p] = [event]
                else:
                    bucket.append(event)
        return Decoded(events, poison, parts if split is not None else None)

    def _learn(self, keys: list[bytes]) -> list[bytes]:
        positions = {key: 2 * index + 1 for index, key in enumerate(keys)}
        names = self._names
        self._texts = (positions.get(names.event_id.encode()), positions.get(names.event_type.encode()))
        lazy = {"data": names.data, "timestamp": names.timestamp, "metadata": names.metadata}
        self._layout = {field: positions[name.encode()] for field, name in lazy.items() if name.encode() in positions}
        self._keys = keys
        return keys

    def _reject(
        self, poison: list[Poison], raw_id: bytes, flat: list[bytes] | None, exc: Exception, *, placed: bool = False
    ) -> None:
        """Set an undecodable entry apart, if it is this shard's to report: `placed` in one of its partitions by its
        key, else as `keeps` says (an entry with no key to route it by is in no shard's partitions)."""
        stream_id = raw_id.decode()
        if placed or self._keeps(stream_id):
            poison.append(self._poison(stream_id, flat, exc))

    def _poison(self, stream_id: str, flat: list[bytes] | None, exc: Exception) -> Poison:
        if flat is None:  # an entry deleted between listing and reading (XDEL): a tombstone
            return Poison(self.stream, stream_id, {}, "tombstone: entry has no fields")
        field = "data: " if isinstance(exc, msgspec.MsgspecError) else ""  # only the partition key uses msgspec here
        return Poison(self.stream, stream_id, _lenient(flat), f"{type(exc).__name__}: {field}{exc}")


def _always(stream_id: str) -> bool:
    return True


def _lenient(flat: list[bytes]) -> dict[str, str]:
    """The fields as text, for display and dead letters, whatever their bytes."""
    it = iter(flat)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in zip(it, it, strict=False)}


def decode_all(events: Sequence[Event]) -> tuple[list[Event], list[Poison]]:
    """Decode every field of `events` now: those that decode, and the others as Poison."""
    good: list[Event] = []
    poison: list[Poison] = []
    for event in events:
        try:
            event.astuple()
        except DecodeError as error:
            poison.append(Poison.of(error))
        else:
            good.append(event)
    return good, poison
