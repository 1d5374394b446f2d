"""The daemon: runs every configured job, follows live, and shuts down in two stages on SIGTERM/SIGINT.

First signal: every job stops reading, drains what is routed and commits, within `shutdown_timeout_s`;
past it, in-flight work is cancelled uncommitted (it will be replayed). Second signal: exit at once; the last
commit holds, because each is one atomic script.

With `[http] enabled` (the default) the daemon serves /metrics, /healthz (/livez) and /readyz (`replayd.ops.http`)
in its task group for as long as it runs, drain included; readiness is config valid + plugins loaded + Redis
answering a PING every few seconds on a connection of its own (never "caught up").
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from functools import partial

import anyio
import anyio.abc
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from replayd.config import RedisConfig, Settings
from replayd.connection import Client, connection_options, create_redis, ping
from replayd.errors import RestartJob
from replayd.jobs.engine import CLOSING_S, Engine
from replayd.jobs.workers import announce, listener_address
from replayd.ops.http import HttpServer, Readiness, watch_redis
from replayd.ops.logs import redact_text
from replayd.ops.metrics import Metrics

logger = logging.getLogger(__name__)


class Daemon:
    """Runs the jobs of `settings` until they end or a signal stops them."""

    def __init__(
        self,
        settings: Settings,
        *,
        handle_signals: bool = True,
        redis: Client | None = None,
        metrics: Metrics | None = None,
        stall_after_s: float = 10.0,
    ) -> None:
        self.settings = settings
        self.handle_signals = handle_signals
        self.stall_after_s = stall_after_s
        """/healthz fails once the event loop has not run for this long (a handler blocking it)."""
        self.readiness = Readiness(config_ok=True)  # `settings` is a validated Settings
        self.redis = redis or create_redis(settings.redis)
        # handlers and filters load here, before anything runs: a bad plugin is a config error at start
        self.metrics = metrics or Metrics()
        self.engines = [
            Engine(spec, self.redis, redis_cfg=settings.redis, metrics=self.metrics) for spec in settings.jobs
        ]
        self.readiness.plugins_loaded = True
        self.http_port: int | None = None
        """The port /metrics, /healthz and /readyz are served on, once `run` has bound it."""
        self.stopping = False

    def stop(self) -> None:
        self.stopping = True
        for engine in self.engines:
            engine.stop()

    async def run(self) -> None:
        logger.info(
            "replayd starting: %d job(s) on %s",
            len(self.engines),
            redact_text(self.settings.redis.url.get_secret_value()),
        )
        try:
            async with anyio.create_task_group() as tg:
                if self.handle_signals:
                    tg.start_soon(drain_on_signals, self.stop, tg.cancel_scope, self.settings.shutdown_timeout_s)
                http = self.settings.http
                if http.enabled:
                    self.http_port = await start_http(
                        tg, self.metrics, self.readiness, self.settings.redis,
                        host=http.host, port=http.port, stall_after_s=self.stall_after_s,
                    )  # fmt: skip
                async with anyio.create_task_group() as jobs:
                    for index in range(len(self.engines)):
                        jobs.start_soon(self._run_job, index)
                tg.cancel_scope.cancel()
        finally:
            with anyio.move_on_after(2, shield=True):
                await self.redis.aclose()
        totals = [engine.stats for engine in self.engines]
        logger.info(
            "replayd stopped: %d processed, %d failed",
            sum(s.processed for s in totals),
            sum(s.failed for s in totals),
        )

    async def _run_job(self, index: int) -> None:
        """Run a job; start it again when it must (a rebuild flipped its projection to a new version, Redis lost
        commits it had acknowledged)."""
        while True:
            engine = self.engines[index]
            try:
                await engine.run()
            except RestartJob as restart:
                logger.warning("%s", restart)
            else:
                return
            self.engines[index] = Engine(engine.spec, self.redis, redis_cfg=self.settings.redis,
                                         handler=engine.handler, metrics=self.metrics)  # fmt: skip
            if self.stopping:
                return


async def drain_on_signals(
    stop: Callable[[], None], scope: anyio.CancelScope, timeout_s: float, received: list[int] | None = None
) -> None:
    """The first SIGTERM or SIGINT calls `stop` (stop reading, drain what is routed, commit) and, should that take
    longer than `timeout_s` less the `CLOSING_S` each job's final progress write and lease release may take, cancels
    `scope`: in-flight work is then left uncommitted, to be replayed, and the whole stop still fits in `timeout_s`
    (a container's stop grace). A second signal exits at once with 128 + its number. The first signal's number is
    appended to `received`.

    Explicit handlers rather than asyncio's default Ctrl-C (which cancels the main task, and a cancellation
    meeting one of anyio's own cancel scopes can be absorbed by it): the stop is a drain, whatever runs then."""
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        signum = await anext(signals)
        if received is not None:
            received.append(signum)
        drain_s = max(timeout_s - CLOSING_S, 0.0)  # the final writes' share first: a stop never overruns
        logger.info("%s: draining, up to %.0fs (then %.0fs for the final writes)", signal.Signals(signum).name,
                    drain_s, timeout_s - drain_s)  # fmt: skip
        stop()
        with anyio.move_on_after(drain_s):
            async for again in signals:
                _exit_now(128 + again, "second %s: exiting now", signal.Signals(again).name)
        logger.warning("drain deadline passed: cancelling in-flight work (it is not committed and will be replayed)")
        # a sync handler stuck in a worker thread cannot be cancelled, and the cancelled work waits for it: past the
        # final writes' share, leave without it, so the stop still fits in the container's grace
        overrun = threading.Timer(timeout_s - drain_s, _exit_now, (128 + signum, _STUCK_AT_STOP))
        overrun.daemon = True
        overrun.start()
        scope.cancel()


_STUCK_AT_STOP = (
    "the stop outran shutdown_timeout_s: a handler call in a worker thread is still running (a sync function "
    "cannot be cancelled); exiting without it (its events are not committed and will be replayed)"
)


def _exit_now(code: int, message: str, *args: object) -> None:
    logger.warning(message, *args)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(code)


async def start_http(
    tg: anyio.abc.TaskGroup,
    metrics: Metrics,
    readiness: Readiness,
    redis_cfg: RedisConfig,
    *,
    host: str,
    port: int,
    stall_after_s: float = 10.0,
) -> int:
    """Serve /metrics, /healthz and /readyz in `tg` and keep `readiness.redis_ok` fresh; return the bound port.
    A `--workers` worker serves on a free loopback port, which it announces to the supervisor's listener."""
    host, port = listener_address(host, port)
    server = HttpServer(metrics, readiness, host=host, port=port, stall_after_s=stall_after_s)
    bound: int = await tg.start(server.run)
    announce(bound)
    tg.start_soon(ping_redis, readiness, redis_cfg)
    shown = f"[{host}]" if ":" in host else host
    logger.info("serving /metrics /healthz /readyz on http://%s:%d", shown, bound)
    return bound


async def ping_redis(
    readiness: Readiness, cfg: RedisConfig, *, interval_s: float = 5.0, timeout_s: float = 2.0
) -> None:
    """`watch_redis` on a client of its own: a busy data-path pool must not read as "Redis unreachable".
    On a cluster it PINGs the node the URL names."""
    client = Redis.from_url(
        cfg.node_url(),
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),  # one attempt per PING: the next one comes in `interval_s`
        protocol=2,
        **connection_options(cfg),  # credentials and TLS files that the URL does not carry
    )
    try:
        await watch_redis(readiness, partial(ping, client), interval_s=interval_s, timeout_s=timeout_s)
    finally:
        with anyio.move_on_after(1, shield=True):
            await client.aclose()
