"""Bad input, fuzzed (issue 5, item 5): every entry ends as a processed event, a dead letter or a clear refusal,
and every config file or environment as Settings or a ConfigError; never a crash, never a silent skip."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
import pytest
import redis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from replayd.config import FieldNames, JobSpec, RedisConfig, Settings, load_settings
from replayd.errors import ConfigError, DataError
from replayd.events import Event, Poison, parse_id
from replayd.handlers import ObjectHandler
from replayd.jobs.engine import Engine
from replayd.pipeline.codec import Codec, RawEntry, decode_all
from tests.plugins import Recorder

SCHEMA = ("event_id", "event_type", "data", "timestamp", "metadata")
STREAM = "events:fuzz"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # one backend: the examples, not the event loops, are what varies here


# --- entry fields --------------------------------------------------------------------------------------------


class Value(NamedTuple):
    """A generated field value and what the codec must make of it."""

    raw: bytes
    kind: str
    """`good` (decodes to `expected`), `bad` (makes the entry poison) or `any` (either is acceptable)."""
    expected: Any = None


def good(raw: bytes, expected: Any) -> Value:
    return Value(raw, "good", expected)


def bad(raw: bytes) -> Value:
    return Value(raw, "bad")


def anything(raw: bytes) -> Value:
    return Value(raw, "any")


_json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
_json_values = st.recursive(
    _json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_json_objects = st.dictionaries(st.text(max_size=10), _json_values, max_size=5)
_huge = st.sampled_from([2**16, 2**20])
_invalid_utf8 = st.builds(lambda a, b: a + b"\xff" + b, st.binary(max_size=8), st.binary(max_size=8))


def _text_values(huge: bool) -> st.SearchStrategy[Value]:
    texts = st.text(max_size=30).map(lambda s: good(s.encode(), s))
    if huge:
        texts |= _huge.map(lambda n: good(b"x" * n, "x" * n))
    return texts | _invalid_utf8.map(bad) | st.binary(max_size=24).map(anything)


def _object_values(huge: bool) -> st.SearchStrategy[Value]:
    objects = _json_objects.map(lambda d: good(msgspec.json.encode(d), d))
    if huge:
        objects |= _huge.map(lambda n: good(msgspec.json.encode({"blob": "y" * n}), {"blob": "y" * n}))
    not_objects = _json_values.filter(lambda v: not isinstance(v, dict)).map(lambda v: bad(msgspec.json.encode(v)))
    broken = st.sampled_from(
        [b"", b"{", b"{broken", b"NaN", b'{"a": NaN}', b'{"x": "\xff"}', b"{'a': 1}", b"{}{}", b"\x00",
         b'{"a":' * 2000 + b"1" + b"}" * 2000]  # nesting beyond any parser's limit
    ).map(bad)  # fmt: skip
    return (
        objects
        | not_objects
        | broken
        | st.binary(max_size=24).map(anything)
        | st.text(max_size=20).map(lambda s: anything(s.encode()))
    )


def _timestamp_values() -> st.SearchStrategy[Value]:
    floats = st.floats(allow_nan=False, allow_infinity=False).map(lambda f: good(repr(f).encode(), f))
    ints = st.integers(-(10**30), 10**30).map(lambda i: good(str(i).encode(), float(i)))
    broken = st.sampled_from([b"", b"yesterday", b"1.2.3", b"0x10", b"\xff", b"1,5", b"--1", b"1e"]).map(bad)
    return floats | ints | broken | st.binary(max_size=16).map(anything)


def _values(huge: bool) -> dict[str, st.SearchStrategy[Value]]:
    return {
        "event_id": _text_values(huge),
        "event_type": _text_values(huge),
        "data": _object_values(huge),
        "timestamp": _timestamp_values(),
        "metadata": _object_values(huge),
    }


_VALUES = {True: _values(True), False: _values(False)}

Pairs = list[tuple[bytes, Value]]


@st.composite
def field_names(draw: st.DrawFn) -> FieldNames:
    """The article's names, or five other distinct names (producers with their own schema)."""
    if draw(st.booleans()):
        return FieldNames()
    names = draw(st.lists(st.text(min_size=1, max_size=10), min_size=5, max_size=5, unique=True))
    return FieldNames(**dict(zip(SCHEMA, names, strict=True)))


