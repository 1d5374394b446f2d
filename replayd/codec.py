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
    """Decodes the entries of one stream. Field names are configurable for other producers.

    A producer writes its fields in the same order every time, so the positions of the five fields are
    learnt once per field layout and each entry is then read by index: no per-entry dict (the hot path).
    """

    def __init__(self, stream: str, names: FieldNames) -> None:
        self.stream = stream
        self._names = [n.encode() for n in (names.event_id, names.event_type, names.data, names.timestamp,
                                              names.metadata)]  # fmt: skip
        self._keys: list[bytes] = []
        self._positions: tuple[int | None, ...] = (None,) * 5

    def decode(self, entries: Sequence[RawEntry]) -> tuple[list[Event], list[Poison]]:
        events: list[Event] = []
        poison: list[Poison] = []
        append = events.append
        new, stream, loads = tuple.__new__, self.stream, orjson.loads
        for raw_id, flat in entries:
            stream_id = raw_id.decode()
            try:
                keys = flat[::2]
                if keys != self._keys:
                    self._learn(keys)
                i_id, i_type, i_data, i_ts, i_meta = self._positions
                data = loads(flat[i_data]) if i_data is not None else {}
                metadata = loads(flat[i_meta]) if i_meta is not None else {}
                if type(data) is not dict or type(metadata) is not dict:
                    raise TypeError("data and metadata must be JSON objects")  # noqa: TRY301 - one poison path
                append(new(Event, (
                    stream_id,
                    flat[i_id].decode() if i_id is not None else stream_id,
                    flat[i_type].decode() if i_type is not None else "unknown",
                    data,
                    float(flat[i_ts]) if i_ts is not None else 0.0,
                    metadata,
                    stream,
                )))  # fmt: skip
            except (ValueError, TypeError, UnicodeDecodeError) as exc:
                poison.append(self._poison(stream_id, flat, exc))
        return events, poison

    def _learn(self, keys: list[bytes]) -> None:
        positions = {key: 2 * index + 1 for index, key in enumerate(keys)}
        self._positions = tuple(positions.get(name) for name in self._names)
        self._keys = keys

    def _poison(self, stream_id: str, flat: list[bytes] | None, exc: Exception) -> Poison:
        if flat is None:  # an entry deleted between listing and reading (XDEL): a tombstone
            return Poison(self.stream, stream_id, {}, "tombstone: entry has no fields")
        it = iter(flat)
        fields = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in zip(it, it, strict=False)}
        return Poison(self.stream, stream_id, fields, f"{type(exc).__name__}: {exc}")
