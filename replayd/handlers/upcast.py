"""Upcasting: old versions of an event type are turned into the current one before filters and handlers see them.

An upcaster takes the `data` of version N of one event type and returns the `data` of version N+1. An event's
version is read from `metadata.schema_version` (configurable; an event without it is version 1), and its
upcasters run in a chain, N -> N+1 -> ... -> the newest version, which the event's version field then says. An
upcaster is plain code over one event, so an error in it happens again on every attempt: the event is poison
(`on_poison`), never retried.

    UPCASTERS = Upcasters()

    @UPCASTERS.register("OrderCreated", 1)
    def total_in_cents(data):  # v1 -> v2
        return {**data, "total_cents": round(data.pop("total") * 100)}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import msgspec

from replayd.errors import ConfigError, DecodeError
from replayd.events import Event

Upcast = Callable[[dict[str, Any]], dict[str, Any]]
"""Version N's `data` -> version N+1's."""

U = TypeVar("U", bound=Upcast)

VERSION = "metadata.schema_version"
"""Where an event's version is read by default."""


class Upcasters:
    """The upcasters of a projection or a job, by event type and the version each one upgrades from."""

    def __init__(
        self, steps: Mapping[tuple[str, int], Upcast] | None = None, *, version: str = VERSION, first: int = 1
    ) -> None:
        """`steps`: `(event_type, version) -> upcaster` (or use `register`). `version`: where the version is,
        `metadata.<field>` or `data.<field>`. `first`: the version of an event without that field."""
        place, _, field = version.partition(".")
        if place not in ("metadata", "data") or not field or "." in field:
            raise ConfigError(f"upcasters: version {version!r} must be metadata.<field> or data.<field>")
        self.place, self.field, self.first = place, field, first
        self._steps: dict[str, dict[int, Upcast]] = {}
        for (event_type, since), upcast in (steps or {}).items():
            self.register(event_type, since)(upcast)

    def register(self, event_type: str, version: int) -> Callable[[U], U]:
        """Decorator: the function upgrades `event_type` from `version` to `version + 1`."""

        def add(upcast: U) -> U:
            chain = self._steps.setdefault(event_type, {})
            if version in chain:
                raise ConfigError(f"upcasters: two upcasters of {event_type} from version {version}")
            chain[version] = upcast
            _check_chain(event_type, chain)
            return upcast

        return add

    def apply(self, events: list[Event]) -> tuple[list[Event], list[DecodeError], bool]:
        """Upcast `events` in place: those kept, in order; the poison ones (an upcaster raised, or the version
        cannot be read); and whether any event's `data` changed."""
        steps = self._steps
        kept: list[Event] = []
        poison: list[DecodeError] = []
        changed = False
        for event in events:
            chain = steps.get(event.event_type)
            if chain is not None:
                try:
                    changed = self._upcast(event, chain) or changed
                except DecodeError as error:
                    poison.append(error)
                    continue
            kept.append(event)
        return kept, poison, changed

    def _upcast(self, event: Event, chain: dict[int, Upcast]) -> bool:
        """Run the chain from the event's version; True if it was older than the newest."""
        holder = event.metadata if self.place == "metadata" else event.data
        version = _version(event, holder.get(self.field, self.first))
        if version not in chain:
            return False
        data = event.data
        while version in chain:
            try:
                data = chain[version](dict(data))
            except Exception as exc:
                reason = f"upcaster of {event.event_type} v{version} raised {type(exc).__name__}: {exc}"
                raise _poison(event, reason) from exc
            if not isinstance(data, dict):
                raise _poison(event, f"upcaster of {event.event_type} v{version} returned {type(data).__name__}, "
                                     "not a dict")  # fmt: skip
            version += 1
        if self.place == "metadata":
            event.metadata = {**event.metadata, self.field: version}
        else:
            data = {**data, self.field: version}
        event.data = data
        try:  # the partition key the codec read from the stored `data`: routing reads it afresh
            del event.key  # type: ignore[attr-defined]
        except AttributeError:
            pass
        return True


def _check_chain(event_type: str, chain: dict[int, Upcast]) -> None:
    versions = sorted(chain)
    missing = sorted(set(range(versions[0], versions[-1])) - set(versions))
    if missing:
        raise ConfigError(f"upcasters of {event_type}: none from version {missing[0]}, so the chain from "
                          f"v{versions[0]} to v{versions[-1] + 1} is broken")  # fmt: skip


def _version(event: Event, value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    raise _poison(event, f"version {value!r} of {event.event_type} is not a whole number")


def _poison(event: Event, reason: str) -> DecodeError:
    fields = {"event_id": event.event_id, "event_type": event.event_type}
    for name, value in (("data", event.data), ("metadata", event.metadata)):
        fields[name] = msgspec.json.encode(value).decode()
    return DecodeError(event.stream, event.stream_id, fields, reason)


def as_upcasters(value: object, where: str) -> Upcasters | None:
    """An `Upcasters`, a mapping `(event_type, version) -> upcaster`, or None, as `Upcasters` (ConfigError else)."""
    if value is None or isinstance(value, Upcasters):
        return value
    if isinstance(value, Mapping) and all(_is_step(key, step) for key, step in value.items()):
        return Upcasters(value)
    raise ConfigError(f"{where}: expected an Upcasters or a dict of (event type, version) -> function, "
                      f"got {type(value).__name__}")  # fmt: skip


def _is_step(key: object, step: object) -> bool:
    return (isinstance(key, tuple) and len(key) == 2 and isinstance(key[0], str) and isinstance(key[1], int)
            and callable(step))  # fmt: skip
