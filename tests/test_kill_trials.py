"""Kill trials (issue 5, item 4; the fault matrix, T1 and T4): `replayd run` subprocesses on a real redis-server,
SIGKILLed at seeded random moments and restarted, or SIGTERMed during slow batches.

- atomic (order_summary, effects in the checkpoint's script): the final projection equals a clean rebuild; an async
  handler (lanes and group commits, not the inline path) commits each effect exactly once;
- at-least-once (a handler writing with its own client): every entry ID is seen;
- SIGTERM: exit 0 within the drain deadline, status `stopped`, and the checkpoint is exactly the handled work.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from replayd.config import FieldNames
from replayd.events import parse_id
from replayd.pipeline.codec import Codec
from replayd.pipeline.commit import partition_positions
from replayd.pipeline.router import Router
from replayd.sample import load_history_sync
from tests.helpers import order_summaries, replayd, wait_for
from tests.trial_plugins import EFFECT_LOG, EFFECTS, SEEN

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

STREAM = "events:orders"
JOB = "orders"
CHECKPOINT = f"replayd:{{{JOB}}}:checkpoint"
PROGRESS = f"replayd:{{{JOB}}}:progress"
FLOOR = f"{STREAM}#*"
TRIALS = 20
EVENTS = 100_000


def write_config(tmp_path: Path, redis_url: str, *, shutdown_timeout_s: float = 20.0, **job: Any) -> Path:
    settings = {"name": JOB, "streams": [STREAM], "end": "now", "lease_ttl_s": 1, **job}
    lines = [
        f"shutdown_timeout_s = {shutdown_timeout_s}",
        f'[redis]\nurl = "{redis_url}"\nblock_ms = 100',
        "[http]\nenabled = false",
        "[[jobs]]",
        *(f"{key} = {value!r}".replace("'", '"') for key, value in settings.items()),
    ]
    path = tmp_path / "replayd.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def start(config: Path, redis_url: str, **env: str) -> subprocess.Popen[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("REPLAYD_", "TRIAL_"))}
    environ |= {"TRIAL_REDIS_URL": redis_url, **env}
    return subprocess.Popen(
        [sys.executable, "-m", "replayd", "run", "--config", str(config), "--log-format", "json"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=environ,
    )  # fmt: skip


def last_id(client: redis.Redis) -> bytes:
    entries: Any = client.xrevrange(STREAM, count=1)
    head: bytes = entries[0][0]
    return head


def floor(client: redis.Redis) -> bytes | None:
    value: Any = client.hget(CHECKPOINT, FLOOR)
    return value if value is None else bytes(value)


def seq(client: redis.Redis) -> bytes | None:
    value: Any = client.hget(CHECKPOINT, "seq")
    return value if value is None else bytes(value)


def as_id(value: bytes | None) -> tuple[int, int]:
    return (0, 0) if value is None else parse_id(value)


def kill_trials(client: redis.Redis, config: Path, redis_url: str, processes: list[subprocess.Popen[str]],
                seed: int, max_sleep_s: float) -> int:  # fmt: skip
    """TRIALS runs, each SIGKILLed at a seeded random moment after it took the lease and claimed the commit
    sequence (so the moment falls in its replay, not in its start-up or in waiting for the dead one's lease).
    Returns how many kills left the stream unfinished; checks the checkpoint never moves backwards."""
    rng = random.Random(seed)
    last = last_id(client)
    mid_replay = 0
    previous = as_id(floor(client))
    for trial in range(TRIALS):
        claimed = seq(client)
        proc = start(config, redis_url)
        processes.append(proc)
        wait_for(lambda: seq(client) != claimed, proc=proc)  # noqa: B023 - called within the iteration
        time.sleep(rng.uniform(0.0, max_sleep_s))
        proc.kill()
        _, stderr = proc.communicate(timeout=10)
        assert proc.returncode in (-signal.SIGKILL, 0), f"trial {trial}: exit {proc.returncode}: {stderr[-2000:]}"
        now = as_id(floor(client))
        assert now >= previous, f"trial {trial}: the checkpoint went back from {previous} to {now}"
        previous = now
        mid_replay += floor(client) != last
    return mid_replay


def finish(config: Path, redis_url: str, processes: list[subprocess.Popen[str]]) -> None:
    proc = start(config, redis_url)
    processes.append(proc)
    _, stderr = proc.communicate(timeout=90)
    assert proc.returncode == 0, stderr[-3000:]


def test_sigkill_20_times_during_an_atomic_replay_then_the_projection_equals_a_clean_rebuild(
    tmp_path: Path, redis_url: str, sync_redis: redis.Redis, processes: list[subprocess.Popen[str]]
) -> None:
    """T1, atomic: 200k order events; 20 runs to `now` killed at random, restarted; then one run to the end.
    The order_summary projection (float sums: order and exactly-once matter) equals `rebuild --in-place`'s."""
    load_history_sync(sync_redis, STREAM, 2 * EVENTS)
    # small batches and 200k events (order_summary is called inline, without lanes: 100k were over before the 20th
    # kill): the replay lasts several seconds, so the 20 kills fall across it
    config = write_config(tmp_path, redis_url, handler="order_summary", batch_size=50)
    mid_replay = kill_trials(sync_redis, config, redis_url, processes, seed=20240501, max_sleep_s=0.45)
    assert mid_replay > TRIALS // 2, f"only {mid_replay} of {TRIALS} kills landed mid-replay"
    finish(config, redis_url, processes)
    assert floor(sync_redis) == last_id(sync_redis)
    resumed = order_summaries(sync_redis)
    assert resumed
    clean = replayd("rebuild", "--redis-url", redis_url, "--stream", STREAM, "--handler", "order_summary",
                    "--in-place", "--job", "clean", timeout=120)  # fmt: skip
    assert clean.returncode == 0, clean.stderr[-3000:]
    rebuilt = order_summaries(sync_redis)
    assert resumed.keys() == rebuilt.keys()
    differing = [key for key in rebuilt if resumed[key] != rebuilt[key]]
    assert not differing, f"{len(differing)} keys differ, e.g. {differing[:3]}: {[resumed[k] for k in differing[:3]]}"


def test_sigkill_20_times_with_a_non_transactional_handler_loses_no_event(
    tmp_path: Path, redis_url: str, sync_redis: redis.Redis, processes: list[subprocess.Popen[str]]
) -> None:
    """T1, at-least-once: the handler SADDs each entry ID with its own client, outside the commit; after 20
    random kills and a last run, every entry ID is in the set."""
    load_history_sync(sync_redis, STREAM, EVENTS)
    config = write_config(tmp_path, redis_url, handler="tests.trial_plugins:seen_direct", batch_size=500)
    mid_replay = kill_trials(sync_redis, config, redis_url, processes, seed=7, max_sleep_s=0.6)
    assert mid_replay > TRIALS // 2, f"only {mid_replay} of {TRIALS} kills landed mid-replay"
    finish(config, redis_url, processes)
    assert floor(sync_redis) == last_id(sync_redis)
    assert sync_redis.scard(SEEN) == sync_redis.xlen(STREAM) == EVENTS
    entries: Any = sync_redis.xrange(STREAM)
    ids = [entry_id for entry_id, _ in entries]
    assert sync_redis.smismember(SEEN, ids) == [1] * EVENTS


def test_sigkill_20_times_during_an_async_handlers_replay_then_each_effect_is_committed_once(
    tmp_path: Path, redis_url: str, sync_redis: redis.Redis, processes: list[subprocess.Popen[str]]
) -> None:
    """T1, atomic on the lane path: SlowEffects is async, so its batches run in lanes (8 partitions) and commit in
    groups, unlike order_summary (called inline). After 20 random kills and a last run, every event's effect is
    committed exactly once, and each partition's checkpoint covers exactly the effects."""
    load_history_sync(sync_redis, STREAM, EVENTS)
    # 0.5 ms per event over 8 lanes: about 6 s of replay, across which the 20 kills fall
    config = write_config(tmp_path, redis_url, handler="tests.trial_plugins:SlowEffects", partitions=8, batch_size=200)
    mid_replay = kill_trials(sync_redis, config, redis_url, processes, seed=1905, max_sleep_s=0.5)
    assert mid_replay > TRIALS // 2, f"only {mid_replay} of {TRIALS} kills landed mid-replay"
    finish(config, redis_url, processes)
    assert floor(sync_redis) == last_id(sync_redis)
    assert handled_matches_checkpoint(sync_redis, 8) == (EVENTS, EVENTS)


def handled_matches_checkpoint(client: redis.Redis, partitions: int) -> tuple[int, int]:
    """Every entry with an effect is at or below its partition's checkpoint, and every entry at or below it has
    its effect, once. Returns (entries with an effect, entries)."""
    raw: Any = client.xrange(STREAM)
    events, poison, _ = Codec(STREAM, FieldNames()).decode([[i, [f for pair in fields.items() for f in pair]]
                                                           for i, fields in raw])  # fmt: skip
    assert not poison
    fields: Any = client.hgetall(CHECKPOINT)
    positions = partition_positions({k.decode(): v.decode() for k, v in fields.items()}, STREAM, partitions) or {}
    router = Router(partitions, partition_by="customer_id", ordering="key")
    members: Any = client.smembers(EFFECTS)
    effects = {member.decode() for member in members}
    log: Any = client.lrange(EFFECT_LOG, 0, -1)
    assert len(log) == len(set(log)), "an effect was committed twice"
    wrong = [
        (event.stream_id, router.partition(event))
        for event in events
        if (event.stream_id in effects) != (parse_id(event.stream_id) <= positions.get(router.partition(event), (0, 0)))
    ]
    assert not wrong, f"{len(wrong)} entries disagree with their partition's checkpoint, e.g. {wrong[:5]}"
    return len(effects), len(events)


@pytest.mark.parametrize(
    ("event_sleep_s", "shutdown_timeout_s"),
    [pytest.param(0.0005, 5.0, id="drains"), pytest.param(0.03, 1.0, id="deadline-cancels")],
)
def test_sigterm_during_slow_batches_exits_0_with_the_checkpoint_matching_the_handled_work(
    tmp_path: Path, redis_url: str, sync_redis: redis.Redis, processes: list[subprocess.Popen[str]],
    event_sleep_s: float, shutdown_timeout_s: float,
) -> None:  # fmt: skip
    """T4: lane batches of 1000 events taking 0.5 s (drains) or 30 s (longer than the drain deadline); SIGTERM
    mid-replay. Short batches finish and commit before the deadline; long ones are cancelled at it, uncommitted.
    Either way: exit 0 within the deadline, status `stopped`, effects == checkpoint; a restart completes the job."""
    drains = event_sleep_s * 1000 < shutdown_timeout_s
    partitions = 8
    load_history_sync(sync_redis, STREAM, 40_000)
    config = write_config(tmp_path, redis_url, shutdown_timeout_s=shutdown_timeout_s,
                          handler="tests.trial_plugins:SlowEffects", partitions=partitions, concurrency=partitions,
                          batch_size=1000, min_batch_size=1000)  # fmt: skip
    proc = start(config, redis_url, TRIAL_EVENT_SLEEP_S=str(event_sleep_s))
    processes.append(proc)
    if drains:
        wait_for(lambda: floor(sync_redis) is not None, proc=proc)  # some batches committed
    else:
        wait_for(lambda: sync_redis.hget(PROGRESS, "status") == b"catching_up", proc=proc)
    time.sleep(0.2)  # into the next batches
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=shutdown_timeout_s + 10)
    took = time.monotonic() - signalled
    assert proc.returncode == 0, stderr[-3000:]
    assert took < shutdown_timeout_s + 3, f"exited {took:.1f}s after SIGTERM (drain deadline {shutdown_timeout_s}s)"
    assert ("drain deadline passed" in stderr) != drains, stderr[-3000:]
    assert sync_redis.hget(PROGRESS, "status") == b"stopped"
    assert as_id(floor(sync_redis)) < parse_id(last_id(sync_redis)), "SIGTERM came too late: nothing left to stop"
    handled, total = handled_matches_checkpoint(sync_redis, partitions)
    assert handled < total
    if not drains:
        assert handled == 0, "a batch cancelled at the deadline was committed"
    finish(config, redis_url, processes)  # 0.5 s per 1000 events: the rest of the replay
    assert handled_matches_checkpoint(sync_redis, partitions) == (total, total)
