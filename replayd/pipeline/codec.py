"""Entry fields -> `Event`, with the article's defaults; what cannot be decoded becomes a `Poison` record.

A `Shape` says which entry fields hold what (the article's by default; `codecs` has the other producers' shapes).
The entry ID, `event_id` and `event_type` (short texts every stage may log or filter on) are decoded with the
batch; a JSON `data` just before a handler gets its events (`decode_data`: nearly every handler reads it), or where
something reads it first; `metadata` (JSON), `timestamp` and `fields` (every entry field, raw) when first read.
When the router partitions by a field of `data`, `data` is decoded with the batch, its key read from it, and the
batch is split by partition in the same pass; a shard leaves the entries of other shards' partitions unbuilt. An
entry whose text fields cannot be decoded, or that has no fields (a tombstone), or whose partition key cannot be
read, is Poison at once; a JSON or timestamp field that cannot be decoded raises `DecodeError` where it is first
read: in a filter (the engine turns it into Poison before any handler runs) or in a handler (`handlers` sends it to
the same `on_poison` policy). A field nobody reads never makes an entry poison.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, ClassVar, NamedTuple
from zlib import crc32

import msgspec

from replayd.config import FieldNames
from replayd.errors import DecodeError
from replayd.events import Event, Poison, RawValue
from replayd.pipeline.router import UNKEYED, Partitioner, Router

RawEntry = Sequence[Any]
"""An XRANGE/XREAD reply element as hiredis returns it: `[id, [field, value, field, value, ...]]`."""


_decode_json = msgspec.json.Decoder().decode
UNSET = msgspec.UNSET


_UNDECODABLE = (ValueError, TypeError, RecursionError)
"""What decoding a field raises: msgspec's errors and UnicodeDecodeError are ValueErrors; nesting deeper than
msgspec goes is a RecursionError."""


def _json_object(raw: bytes) -> dict[str, Any]:
    value = _decode_json(raw)
    if type(value) is not dict:
        raise TypeError(f"must be a JSON object, not {type(value).__name__}")
    return value


def _empty(event: LazyEvent) -> dict[str, Any]:
    return {}


def id_time(event: LazyEvent) -> float:
    """The entry ID's time in seconds: Redis's clock when the entry was added, the time of an entry without one."""
    return int(event.stream_id.partition("-")[0]) / 1000


class Lazy:
    """A field of `LazyEvent` decoded on its first read and kept in the event's `__dict__`.

    A non-data descriptor: once the value is in the instance dict, reads find it there and never call this.
    """

    __slots__ = ("decode", "default", "name")

    def __init__(self, decode: Callable[[bytes], Any], default: Callable[[LazyEvent], Any]) -> None:
        self.decode = decode
        self.default = default
        """The value when the entry lacks the field: a fresh `{}`, or the entry ID's time."""
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, event: LazyEvent | None, owner: type | None = None) -> Any:
        if event is None:
            return self
        index = event._layout.get(self.name)
        try:
            value = self.default(event) if index is None else self.decode(event._flat[index])
        except _UNDECODABLE as exc:
            reason = f"{type(exc).__name__}: {self.name}: {exc}"
            raise DecodeError(event.stream, event.stream_id, lenient(event._flat), reason) from None
        event.__dict__[self.name] = value
        return value


class Whole:
    """A field of `LazyEvent` made from all of the entry's fields on its first read (`fields`, a flat entry's
    `data`): `build` takes the event and returns the value, or raises ValueError (the entry is then poison)."""

    __slots__ = ("build", "name")

    def __init__(self, build: Callable[[LazyEvent], Any]) -> None:
        self.build = build
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, event: LazyEvent | None, owner: type | None = None) -> Any:
        if event is None:
            return self
        try:
            value = self.build(event)
        except _UNDECODABLE as exc:
            reason = f"{type(exc).__name__}: {self.name}: {exc}"
            raise DecodeError(event.stream, event.stream_id, lenient(event._flat), reason) from None
        event.__dict__[self.name] = value
        return value


def raw_fields(flat: list[bytes]) -> dict[str, RawValue]:
    """Every field of an entry: names as text, values as text or, where they are not UTF-8, bytes."""
    it = iter(flat)
    return {key.decode(errors="replace"): _text_or_bytes(value) for key, value in zip(it, it, strict=False)}


def _event_fields(event: LazyEvent) -> dict[str, RawValue]:
    return raw_fields(event._flat)


def _text_or_bytes(value: bytes) -> RawValue:
    try:
        return value.decode()
    except UnicodeDecodeError:
        return value