def schema_of(names: FieldNames) -> dict[bytes, str]:
    """Configured field name (bytes) -> the Event field it fills."""
    return {(getattr(names, field) or field).encode(): field for field in SCHEMA}  # unset: the article's


@st.composite
def entry_fields(draw: st.DrawFn, names: FieldNames, *, huge: bool = True, min_size: int = 0) -> Pairs:
    """One entry's field list: each schema field missing, once or twice (the last wins), plus unknown fields
    with arbitrary names and values, in any order."""
    schema = schema_of(names)
    values = _VALUES[huge]
    pairs: Pairs = []
    for name, field in schema.items():
        for _ in range(draw(st.integers(0, 2))):
            pairs.append((name, draw(values[field])))
    others = st.binary(max_size=12).filter(lambda k: k not in schema)
    pairs += draw(st.lists(st.tuples(others, st.binary(max_size=40).map(anything)), max_size=3))
    pairs = list(draw(st.permutations(pairs)))
    if len(pairs) < min_size:
        pairs.append((b"filler", anything(b"")))
    return pairs


def flat(pairs: Pairs) -> list[bytes]:
    return [part for key, value in pairs for part in (key, value.raw)]


def expectation(pairs: Pairs | None, names: FieldNames) -> tuple[str, dict[str, Value]]:
    """`event`, `poison` or `either`, and the value each present schema field ends with (the last one)."""
    if pairs is None:
        return "poison", {}  # a tombstone (XDEL'd entry)
    schema = schema_of(names)
    last = {schema[key]: value for key, value in pairs if key in schema}
    kinds = {value.kind for value in last.values()}
    if "bad" in kinds:
        return "poison", last
    return ("event" if kinds <= {"good"} else "either"), last


def check_event(event: Event, entry_id: str, last: dict[str, Value], stream: str) -> None:
    """Good fields decode to their value; missing ones take the article's defaults."""
    ms = int(entry_id.partition("-")[0])
    defaults: dict[str, Any] = {"event_id": entry_id, "event_type": "unknown", "data": {}, "timestamp": ms / 1000,
                                "metadata": {}}  # fmt: skip
    assert event.stream_id == entry_id
    assert event.stream == stream
    assert isinstance(event.event_id, str) and isinstance(event.event_type, str)
    assert type(event.data) is dict and type(event.metadata) is dict
    assert isinstance(event.timestamp, float)
    for field in SCHEMA:
        value = last.get(field)
        if value is None:
            assert getattr(event, field) == defaults[field], field
        elif value.kind == "good":
            assert getattr(event, field) == value.expected, field


def check_poison(poison: Poison, entry_id: str, pairs: Pairs | None, stream: str) -> None:
    assert (poison.stream, poison.stream_id) == (stream, entry_id)
    assert isinstance(poison.error, str) and poison.error
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in poison.fields.items())
    if pairs is None:
        assert poison.error.startswith("tombstone")
    else:
        assert set(poison.fields) == {key.decode(errors="replace") for key, _ in pairs}


def raw_entry(entry_id: str, pairs: Pairs | None) -> RawEntry:
    return [entry_id.encode(), None if pairs is None else flat(pairs)]


@st.composite
def batches(draw: st.DrawFn) -> tuple[FieldNames, list[Pairs | None]]:
    names = draw(field_names())
    entries = draw(st.lists(st.none() | entry_fields(names), min_size=1, max_size=12))
    return names, entries


def decode_fully(codec: Codec, entries: list[RawEntry]) -> tuple[list[Event], list[Poison]]:
    """Decode, then read every field (`data`, `timestamp`, `metadata` are decoded when first read), as a job
    whose filter, router or handler reads every field does; poison in stream order."""
    events, poison, _ = codec.decode(entries)
    events, unreadable = decode_all(events)
    order = {entry[0].decode(): index for index, entry in enumerate(entries)}
    return events, sorted(poison + unreadable, key=lambda p: order[p.stream_id])


