"""Rebuilds: in place (the article's: clear, replay everything, write meta), or beside the live version (write
projection version N+1 from history, catch up, flip the alias).

Readers and the live job keep using version N all along. The rebuild runs as its own job (`<job>@vN+1`, its
own checkpoint), so a crash resumes it; `replayd.jobs.versions` holds the keys and the atomic flip.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TypeVar

from redis.asyncio import RedisCluster

from replayd.config import JobSpec, RedisConfig
from replayd.connection import Client, retrying
from replayd.errors import ConfigError, ReplaydError
from replayd.events import Id
from replayd.handlers import Handler
from replayd.handlers.loader import load_handler
from replayd.jobs.engine import Engine
from replayd.jobs.progress import Stats
from replayd.jobs.shape import check_shapes
from replayd.jobs.versions import Versions, build_job, namespace
from replayd.ops.metrics import Metrics
from replayd.pipeline.commit import job_key

logger = logging.getLogger(__name__)

Watch = Callable[[Stats, Awaitable[Stats]], Awaitable[Stats]]
T = TypeVar("T")


async def _unwatched(stats: Stats, work: Awaitable[Stats]) -> Stats:
    return await work


class Rebuild:
    """One rebuild of the projection of a live job `spec` into a new version."""

    def __init__(
        self,
        spec: JobSpec,
        redis: Client,
        *,
        redis_cfg: RedisConfig | None = None,
        handler: Handler | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        if isinstance(redis, RedisCluster):  # the flip is one script over the job's and the rebuild's keys
            raise ConfigError("rebuilds beside the live version (and verify) need a single Redis server, not a "
                              "Cluster, for now: use `replayd rebuild --in-place` there")  # fmt: skip
        self.spec = spec
        self.redis = redis
        self.redis_cfg = redis_cfg
        self.handler = handler or load_handler(spec.handler)
        self.metrics = metrics
        self.budget_s = (redis_cfg or RedisConfig()).unavailable_timeout_s
        self.versions = Versions(redis, self.handler.name)
        self.version = 0
        """The version being written (set by `begin`)."""
        self.engines: list[Engine] = []
        """The runs of the rebuild job so far: the build, then the catch-up rounds."""
        self.stopped = False
        """Set by `stop`: the build drains and ends before the flip."""

    def stop(self) -> None:
        """Stop the build: what is routed drains and commits, nothing flips, and the next run resumes the build."""
        self.stopped = True
        for engine in self.engines:
            engine.stop()

    async def begin(self) -> int:
        """Pick the version to write (an interrupted rebuild's, else current + 1), after deleting the versions
        whose retention has passed. A stream its codec does not fit stops it first (`shape`): no version begun."""
        if self.spec.check_shape:
            await self._retried(partial(check_shapes, self.redis, self.spec))
        await self._retried(self.versions.sweep)
        self.version = await self._retried(self.versions.begin)
        logger.info("rebuilding %s as v%d", self.handler.name, self.version)
        return self.version

    async def _retried(self, call: Callable[[], Awaitable[T]]) -> T:
        """`call` through a Redis restart, as the job's own commands: the steps around the build's runs."""
        return await retrying(call, what="rebuild", budget_s=self.budget_s, metrics=self.metrics)

    def engine(self, ends: dict[str, Id] | None = None) -> Engine:
        """A run of the rebuild job: from its own checkpoint (or the beginning) to now, or to `ends`."""
        spec = self.spec.model_copy(
            update={"name": build_job(self.spec.name, self.version), "start": "beginning", "after": None,
                    "resume": True, "end": "now", "shard": None}
        )  # fmt: skip
        engine = Engine(spec, self.redis, redis_cfg=self.redis_cfg, handler=self.handler, metrics=self.metrics,
                        version=self.version, ends=ends)  # fmt: skip
        engine.view.rebuild_targets = engine.stats.target  # replayd_rebuild_running, _target_timestamp_seconds
        self.engines.append(engine)
        if self.stopped:
            engine.stop()
        return engine

    async def catch_up(self, *, rounds: int = 5) -> None:
        """Run again to the head until a round reads less than a batch: the live job, which goes on after the
        flip from the rebuild's positions, then has little to redo."""
        for _ in range(rounds):
            if self.stopped:
                return
            stats = await self.engine().run()
            if stats.total < self.spec.batch_size:
                return

    async def flip(self, *, retain_s: float) -> int:
        """Make the new version current; return the one it replaced. That one is deleted once `retain_s` has
        passed, by the live job (it sweeps every 30 s) or the next rebuild; at once when `retain_s` is 0."""
        replaced = await self._retried(self.versions.current)
        old = await self._retried(partial(self.versions.flip, self.version, self.spec.name, retain_s=retain_s))
        if old is None:  # refused, unless an attempt whose reply was lost had flipped it
            if await self._retried(self.versions.current) != self.version:
                raise ReplaydError(f"{self.versions.next_key} no longer names v{self.version} (another rebuild "
                                   "took over): not flipping")  # fmt: skip
            old = replaced
        runs = self.engines
        meta = partial(self.redis.hset, f"projection:{self.handler.name}:meta", mapping={
            "rebuilt_at": repr(time.time()), "version": self.version, "total_events": sum(e.stats.total for e in runs),
            "processed_events": sum(e.stats.processed for e in runs),
            "events_per_second": f"{runs[0].stats.rate:.1f}",  # the build's pace, for `replayd plan` to go by
        })  # fmt: skip
        await self._retried(meta)
        logger.info("%s is current (it replaced %s)", namespace(self.handler.name, self.version),
                    namespace(self.handler.name, old))  # fmt: skip
        if not retain_s:
            await self._retried(self.versions.sweep)
        return old

    async def run(self, *, retain_s: float, watch: Watch = _unwatched) -> tuple[Stats, int | None]:
        """The whole rebuild: build (under `watch`, e.g. a progress bar), catch up, flip; return the build's
        stats and the version it replaced (deleted at once when `retain_s` is 0), or None when it was stopped
        before the flip."""
        await self.begin()
        first = self.engine()
        stats = await watch(first.stats, first.run())
        await self.catch_up()
        if self.stopped:
            return stats, None
        return stats, await self.flip(retain_s=retain_s)


async def clear_namespace(redis: Client, pattern: str, *, batch: int = 500) -> int:
    """Delete the keys matching `pattern` with SCAN + UNLINK (never KEYS, which blocks Redis). On a cluster the
    SCAN runs on every primary and the UNLINKs are split by slot (redis-py's cluster client does both)."""
    deleted = 0
    keys: list[bytes | str] = []
    async for key in redis.scan_iter(match=pattern, count=batch):
        keys.append(key)
        if len(keys) >= batch:
            deleted += await redis.unlink(*keys)
            keys = []
    if keys:
        deleted += await redis.unlink(*keys)
    return deleted


async def rebuild_in_place(engine: Engine) -> Stats:
    """The article's rebuild: clear the projection's keys and the job's state, replay everything, write meta."""
    if not engine.handler.name:
        raise ReplaydError("rebuild needs a projection with a name (its keys live under projection:<name>:)")
    redis = engine.redis

    async def clear() -> None:  # under the lease: never while another instance of the job writes them
        await clear_namespace(redis, f"{engine.namespace}:*")
        await redis.unlink(job_key(engine.spec.name, "checkpoint"), engine.progress.key)

    engine.on_leased = clear
    engine.view.rebuild_targets = engine.stats.target  # replayd_rebuild_running, _target_timestamp_seconds
    stats = await engine.run()
    if stats.status != "completed":  # stopped part way (a stop, a StopReplay): not rebuilt (the next run starts over)
        return stats
    meta = partial(redis.hset, f"{engine.namespace}:meta", mapping={
        "rebuilt_at": repr(time.time()), "total_events": stats.total, "processed_events": stats.processed,
    })  # fmt: skip
    # every event is committed: a Redis restart now is retried like the job's own commands, not a failed rebuild
    await retrying(meta, what="rebuild", budget_s=engine.budget_s, metrics=engine.metrics)
    return stats
