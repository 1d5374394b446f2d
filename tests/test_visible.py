"""Failures that are visible and bounded: a poison event under default settings, a handler failing on every
event (the circuit breaker), a hanging handler (time-outs), log lines of huge undecodable entries."""

from __future__ import annotations

import json

import redis

from tests.helpers import add, entry, replayd

STREAM = "orders"


def test_a_1mb_undecodable_entry_gives_a_bounded_log_line(redis_url: str, sync_redis: redis.Redis) -> None:
    """1. an entry whose `data` is 1 MB of broken JSON  2. a replay under the default policy stops at it (65)
    3. every line on stderr is short, and says how big the field was."""
    add(sync_redis, [{**entry(), "data": "{" + "x" * (1 << 20)}])
    done = replayd("replay", "--redis-url", redis_url, "--stream", STREAM, "--handler", "order_summary",
                   "--log-format", "json", "--log-level", "DEBUG")  # fmt: skip
    assert done.returncode == 65, done.stderr[-2000:]
    lines = done.stderr.splitlines()
    assert max(map(len, lines)) < 10_000, [len(line) for line in lines]
    logged = [json.loads(line)["msg"] for line in lines if line.startswith("{")]
    assert any("undecodable entry" in msg and f"{(1 << 20) + 1} chars" in msg for msg in logged), logged
