"""The Python API: the engine `replayd replay` and the daemon run, called from an application, a notebook or a
script.

    import replayd

    stats = await replayd.replay(
        "redis://localhost:6379/0", streams=["events:orders"], handler=OrderSummary(), start="24h", end="now"
    )
    print(stats.processed, stats.failed)

`replay` runs one job to its end bound and returns its `Stats`; `Replay` is the same with a handle on the run
(its live `stats`, `stop()`); `run` runs a daemon's jobs in-process. Errors are replayd's own (`ReplaydError`
and its subclasses, each with the `exit_code` the CLI would exit with); a Redis that stays unreachable for
`unavailable_timeout_s` raises redis-py's `ConnectionError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
from pydantic import ValidationError

from replayd.config import JobSpec, RedisConfig, Settings, describe, load_settings
from replayd.connection import create_redis
from replayd.errors import ConfigError
from replayd.handlers import Handler
from replayd.handlers.loader import as_handler
from replayd.jobs.daemon import Daemon
from replayd.jobs.engine import Engine
from replayd.jobs.progress import Stats
from replayd.ops.metrics import Metrics

__all__ = ["Replay", "Stats", "job_spec", "replay", "run"]

DEFAULT_URL = "redis://localhost:6379/0"


class Replay:
    """One job, ready to run: `await Replay(spec, url).run()`. While it runs, `stats` move and `stop()` ends it
    cleanly (what is routed drains and commits, then `run` returns)."""

    def __init__(
        self,
        spec: JobSpec,
        redis: RedisConfig | str = DEFAULT_URL,
        *,
        handler: object | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        """`spec`: the job (see `job_spec`). `redis`: a URL or a `RedisConfig`. `handler`: a Projection, a
        function or a handler object (default: the one `spec.handler` names). `metrics`: where its Prometheus
        metrics go (default: a registry of its own)."""
        cfg = redis if isinstance(redis, RedisConfig) else _redis_config(redis)
        adapted: Handler | None = None
        if handler is not None:
            adapted = as_handler(handler, _name_of(handler))
        self.client = create_redis(cfg)  # connects on first use: nothing to close if the engine is refused
        self.engine = Engine(spec, self.client, redis_cfg=cfg, handler=adapted, metrics=metrics)

    @property
    def stats(self) -> Stats:
        """The run's counters and positions, updated as it runs."""
        return self.engine.stats

    def stop(self) -> None:
        """Stop reading: what is routed drains and commits, then `run` returns (status `stopped`)."""
        self.engine.stop()

    async def run(self) -> Stats:
        """Run the job to its end bound (or a StopReplay, or `stop()`); its Redis client is closed after."""
        try:
            return await self.engine.run()
        finally:
            with anyio.move_on_after(2, shield=True):
                await self.client.aclose()


def job_spec(
    *,
    streams: Sequence[str],
    handler: object,
    start: str = "beginning",
    end: str = "now",
    job: str | None = None,
    **options: Any,
) -> JobSpec:
    """A one-shot job, as `replayd replay` builds it: `streams` from `start` (`beginning`, `checkpoint`, an entry
    ID, an ISO time or an age such as `24h`) to `end` (`now`, `follow`, an ID, a time or an age). `job` names its
    checkpoint (default `replay-<handler name>`); `start="checkpoint"` resumes it. `options` are any other job
    settings (`types`, `where`, `partition_by`, `partitions`, `concurrency`, `on_poison`, `upcasters`, ...).
    Invalid values raise ConfigError naming them."""
    reference = handler if isinstance(handler, str) else f"python:{_name_of(handler)}"
    values: dict[str, Any] = {
        "name": job or "replay-" + _name_of(handler).replace(".", "_"),
        "streams": list(streams),
        "handler": reference,
        "start": "beginning" if start == "checkpoint" else start,
        "resume": start == "checkpoint",
        "end": end,
        **options,
    }
    try:
        return JobSpec(**values)
    except ValidationError as exc:
        raise ConfigError(describe(exc, None).replace("invalid configuration", "invalid replay arguments")) from None


async def replay(
    url: RedisConfig | str = DEFAULT_URL,
    *,
    streams: Sequence[str],
    handler: object,
    start: str = "beginning",
    end: str = "now",
    job: str | None = None,
    **options: Any,
) -> Stats:
    """Replay `streams` from `start` to `end` into `handler` (a Projection, a function, a handler object, or a
    `package.module:attr` string) and return the run's `Stats`. The arguments are `job_spec`'s; the handler's
    writes on `ctx.tx` commit with the job's checkpoint, as in the daemon."""
    spec = job_spec(streams=streams, handler=handler, start=start, end=end, job=job, **options)
    return await Replay(spec, url, handler=None if isinstance(handler, str) else handler).run()


async def run(
    settings: Settings | str | Path | None = None,
    *,
    jobs: Sequence[str] | None = None,
    handle_signals: bool = False,
) -> None:
    """Run the jobs of `settings` (a `Settings`, a config file's path, or None for `REPLAYD_CONFIG` and the
    environment) in this process, as `replayd run` does, until they end: all of them, or those `jobs` names.
    Cancel the calling task to stop them, or pass `handle_signals=True` to drain on SIGTERM/SIGINT as the daemon
    does (main thread only)."""
    if not isinstance(settings, Settings):
        settings = load_settings(str(settings) if settings is not None else None)
    if jobs is not None:
        unknown = sorted(set(jobs) - {job.name for job in settings.jobs})
        if unknown:
            raise ConfigError(f"no job named {', '.join(unknown)} in the settings (their jobs: "
                              f"{', '.join(job.name for job in settings.jobs) or 'none'})")  # fmt: skip
        settings = settings.model_copy(update={"jobs": [job for job in settings.jobs if job.name in jobs]})
    if not settings.jobs:
        raise ConfigError("no jobs configured: add [[jobs]] tables to the config file (see config.example.toml)")
    await Daemon(settings, handle_signals=handle_signals).run()


def _redis_config(url: str) -> RedisConfig:
    try:
        return RedisConfig(url=url)
    except ValidationError as exc:
        raise ConfigError(describe(exc, None).replace("invalid configuration", "invalid Redis URL")) from None


def _name_of(handler: object) -> str:
    """The handler's name: its `name`, else its function's or class's name (a plugin path's last part)."""
    if isinstance(handler, str):
        return handler.rsplit(":", 1)[-1].rsplit(".", 1)[-1]
    name = getattr(handler, "name", None)
    if isinstance(name, str) and name:
        return name
    named = handler if callable(handler) and hasattr(handler, "__name__") else type(handler)
    return str(getattr(named, "__name__", "handler")).lower()
