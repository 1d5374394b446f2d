"""Which events a job handles: event types, one entity, `--where` predicates and plugin predicates.

`--where` takes `PATH OP VALUE` with PATH one of `data.<field>[.<field>...]`, `metadata.<field>...`,
`fields.<entry field>` (as the producer wrote it), `@stream`, `event_type`, `event_id`, `stream_id`, `timestamp`,
`stream`; OP one of `= == != > >= < <= ~` (`~` is "contains"); VALUE a number, `true`/`false`/`null`, or text
(quotes optional). It is parsed once into a closure: never `eval`. A field the event does not have never
matches.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from replayd.events import MISSING, PATHS, Event, path_getter

Predicate = Callable[[Event], bool]

_WHERE = re.compile(r"^\s*(@stream|[A-Za-z_][\w]*(?:\.[\w-]+)*)\s*(==|=|!=|>=|<=|>|<|~)\s*([^=<>!~\s].*?)\s*$")
_ORDER: dict[str, Callable[[Any, Any], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
}


def build_filter(
    *,
    types: Sequence[str] = (),
    entity: str | None = None,
    where: Sequence[str] = (),
    plugin: Predicate | None = None,
    handled: frozenset[str] | None = None,
) -> Predicate | None:
    """One predicate for all the conditions (all must hold), or None when every event passes.

    `handled` are the event types the handler takes (a Projection's `@on` types): others are skipped here,
    before routing, rather than routed to a handler that ignores them.
    """
    predicates: list[Predicate] = []
    if handled:
        predicates.append(lambda e: e.event_type in handled)
    if types:
        wanted = frozenset(types)
        predicates.append(lambda e: e.event_type in wanted)
    if entity:
        entity_type, entity_id = entity.split(":", 1)
        predicates.append(entity_predicate(entity_type, entity_id))
    predicates.extend(parse_where(text) for text in where)
    if plugin is not None:
        predicates.append(plugin)
    if not predicates:
        return None
    if len(predicates) == 1:
        return predicates[0]
    return lambda e: all(p(e) for p in predicates)


def entity_predicate(entity_type: str, entity_id: str) -> Predicate:
    """The article's entity match in a shared stream: type from `data.aggregate_type` or
    `metadata.entity_type`, ID from `data.aggregate_id` or `data.<type>_id`."""
    id_field = f"{entity_type}_id"

    def matches(e: Event) -> bool:
        kind = e.data.get("aggregate_type") or e.metadata.get("entity_type")
        ident = e.data.get("aggregate_id") or e.data.get(id_field)
        return kind == entity_type and ident == entity_id

    return matches


def entity_miss(entity: str, read: int, fields: Sequence[str]) -> str:
    """Why `--entity TYPE:ID` matched none of the `read` events, and what would select them (`fields`: the
    entry fields the stream's entries have)."""
    kind, ident = entity.split(":", 1)
    where = f"--where fields.{kind}_id={ident}" if f"{kind}_id" in fields else f"--where fields.FIELD={ident}"
    return (
        f"--entity {entity} matched none of the {read:,} events read: an event is {kind} {ident}'s when "
        f'data.aggregate_type or metadata.entity_type is "{kind}" and data.aggregate_id or data.{kind}_id is '
        f'"{ident}" (or when the stream events:{kind}:{ident} exists). The entries have the fields '
        f"{', '.join(fields) or '(none)'}: to select by one of them, use {where}"
    )


def parse_where(text: str) -> Predicate:
    """Compile one `PATH OP VALUE` condition; ValueError names what is wrong."""
    match = _WHERE.match(text)
    if not match:
        raise ValueError(
            f"--where {text!r}: expected PATH OP VALUE with OP one of = != > >= < <= ~ (contains), e.g. "
            "data.total>1000 or fields.user_id=u7"
        )
    path, op, raw = match.groups()
    try:
        get = path_getter(path)
    except ValueError:
        raise ValueError(f"--where {text!r}: PATH must be one of {PATHS}") from None
    value = _literal(raw)
    if op == "~":
        needle = value if isinstance(value, str) else raw  # the text as written: `~15` is not `~15.0`
        return lambda e: (v := get(e)) is not MISSING and needle in str(v)
    if op in ("=", "==", "!="):
        equal = op != "!="
        return lambda e: (v := get(e)) is not MISSING and _equals(v, value) == equal
    compare = _ORDER[op]
    return lambda e: (v := get(e)) is not MISSING and _ordered(compare, v, value)


def _literal(raw: str) -> Any:
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
        return raw[1:-1]
    if raw in ("true", "false", "null"):
        return msgspec.json.decode(raw)
    number = _number(raw)
    return raw if number is None else number


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _equals(field: Any, value: Any) -> bool:
    a, b = _number(field), _number(value)
    if a is not None and b is not None:
        return a == b
    if isinstance(value, bool) or value is None:
        return bool(field is value)
    return str(field) == str(value)


def _ordered(compare: Callable[[Any, Any], bool], field: Any, value: Any) -> bool:
    a, b = _number(field), _number(value)
    if a is not None and b is not None:
        return compare(a, b)
    if isinstance(field, str) and isinstance(value, str):
        return compare(field, value)
    return False
