"""The built-in handlers `jsonl_dump` and `republish`, loaded by name and run by the engine on a real Redis."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.asyncio import Redis

from replayd.config import FieldNames, JobSpec, RedisConfig
from replayd.errors import ConfigError, ReplaydError
from replayd.events import Event
from replayd.handlers.builtin.jsonl_dump import JsonlDump
from replayd.handlers.builtin.republish import Republish, seen_key
from replayd.handlers.loader import load_handler
from replayd.jobs.engine import Engine
from replayd.pipeline.codec import Codec
from tests.helpers import STREAM, add, as_text, checkpoint, stream_ids

pytestmark = pytest.mark.anyio

ENV = ("REPLAYD_JSONL_PATH", "REPLAYD_REPUBLISH_STREAM", "REPLAYD_REPUBLISH_MAXLEN", "REPLAYD_REPUBLISH_DEDUPE")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start each test from the defaults, whatever the environment running the suite sets."""
    for name in ENV:
        monkeypatch.delenv(name, raising=False)


def produced(n: int, *, start: int = 0, ids: bool = True) -> list[dict[str, str]]:
    """Entries with producer event IDs (unless `ids` is false), distinct original timestamps and metadata."""
    return [
        {
            **({"event_id": f"evt-{i}"} if ids else {}),
            "event_type": "OrderCreated" if i % 3 else "OrderShipped",
            "data": json.dumps({"order_id": f"o{i}", "customer_id": f"c{i % 5}", "total": i * 1.5}),
            "timestamp": repr(1_700_000_000.0 + i * 0.001 + 0.000123),
            "metadata": json.dumps({"source": "test", "n": i}),
        }
        for i in range(start, start + n)
    ]


def job(handler: str, name: str = "builtin", **overrides: Any) -> JobSpec:
    values: dict[str, Any] = {
        "name": name,
        "streams": [STREAM],
        "handler": handler,
        "end": "now",
        "partitions": 4,
        "batch_size": 8,
        "min_batch_size": 2,
        "progress_interval_s": 0.05,
    }
    values.update(overrides)
    return JobSpec(**values)


async def replay(spec: JobSpec, r: Redis, cfg: RedisConfig) -> Engine:
    """Construct (which loads the handler by name) and run an engine to its end."""
    engine = Engine(spec, r, redis_cfg=cfg)
    await engine.run()
    return engine


async def source_events(r: Redis, stream: str = STREAM) -> list[Event]:
    """The stream decoded as replayd decodes it."""
    raw: Any = await r.xrange(stream)  # the data path's client: raw `[id, [field, value, ...]]` entries
    events, poison, _ = Codec(stream, FieldNames()).decode(raw)
    assert not poison
    return events


def as_line(event: Event) -> dict[str, Any]:
    return {
        "stream": event.stream,
        "stream_id": event.stream_id,
        "event_id": event.event_id,
        "event_type": event.event_type,
        "data": event.data,
        "timestamp": event.timestamp,
        "metadata": event.metadata,
    }


def target_entries(r: redis.Redis, target: str) -> list[dict[str, str]]:
    return [{as_text(k): as_text(v) for k, v in fields.items()} for _, fields in r.xrange(target)]  # type: ignore[union-attr]


# --- jsonl_dump


async def test_jsonl_dump_to_a_file_in_stream_order_and_appends_on_resume(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "events.jsonl"
    monkeypatch.setenv("REPLAYD_JSONL_PATH", str(out))
    add(sync_redis, produced(40))
    engine = await replay(job("jsonl_dump"), raw_redis, redis_cfg)
    assert engine.stats.processed == 40

    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines == [as_line(e) for e in await source_events(raw_redis)]

    # more events, the same job again: it resumes from its checkpoint and appends only the new ones
    add(sync_redis, produced(15, start=40))
    await replay(job("jsonl_dump"), raw_redis, redis_cfg)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["stream_id"] for line in lines] == stream_ids(sync_redis)
    assert lines == [as_line(e) for e in await source_events(raw_redis)]


