"""`replayd demo`: an embedded Redis, the article's order history, a rebuild with a progress bar, then the
daemon following live while a small producer keeps appending orders. Ctrl-C stops it cleanly."""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import ExitStack
from pathlib import Path

import anyio
from redis.asyncio import Redis

from replayd.config import JobSpec, RedisConfig, Settings
from replayd.connection import connection_options, create_redis, text_hash
from replayd.embedded import EmbeddedRedis
from replayd.jobs.daemon import Daemon
from replayd.jobs.engine import Engine
from replayd.jobs.rebuild import rebuild_in_place
from replayd.ops.console import summary, with_progress
from replayd.ops.logs import redact_text
from replayd.sample import load_history, order_events

STREAM = "events:orders"


def _say(text: str) -> None:
    print(text, flush=True)


async def run_demo(args: argparse.Namespace, settings: Settings) -> None:
    with ExitStack() as stack:
        if args.redis_url or os.environ.get("REPLAYD_REDIS__URL"):
            cfg = settings.redis
        else:
            # data kept in ./.replayd/redis (AOF), so a second `make run` resumes from the checkpoint
            server = stack.enter_context(EmbeddedRedis(Path(".replayd/redis"), appendonly=True))
            _say(f"started an embedded redis-server ({server.binary}) on {server.url}")
            cfg = settings.redis.model_copy(update={"url": RedisConfig(url=server.url).url})
        _say(f"using Redis at {redact_text(cfg.url.get_secret_value())}")
        reader = Redis.from_url(cfg.url.get_secret_value(), **connection_options(cfg))
        try:
            await _ensure_history(reader, args.events)
            await _rebuild(cfg)
            await _follow(cfg, settings, reader, args.rate)
        finally:
            await reader.aclose()


async def _ensure_history(redis: Redis, events: int) -> None:
    if await redis.xlen(STREAM):
        _say(f"{STREAM} already holds {await redis.xlen(STREAM):,} events")
        return
    _say(f"loading {events:,} sample order events into {STREAM} ...")
    await load_history(redis, STREAM, events)


async def _rebuild(cfg: RedisConfig) -> None:
    spec = JobSpec(name="order_summary", streams=[STREAM], handler="order_summary", end="now", resume=False)
    client = create_redis(cfg)
    try:
        engine = Engine(spec, client, redis_cfg=cfg)
        _say("rebuilding projection:order_summary in place (the article's rebuild) ...")
        stats = await with_progress(engine.stats, rebuild_in_place(engine))
        _say(summary("rebuilt from", stats))
    finally:
        await client.aclose()


async def _follow(cfg: RedisConfig, settings: Settings, reader: Redis, rate: float) -> None:
    job = JobSpec(name="order_summary", streams=[STREAM], handler="order_summary", end="follow")
    http = settings.http
    if "REPLAYD_HTTP__PORT" not in os.environ:  # a free port on loopback: the demo must not clash with anything
        http = http.model_copy(update={"host": "127.0.0.1", "port": 0})
    daemon_settings = settings.model_copy(update={"redis": cfg, "jobs": [job], "http": http})
    daemon = Daemon(daemon_settings)
    _say(f"following {STREAM} live; a producer appends ~{rate:g} orders/s. Ctrl-C to stop.")
    async with anyio.create_task_group() as tg:
        tg.start_soon(_produce, reader, rate)
        tg.start_soon(_watch, reader)
        await daemon.run()
        tg.cancel_scope.cancel()
    _say("stopped cleanly; the history stays in .replayd/redis for the next `make run`")


async def _produce(redis: Redis, rate: float) -> None:
    # a seed of its own, and ids far above the history's, so live orders are new orders
    for fields in order_events(10**9, seed=int.from_bytes(os.urandom(2), "big"), customers=50):
        await redis.xadd(STREAM, fields)  # type: ignore[arg-type]
        await anyio.sleep(1 / rate)


async def _watch(redis: Redis) -> None:
    key = "replayd:{order_summary}:progress"
    while True:
        await anyio.sleep(2)
        progress = text_hash(await redis.hgetall(key))
        if sys.stdout.isatty() or progress:
            _say(
                f"live: status {progress.get('status')}, {progress.get('processed_events')} processed this run, "
                f"position {progress.get('current_stream_id')}, {await redis.xlen(STREAM):,} events in the stream"
            )
