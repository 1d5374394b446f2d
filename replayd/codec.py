"""Entry fields -> `Event`, with the article's defaults; what cannot be decoded becomes a `Poison` record."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import orjson

from replayd.config import FieldNames
from replayd.events import Event

RawEntry = Sequence[Any]
"""An XRANGE/XREAD reply element as hiredis returns it: `[id, [field, value, field, value, ...]]`."""


class Poison(NamedTuple):
    """An entry that could not be decoded: counted, logged and accounted for, never a crash."""

    stream: str
    """The stream key."""
    stream_id: str
    """The entry ID."""
    fields: dict[str, str]
    """The raw fields, decoded leniently for display."""
    error: str
    """Why it could not be decoded."""


class Codec:
    """Decodes the entries of one stream. Field names are configurable for other producers."""

    def __init__(self, stream: str, names: FieldNames) -> None:
        self.stream = stream
        self._event_id = names.event_id.encode()
        self._event_type = names.event_type.encode()
        self._data = names.data.encode()
        self._timestamp = names.timestamp.encode()
        self._metadata = names.metadata.encode()

    def decode(self, entries: Sequence[RawEntry]) -> tuple[list[Event], list[Poison]]:
        events: list[Event] = []
        poison: list[Poison] = []
        for raw_id, flat in entries:
            stream_id = raw_id.decode()
            if flat is None:  # an entry deleted between listing and reading (XDEL): a tombstone
                poison.append(Poison(self.stream, stream_id, {}, "tombstone: entry has no fields"))
                continue
            it = iter(flat)
            fields: dict[bytes, bytes] = dict(zip(it, it, strict=False))  # Redis always sends field/value pairs
            try:
                events.append(self._event(stream_id, fields))
            except (ValueError, TypeError, UnicodeDecodeError) as exc:
                poison.append(Poison(self.stream, stream_id, _lenient(fields), f"{type(exc).__name__}: {exc}"))
        return events, poison

    def _event(self, stream_id: str, fields: dict[bytes, bytes]) -> Event:
        event_id = fields.get(self._event_id)
        event_type = fields.get(self._event_type)
        timestamp = fields.get(self._timestamp)
        return Event(
            stream_id,
            event_id.decode() if event_id is not None else stream_id,
            event_type.decode() if event_type is not None else "unknown",
            _object(fields.get(self._data), "data"),
            float(timestamp) if timestamp is not None else 0.0,
            _object(fields.get(self._metadata), "metadata"),
            self.stream,
        )


def _object(raw: bytes | None, name: str) -> dict[str, Any]:
    if raw is None:
        return {}
    value = orjson.loads(raw)  # orjson.JSONDecodeError is a ValueError
    if not isinstance(value, dict):
        raise TypeError(f"field {name!r} is JSON {type(value).__name__}, not an object")
    return value


def _lenient(fields: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in fields.items()}
