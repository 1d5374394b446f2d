"""Small helpers shared by the tests: entries, job specs, engine runs, Redis snapshots, the CLI as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import anyio
import redis
from redis.asyncio import Redis

from replayd.config import JobSpec, RedisConfig
from replayd.handlers import FunctionHandler, Handler, ObjectHandler, Projection
from replayd.jobs.engine import Engine
from replayd.jobs.progress import Stats
from tests.plugins import Recorder

STREAM = "orders"
JOB = "job"


def entry(
    event_type: str = "OrderCreated", data: dict[str, Any] | None = None, metadata: dict[str, Any] | None = None
) -> dict[str, str]:
    """Entry fields in the article's schema."""
    return {
        "event_type": event_type,
        "data": json.dumps(data or {}),
        "metadata": json.dumps(metadata or {}),
        "timestamp": "1700000000.0",
    }


def add(
    r: redis.Redis, entries: Iterable[dict[str, str]], *, stream: str = STREAM, ids: Iterable[str] = ()
) -> list[str]:
    """XADD the entries (with the given IDs, else `*`); return their IDs."""
    wanted = list(ids)
    added: list[str] = []
    for i, fields in enumerate(entries):
        raw = r.xadd(stream, fields, id=wanted[i] if wanted else "*")  # type: ignore[arg-type]
        added.append(as_text(raw))
    return added


def orders(n: int, *, customers: int = 7, start: int = 0) -> list[dict[str, str]]:
    """`n` OrderCreated entries spread over `customers`, each with its sequence number `seq`."""
    return [entry(data={"customer_id": f"c{i % customers}", "seq": i, "total": i}) for i in range(start, start + n)]


def spec(**overrides: Any) -> JobSpec:
    """A JobSpec for tests: stream `orders`, end `now`, 4 partitions, progress written often."""
    values: dict[str, Any] = {
        "name": JOB,
        "streams": [STREAM],
        "handler": "tests.plugins:Recorder",
        "end": "now",
        "partitions": 4,
        "progress_interval_s": 0.05,
    }
    values.update(overrides)
    return JobSpec(**values)


def engine(job: JobSpec, r: Redis, cfg: RedisConfig, handler: object) -> Engine:
    """An Engine on a handler object (a Recorder, a Projection, an already adapted Handler...)."""
    adapted: Handler
    if isinstance(handler, Projection | FunctionHandler | ObjectHandler):
        adapted = handler
    else:
        adapted = ObjectHandler(handler, getattr(handler, "name", "handler"))
    return Engine(job, r, redis_cfg=cfg, handler=adapted)


async def run(job: JobSpec, r: Redis, cfg: RedisConfig, handler: object | None = None) -> tuple[Stats, Any]:
    """Run a job to its end; return its stats and the handler (a fresh Recorder unless given)."""
    used = handler if handler is not None else Recorder()
    stats = await engine(job, r, cfg, used).run()
    return stats, used


async def wait_until(condition: Callable[[], bool], *, within: float = 10.0) -> None:
    """Poll until `condition()` holds; fail after `within` seconds."""
    with anyio.fail_after(within):
        while not condition():  # noqa: ASYNC110 - polls state that other tasks change without an Event
            await anyio.sleep(0.01)


def as_text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def checkpoint(r: redis.Redis, job: str = JOB) -> dict[str, str]:
    raw: dict[bytes, bytes] = r.hgetall(f"replayd:{{{job}}}:checkpoint")  # type: ignore[assignment]
    return {k.decode(): v.decode() for k, v in raw.items()}


def progress(r: redis.Redis, job: str = JOB) -> dict[str, str]:
    raw: dict[bytes, bytes] = r.hgetall(f"replayd:{{{job}}}:progress")  # type: ignore[assignment]
    return {k.decode(): v.decode() for k, v in raw.items()}


def stream_ids(r: redis.Redis, stream: str = STREAM) -> list[str]:
    return [raw.decode() for raw, _ in r.xrange(stream)]  # type: ignore[union-attr]


def snapshot(r: redis.Redis, pattern: str) -> dict[str, tuple[str, Any]]:
    """Every key matching `pattern` -> (type, value), read by type (hash, string, set, list, zset), pipelined."""
    keys: list[bytes] = list(r.scan_iter(match=pattern, count=1000))
    pipe = r.pipeline(transaction=False)
    for key in keys:
        pipe.type(key)
    kinds = [as_text(kind) for kind in pipe.execute()]
    readers: dict[str, Callable[[Any, bytes], Any]] = {
        "hash": lambda p, k: p.hgetall(k),
        "string": lambda p, k: p.get(k),
        "set": lambda p, k: p.smembers(k),
        "list": lambda p, k: p.lrange(k, 0, -1),
        "zset": lambda p, k: p.zrange(k, 0, -1, withscores=True),
    }
    for key, kind in zip(keys, kinds, strict=True):
        readers[kind](pipe, key)
    values = pipe.execute()
    return {as_text(key): (kind, value) for key, kind, value in zip(keys, kinds, values, strict=True)}


def order_summaries(r: redis.Redis) -> dict[str, tuple[str, Any]]:
    """The order_summary projection as `snapshot` reads it, without its meta hash (which says when it was built)."""
    keys = snapshot(r, "projection:order_summary:*")
    return {key: value for key, value in keys.items() if not key.endswith(":meta")}


def cli_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """This environment without replayd settings (they would leak into the command under test), plus `env`;
    REPLAYD_REDIS_SERVER, the binary the tests run, stays."""
    kept = {k: v for k, v in os.environ.items() if not k.startswith("REPLAYD_") or k == "REPLAYD_REDIS_SERVER"}
    return kept | (env or {})


def replayd(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`python -m replayd ARGS` to completion, output captured as text."""
    command = [sys.executable, "-m", "replayd", *args]
    return subprocess.run(command, capture_output=True, text=True, env=cli_env(env), timeout=timeout, check=False)


def spawn_replayd(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """`python -m replayd ARGS` in the background, stdout and stderr piped."""
    command = [sys.executable, "-m", "replayd", *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(env))


def wait_for(condition: Callable[[], bool], timeout: float = 20.0, proc: subprocess.Popen[str] | None = None) -> None:
    """Poll `condition` (blocking) until it holds; fail after `timeout` s, or at once if `proc` exits first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"replayd exited with {proc.returncode} first: {proc.communicate()[1][-2000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met in {timeout}s")
        time.sleep(0.01)
