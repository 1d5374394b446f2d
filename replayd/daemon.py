"""The daemon: runs every configured job, follows live, and shuts down in two stages on SIGTERM/SIGINT.

First signal: every job stops reading, drains what is routed and commits, within `shutdown_timeout_s`;
past it, in-flight work is cancelled uncommitted (it will be replayed). Second signal: exit at once; the last
commit holds, because each is a single MULTI/EXEC.
"""

from __future__ import annotations

import logging
import os
import signal

import anyio
import anyio.abc
from redis.asyncio import Redis

from replayd.config import Settings
from replayd.connection import create_redis, redact
from replayd.engine import Engine
from replayd.metrics import Metrics

logger = logging.getLogger(__name__)


class Daemon:
    """Runs the jobs of `settings` until they end or a signal stops them."""

    def __init__(
        self,
        settings: Settings,
        *,
        handle_signals: bool = True,
        redis: Redis | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.handle_signals = handle_signals
        self.redis = redis or create_redis(settings.redis)
        # handlers and filters load here, before anything runs: a bad plugin is a config error at start
        self.metrics = metrics or Metrics()
        self.engines = [
            Engine(spec, self.redis, redis_cfg=settings.redis, metrics=self.metrics) for spec in settings.jobs
        ]
        self.stopping = False

    def stop(self) -> None:
        self.stopping = True
        for engine in self.engines:
            engine.stop()

    async def run(self) -> None:
        logger.info(
            "replayd starting: %d job(s) on %s", len(self.engines), redact(self.settings.redis.url.get_secret_value())
        )
        try:
            async with anyio.create_task_group() as tg:
                if self.handle_signals:
                    tg.start_soon(self._signals, tg)
                async with anyio.create_task_group() as jobs:
                    for engine in self.engines:
                        jobs.start_soon(engine.run)
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

    async def _signals(self, tg: anyio.abc.TaskGroup) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if self.stopping:
                    logger.warning("second %s: exiting now", name)
                    for handler in logging.getLogger().handlers:
                        handler.flush()
                    os._exit(128 + signum)
                logger.info("%s: draining, up to %.0fs", name, self.settings.shutdown_timeout_s)
                self.stop()
                tg.start_soon(self._deadline, tg.cancel_scope)

    async def _deadline(self, scope: anyio.CancelScope) -> None:
        await anyio.sleep(self.settings.shutdown_timeout_s)
        logger.warning("drain deadline passed: cancelling in-flight work (it is not committed and will be replayed)")
        scope.cancel()
