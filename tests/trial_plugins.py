"""Handlers for the kill and SIGTERM trials (tests/test_kill_trials.py), loaded by `replayd run` from its config.

`seen_direct` writes outside the commit (its own client): the at-least-once case. `SlowEffects` writes per
event on `ctx.tx`, so effects and checkpoint commit together, and is slow: `TRIAL_EVENT_SLEEP_S` per event
(0.5 ms by default: 0.5 s for a lane batch of 1000), slept once per call.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import cache

import anyio
import redis

from replayd import Context, Event, Outcome

SEEN = "trial:seen"
"""The set of entry IDs `seen_direct` has handled."""

EFFECTS = "trial:eff"
"""The set of entry IDs whose effect `SlowEffects` committed."""

EFFECT_LOG = "trial:log"
"""Every committed effect of `SlowEffects`, duplicates included."""


@cache
def _client() -> redis.Redis:
    return redis.Redis.from_url(os.environ["TRIAL_REDIS_URL"], socket_timeout=10)


def seen_direct(event: Event) -> None:
    """A non-transactional idempotent handler: SADD straight to Redis, outside `ctx.tx` (runs in a thread)."""
    _client().sadd(SEEN, event.stream_id)


class SlowEffects:
    """One effect per event, queued on `ctx.tx` (atomic with the checkpoint); slow in proportion to the events
    (a lane batch is handed over in pieces, one per read batch, so a sleep per call would not be per batch)."""

    name = "slow_effects"
    partition_by = "customer_id"
    event_types = None

    async def handle_batch(self, events: Sequence[Event], ctx: Context) -> Outcome:
        await anyio.sleep(float(os.environ.get("TRIAL_EVENT_SLEEP_S", "0.0005")) * len(events))
        for event in events:
            ctx.tx.sadd(EFFECTS, event.stream_id)
            ctx.tx.rpush(EFFECT_LOG, event.stream_id)
        return Outcome(handled=len(events))


class CrashAfterEffect:
    """T2: per event, an effect straight to Redis (SEEN) and one on `ctx.tx` (EFFECTS, EFFECT_LOG); once the process
    has handled `TRIAL_CRASH_AFTER` events, it dies (`os._exit(1)`) after a batch's effects, before its commit.
    Only the first process to get there crashes (the marker key), so a restart runs to the end."""

    name = "crash_after_effect"
    partition_by = None
    event_types = None

    def __init__(self) -> None:
        self.handled = 0

    def handle_batch(self, events: Sequence[Event], ctx: Context) -> Outcome:
        client = _client()
        client.sadd(SEEN, *(event.stream_id for event in events))
        for event in events:
            ctx.tx.sadd(EFFECTS, event.stream_id)
            ctx.tx.rpush(EFFECT_LOG, event.stream_id)
        self.handled += len(events)
        if self.handled >= int(os.environ.get("TRIAL_CRASH_AFTER", "0")) and client.set("trial:crashed", 1, nx=True):
            os._exit(1)
        return Outcome(handled=len(events))
