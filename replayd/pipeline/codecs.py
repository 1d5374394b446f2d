"""The entry shapes of common producers (`codec = "..."`), and codec plugins (`codec = "module:function"`).

Built-in shapes, each a set of entry field names over the one fast `Codec` (`--field` renames any of them):

- `article` (the default): `event_id`, `event_type`, `data` (a JSON object), `timestamp`, `metadata` (JSON).
- `payload`: `type` and one JSON `payload` field (`id`, `timestamp`, `metadata` when present).
- `flat`: every field is data, as text (`{"type": ..., "user_id": ...}`); `type`, `id`, `timestamp` when present.
- `cloudevents`: CloudEvents attributes as fields, `type`, `id`, `source`, `time` (RFC 3339), `specversion`...,
  or with the binary-mode prefix `ce_type`, `ce_id`, ...; `data` holds the JSON data; `metadata` is every other
  attribute (`source`, `specversion`, `subject`, extensions), without the prefix.

A plugin is a function `decode(entry: Entry) -> Event`, called once per entry. Whatever it raises (any
Exception) makes the entry poison, with the exception as the reason, and the job's `on_poison` policy applies;
so does returning something that is not an `Event`. An event whose `fields` the plugin left empty gets the
entry's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, ClassVar, NamedTuple

from replayd.config import FieldNames
from replayd.events import Event, Poison, RawValue
from replayd.pipeline.codec import (
    ARTICLE,
    Codec,
    Decoded,
    Lazy,
    LazyEvent,
    RawEntry,
    Shape,
    Whole,
    id_time,
    lenient,
    raw_fields,
)
from replayd.pipeline.router import Router


class Entry(NamedTuple):
    """What a codec plugin is given: one stream entry as read."""

    stream: str
    """The stream key."""
    stream_id: str
    """The entry ID, e.g. `1700000000000-0`."""
    fields: dict[str, RawValue]
    """The entry's fields: values as text, or bytes where they are not UTF-8."""


Plugin = Callable[[Entry], Event]
"""A codec plugin: one entry in, one `Event` out; raising makes the entry poison."""


def _flat_data(event: LazyEvent) -> dict[str, Any]:
    it = iter(event._flat)
    return {key.decode(): value.decode() for key, value in zip(it, it, strict=False)}


class FlatEvent(LazyEvent):
    """`data` is every field of the entry, as text."""

    __slots__ = ()

    data = Whole(_flat_data)
    json_data: ClassVar[bool] = False


_CE_OWN = frozenset({"id", "type", "time", "data"})
"""CloudEvents attributes an Event has its own place for; the others are `metadata`."""


def _rfc3339(raw: bytes) -> float:
    return datetime.fromisoformat(raw.decode()).timestamp()


def _ce_attributes(event: LazyEvent) -> dict[str, Any]:
    it = iter(event._flat)
    pairs = [(key.decode(), value.decode()) for key, value in zip(it, it, strict=False)]
    binary = any(key.startswith("ce_") for key, _ in pairs)
    named = ((key.removeprefix("ce_"), value) for key, value in pairs if not binary or key.startswith("ce_"))
    return {key: value for key, value in named if key not in _CE_OWN}


class CloudEvent(LazyEvent):
    """`timestamp` from the RFC 3339 `time`, `metadata` from the other attributes."""

    __slots__ = ()

    timestamp = Lazy(_rfc3339, id_time)
    metadata = Whole(_ce_attributes)


_OTHERS = {"event_id": "id", "event_type": "type", "timestamp": "timestamp", "metadata": "metadata"}

_OTHERS = {"event_id": "id", "event_type": "type", "timestamp": "timestamp", "metadata": "metadata"}

SHAPES = {
    "article": ARTICLE,
    "payload": Shape("payload", {**_OTHERS, "data": "payload"}),
    "flat": Shape("flat", {"event_id": "id", "event_type": "type", "timestamp": "timestamp"}, FlatEvent),
    "cloudevents": Shape("cloudevents", {**_OTHERS, "data": "data", "timestamp": "time"}, CloudEvent, "ce_"),
}
"""The built-in shapes by codec name (`config.BUILTIN_CODECS`)."""


def is_plugin(codec: str) -> bool:
    return codec not in SHAPES


def shape_of(codec: str, fields: FieldNames) -> Shape:
    """A built-in codec's shape, with the entry fields `fields` sets in place of its own."""
    return SHAPES[codec].mapped(fields)


CodecFactory = Callable[[str, Router | None], Codec]
"""Stream, router -> the codec of one stream's reader."""


def codec_factory(codec: str, fields: FieldNames, plugin: Plugin | None = None) -> CodecFactory:
    """What makes each stream's codec: a built-in shape's `Codec`, or `plugin` called entry by entry."""
    if plugin is not None:
        return lambda stream, router: PluginCodec(stream, plugin, codec, router)
    shape = shape_of(codec, fields)
    return lambda stream, router: Codec(stream, shape, router)


class PluginCodec(Codec):
    """Decodes entries with a plugin function, one call per entry (no lazy fields: the plugin decides)."""

    def __init__(self, stream: str, plugin: Plugin, name: str, router: Router | None = None) -> None:
        super().__init__(stream, ARTICLE, router)
        self._plugin = plugin
        self._name = name

    def decode(self, entries: Sequence[RawEntry]) -> Decoded:
        events: list[Event] = []
        poison: list[Poison] = []
        for raw_id, flat in entries:
            stream_id = raw_id.decode()
            if not flat:  # an entry deleted between listing and reading (XDEL): a tombstone
                self._reject(poison, raw_id, None, ValueError())
                continue
            entry = Entry(self.stream, stream_id, raw_fields(flat))
            try:
                event = self._plugin(entry)
                if not isinstance(event, Event):
                    raise TypeError(f"returned {type(event).__name__}, not an Event")  # noqa: TRY301 - one reason path
            except Exception as exc:  # noqa: BLE001 - the plugin's contract: whatever it raises makes the entry poison
                if self._keeps(stream_id):
                    poison.append(Poison(self.stream, stream_id, lenient(flat),
                                         f"codec {self._name}: {type(exc).__name__}: {exc}"))  # fmt: skip
                continue
            if not event.fields:
                event.fields = entry.fields
            events.append(event)
        return Decoded(events, poison, None)
