"""Failures that are visible and bounded: a poison event under default settings, a handler failing on every
event (the circuit breaker), a hanging handler (time-outs), log lines of huge undecodable entries."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis
from redis.asyncio import Redis

from replayd.config import JobSpec, RedisConfig
from replayd.embedded import free_port
from replayd.errors import DataError, JobBlocked
from replayd.events import Event
from replayd.handlers import FunctionHandler, ObjectHandler
from replayd.jobs.deadletter import Letters
from replayd.jobs.engine import Engine
from replayd.ops.metrics import Metrics
from tests.helpers import add, checkpoint, entry, orders, progress, replayd, spawn_replayd, wait_for

STREAM = "orders"


def test_a_1mb_undecodable_entry_gives_a_bounded_log_line(redis_url: str, sync_redis: redis.Redis) -> None:
    """1. an entry whose `data` is 1 MB of broken JSON  2. a replay under the default policy stops at it (65)
    3. every line on stderr is short, and says how big the field was."""
    add(sync_redis, [{**entry(), "data": "{" + "x" * (1 << 20)}])
    done = replayd("replay", "--redis-url", redis_url, "--stream", STREAM, "--handler", "order_summary",
                   "--log-format", "json", "--log-level", "DEBUG")  # fmt: skip
    assert done.returncode == 65, done.stderr[-2000:]
    lines = done.stderr.splitlines()
    assert max(map(len, lines)) < 10_000, [len(line) for line in lines]
    logged = [json.loads(line)["msg"] for line in lines if line.startswith("{")]
    assert any("undecodable entry" in msg and f"{(1 << 20) + 1} chars" in msg for msg in logged), logged


# --- one poison event under default settings (FAULTS T41) ------------------------------------------------------


class FailsOn:
    """A plain async function handler (no partition_by) that fails on the events whose `seq` is in `bad`."""

    def __init__(self, *bad: int) -> None:
        self.bad = set(bad)
        self.seen: list[int] = []

    async def handle(self, event: Event) -> None:
        if event.data["seq"] in self.bad:
            raise RuntimeError(f"cannot handle seq {event.data['seq']}")
        self.seen.append(event.data["seq"])


def following(**overrides: Any) -> JobSpec:
    """A following job as the daemon runs it, with the default failure settings."""
    values: dict[str, Any] = {"name": "vis", "streams": [STREAM], "handler": "x:y", "end": "follow",
                              "progress_interval_s": 0.05, "retry_backoff_s": 0.001}  # fmt: skip
    return JobSpec(**{**values, **overrides})


async def eventually(condition: Callable[[], bool], within: float = 20.0) -> None:
    with anyio.fail_after(within):
        while not condition():  # noqa: ASYNC110 - polls state of the engine and of Redis
            await anyio.sleep(0.05)


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


@pytest.mark.anyio
async def test_one_poison_event_under_default_settings_blocks_visibly(
    raw_redis: Redis, redis_cfg: RedisConfig, sync_redis: redis.Redis, redis_url: str
) -> None:
    """1. a following job, default partitioning and policy; its plain function fails on event 10 of 200
    2. it does not dead-letter the 189 events behind it: one letter, state `blocked` in progress, status (text and
       JSON) and metrics, naming the stream and the letter; never `live`
    3. the handler is fixed, the letter retried, `replayd resume`: every later event is handled, in order."""
    ids = add(sync_redis, orders(200))
    handler = FailsOn(10)
    metrics = Metrics()
    engine = Engine(following(), raw_redis, redis_cfg=redis_cfg, handler=FunctionHandler(handler.handle, "fn"),
                    metrics=metrics)  # fmt: skip
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        await eventually(lambda: progress(sync_redis, "vis").get("status") == "blocked")
        state = progress(sync_redis, "vis")
        assert sync_redis.xlen("replayd:{vis}:dlq") == 1
        assert (state["dead_lettered_events"], state["parked_keys"]) == ("1", "1")
        assert f"dead letter {ids[10]}" in state["blocked"] and STREAM in state["blocked"]
        assert handler.seen == list(range(10))
        assert sample(metrics, "replayd_state", replay="vis", state="blocked") == 1
        assert sample(metrics, "replayd_parked_keys", replay="vis") == 1
        outcome = {"stream": STREAM, "replay": "vis", "outcome": "dead_lettered"}
        assert sample(metrics, "replayd_handler_events_total", **outcome) == 1
        text = await anyio.to_thread.run_sync(replayd, "status", "vis", "--redis-url", redis_url)
        assert text.returncode == 0, text.stderr
        assert "blocked  processed 10" in text.stdout and "dead-lettered 1" in text.stdout
        assert f"blocked: job vis blocked: stream {STREAM} waits behind dead letter {ids[10]}" in text.stdout
        as_json = await anyio.to_thread.run_sync(replayd, "status", "vis", "--json", "--redis-url", redis_url)
        shown = json.loads(as_json.stdout)["vis"]["progress"]
        assert (shown["status"], shown["dead_lettered_events"], shown["parked_keys"]) == ("blocked", "1", "1")

        handler.bad.clear()  # the fix
        letters = Letters(raw_redis, "vis")
        assert await letters.retry(FunctionHandler(handler.handle, "fn"), None) == (1, 0)
        await letters.aclose()
        resumed = await anyio.to_thread.run_sync(replayd, "resume", "vis", "--redis-url", redis_url)
        assert resumed.returncode == 0, resumed.stderr
        await eventually(lambda: len(handler.seen) == 200 and engine.stats.status == "live")
        assert handler.seen == [*range(10), 10, *range(11, 200)]  # the letter first (the retry), then the rest
        await eventually(lambda: progress(sync_redis, "vis")["status"] == "live")
        assert progress(sync_redis, "vis")["blocked"] == ""
        engine.stop()


def test_one_poison_event_in_a_one_shot_replay_exits_65_naming_it(redis_url: str, sync_redis: redis.Redis) -> None:
    ids = add(sync_redis, orders(50))
    done = replayd("replay", "--redis-url", redis_url, "--stream", STREAM, "--handler", "tests.test_visible:fails_on_7")
    assert done.returncode == 65, done.stderr
    assert ids[7] in done.stderr.splitlines()[-1]


def fails_on_7(event: Event) -> None:
    """A plain sync function that fails on the event whose seq is 7."""
    if event.data["seq"] == 7:
        raise ValueError("seq 7")


# --- a handler that fails on every event: the circuit breaker (FAULTS T40) ---------------------------------------


async def always_fails(event: Event) -> None:
    raise RuntimeError(f"backend down ({event.data['seq']})")


@pytest.mark.anyio
async def test_the_breaker_blocks_a_following_job_instead_of_dead_lettering_its_stream(
    raw_redis: Redis, redis_cfg: RedisConfig, sync_redis: redis.Redis
) -> None:
    """1. a following job partitioned by customer (each failure parks only its own key), a handler failing on
    every event  2. after breaker_failures (20 by default) in a row, it blocks, naming the last errors: about
    20 letters, not 1,000  3. `resume` with the cause fixed: the rest is handled."""
    add(sync_redis, orders(1000, customers=500))
    metrics = Metrics()
    handler = FailsOn(*range(1000))
    spec = following(partition_by="customer_id", retries=0)
    engine = Engine(
        spec, raw_redis, redis_cfg=redis_cfg, handler=FunctionHandler(handler.handle, "fn"), metrics=metrics
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        await eventually(lambda: progress(sync_redis, "vis").get("status") == "blocked")
        blocked = progress(sync_redis, "vis")["blocked"]
        assert "circuit breaker: 20 events in a row failed for good" in blocked
        assert "RuntimeError: cannot handle seq" in blocked
        assert sync_redis.xlen("replayd:{vis}:dlq") < 40  # the lanes that were mid-batch add a few
        assert sample(metrics, "replayd_state", replay="vis", state="blocked") == 1
        handler.bad.clear()
        sync_redis.hdel("replayd:{vis}:progress", "paused")  # what `replayd resume vis` does
        await eventually(lambda: engine.stats.status == "live")
        assert len(handler.seen) + sync_redis.xlen("replayd:{vis}:dlq") == 1000
        engine.stop()


@pytest.mark.anyio
async def test_the_breaker_stops_a_one_shot_job_with_65(
    raw_redis: Redis, redis_cfg: RedisConfig, sync_redis: redis.Redis
) -> None:
    add(sync_redis, orders(300))
    spec = following(end="now", on_poison="skip", retries=0, partitions=1)
    engine = Engine(spec, raw_redis, redis_cfg=redis_cfg, handler=FunctionHandler(always_fails, "fn"))
    with pytest.raises(JobBlocked, match=r"circuit breaker: 20 events .* backend down \(19\)") as caught:
        await engine.run()
    assert caught.value.exit_code == 65
    assert engine.stats.failed == 20  # 19 skipped, the 20th stopped at (it is retried next run)


# --- handler time-outs (FAULTS T39) ----------------------------------------------------------------------------


class HangsOn:
    """Hangs (async, for ever) or blocks its worker thread (sync, `block_s`) on the event whose seq is `bad`."""

    def __init__(self, bad: int, block_s: float = 0.0) -> None:
        self.bad = bad
        self.block_s = block_s
        self.seen: list[int] = []

    async def hang(self, event: Event) -> None:
        if event.data["seq"] == self.bad:
            await anyio.Event().wait()
        self.seen.append(event.data["seq"])

    def block(self, event: Event) -> None:
        if event.data["seq"] == self.bad:
            time.sleep(self.block_s)
        self.seen.append(event.data["seq"])


@pytest.mark.anyio
async def test_a_hanging_async_handler_times_out_and_is_dead_lettered(
    raw_redis: Redis, redis_cfg: RedisConfig, sync_redis: redis.Redis
) -> None:
    """1. an async handler never returns on event 5  2. handler_timeout_s = 0.5: the call is cancelled, retried
    once (cancelled again), then dead-lettered as HandlerTimeout  3. every other event is handled, the job ends."""
    ids = add(sync_redis, orders(40, customers=4))
    handler = HangsOn(5)
    metrics = Metrics()
    spec = following(end="now", partition_by="customer_id", on_poison="dead-letter", retries=1,
                     handler_timeout_s=0.5)  # fmt: skip
    engine = Engine(spec, raw_redis, redis_cfg=redis_cfg, handler=FunctionHandler(handler.hang, "hang"),
                    metrics=metrics)  # fmt: skip
    with anyio.fail_after(15):
        stats = await engine.run()
    assert stats.status == "completed"
    letters: Any = sync_redis.xrange("replayd:{vis}:dlq")
    assert [(f[b"id"].decode(), f[b"error_type"]) for _, f in letters][:1] == [(ids[5], b"HandlerTimeout")]
    assert sorted(handler.seen) == [seq for seq in range(40) if seq % 4 != 1 or seq < 5]  # c1 parked after 5
    assert sample(metrics, "replayd_handler_timeouts_total", replay="vis", action="cancelled") == 2


@pytest.mark.anyio
async def test_a_hanging_async_handler_stops_a_one_shot_job_naming_the_event(
    raw_redis: Redis, redis_cfg: RedisConfig, sync_redis: redis.Redis
) -> None:
    ids = add(sync_redis, orders(20))
    spec = following(end="now", retries=0, handler_timeout_s=0.3)
    engine = Engine(spec, raw_redis, redis_cfg=redis_cfg, handler=FunctionHandler(HangsOn(3).hang, "hang"))
    with anyio.fail_after(10), pytest.raises(DataError, match=f"{STREAM} {ids[3]}"):
        await engine.run()
    committed = checkpoint(sync_redis, "vis")
    assert ids[2] in {v for k, v in committed.items() if k.startswith(f"{STREAM}#")}


@pytest.mark.anyio
async def test_a_blocking_sync_handler_past_its_time_is_reported_and_stalled(
    raw_redis: Redis, redis_cfg: RedisConfig, sync_redis: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """A sync function in a worker thread cannot be cancelled: past handler_timeout_s it is logged with the event
    and handler, counted, and the job reads `stalled` until it returns; then it goes on (nothing is lost)."""
    ids = add(sync_redis, orders(10))
    handler = HangsOn(4, block_s=2.0)
    metrics = Metrics()
    spec = following(handler_timeout_s=0.4)
    engine = Engine(spec, raw_redis, redis_cfg=redis_cfg, handler=FunctionHandler(handler.block, "blocker"),
                    metrics=metrics)  # fmt: skip
    states = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        await eventually(lambda: sample(metrics, "replayd_state", replay="vis", state="stalled") == 1)
        states.append(progress(sync_redis, "vis").get("status"))
        await eventually(lambda: len(handler.seen) == 10 and engine._state() == "live")
        engine.stop()
    assert sample(metrics, "replayd_handler_timeouts_total", replay="vis", action="reported") == 1
    assert any("handler blocker has run for" in r.getMessage() and ids[4] in r.getMessage() for r in caplog.records)
    assert handler.seen == list(range(10))


def test_the_daemon_blocks_on_one_poison_event_and_still_stops_on_sigterm(
    redis_url: str, sync_redis: redis.Redis, tmp_path: Path, processes: list[subprocess.Popen[str]]
) -> None:
    """1. `replayd run`, a following job whose plain function fails on seq 7, default settings  2. `blocked` in
    status and in /metrics, one dead letter  3. SIGTERM: exit 0 at once  4. restarted, it blocks again (not
    `paused`): the letter still holds the stream."""
    add(sync_redis, orders(100))
    port = free_port()
    config = tmp_path / "replayd.toml"
    config.write_text(
        f'[http]\nport = {port}\nhost = "127.0.0.1"\n\n[[jobs]]\nname = "d"\nstreams = ["{STREAM}"]\n'
        'handler = "tests.test_visible:fails_on_7"\nretry_backoff_s = 0.001\n'
    )

    def status() -> str:
        shown = json.loads(replayd("status", "d", "--json", "--redis-url", redis_url).stdout)
        return str(shown["d"]["progress"]["status"])

    for _ in range(2):
        daemon = spawn_replayd("run", "--config", str(config), "--redis-url", redis_url, "--log-format", "json")
        processes.append(daemon)
        wait_for(lambda: progress(sync_redis, "d").get("status") == "blocked", proc=daemon)
        assert status() == "blocked"
        scraped = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert 'replayd_state{replay="d",state="blocked"} 1.0' in scraped
        assert sync_redis.xlen("replayd:{d}:dlq") == 1
        started = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        _, stderr = daemon.communicate(timeout=20)
        assert daemon.returncode == 0, stderr[-2000:]
        assert time.monotonic() - started < 10
        assert any("blocked" in json.loads(line)["msg"] for line in stderr.splitlines() if line.startswith("{"))
        assert progress(sync_redis, "d")["status"] == "stopped"


class HangingBatch:
    """A `handle_batch` handler whose call on the batch holding seq `bad` never returns."""

    name = "batcher"

    def __init__(self, bad: int) -> None:
        self.bad = bad
        self.seen: list[int] = []

    async def handle_batch(self, events: list[Event], ctx: Any) -> None:
        if any(event.data["seq"] == self.bad for event in events):
            await anyio.Event().wait()
        self.seen += [event.data["seq"] for event in events]


@pytest.mark.anyio
async def test_a_hanging_handle_batch_call_fails_its_batch_and_the_job_goes_on(
    raw_redis: Redis, redis_cfg: RedisConfig, sync_redis: redis.Redis
) -> None:
    add(sync_redis, orders(30, customers=3))
    handler = HangingBatch(4)
    metrics = Metrics()
    spec = following(end="now", partition_by="customer_id", partitions=3, handler_timeout_s=0.3)
    engine = Engine(spec, raw_redis, redis_cfg=redis_cfg, handler=ObjectHandler(handler, "batcher"), metrics=metrics)
    with anyio.fail_after(10):
        stats = await engine.run()
    assert stats.status == "completed"
    assert 4 not in handler.seen and stats.failed >= 1 and len(handler.seen) + stats.failed == 30
    assert sample(metrics, "replayd_handler_timeouts_total", replay="vis", action="cancelled") == 1