class LazyEvent(Event):
    """An `Event` whose `data` (unless decoded already: `decode_data`, routing by a field of it), `timestamp`,
    `metadata` and `fields` are decoded when first read.

    Their values live in the instance dict, filled by `Lazy` on the first read; later reads find them there.
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

    data = Lazy(_json_object, _empty)
    timestamp = Lazy(float, id_time)
    metadata = Lazy(_json_object, _empty)
    fields = Whole(_event_fields)

    json_data: ClassVar[bool] = True
    """`data` is one JSON field: routing by a field of it decodes `data` with the batch and reads the key from it."""


ROLES = ("event_id", "event_type", "data", "timestamp", "metadata")
"""What entry fields hold, as `FieldNames` names them."""


class Shape(NamedTuple):
    """How a producer lays its events out in entry fields: the entry field of each of `ROLES`, and the event
    class whose lazy fields decode them."""

    name: str
    names: dict[str, str]
    """Role -> the entry field holding it (a role not named: the event's default)."""
    event: type[LazyEvent] = LazyEvent
    prefix: str = ""
    """An entry that has `<prefix><name>` fields uses them (CloudEvents' `ce_type`... beside `type`...)."""

    def mapped(self, fields: FieldNames) -> Shape:
        """This shape with the entry fields `fields` names (set ones only) in place of its own."""
        chosen = {role: name for role in ROLES if (name := getattr(fields, role)) is not None}
        return self._replace(names={**self.names, **chosen}) if chosen else self

    def layout_names(self, keys: list[bytes]) -> dict[str, bytes]:
        """Role -> entry field name, for an entry with fields `keys`."""
        prefixed = bool(self.prefix) and any(key.startswith(self.prefix.encode()) for key in keys)
        return {role: (self.prefix + name if prefixed and role != "data" else name).encode()
                for role, name in self.names.items() if name}  # fmt: skip


ARTICLE = Shape("article", {role: role for role in ROLES})
"""The article's entries: `event_id`, `event_type`, `data` (JSON), `timestamp`, `metadata` (JSON)."""


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
    Given the `router`: when it routes by a field of `data`, `data` is decoded whole into the event (handlers
    read it: decoding the key field alone, then all of it on the handler's read, cost half a decode more and a
    lazy read per event) and its key is read from it; by an entry field (`fields.<name>`), that field's text is
    the key. Either way the key goes into each event's `key` and the batch is split by partition in the same
    pass, an entry of another shard's partition left unbuilt (that shard decodes it); an entry that cannot be
    decoded is reported by the shard the router says keeps it.
    """

    def __init__(self, stream: str, shape: Shape | FieldNames = ARTICLE, router: Router | None = None) -> None:
        self.stream = stream
        self._shape = shape if isinstance(shape, Shape) else ARTICLE.mapped(shape)
        self._event = self._shape.event
        self._by_data: str | None = None
        """Routing by a field of `data`: its name."""
        self._key_field: bytes | None = None
        """Routing by an entry field: its name (the key is its value)."""
        self._partitioner: Partitioner | None = None
        """Routing by a field of `data`: the events' partitions, and which are this shard's."""
        self._keeps: Callable[[str], bool] = _always
        """Whether this shard reports an undecodable entry (by its ID) that no key places in its partitions."""
        if router is not None:
            self._keeps = partial(router.keeps, stream)
            if router.key_field is not None and self._event.json_data:
                self._by_data, self._partitioner = router.key_field, router.partitioner
            elif router.key_entry_field is not None:
                self._key_field, self._partitioner = router.key_entry_field.encode(), router.partitioner
        self._i_key: int | None = None
        """Where the key is in an entry of the current layout (None: not there)."""
        self._keys: list[bytes] = []
        self._texts: tuple[int | None, int | None] = (None, None)
        self._layout: dict[str, int] = {}

    def decode(self, entries: Sequence[RawEntry]) -> Decoded:
        events: list[Event] = []
        poison: list[Poison] = []
        append, new, kind, by_data = events.append, object.__new__, self._event, self._by_data
        split = self._partitioner
        parts: defaultdict[int, list[Event]] = defaultdict(list)
        mine, partitions = (split.mine, split.partitions) if split is not None else ([], 1)
        stream, keys, layout, (i_id, i_type), i_key = self.stream, self._keys, self._layout, self._texts, self._i_key
        key: Any
        data: dict[str, Any] | None = None
        for raw_id, flat in entries:
            placed = False
            try:
                if flat[::2] != keys:
                    keys = self._learn(flat[::2])
                    layout, (i_id, i_type), i_key = self._layout, self._texts, self._i_key
                if split is not None:
                    if by_data is not None:
                        data = _json_object(flat[i_key]) if i_key is not None else {}
                        key = data.get(by_data, UNSET)
                    else:
                        key = _text_or_bytes(flat[i_key]) if i_key is not None else UNSET
                    # a number and its text are one key; no key at all is UNKEYED, counted below
                    key = key if type(key) is str else UNKEYED if key is UNSET else str(key)
                    p = crc32(key.encode()) % partitions  # `Partitioner`'s own formula: a method call cost 0.07 us
                    if not mine[p]:
                        continue  # another shard's partition: that shard decodes this entry
                    placed = True
                # the slots filled here, not in an __init__: a class call costs a third of the rest of the loop
                event = new(kind)
                event.stream_id = stream_id = raw_id.decode()
                event.event_id = flat[i_id].decode() if i_id is not None else stream_id
                event.event_type = flat[i_type].decode() if i_type is not None else "unknown"
            except _UNDECODABLE as exc:
                # no fields (a tombstone), `data` that is not a JSON object (routing by a field of it), or a text
                # field that is not UTF-8 (with a split, in this shard's partition)
                self._reject(
                    poison, raw_id, flat, exc, placed=placed, field="" if placed or split is None else "data: "
                )
                continue
            event.stream = stream
            event._flat = flat
            event._layout = layout
            append(event)
            if placed:
                event.key = key
                if data is not None:
                    event.data = data
                parts[p].append(event)
        return Decoded(events, poison, self._count_unkeyed(parts))

    def _count_unkeyed(self, parts: dict[int, list[Event]]) -> dict[int, list[Event]] | None:
        """The batch's split (None: no split), its events without a key counted (they are UNKEYED, so in the
        partition of "default"): reported, not silently more events of the key "default"."""
        split = self._partitioner
        if split is None:
            return None
        split.unkeyed += sum(type(e.key) is not str for e in parts.get(split[UNKEYED], ()))  # type: ignore[attr-defined]
        return dict(parts)  # a plain dict: a later lookup of a partition the batch lacks must not add it

    def _learn(self, keys: list[bytes]) -> list[bytes]:
        positions = {key: 2 * index + 1 for index, key in enumerate(keys)}
        names = self._shape.layout_names(keys)
        self._texts = (positions.get(names.get("event_id", b"")), positions.get(names.get("event_type", b"")))
        lazy = ("data", "timestamp", "metadata")
        self._layout = {role: positions[names[role]] for role in lazy if names.get(role, b"") in positions}
        self._i_key = self._layout.get("data") if self._key_field is None else positions.get(self._key_field)
        self._keys = keys
        return keys

    def _reject(
        self,
        poison: list[Poison],
        raw_id: bytes,
        flat: list[bytes] | None,
        exc: Exception,
        *,
        placed: bool = False,
        field: str = "",
    ) -> None:
        """Set an undecodable entry apart, if it is this shard's to report: `placed` in one of its partitions by its
        key, else as `keeps` says (an entry with no key to route it by is in no shard's partitions). `field`
        prefixes the reason (`data: `)."""
        stream_id = raw_id.decode()
        if placed or self._keeps(stream_id):
            poison.append(self._poison(stream_id, flat, exc, field))

    def _poison(self, stream_id: str, flat: list[bytes] | None, exc: Exception, field: str = "") -> Poison:
        if flat is None:  # an entry deleted between listing and reading (XDEL): a tombstone
            return Poison(self.stream, stream_id, {}, "tombstone: entry has no fields")
        return Poison(self.stream, stream_id, lenient(flat), f"{type(exc).__name__}: {field}{exc}")


def decode_data(events: Sequence[Event]) -> None:
    """Decode the JSON `data` of a slice's events in one loop, just before a handler gets them: nearly every handler
    reads it, and a lazy first read per event cost as much again as the decode. Done by the lanes rather than with
    the batch: for a handler that awaits, the router's decoding holds the event loop, and reads are sized to keep
    it short. One that is not a JSON object is left to `Lazy`, whose read raises: it makes its entry poison only
    where something reads it. Events of other codecs, and those decoded already (routing by a field of `data`),
    are left as they are. A slice whose first and last events have their `data` is left whole: the codec decoded
    the batch's (looking at each event cost 0.05 us an event), or a filter read those (the others decode when
    read). Not the first alone: routing one partition by a field of `data` reads the first event's."""
    if not events or not getattr(events[0], "json_data", False):
        return
    if "data" in events[0].__dict__ and "data" in events[-1].__dict__:
        return
    decode = _decode_json
    for event in events:
        values = event.__dict__
        index = event._layout.get("data")  # type: ignore[attr-defined]
        if index is None or "data" in values:
            continue
        try:
            value = decode(event._flat[index])  # type: ignore[attr-defined]
        except _UNDECODABLE:
            continue
        if type(value) is dict:
            values["data"] = value


def _always(stream_id: str) -> bool:
    return True


def lenient(flat: list[bytes]) -> dict[str, str]:
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