@settings(max_examples=150, deadline=None)
@given(batches())
@example((FieldNames(), [[(b"data", bad(b"{broken"))], None, [(b"event_type", good(b"A", "A"))]]))
@example((FieldNames(), [[(b"event_id", bad(b"\xc3(")), (b"timestamp", bad(b"yesterday"))], []]))
def test_decode_never_raises_and_accounts_for_every_entry(batch: tuple[FieldNames, list[Pairs | None]]) -> None:
    names, entries = batch
    ids = [f"{i + 1}-{i % 3}" for i in range(len(entries))]
    codec = Codec("orders", names)
    events, poison = decode_fully(codec, [raw_entry(i, pairs) for i, pairs in zip(ids, entries, strict=True)])
    # exactly one outcome per entry, in stream order within each list
    assert len(events) + len(poison) == len(entries)
    outcome = {e.stream_id: e for e in events} | {p.stream_id: p for p in poison}
    assert sorted(outcome) == sorted(ids)
    assert [e.stream_id for e in events] == [i for i in ids if isinstance(outcome[i], Event)]
    assert [p.stream_id for p in poison] == [i for i in ids if isinstance(outcome[i], Poison)]
    for entry_id, pairs in zip(ids, entries, strict=True):
        verdict, last = expectation(pairs, names)
        got = outcome[entry_id]
        if verdict == "poison":
            assert isinstance(got, Poison), (pairs, got)
        elif verdict == "event":
            assert isinstance(got, Event), (pairs, got)
        if isinstance(got, Event):
            check_event(got, entry_id, last, "orders")
        else:
            check_poison(got, entry_id, pairs, "orders")
        # the codec learns field layouts across entries: a fresh codec must see the same entry the same way
        alone = decode_fully(Codec("orders", names), [raw_entry(entry_id, pairs)])
        same = ([got], []) if isinstance(got, Event) else ([], [got])
        assert repr(alone) == repr(same)  # repr: a NaN timestamp is not == itself


# --- the engine, end to end on a real Redis -----------------------------------------------------------------


def write_entries(client: redis.Redis, entries: list[Pairs]) -> list[str]:
    """XADD each field list as it is (duplicates and odd names included); return the entry IDs."""
    ids: list[str] = []
    for pairs in entries:
        entry_id: bytes = client.execute_command("XADD", STREAM, "*", *flat(pairs))  # type: ignore[no-untyped-call]
        ids.append(entry_id.decode())
    return ids


def decoded_as(ids: list[str], entries: list[Pairs]) -> dict[str, bool]:
    """Entry ID -> True when the codec makes an Event of it (checked against the oracle in the test above)."""
    codec = Codec(STREAM, FieldNames())
    events, _ = decode_fully(codec, [raw_entry(i, pairs) for i, pairs in zip(ids, entries, strict=True)])
    good_ids = {e.stream_id for e in events}
    return {i: i in good_ids for i in ids}


def fuzz_job(policy: str, partition_by: str | None) -> JobSpec:
    return JobSpec(
        name="fz", streams=[STREAM], handler="x:y", end="now", partitions=4, partition_by=partition_by,
        on_poison=policy, retries=0, retry_backoff_s=0.001, batch_size=4, min_batch_size=1,
        check_shape=False,  # arbitrary fields on purpose: what is tried here is the poison path
    )  # fmt: skip


ENGINE_ENTRIES = st.lists(entry_fields(FieldNames(), huge=False, min_size=1), min_size=1, max_size=8)


@pytest.mark.anyio
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries=ENGINE_ENTRIES, partition_by=st.sampled_from([None, "k", "customer_id"]))
async def test_engine_dead_letters_what_it_cannot_decode_and_handles_the_rest(
    raw_redis: Redis, redis_cfg: RedisConfig, sync_redis: redis.Redis, entries: list[Pairs], partition_by: str | None
) -> None:
    sync_redis.flushall()
    ids = write_entries(sync_redis, entries)
    decodes = decoded_as(ids, entries)
    handler = Recorder(decode=True)  # reads every field: finds every undecodable entry
    engine = Engine(fuzz_job("dead-letter", partition_by), raw_redis, redis_cfg=redis_cfg,
                    handler=ObjectHandler(handler, "r"))  # fmt: skip
    await engine.run()
    letters: Any = sync_redis.xrange("replayd:{fz}:dlq")
    dead = [fields[b"id"].decode() for _, fields in letters]
    # every entry exactly once: handled or dead-lettered, none skipped, none twice
    assert sorted(handler.ids + dead) == sorted(ids)
    assert set(handler.ids) == {i for i in ids if decodes[i]}
    assert engine.stats.status == "completed"
    assert engine.stats.poison == len(dead)
    assert all(
        fields[b"error_type"] == b"DecodeError" and fields[b"stream"] == STREAM.encode() for _, fields in letters
    )
    assert sync_redis.hget("replayd:{fz}:checkpoint", f"{STREAM}#*") == ids[-1].encode()


