"""What the commands share: a Redis client for one command, asking before destructive changes."""

from __future__ import annotations

import argparse
import sys

import anyio

from replayd.config import Settings
from replayd.connection import Client, create_redis
from replayd.errors import UsageError


class _client:
    """`async with _client(settings) as redis`: the data path's client, closed on exit."""

    def __init__(self, settings: Settings) -> None:
        self.redis = create_redis(settings.redis)

    async def __aenter__(self) -> Client:
        return self.redis

    async def __aexit__(self, *exc: object) -> None:
        with anyio.move_on_after(2, shield=True):
            await self.redis.aclose()


def _confirm(args: argparse.Namespace, what: str) -> None:
    if args.yes:
        return
    if not sys.stdin.isatty():
        raise UsageError(f"refusing to {what} without --yes")
    if input(f"{what}? [y/N] ").strip().lower() not in ("y", "yes"):
        raise UsageError("cancelled")
