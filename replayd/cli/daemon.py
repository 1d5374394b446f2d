"""The daemon and its controls: `run`, `pause`/`resume`, and `demo`."""

from __future__ import annotations

import argparse
import sys

from replayd.cli.shared import _client
from replayd.cli.state import _owners
from replayd.config import Settings
from replayd.errors import ConfigError, UsageError
from replayd.jobs.daemon import Daemon
from replayd.pipeline.commit import job_key


async def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    if not settings.jobs:
        raise ConfigError("no jobs configured: add [[jobs]] tables to the config file (see config.example.toml)")
    if args.no_check_shape:
        settings.jobs = [job.model_copy(update={"check_shape": False}) for job in settings.jobs]
    await Daemon(settings).run()
    return 0


async def cmd_pause(args: argparse.Namespace, settings: Settings) -> int:
    async with _client(settings) as client:
        keys = [key async for key in client.scan_iter(match=job_key(args.job, "progress") + "*")]
        if not keys:
            raise UsageError(f"no job {args.job!r} in Redis (it has no progress hash)")
        if args.command == "pause" and not await _owners(client, args.job):
            print(f"replayd: job {args.job!r} is not running (no instance holds its lease): nothing to pause",
                  file=sys.stderr)  # fmt: skip
            return 1
        for key in keys:
            if args.command == "pause":
                await client.hset(key, "paused", "1")
            else:
                await client.hdel(key, "paused")
    print(f"{args.command}d {args.job}" + (f" ({len(keys)} shards)" if len(keys) > 1 else ""))
    return 0


async def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from replayd.demo import run_demo

    await run_demo(args, settings)
    return 0