@pytest.mark.anyio
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries=ENGINE_ENTRIES)
async def test_engine_stops_at_the_first_undecodable_entry_and_names_it(
    raw_redis: Redis, redis_cfg: RedisConfig, sync_redis: redis.Redis, entries: list[Pairs]
) -> None:
    sync_redis.flushall()
    ids = write_entries(sync_redis, entries)
    decodes = decoded_as(ids, entries)
    first_bad = next((i for i in ids if not decodes[i]), None)
    handler = Recorder(decode=True)
    engine = Engine(fuzz_job("stop", None), raw_redis, redis_cfg=redis_cfg, handler=ObjectHandler(handler, "r"))
    try:
        await engine.run()
    except DataError as error:
        assert first_bad is not None, f"DataError without a poison entry: {error}"
        assert error.exit_code == 65
        assert f"{STREAM} {first_bad}" in str(error)
        assert engine.stats.status == "failed"
        # nothing at or after the poison entry was handled; what was handled is in order, once
        assert handler.ids == [i for i in ids if parse_id(i) < parse_id(first_bad)][: len(handler.ids)]
        floor = sync_redis.hget("replayd:{fz}:checkpoint", f"{STREAM}#*")
        assert floor is None or parse_id(floor) < parse_id(first_bad)
    else:
        assert first_bad is None, f"entry {first_bad} cannot be decoded, yet the stop policy completed"
        assert handler.ids == ids
        assert engine.stats.status == "completed"
    assert not sync_redis.exists("replayd:{fz}:dlq")


# --- settings: TOML files and REPLAYD_* environment ---------------------------------------------------------


