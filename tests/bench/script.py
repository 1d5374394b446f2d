"""Where the commit script's Redis CPU goes: the same writes committed by replayd's script and by stripped
variants of it, side by side, against a plain pipeline of the same writes and checkpoint.

Each variant sends the order_summary writes in commits of 1000 events, with 16 checkpoint fields (one per
partition, as a rebuild's commit carries) and the commit sequence, packed with hiredis on one connection; what is
compared is redis-server's CPU (`used_cpu_user + used_cpu_sys` from INFO) per event, not the client's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import hiredis
import redis

from replayd.pipeline.script import COMMIT_SCRIPT, script_args
from tests.bench.core import BATCH, clear_projection
from tests.bench.peers import Command

PARTITIONS = 16
KEY = "bench:script:checkpoint"
SEQ = "seq"


def _without(old: str, new: str, body: str = COMMIT_SCRIPT) -> str:
    """`body` with `old` replaced: a variant that no longer matches the script fails here, not silently."""
    if old not in body:
        raise AssertionError(f"the commit script no longer holds {old!r}: update tests/bench/script.py")
    return body.replace(old, new)


_CHECK = COMMIT_SCRIPT[COMMIT_SCRIPT.index("local index, i = 0, first") : COMMIT_SCRIPT.index("-- the first write")]
_UNCHECKED = _without(_CHECK, "local i\n")
_UNREAD = _without(
    "local v = redis.pcall('HGET', key, f)",
    "local v = false",
    _without("local n = redis.pcall('HLEN', key)", "local n = 1"),
)
_UNPACK_ONLY = """
local counts, i = ARGV[5], 5 + tonumber(ARGV[4])
for c = 1, #counts, 2 do
  local high, low = string.byte(counts, c, c + 1)
  local _ = {unpack(ARGV, i + 1, i + high * 256 + low)}
  i = i + high * 256 + low
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
"""
_EMPTY = "redis.call('HSET', KEYS[1], ARGV[1], ARGV[3]) return 1"

Pack = Callable[[Sequence[Command], dict[str, str], int], list[bytes]]


def script_pack(body: str, checkpoint: bool = True) -> Pack:
    """EVAL of `body` with replayd's arguments (`script_args`); `checkpoint=False`: no checkpoint fields."""

    def pack(commands: Sequence[Command], fields: dict[str, str], seq: int) -> list[bytes]:
        expected = f"{seq}:t" if seq else ""
        args = script_args(KEY, SEQ, expected, f"{seq + 1}:t", fields if checkpoint else {}, list(commands))
        return [hiredis.pack_command(("EVAL", body, *args))]

    return pack


def pipeline_pack(commands: Sequence[Command], fields: dict[str, str], seq: int) -> list[bytes]:
    """MULTI, the same writes, the checkpoint fields and sequence in one HSET, EXEC (what redis-py's transactional
    pipeline sends, less the WATCH a conditional commit would need)."""
    pairs = [x for item in fields.items() for x in item]
    wrapped: list[Command] = [("MULTI",), *commands, ("HSET", KEY, *pairs, SEQ, f"{seq + 1}:t"), ("EXEC",)]
    return [hiredis.pack_command(command) for command in wrapped]  # type: ignore[arg-type]


VARIANTS: dict[str, Pack] = {
    "replayd's commit script": script_pack(COMMIT_SCRIPT),
    "  no check pass (the commands run unchecked)": script_pack(_UNCHECKED),
    "  check pass without its reads (no HLEN, no HGET)": script_pack(_UNREAD),
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
