"""Where the commit script's Redis CPU goes: the same writes committed by replayd's script and by stripped
variants of it, side by side, against a plain pipeline of the same writes and checkpoint.

Each variant sends the order_summary writes in commits of 1000 events, with 16 checkpoint fields (one per
partition, as a rebuild's commit carries) and the commit sequence, packed with hiredis on one connection; what is
compared is redis-server's CPU (`used_cpu_user + used_cpu_sys` from INFO) per event, not the client's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import hiredis
import redis

from replayd.pipeline.script import COMMIT_SCRIPT
from tests.bench.core import BATCH, clear_projection
from tests.bench.peers import Command

PARTITIONS = 16
KEY = "bench:script:checkpoint"
SEQ = "seq"

_CALL = COMMIT_SCRIPT.replace(
    """  local result = redis.pcall(unpack(ARGV, i + 1, i + n))
  if type(result) == 'table' and result.err then reply[#reply + 1] = ARGV[i + 1] .. ': ' .. result.err end
""",
    "  redis.call(unpack(ARGV, i + 1, i + n))\n",
)
_UNPACK_ONLY = """
local i = 5 + tonumber(ARGV[4])
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  local _ = {unpack(ARGV, i + 1, i + n)}
  i = i + n + 1
end
return 1
"""
_EMPTY = "return 1"

Pack = Callable[[Sequence[Command], dict[str, str], int], list[bytes]]


def script_pack(body: str, checkpoint: bool = True) -> Pack:
    """EVAL of `body` with replayd's argument layout: seq field, expected, new, 2k, k field/value pairs, then per
    command its argument count and arguments (`checkpoint=False`: no checkpoint fields, k = 0)."""

    def pack(commands: Sequence[Command], fields: dict[str, str], seq: int) -> list[bytes]:
        pairs = [x for item in fields.items() for x in item] if checkpoint else []
        expected = f"{seq}:t" if seq else ""
        argv: list[Any] = ["EVAL", body, 1, KEY, SEQ, expected, f"{seq + 1}:t", len(pairs), *pairs]
        for command in commands:
            argv.append(len(command))
            argv.extend(command)
        return [hiredis.pack_command(tuple(argv))]

    return pack


def pipeline_pack(commands: Sequence[Command], fields: dict[str, str], seq: int) -> list[bytes]:
    """MULTI, the same writes, the checkpoint fields and sequence in one HSET, EXEC (what redis-py's transactional
    pipeline sends, less the WATCH a conditional commit would need)."""
    pairs = [x for item in fields.items() for x in item]
    wrapped: list[Command] = [("MULTI",), *commands, ("HSET", KEY, *pairs, SEQ, f"{seq + 1}:t"), ("EXEC",)]
    return [hiredis.pack_command(command) for command in wrapped]  # type: ignore[arg-type]


VARIANTS: dict[str, Pack] = {
    "replayd's commit script": script_pack(COMMIT_SCRIPT),
    "  redis.call, no per-command error check": script_pack(_CALL),
    "  no checkpoint fields (sequence only)": script_pack(COMMIT_SCRIPT, checkpoint=False),
    "  arguments unpacked, no command run": script_pack(_UNPACK_ONLY),
    "  empty script, same arguments": script_pack(_EMPTY),
    "plain pipeline, MULTI/EXEC, same writes and checkpoint": pipeline_pack,
}
"""The variants, the first (replayd's) and last (the plain pipeline) being what the target compares."""

SCRIPT, PIPELINE = "replayd's commit script", "plain pipeline, MULTI/EXEC, same writes and checkpoint"


def commits(commands: Sequence[Command], events: int) -> list[Sequence[Command]]:
    """The writes cut into commits of about BATCH events (the same share of commands per commit)."""
    per = max(1, len(commands) * BATCH // max(events, 1))
    return [commands[i : i + per] for i in range(0, len(commands), per)]


def redis_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def run_variant(url: str, pack: Pack, batches: list[Sequence[Command]]) -> float:
    """Redis CPU seconds to run every commit of `batches` as `pack` sends it; the projection is cleared after."""
    fields = {f"bench:orders#{p}": "0-1" for p in range(PARTITIONS)}
    with redis.Redis.from_url(url) as client:
        clear_projection(client)
        client.delete(KEY)
        conn = client.connection_pool.get_connection("EVAL")
        try:
            before = redis_cpu(client)
            for seq, batch in enumerate(batches):
                packed = pack(batch, fields, seq)
                conn.send_packed_command([b"".join(packed)], check_health=False)
                replies = [conn.read_response() for _ in packed]
                if isinstance(replies[-1], list) and replies[-1][:1] == [b"stale"]:
                    raise AssertionError(f"commit {seq} found the sequence at {replies[-1][1]!r}: nothing ran")
            spent = redis_cpu(client) - before
        finally:
            client.connection_pool.release(conn)
        clear_projection(client)
        client.delete(KEY)
    return spent