def toml_value(value: Any) -> str:
    """A value as TOML text (strings through JSON escapes, which TOML basic strings mostly share)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(type(value))


def toml_document(top: dict[str, Any], tables: dict[str, dict[str, Any]], jobs: list[dict[str, Any]]) -> str:
    lines = [f"{json.dumps(k)} = {toml_value(v)}" for k, v in top.items()]
    for name, table in tables.items():
        lines.append(f"[{name}]")
        lines += [f"{json.dumps(k)} = {toml_value(v)}" for k, v in table.items()]
    for job in jobs:
        lines.append("[[jobs]]")
        lines += [f"{json.dumps(k)} = {toml_value(v)}" for k, v in job.items()]
    return "\n".join(lines) + "\n"


SECRET = "hunter2-s3cr3t"  # noqa: S105 - a marker that must never show up in an error

_scalar = (
    st.text(max_size=20)
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.booleans()
)  # fmt: skip
_any_value = st.recursive(
    _scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)  # fmt: skip
_numbers = st.sampled_from([-1, 0, 1, 2, 3, 100, 4096, 4097, 100_000, 100_001, 2**63, 1e400, 0.5, -0.0]) | st.floats()
_bounds = st.sampled_from([
    "beginning", "checkpoint", "now", "follow", "0", "0-0", "1700000000000-5", "1-", "-1", "1-x", "24h", "7d", "1.5s",
    "0ms", "9" * 400 + "s", "9" * 30 + "w", "2024-01-01T00:00:00Z", "2024-01-01", "2024-13-01",
    "0001-01-01T00:00:00+23:59", "9999-12-31T23:59:59-23:59", "yesterday", "", "²", "١٢٣", "9" * 5000,
    "1" * 30 + "-" + "1" * 30,
]) | st.text(max_size=12)  # fmt: skip
_shards = st.sampled_from(["0/1", "1/3", "3/3", "-1/3", "a/b", "/", "0/0", "²/3", "1/" + "9" * 30, ""]) | st.text(
    max_size=6
)
_wheres = st.sampled_from([
    "data.total > 100", "data.a.b = 'x'", "event_type == OrderCreated", "metadata.source ~ api", "timestamp <= 5",
    "stream != x", "data. = 1", "data.total >", "> 1", "nope = 1", "data.x = ", "event_type.x = 1", "data.x === 1",
    "data.x = " + "9" * 400, "x" * 10_000,
]) | st.text(max_size=20)  # fmt: skip

_JOB_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "name": st.sampled_from(["a", "orders", "a b", "", "x" * 101, "ok.name:1-2"]) | st.text(max_size=8),
    "streams": st.lists(st.text(max_size=8), max_size=3),
    "handler": st.sampled_from(["order_summary", "x:y", "tests.plugins:record_event", ""]),
    "start": _bounds,
    "after": _bounds,
    "end": _bounds,
    "resume": st.booleans(),
    "types": st.lists(st.text(max_size=6), max_size=2),
    "entity": st.sampled_from(["order:1", "order", ":1", "order:"]) | st.text(max_size=8),
    "where": st.lists(_wheres, max_size=3),
    "partition_by": st.text(max_size=8),
    "partitions": _numbers,
    "concurrency": _numbers,
    "ordering": st.sampled_from(["key", "none", "KEY"]),
    "batch_size": _numbers,
    "min_batch_size": _numbers,
    "batch_target_s": _numbers,
    "max_in_flight": _numbers,
    "fields": st.dictionaries(st.sampled_from([*SCHEMA, "other"]), st.text(max_size=5), max_size=3),
    "progress_interval_s": _numbers,
    "shard": _shards,
    "on_gap": st.sampled_from(["fail", "warn", "skip", "ignore"]),
    "on_poison": st.sampled_from(["stop", "dead-letter", "skip", "dead_letter"]),
    "retries": _numbers,
    "retry_backoff_s": _numbers,
    "on_lease_held": st.sampled_from(["wait", "exit", "spin"]),
    "lease_ttl_s": _numbers,
    "allow_reset": st.booleans(),
}
_REDIS_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "url": st.sampled_from([f"redis://:{SECRET}@localhost:1/0", f"rediss://user:{SECRET}@h/0", "redis://x"]),
    "socket_timeout_s": _numbers,
    "connect_timeout_s": _numbers,
    "block_ms": _numbers,
    "max_connections": _numbers,
    "unavailable_timeout_s": _numbers,
}
_HTTP_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "enabled": st.booleans() | st.sampled_from(["yes", "true"]),
    "host": st.sampled_from(["127.0.0.1", "::1", ""]),
    "port": _numbers,
}
_TOP_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "log_level": st.sampled_from(["DEBUG", "INFO", "info", "TRACE"]),
    "log_format": st.sampled_from(["auto", "json", "text", "xml"]),
    "shutdown_timeout_s": _numbers,
    "shard": _shards,
    "config": st.text(max_size=8),
}


@st.composite
def section(draw: st.DrawFn, fields: dict[str, st.SearchStrategy[Any]]) -> dict[str, Any]:
    """Some of the section's keys with plausible or wrongly typed values, and now and then an unknown key."""
    chosen = draw(st.lists(st.sampled_from(sorted(fields)), unique=True, max_size=len(fields)))
    values = {key: draw(fields[key] | _any_value if draw(st.integers(0, 4)) == 0 else fields[key]) for key in chosen}
    if draw(st.integers(0, 5)) == 0:
        values[draw(st.text(min_size=1, max_size=8))] = draw(_any_value)
    return values


@st.composite
def toml_documents(draw: st.DrawFn) -> str:
    if draw(st.integers(0, 15)) == 0:
        return draw(st.text(max_size=60))  # not even TOML, most of the time
    jobs = draw(st.lists(section(_JOB_FIELDS), max_size=2))
    for job in jobs:  # mostly complete jobs, so the validators past the required fields run
        if draw(st.integers(0, 4)):
            job.setdefault("name", "job")
            job.setdefault("streams", ["s"])
            job.setdefault("handler", "x:y")
    tables = {name: draw(section(fields)) for name, fields in (("redis", _REDIS_FIELDS), ("http", _HTTP_FIELDS))
              if draw(st.booleans())}  # fmt: skip
    return toml_document(draw(section(_TOP_FIELDS)), tables, jobs)


