"""Redis clients for the data path: hiredis, a blocking pool, raw stream replies, retries with backoff."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import anyio
from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from replayd.config import RedisConfig
from replayd.errors import SourceError
from replayd.metrics import Metrics

logger = logging.getLogger(__name__)

T = TypeVar("T")

RETRIABLE = (RedisConnectionError, RedisTimeoutError, OSError)
"""Errors after which the same idempotent read may simply be sent again."""


def is_retriable(exc: BaseException) -> bool:
    """A lost or failing connection: one of RETRIABLE, or uvloop's RuntimeError for a write on a transport the
    peer has reset ("unable to perform operation on <TCPTransport closed=True ...>; the handler is closed")."""
    return isinstance(exc, RETRIABLE) or (isinstance(exc, RuntimeError) and "handler is closed" in str(exc))


def create_redis(cfg: RedisConfig, *, raw_streams: bool = True) -> Redis:
    """A client on a blocking pool (waits for a free connection instead of failing under load).

    With `raw_streams`, XRANGE/XREVRANGE/XREAD replies stay the lists hiredis builds: redis-py's per-entry
    callbacks would cost more than the decoding itself.
    """
    pool = BlockingConnectionPool.from_url(
        cfg.url.get_secret_value(),
        max_connections=cfg.max_connections,
        timeout=cfg.socket_timeout_s,
        socket_timeout=cfg.socket_timeout_s,
        socket_connect_timeout=cfg.connect_timeout_s,
        health_check_interval=30,
        # RESP2 on purpose: the raw stream replies the data path parses have one shape on Redis 6.2 and 7,
        # whatever protocol a redis-py release negotiates by default
        protocol=2,
    )
    client = Redis.from_pool(pool)  # owns the pool: aclose() disconnects it
    if raw_streams:
        for command in ("XRANGE", "XREVRANGE", "XREAD"):
            client.response_callbacks.pop(command, None)
    return client


def redact(url: str) -> str:
    """The URL with its password replaced, for logs and status output."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:" if parts.username else ":"
    return urlunsplit(parts._replace(netloc=f"{user}***@{netloc}"))


async def retrying(
    call: Callable[[], Awaitable[T]], *, what: str, budget_s: float, metrics: Metrics | None = None
) -> T:
    """Run an idempotent Redis call, retrying connection errors with exponential backoff and full jitter."""
    deadline = time.monotonic() + budget_s
    delay = 0.05
    failed = False
    while True:
        started = time.monotonic()
        try:
            result = await call()
        except Exception as exc:
            if not is_retriable(exc):
                raise
            if metrics:
                metrics.redis_error(what.lower(), exc)
            if time.monotonic() + delay > deadline:
                raise SourceError(f"Redis unavailable for {budget_s:.0f}s during {what}: {exc}") from exc
            logger.warning("redis %s failed (%s), retrying", what, exc)
            failed = True
            await anyio.sleep(random.uniform(0, delay))
            delay = min(delay * 2, 5.0)
            continue
        if metrics:
            metrics.command_duration.labels(what.lower()).observe(time.monotonic() - started)
            if failed:
                metrics.reconnects.inc()
        return result


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def text_hash(raw: dict[Any, Any]) -> dict[str, str]:
    """An HGETALL reply as text, whatever the client's decode_responses."""
    return {text(k): text(v) for k, v in raw.items()}
