"""Bytes per event on the wire, for the capacity page: what a replay reads (XRANGE replies, as Redis sends them)
and what a commit of the order_summary writes sends (replayd's script, and a plain pipeline of the same writes)."""

from __future__ import annotations

import socket
from typing import Any

import hiredis
import redis

from replayd.pipeline.script import COMMIT_SCRIPT
from tests.bench import script
from tests.bench.core import BATCH
from tests.bench.peers import Command


def read_bytes(host: str, port: int, stream: str) -> tuple[int, int]:
    """(reply bytes, entries) of reading the whole stream with XRANGE COUNT 1000."""
    total = entries = 0
    after = b"-"
    with socket.create_connection((host, port)) as sock:
        while True:
            sock.sendall(hiredis.pack_command(("XRANGE", stream, after, "+", "COUNT", BATCH)))  # type: ignore[arg-type]
            reader = hiredis.Reader()
            reply: Any = False
            while reply is False:
                chunk = sock.recv(1 << 20)
                if not chunk:
                    raise ConnectionError("redis-server closed the connection")
                total += len(chunk)
                reader.feed(chunk)
                reply = reader.gets()
            entries += len(reply)
            if len(reply) < BATCH:
                return total, entries
            after = b"(" + reply[-1][0]


def commit_bytes(commands: list[Command], events: int) -> dict[str, float]:
    """Request bytes per event of committing `commands` in commits of ~1000 events with 16 checkpoint fields."""
    batches = script.commits(commands, events)
    fields = {f"bench:orders#{p}": "1700000000000-0" for p in range(script.PARTITIONS)}
    sent = sum(len(b"".join(script.script_pack(COMMIT_SCRIPT)(batch, fields, 1))) for batch in batches)
    piped = sum(len(b"".join(script.pipeline_pack(batch, fields, 1))) for batch in batches)
    return {"script": sent / events, "pipeline": piped / events}


def measure(url: str, host: str, port: int, stream: str, commands: list[Command], events: int) -> dict[str, float]:
    total, entries = read_bytes(host, port, stream)
    with redis.Redis.from_url(url) as client:
        stored = client.memory_usage(stream, samples=0) or 0
    sent = commit_bytes(commands, events)
    return {
        "read_bytes_per_event": round(total / max(entries, 1), 1),
        "stream_memory_bytes_per_event": round(stored / max(entries, 1), 1),
        "commit_script_bytes_per_event": round(sent["script"], 1),
        "commit_pipeline_bytes_per_event": round(sent["pipeline"], 1),
        "commands_per_event": round(len(commands) / max(events, 1), 3),
    }
