"""Any producer's stream: every entry field raw, field mapping, paths, codecs, the shape check, `job delete`.

The stream of the issue: a service that writes `type`, `user_id` and `payload` (JSON), not the article's fields.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis
from redis.asyncio import Redis

from replayd.cli import run_cli
from replayd.config import RedisConfig
from replayd.events import Event, parse_shard
from replayd.handlers import Context, ObjectHandler, Projection, on
from replayd.jobs.engine import Engine
from replayd.jobs.lease import Lease
from replayd.ops.metrics import Metrics
from replayd.pipeline.codec import Codec
from replayd.pipeline.codecs import SHAPES
from replayd.pipeline.router import Router
from replayd.sample import load_history_sync
from tests.helpers import add, checkpoint, entry, progress, replayd, run, spec
from tests.plugins import Recorder

USERS = "users"


def user_entries(n: int, users: int = 40) -> list[dict[str, str]]:
    """As many services write events: a `type`, the user's ID as a field of its own, the body as JSON."""
    return [
        {"type": "UserSeen" if i % 3 else "UserCreated", "user_id": f"u{i % users}",
         "payload": json.dumps({"n": i, "plan": "free"})}
        for i in range(n)
    ]  # fmt: skip


def by_user(events: list[Event]) -> dict[str, list[int]]:
    seen: dict[str, list[int]] = {}
    for event in events:
        seen.setdefault(str(event.fields["user_id"]), []).append(event.data["n"])
    return seen


def partitions_used(saved: dict[str, str], stream: str) -> set[str]:
    return {field.rpartition("#")[2] for field in saved if field.startswith(stream + "#") and field[-1].isdigit()}


# --- 1. every entry field, raw


@pytest.mark.anyio
async def test_event_fields_hold_every_entry_field_raw_decoded_on_first_read(
    sync_redis: redis.Redis, raw_redis: Redis
) -> None:
    sync_redis.xadd(USERS, {"type": "UserSeen", "user_id": "u7", "payload": "{}", "blob": b"\xff\x00"})
    entries = await raw_redis.execute_command("XRANGE", USERS, "-", "+")  # type: ignore[no-untyped-call]
    (event,) = Codec(USERS).decode(entries).events
    assert "fields" not in vars(event)  # nothing decoded it yet: a job that never reads it never pays for it
    assert event.fields == {"type": "UserSeen", "user_id": "u7", "payload": "{}", "blob": b"\xff\x00"}
    assert event.fields is event.fields  # decoded once


# --- 4. the shape check, and 2./3. the one flag that fixes it