async def test_jsonl_dump_to_stdout(
    sync_redis: redis.Redis,
    raw_redis: Redis,
    redis_cfg: RedisConfig,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REPLAYD_JSONL_PATH", "-")
    add(sync_redis, produced(25, ids=False))
    await replay(job("jsonl_dump"), raw_redis, redis_cfg)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    events = await source_events(raw_redis)
    assert lines == [as_line(e) for e in events]
    assert all(line["event_id"] == line["stream_id"] for line in lines)  # no producer ID: the entry ID


async def test_jsonl_dump_keeps_each_streams_order(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "two.jsonl"
    monkeypatch.setenv("REPLAYD_JSONL_PATH", str(out))
    for stream in ("a", "b", "c"):
        add(sync_redis, produced(30), stream=stream)
    await replay(job("jsonl_dump", streams=["a", "b", "c"]), raw_redis, redis_cfg)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    for stream in ("a", "b", "c"):
        assert [line["stream_id"] for line in lines if line["stream"] == stream] == stream_ids(sync_redis, stream)
    assert len(lines) == 90


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (every write fails with ENOSPC)")
async def test_jsonl_dump_write_failure_stops_the_job_before_its_checkpoint(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REPLAYD_JSONL_PATH", "/dev/full")
    add(sync_redis, produced(5))
    with pytest.raises(ReplaydError, match="writing to /dev/full failed"):
        await replay(job("jsonl_dump", name="full"), raw_redis, redis_cfg)
    assert not any(field.startswith(f"{STREAM}#") for field in checkpoint(sync_redis, "full"))  # written again


# --- republish


async def test_republish_copies_events_in_order_with_original_timestamps(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig
) -> None:
    add(sync_redis, produced(40))
    engine = await replay(job("republish"), raw_redis, redis_cfg)
    assert engine.stats.processed == 40

    source = await source_events(raw_redis)
    copied = target_entries(sync_redis, f"{STREAM}:replay")  # the default target
    assert [c["origin_id"] for c in copied] == [e.stream_id for e in source]
    assert {c["origin_stream"] for c in copied} == {STREAM}
    original = target_entries(sync_redis, STREAM)
    assert [c["timestamp"] for c in copied] == [f["timestamp"] for f in original]
    # the copy decodes as the same events: it can itself be replayed by replayd
    again = await source_events(raw_redis, f"{STREAM}:replay")
    keep = ("event_id", "event_type", "data", "timestamp", "metadata")
    assert [[getattr(e, k) for k in keep] for e in again] == [[getattr(e, k) for k in keep] for e in source]
    assert sync_redis.scard(seen_key(f"{STREAM}:replay")) == 40


async def test_republish_is_idempotent_across_replays(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REPLAYD_REPUBLISH_STREAM", "reprocess")
    add(sync_redis, produced(30))
    add(sync_redis, produced(1, start=7))  # the producer sent evt-7 twice
    first = await replay(job("republish", name="first"), raw_redis, redis_cfg)
    assert isinstance(first.handler, Republish)
    assert (first.handler.published, first.handler.skipped) == (30, 1)
    assert sync_redis.xlen("reprocess") == 30

    second = await replay(job("republish", name="second"), raw_redis, redis_cfg)  # a full re-replay
    assert isinstance(second.handler, Republish)
    assert (second.handler.published, second.handler.skipped) == (0, 31)
    assert sync_redis.xlen("reprocess") == 30

    add(sync_redis, produced(10, start=30))
    await replay(job("republish", name="third"), raw_redis, redis_cfg)
    copied = target_entries(sync_redis, "reprocess")
    assert [c["event_id"] for c in copied] == [f"evt-{i}" for i in range(40)]


async def test_republish_from_several_streams_keeps_each_streams_order(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REPLAYD_REPUBLISH_STREAM", "merged")
    ids = [f"{1000 + i // 3}-{i % 3}" for i in range(45)]
    for stream in ("a", "b", "c"):  # no producer IDs and equal entry IDs: still three distinct sets of events
        add(sync_redis, produced(45, ids=False), stream=stream, ids=ids)
    await replay(job("republish", streams=["a", "b", "c"]), raw_redis, redis_cfg)
    copied = target_entries(sync_redis, "merged")
    assert len(copied) == 135
    for stream in ("a", "b", "c"):
        assert [c["origin_id"] for c in copied if c["origin_stream"] == stream] == ids

    await replay(job("republish", name="again", streams=["a", "b", "c"]), raw_redis, redis_cfg)
    assert sync_redis.xlen("merged") == 135


async def test_republish_default_targets_per_stream_and_trimming(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REPLAYD_REPUBLISH_MAXLEN", "50")
    monkeypatch.setenv("REPLAYD_REPUBLISH_DEDUPE", "off")
    add(sync_redis, produced(20), stream="a")
    add(sync_redis, produced(400), stream="b")
    await replay(job("republish", streams=["a", "b"], batch_size=100), raw_redis, redis_cfg)
    assert [c["origin_id"] for c in target_entries(sync_redis, "a:replay")] == stream_ids(sync_redis, "a")
    assert 50 <= sync_redis.xlen("b:replay") < 400  # approximate trimming: whole nodes of the stream go
    assert target_entries(sync_redis, "b:replay")[-1]["origin_id"] == stream_ids(sync_redis, "b")[-1]
    assert not sync_redis.exists(seen_key("a:replay"), seen_key("b:replay"))


async def test_republish_refuses_a_bad_target(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    add(sync_redis, produced(3))
    add(sync_redis, produced(3), stream="other")
    monkeypatch.setenv("REPLAYD_REPUBLISH_STREAM", STREAM)
    with pytest.raises(ConfigError, match="is a source stream"):
        await replay(job("republish", streams=["other", STREAM]), raw_redis, redis_cfg)
    monkeypatch.setenv("REPLAYD_REPUBLISH_STREAM", "taken")
    sync_redis.set("taken", "a string")
    with pytest.raises(ConfigError, match="'taken' is a string, not a stream"):
        await replay(job("republish", name="other"), raw_redis, redis_cfg)


# --- configuration and loading


@pytest.mark.parametrize(
    ("handler", "name", "value", "message"),
    [
        ("republish", "REPLAYD_REPUBLISH_MAXLEN", "many", "expected a whole number"),
        ("republish", "REPLAYD_REPUBLISH_MAXLEN", "0", "at least 1"),
        ("republish", "REPLAYD_REPUBLISH_MAXLEN", "-3", "at least 1"),
        ("republish", "REPLAYD_REPUBLISH_DEDUPE", "maybe", "expected on or off"),
        ("jsonl_dump", "REPLAYD_JSONL_PATH", "{tmp}", "is a directory"),
        ("jsonl_dump", "REPLAYD_JSONL_PATH", "{tmp}/missing/out.jsonl", "does not exist"),
    ],
)
async def test_bad_settings_are_config_errors_at_construction(
    raw_redis: Redis,
    redis_cfg: RedisConfig,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    handler: str,
    name: str,
    value: str,
    message: str,
) -> None:
    monkeypatch.setenv(name, value.format(tmp=tmp_path))
    with pytest.raises(ConfigError, match=message):
        Engine(job(handler), raw_redis, redis_cfg=redis_cfg)


def test_builtins_are_entry_points(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REPLAYD_JSONL_PATH", raising=False)
    dump = load_handler("jsonl_dump")
    assert isinstance(dump, JsonlDump)
    assert (dump.name, dump.partition_by, dump.event_types, dump.path) == ("jsonl_dump", None, None, None)
    republish = load_handler("republish")
    assert isinstance(republish, Republish)
    assert (republish.name, republish.partition_by, republish.event_types) == ("republish", None, None)
    assert (republish.target_of("events:orders"), republish.maxlen, republish.dedupe) == (
        "events:orders:replay",
        None,
        True,
    )
