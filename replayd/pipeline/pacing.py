"""Pacing: a rate limit in entries per second (to protect a production Redis) and playback at the events'
original pace, scaled (`--speed 10x`: ten times faster than it happened), from their producer timestamps."""

from __future__ import annotations

import time
from typing import Protocol

import anyio

from replayd.errors import DecodeError
from replayd.events import Event


class Paced(Protocol):
    """A read batch, as pacing sees it."""

    @property
    def first(self) -> Event | None:
        """The first event handed to handlers (None: none is)."""


class Pacer:
    """Waits before each read batch is dispatched, as long as the rate limit or the playback speed asks."""

    def __init__(self, rate_limit: float | None, speed: float | None) -> None:
        self.rate_limit = rate_limit
        self.speed = speed
        self._started = time.monotonic()
        self._admitted = 0
        self._origin: tuple[float, float] | None = None
        """(wall time, event timestamp) of the first paced event."""

    async def pace(self, entries: int, batch: Paced) -> None:
        """Wait before a read batch of `entries` goes on; played back at the original pace, from the timestamp of
        the first event it hands to handlers."""
        await self.admit(entries, self._start_of(batch) if self.speed else None)

    @staticmethod
    def _start_of(batch: Paced) -> float | None:
        first = batch.first
        if first is None:
            return None
        try:
            return first.timestamp
        except DecodeError:  # the handler will find it undecodable; this batch is not held back
            return None

    async def admit(self, entries: int, first_timestamp: float | None) -> None:
        now = time.monotonic()
        wait = 0.0
        if self.rate_limit:
            wait = self._started + self._admitted / self.rate_limit - now
            self._admitted += entries
        if self.speed and first_timestamp is not None:
            if self._origin is None:
                self._origin = (now, first_timestamp)
            wall, timestamp = self._origin
            wait = max(wait, wall + (first_timestamp - timestamp) / self.speed - now)
        # uvloop times a sleep from the loop's cached clock, so under load it can wake early: sleep again until
        # the real clock agrees, or the rate limit lets more through than it says
        deadline = now + wait
        while wait > 0:
            await anyio.sleep(wait)
            wait = deadline - time.monotonic()


def parse_speed(text: str) -> float:
    """`10x`, `0.5x` or `10`: how much faster than the events happened."""
    value = float(text.removesuffix("x"))
    if value <= 0:
        raise ValueError(f"speed {text!r} must be above 0")
    return value