def test_a_stream_of_other_field_names_stops_naming_the_fix_and_replays_with_one_flag(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    ids = add(sync_redis, user_entries(2000), stream=USERS)
    where = ("--redis-url", redis_url, "--stream", USERS, "--handler", "jsonl_dump")
    refused = replayd("replay", *where)
    assert refused.returncode == 65, refused.stderr
    assert refused.stdout == ""  # nothing replayed as `unknown`
    assert "type, user_id, payload" in refused.stderr
    assert "--codec payload" in refused.stderr
    assert "--field event_type=type --field data=payload" in refused.stderr
    assert 'fields = { event_type = "type", data = "payload" }' in refused.stderr
    assert "Traceback" not in refused.stderr

    for fix in (["--codec", "payload"], ["--field", "event_type=type", "--field", "data=payload"]):
        done = replayd("replay", *where, *fix, "--job", f"fixed-{fix[0]}")
        assert done.returncode == 0, done.stderr
        lines = [json.loads(line) for line in done.stdout.splitlines()]
        assert len(lines) == 2000
        assert (lines[0]["event_type"], lines[0]["data"]) == ("UserCreated", {"n": 0, "plan": "free"})
        assert lines[1]["event_type"] == "UserSeen"
        assert lines[5]["timestamp"] == int(ids[5].partition("-")[0]) / 1000  # the entry's time, not 0.0

    anyway = replayd("replay", *where, "--no-check-shape", "--job", "anyway")
    assert anyway.returncode == 0, anyway.stderr
    assert json.loads(anyway.stdout.splitlines()[0])["event_type"] == "unknown"


def test_plan_shows_the_detected_shape(
    redis_url: str, sync_redis: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    add(sync_redis, user_entries(30), stream=USERS)
    where = ["--redis-url", redis_url, "--stream", USERS, "--handler", "jsonl_dump", "--json"]
    assert run_cli(["plan", *where]) == 65
    shape = json.loads(capsys.readouterr().out)["streams"][USERS]["shape"]
    assert (shape["codec"], shape["fields"], shape["fits"]) == ("article", ["type", "user_id", "payload"], False)
    assert run_cli(["plan", *where, "--codec", "payload"]) == 0
    report = json.loads(capsys.readouterr().out)["streams"][USERS]
    assert report["shape"]["fits"] is True
    assert report["types"] == {"UserSeen": 20, "UserCreated": 10}


def test_run_and_rebuild_check_the_shape_before_anything_runs(
    redis_url: str, sync_redis: redis.Redis, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    add(sync_redis, user_entries(10), stream=USERS)
    config = tmp_path / "replayd.toml"
    job = f'name = "users"\nstreams = ["{USERS}"]\nhandler = "order_summary"\nend = "now"\n'
    config.write_text(f'[redis]\nurl = "{redis_url}"\n[http]\nenabled = false\n[[jobs]]\n{job}')
    assert run_cli(["run", "--config", str(config)]) == 65
    assert run_cli(["rebuild", "--redis-url", redis_url, "--stream", USERS, "--handler", "order_summary"]) == 65
    assert "--codec payload" in capsys.readouterr().err
    assert not sync_redis.keys("replayd:*")  # refused before the lease: no state written
    assert not sync_redis.keys("projection:*")


def test_an_explicit_mapping_that_names_no_field_is_caught(redis_url: str, sync_redis: redis.Redis) -> None:
    add(sync_redis, user_entries(10), stream=USERS)
    done = replayd("replay", "--redis-url", redis_url, "--stream", USERS, "--handler", "jsonl_dump",
                   "--field", "event_type=kind", "--field", "data=payload")  # fmt: skip
    assert done.returncode == 65
    assert "no event_type (field 'kind')" in done.stderr


def test_entries_without_data_still_fit(redis_url: str, sync_redis: redis.Redis) -> None:
    """The article allows events with no `data`: entries holding nothing the codec does not read are fine."""
    add(sync_redis, [{"event_type": "Tick"}] * 3, stream=USERS)
    done = replayd("replay", "--redis-url", redis_url, "--stream", USERS, "--handler", "jsonl_dump")
    assert done.returncode == 0, done.stderr


# --- 2. paths: partition, where, entity


@pytest.mark.anyio
@pytest.mark.parametrize("partition_by", ["fields.user_id", "data.user", "metadata.user"])
async def test_partition_by_a_path_keeps_each_users_order_across_partitions(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig, partition_by: str
) -> None:
    entries = [
        {**fields, "payload": json.dumps({**json.loads(fields["payload"]), "user": fields["user_id"]}),
         "metadata": json.dumps({"user": fields["user_id"]})}
        for fields in user_entries(400)
    ]  # fmt: skip
    add(sync_redis, entries, stream=USERS)
    stats, rec = await run(spec(streams=[USERS], codec="payload", partition_by=partition_by), raw_redis, redis_cfg)
    assert stats.processed == 400
    assert stats.unkeyed == 0
    assert len(partitions_used(checkpoint(sync_redis), USERS)) == 4  # not one partition for everything
    orders = by_user(rec.events)
    assert len(orders) == 40
    assert all(seen == sorted(seen) for seen in orders.values())


@pytest.mark.anyio
@pytest.mark.parametrize(("partition_by", "keyed"), [("customer_id", "data"), ("metadata.tenant", "metadata")])
async def test_events_without_the_partition_key_are_counted_and_reported(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig, partition_by: str, keyed: str
) -> None:
    key = partition_by.rpartition(".")[2]

    def keyed_entry(i: int) -> dict[str, str]:
        if keyed == "data":
            return entry(data={key: f"c{i % 5}", "n": i})
        return entry(data={"n": i}, metadata={key: f"c{i % 5}"})

    entries = [keyed_entry(i) if i % 4 else entry(data={"n": i}) for i in range(40)]
    add(sync_redis, entries)
    metrics = Metrics()
    job = spec(partition_by=partition_by, progress_interval_s=0.01)
    engine = Engine(job, raw_redis, redis_cfg=redis_cfg, handler=ObjectHandler(Recorder(), "r"), metrics=metrics)
    stats = await engine.run()
    assert stats.processed == 40
    assert stats.unkeyed == 10
    assert progress(sync_redis)["unkeyed_events"] == "10"
    sample = metrics.registry.get_sample_value("replayd_unkeyed_events_total", {"stream": "orders", "replay": "job"})
    assert sample == 10


def test_an_entry_field_key_read_with_the_batch_routes_as_event_fields_does() -> None:
    """Routing by `fields.user_id`, the codec reads that field alone (not every field of every event): each event
    lands where `event.fields` would put it (text, bytes that are not UTF-8, a missing field), and events
    without it are counted."""
    values = [b"u1", b"u2", b"\xff\xfe", None, b"u1", b""]
    entries: list[Any] = [
        [f"{i}-0".encode(), [b"type", b"A", *([b"user_id", v] if v is not None else []), b"payload", b"{}"]]
        for i, v in enumerate(values, 1)
    ]
    router = Router(8, partition_by="fields.user_id", ordering="key")
    events, poison, parts = Codec(USERS, SHAPES["payload"], router).decode(entries)
    assert poison == []
    assert parts is not None
    generic = Router(8, partition_by=lambda e: e.fields.get("user_id"), ordering="key")
    assert {e.stream_id: p for p, part in parts.items() for e in part} == {
        e.stream_id: generic.partition(e) for e in events}  # fmt: skip
    assert router.partitioner.take_unkeyed() == 1


class ByUser(Projection):
    name = "by_user"

    def __init__(self) -> None:
        self.events: list[Event] = []

    def partition_by(self, event: Event) -> str:
        return str(event.fields["user_id"])

    @on("UserSeen", "UserCreated")
    def seen(self, event: Event, ctx: Context) -> None:
        self.events.append(event)


@pytest.mark.anyio
async def test_a_projections_partition_by_may_be_a_function_of_the_event(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig
) -> None:
    add(sync_redis, user_entries(200), stream=USERS)
    projection = ByUser()
    await Engine(spec(streams=[USERS], codec="payload"), raw_redis, redis_cfg=redis_cfg, handler=projection).run()
    assert len(projection.events) == 200
    assert len(partitions_used(checkpoint(sync_redis), USERS)) == 4
    assert all(seen == sorted(seen) for seen in by_user(projection.events).values())


@pytest.mark.anyio
async def test_where_reaches_entry_fields_and_the_stream(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig
) -> None:
    add(sync_redis, user_entries(200), stream=USERS)
    job = spec(streams=[USERS], codec="payload", where=["fields.user_id=u7", "@stream=users"])
    _, rec = await run(job, raw_redis, redis_cfg)
    assert [e.data["n"] for e in rec.events] == [7, 47, 87, 127, 167]


def test_entity_errors_say_what_is_expected_and_why_nothing_matched(redis_url: str, sync_redis: redis.Redis) -> None:
    add(sync_redis, user_entries(200), stream=USERS)
    where = ("--redis-url", redis_url, "--stream", USERS, "--handler", "jsonl_dump", "--codec", "payload")
    bad = replayd("replay", *where, "--entity", "u7")
    assert bad.returncode == 2
    assert "expected TYPE:ID" in bad.stderr
    assert "^" not in bad.stderr  # no regular expression
    missed = replayd("replay", *where, "--entity", "user:u7")
    assert missed.returncode == 0, missed.stderr
    assert "--entity user:u7 matched none of the 200 events read" in missed.stderr
    assert "--where fields.user_id=u7" in missed.stderr
    bad_where = replayd("replay", *where, "--where", "user_id=u7")
    assert bad_where.returncode == 2
    assert "fields.<entry field>" in bad_where.stderr


# --- 3. codecs: the built-ins, with entries as each producer writes them, and plugins

CE_METADATA = {"specversion": "1.0", "source": "/orders", "datacontenttype": "application/json"}

PRODUCERS: dict[str, tuple[dict[str, str], tuple[str, str, dict[str, Any], float | None, dict[str, Any]]]] = {
    "payload": (
        {"id": "evt-1", "type": "OrderPaid", "payload": '{"order_id": "o1"}', "timestamp": "1700000000.5"},
        ("evt-1", "OrderPaid", {"order_id": "o1"}, 1700000000.5, {}),
    ),
    "flat": (
        {"type": "OrderPaid", "order_id": "o1", "total": "19.90"},
        ("", "OrderPaid", {"type": "OrderPaid", "order_id": "o1", "total": "19.90"}, None, {}),
    ),
    "cloudevents": (  # structured: every attribute a field, `data` the JSON data
        {
            "specversion": "1.0",
            "type": "com.example.order.paid",
            "source": "/orders",
            "id": "A-1",
            "time": "2023-11-14T22:13:20Z",
            "datacontenttype": "application/json",
            "data": '{"order_id": "o1"}',
        },
        ("A-1", "com.example.order.paid", {"order_id": "o1"}, 1700000000.0, CE_METADATA),
    ),
    "cloudevents-binary": (  # binary mode: the attributes prefixed `ce_`, as the Kafka binding's headers
        {
            "ce_specversion": "1.0",
            "ce_type": "com.example.order.paid",
            "ce_source": "/orders",
            "ce_id": "A-1",
            "ce_time": "2023-11-14T22:13:20Z",
            "ce_datacontenttype": "application/json",
            "data": '{"order_id": "o1"}',
        },
        ("A-1", "com.example.order.paid", {"order_id": "o1"}, 1700000000.0, CE_METADATA),
    ),
}


@pytest.mark.anyio
@pytest.mark.parametrize("producer", sorted(PRODUCERS))
async def test_builtin_codecs_decode_their_producers_entries(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig, producer: str
) -> None:
    fields, (event_id, event_type, data, timestamp, metadata) = PRODUCERS[producer]
    (entry_id,) = add(sync_redis, [fields])
    _, rec = await run(spec(codec=producer.removesuffix("-binary")), raw_redis, redis_cfg)
    (event,) = rec.events
    assert (event.event_id or "", event.event_type, event.data, event.metadata) == (
        event_id or entry_id, event_type, data, metadata)  # fmt: skip
    assert event.timestamp == (timestamp if timestamp is not None else int(entry_id.partition("-")[0]) / 1000)
    assert event.fields == fields


@pytest.mark.anyio
async def test_a_codec_plugin_decodes_entries_and_what_it_raises_is_poison(
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig
) -> None:
    ids = add(sync_redis, [{"e": 'Paid|{"n": 1}'}, {"e": "broken"}, {"other": "x"}, {"e": 'Paid|{"n": 2}'}])
    job = spec(codec="tests.plugins:pipe_codec", on_poison="dead-letter")
    stats, rec = await run(job, raw_redis, redis_cfg)
    assert [(e.event_type, e.data, e.fields) for e in rec.events] == [
        ("Paid", {"n": 1}, {"e": 'Paid|{"n": 1}'}), ("Paid", {"n": 2}, {"e": 'Paid|{"n": 2}'})]  # fmt: skip
    assert stats.poison == 2
    letters: Any = sync_redis.xrange("replayd:{job}:dlq")
    assert [fields[b"id"].decode() for _, fields in letters] == ids[1:3]
    assert b"codec tests.plugins:pipe_codec: ValueError: no '|'" in letters[0][1][b"error"]
    assert b"KeyError" in letters[1][1][b"error"]


def test_codec_flag_names_the_choices(redis_url: str) -> None:
    done = replayd("replay", "--redis-url", redis_url, "--stream", USERS, "--handler", "jsonl_dump", "--codec", "x")
    assert done.returncode == 2
    assert "article, payload, flat, cloudevents or a plugin" in done.stderr
    bad = replayd("replay", "--redis-url", redis_url, "--stream", USERS, "--handler", "jsonl_dump", "--field", "type")
    assert bad.returncode == 2
    assert "expected PART=FIELD" in bad.stderr


# --- 9. jobs as a whole: delete, and the first versioned rebuild


def _job_state(r: redis.Redis, job: str) -> None:
    r.hset(f"replayd:{{{job}}}:checkpoint", mapping={"orders#0": "1-0", "seq": "1"})
    r.hset(f"replayd:{{{job}}}:progress", mapping={"status": "completed"})
    r.hset(f"replayd:{{{job}}}:progress:0/2", mapping={"status": "completed"})
    r.xadd(f"replayd:{{{job}}}:dlq", {"stream": "orders", "id": "1-0"})
    r.sadd(f"replayd:{{{job}}}:parked", "c1")


def test_job_delete_removes_all_of_a_jobs_state_and_nothing_else(
    redis_url: str, sync_redis: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    _job_state(sync_redis, "a")
    _job_state(sync_redis, "ab")
    assert run_cli(["job", "delete", "a", "--redis-url", redis_url]) == 2  # asks first; no terminal, no --yes
    assert "refusing to delete job a" in capsys.readouterr().err
    assert len(sync_redis.keys("replayd:{a}:*")) == 5
    assert run_cli(["job", "delete", "a", "--redis-url", redis_url, "--yes"]) == 0
    assert sync_redis.keys("replayd:{a}:*") == []
    assert len(sync_redis.keys("replayd:{ab}:*")) == 5
    assert run_cli(["job", "delete", "a", "--redis-url", redis_url, "--yes"]) == 1  # no such job


@pytest.mark.anyio
@pytest.mark.parametrize("shard", ["0/1", "0/2"])
async def test_job_delete_refuses_while_the_job_runs(
    redis_url: str, raw_redis: Redis, sync_redis: redis.Redis, shard: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _job_state(sync_redis, "a")
    lease = Lease(raw_redis, "a", parse_shard(shard), ttl_ms=60_000, wait=False)  # an instance running as `shard`
    assert await lease.acquire(anyio.Event())
    delete = ["job", "delete", "a", "--redis-url", redis_url, "--yes"]
    assert await anyio.to_thread.run_sync(run_cli, delete) == 75
    assert "stop it first" in capsys.readouterr().err
    assert len(sync_redis.keys("replayd:{a}:*")) == 7  # its state, its lease and its owners set
    await lease.release()
    assert await anyio.to_thread.run_sync(run_cli, delete) == 0
    assert sync_redis.keys("replayd:{a}:*") == []


def test_a_first_versioned_rebuild_of_an_unversioned_projection_asks_first(
    redis_url: str, sync_redis: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    load_history_sync(sync_redis, "events:orders", 300)
    where = ["--redis-url", redis_url, "--stream", "events:orders", "--handler", "order_summary"]
    assert run_cli(["rebuild", *where, "--in-place"]) == 0  # the article's keys: projection:order_summary:*
    before = sorted(sync_redis.keys("projection:order_summary:*"))
    assert run_cli(["rebuild", *where]) == 2
    err = capsys.readouterr().err
    assert "projection:order_summary:current" in err
    assert "refusing to move projection order_summary to versioned keys without --yes" in err
    assert sorted(sync_redis.keys("projection:order_summary:*")) == before  # nothing moved
    assert run_cli(["rebuild", *where, "--yes"]) == 0
    assert sync_redis.get("projection:order_summary:current") == b"1"
    assert run_cli(["rebuild", *where]) == 0  # versioned now: nothing to ask