_env_text = st.text(st.characters(exclude_characters="\x00", exclude_categories=["Cs"]), max_size=20)
_ENV: dict[str, st.SearchStrategy[str]] = {
    "REPLAYD_LOG_LEVEL": st.sampled_from(["DEBUG", "loud"]),
    "REPLAYD_SHUTDOWN_TIMEOUT_S": st.sampled_from(["5", "-1", "abc", "1e400", "nan", ""]),
    "REPLAYD_SHARD": _shards.filter(lambda s: "\x00" not in s),
    "REPLAYD_REDIS__URL": st.just(f"redis://:{SECRET}@localhost:1/0"),
    "REPLAYD_REDIS__BLOCK_MS": st.sampled_from(["100", "5000", "-1", "x", "1e400"]),
    "REPLAYD_REDIS__SOCKET_TIMEOUT_S": st.sampled_from(["1", "0", "nan", "inf"]),
    "REPLAYD_HTTP__PORT": st.sampled_from(["0", "9464", "65536", "port"]),
    "REPLAYD_HTTP__ENABLED": st.sampled_from(["false", "0", "maybe"]),
    "REPLAYD_REDIS": st.sampled_from(['{"block_ms": 10}', '{"nope": 1}', "[]", "{bad", ""]),
    "REPLAYD_HTTP": st.sampled_from(['{"port": 1}', "null", "{bad"]),
    "REPLAYD_JOBS": st.sampled_from(
        [
            '[{"name": "e", "streams": ["s"], "handler": "x:y"}]',
            '[{"name": "e"}]',
            "[]",
            "{}",
            "not json",
            "[1",
            '[{"name": "e", "streams": ["s"], "handler": "x:y", "start": "' + "9" * 400 + 's"}]',
        ]
    ),
    "REPLAYD_JOBS__0__NAME": st.just("b"),
    "REPLAYD_UNKNOWN": _env_text,
    "REPLAYD_REDIS__NOPE": _env_text,
}


@st.composite
def environments(draw: st.DrawFn) -> dict[str, str]:
    names = draw(st.lists(st.sampled_from(sorted(_ENV)), unique=True, max_size=4))
    return {name: draw(_ENV[name] | _env_text if draw(st.booleans()) else _ENV[name]) for name in names}


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        for name in [n for n in os.environ if n.startswith("REPLAYD_")]:
            patch.delenv(name)
        for name, value in values.items():
            patch.setenv(name, value)
        yield


def load_or_refuse(path: Path) -> Settings | ConfigError:
    """Settings or a ConfigError; anything else escapes and fails the test with the input that caused it."""
    try:
        return load_settings(str(path))
    except ConfigError as error:
        message = str(error)
        assert message.strip()
        assert SECRET not in message, "a secret leaked into a config error"
        return error


_JOB = {"name": "a", "streams": ["s"], "handler": "x:y"}


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=toml_documents(), env=environments())
@example(document=toml_document({}, {}, [{**_JOB, "start": "9" * 400 + "s"}]), env={})  # OverflowError
@example(document=toml_document({}, {}, [{**_JOB, "end": "9" * 400 + "h"}]), env={})  # OverflowError
@example(document="", env={"REPLAYD_JOBS": "not json"})  # pydantic-settings SettingsError
@example(document="", env={"REPLAYD_REDIS": "{bad"})  # pydantic-settings SettingsError
def test_settings_load_or_are_refused_with_a_config_error(tmp_path: Path, document: str, env: dict[str, str]) -> None:
    path = tmp_path / "replayd.toml"
    path.write_text(document)
    with environment(env):
        outcome = load_or_refuse(path)
    if isinstance(outcome, Settings):
        for job in outcome.jobs:  # what loaded is usable: bounds and shards resolve without raising
            assert job.start_bound and job.end_bound and job.shard_of


@pytest.mark.parametrize(
    ("document", "env"),
    [
        pytest.param(toml_document({}, {}, [{**_JOB, "start": "9" * 400 + "s"}]), {}, id="start-age-overflows"),
        pytest.param(toml_document({}, {}, [{**_JOB, "end": "9" * 400 + "d"}]), {}, id="end-age-overflows"),
        pytest.param("", {"REPLAYD_JOBS": "not json"}, id="env-jobs-not-json"),
        pytest.param("", {"REPLAYD_REDIS": "{bad"}, id="env-redis-not-json"),
        pytest.param("", {"REPLAYD_HTTP": "{bad"}, id="env-http-not-json"),
    ],
)
def test_known_bad_inputs_are_config_errors(tmp_path: Path, document: str, env: dict[str, str]) -> None:
    """The cases the fuzzer found, kept as plain regressions: each must be a ConfigError (exit 78)."""
    path = tmp_path / "replayd.toml"
    path.write_text(document)
    with environment(env), pytest.raises(ConfigError):
        load_settings(str(path))
