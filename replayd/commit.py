"""Checkpoints: where each (job, stream, partition) is, committed atomically with the handler's writes.

Layout of `replayd:{job}:checkpoint` (one hash per job; the braces are a Cluster hash tag):
    <stream>#<p>             the last entry of partition p whose effects are committed
    <stream>#*               the stream's floor: every routed entry at or below it is committed, whatever its
                             partition (so partitions that get no events, and filtered events, still advance)
    <stream>#*i/N            the same, for shard i of N
    <stream>#replay_until    entries at or below it are history (`ctx.replaying`) for a following job
    partitions               P, fixed for the job's lifetime (changing it would re-route committed keys)
    seq, seq:i/N             the commit sequence `<n>:<token>` of the job (or shard): each commit runs only if it
                             is unchanged, which makes retries apply once and fences out a second instance
"""

from __future__ import annotations

import logging
import random
import secrets
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import anyio
import hiredis
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from replayd.connection import is_retriable, text, text_hash
from replayd.errors import CommitError, ConfigError, FencingError, ReplaydError
from replayd.events import WHOLE, ZERO, Id, Shard, format_id, parse_id, parse_shard
from replayd.metrics import Metrics

logger = logging.getLogger(__name__)

FLOOR = "*"


def job_key(job: str, kind: str) -> str:
    """`replayd:{job}:<kind>`; all keys of a job share the hash tag `{job}`."""
    return f"replayd:{{{job}}}:{kind}"


class Resume(NamedTuple):
    """Where a stream's reading resumes."""

    after: Id
    """Read entries after this ID: the lowest checkpoint over the partitions."""
    skip: dict[int, Id]
    """Partitions that are further along: their entries at or below this ID were committed already."""


class CheckpointStore:
    """Reads and resets the checkpoint hash of a job. Writes happen only in `Committer` transactions."""

    def __init__(self, redis: Redis, job: str, partitions: int, shard: Shard = WHOLE) -> None:
        self.redis = redis
        self.key = job_key(job, "checkpoint")
        self.partitions = partitions
        self.shard = shard
        self.fields: dict[str, str] = {}

    async def load(self) -> dict[str, str]:
        self.fields = text_hash(await self.redis.hgetall(self.key))
        stored = self.fields.get("partitions")
        if stored is not None and int(stored) != self.partitions:
            raise ConfigError(
                f"{self.key} was written with partitions = {stored}, the job now has {self.partitions}: "
                "changing P re-routes keys whose effects are committed. Keep partitions, or reset the "
                "checkpoint (replayd checkpoint reset) and rebuild."
            )
        return self.fields

    def resume(self, stream: str) -> Resume | None:
        """The resume point of `stream` for this shard, or None when the job has no checkpoint for it."""
        positions = partition_positions(self.fields, stream, self.partitions, self.shard)
        if positions is None:
            return None
        lowest = min(positions.values())
        return Resume(lowest, {p: cp for p, cp in positions.items() if cp > lowest})

    async def claim(self, token: str) -> str:
        """Move the commit sequence to `<n+1>:<token>` unconditionally; return it.

        Done once the lease is held and before the checkpoint is read: an instance that lost its lease (paused
        past the TTL) can then no longer commit, so the checkpoint this one resumes from is final."""
        seq: bytes | str = await self.redis.eval(_CLAIM_SCRIPT, 1, self.key, seq_field(self.shard), token)
        return text(seq)

    def replay_until(self, stream: str) -> Id | None:
        text = self.fields.get(f"{stream}#replay_until")
        return parse_id(text) if text else None

    async def init_stream(self, stream: str, replay_until: Id) -> None:
        await self.redis.hset(
            self.key, mapping={"partitions": self.partitions, f"{stream}#replay_until": format_id(replay_until)}
        )

    async def reset(self) -> None:
        """Forget this job's positions; a shard forgets only its own (the others may be running)."""
        if self.shard.total == 1:
            await self.redis.unlink(self.key)
            return
        own_floor, own_seq = f"#{FLOOR}{self.shard.suffix}", seq_field(self.shard)
        fields = text_hash(await self.redis.hgetall(self.key))
        mine = [
            name
            for name in fields
            if name == own_seq
            or name.endswith(own_floor)
            or ((tail := name.rpartition("#")[2]).isdigit() and self.shard.owns(int(tail)))
        ]
        if mine:
            await self.redis.hdel(self.key, *mine)


def partition_positions(
    fields: dict[str, str], stream: str, partitions: int, shard: Shard | None = None
) -> dict[int, Id] | None:
    """Per partition (of `shard`, or all): the ID after which it resumes. None when nothing is stored.

    A partition's position is the highest of its own checkpoint and every floor that covers it: the job's
    floor `<stream>#*`, and the floor `<stream>#*i/N` of a shard that owns it.
    """
    prefix = stream + "#"
    own: dict[int, Id] = {}
    floors: list[tuple[Shard, Id]] = []
    for name, value in fields.items():
        if not name.startswith(prefix):
            continue
        tail = name[len(prefix) :]
        if tail.isdigit():
            own[int(tail)] = parse_id(value)
        elif tail.startswith(FLOOR):
            floors.append((parse_shard(tail[1:]) if tail[1:] else Shard(), parse_id(value)))
    if not own and not floors:
        return None
    return {
        p: max([own.get(p, ZERO)] + [floor for owner, floor in floors if owner.owns(p)])
        for p in range(partitions)
        if shard is None or shard.owns(p)
    }


def floor_field(stream: str, shard: Shard) -> str:
    return f"{stream}#{FLOOR}{shard.suffix}"


@dataclass(eq=False)
class Mark:
    """One read batch of one stream: done when every partition slice of it is committed."""

    stream: str
    last_id: Id
    remaining: int
    commands: list[tuple[Any, ...]] = field(default_factory=list)
    """Writes that belong with the floor moving past this batch (dead letters of its undecodable entries)."""


class Watermark:
    """The contiguous committed prefix of each stream, whatever the partitions.

    Read batches are marked in order. Example: batches A(..10), B(..20), C(..30) are routed; B's slices commit
    first, then A's. After B the floor stays where it was (A is still open); after A it jumps to 20 (A and B
    are done); C is open, so it stops there. A batch whose events were all filtered out is done at once.
    """

    def __init__(self) -> None:
        self._marks: dict[str, deque[Mark]] = {}

    def add(self, stream: str, last_id: Id, slices: int) -> Mark:
        mark = Mark(stream, last_id, slices)
        self._marks.setdefault(stream, deque()).append(mark)
        return mark

    def advance(self, commands: list[tuple[Any, ...]]) -> dict[str, Id]:
        """Pop the done prefix of each stream; return the streams whose floor moved, with the new floor, and
        append the popped batches' own writes to `commands` (they commit with the floor that passes them)."""
        moved: dict[str, Id] = {}
        for stream, marks in self._marks.items():
            while marks and marks[0].remaining <= 0:
                mark = marks.popleft()
                moved[stream] = mark.last_id
                commands.extend(mark.commands)
        return moved

    def pending(self) -> int:
        return sum(len(marks) for marks in self._marks.values())


@dataclass(eq=False)
class CommitRequest:
    """A lane batch's writes and checkpoint fields, waiting for its transaction."""

    commands: list[tuple[Any, ...]]
    checkpoints: dict[str, str]
    marks: list[Mark]
    done: anyio.Event = field(default_factory=anyio.Event)


class Committer:
    """Commits lane batches. Requests that are ready together share one commit script (group commit).

    One task owns all writes to the checkpoint hash, so commits are applied in order and the floor of a
    stream can be computed without races.
    """

    def __init__(
        self,
        redis: Redis,
        job: str,
        watermark: Watermark,
        send: MemoryObjectSendStream[CommitRequest],
        *,
        on_commit: Callable[[dict[str, Id]], None] = lambda floors: None,
        layout: dict[str, str] | None = None,
        metrics: Metrics | None = None,
        budget_s: float = 60.0,
        timeout_s: float = 10.0,
        shard: Shard = WHOLE,
        seq: str = "",
    ) -> None:
        self.redis = redis
        self.key = job_key(job, "checkpoint")
        self.watermark = watermark
        self._send = send
        self._on_commit = on_commit
        self._metrics = metrics
        self._job = job
        self.budget_s = budget_s
        self.timeout_s = timeout_s
        self.shard = shard
        self.seq = seq
        """The commit sequence this instance last wrote: `<n>:<token>` (from CheckpointStore.claim)."""
        self._seq_field = seq_field(shard)
        self._token = seq.partition(":")[2] or secrets.token_hex(4)
        self.floors: dict[str, Id] = {}
        self._layout: dict[str, str] = dict(layout or {})
        """Written with the first commit of the run (P, so a changed P is caught at the next start)."""

    async def commit(self, request: CommitRequest) -> None:
        await self._send.send(request)
        await request.done.wait()

    async def nudge(self) -> None:
        """Ask for a commit of the floors alone (after batches whose events were all filtered out)."""
        await self._send.send(CommitRequest([], {}, []))

    async def run(self, receive: MemoryObjectReceiveStream[CommitRequest]) -> None:
        async with receive:
            async for first in receive:
                group = [first]
                while True:
                    try:
                        group.append(receive.receive_nowait())
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                await self._flush(group)

    async def _flush(self, group: Sequence[CommitRequest]) -> None:
        commands: list[tuple[Any, ...]] = []
        fields: dict[str, str] = {}
        for request in group:
            commands.extend(request.commands)
            fields.update(request.checkpoints)
            for mark in request.marks:
                mark.remaining -= 1
        floors = self.watermark.advance(commands)
        for stream, floor in floors.items():
            fields[floor_field(stream, self.shard)] = format_id(floor)
        if fields and self._layout:
            fields.update(self._layout)
            self._layout = {}
        if fields or commands:
            started = time.monotonic()
            try:
                await self._transaction(commands, fields)
            except FencingError:
                self._count("fenced")
                raise
            except BaseException:
                self._count("error")
                raise
            self._count("ok", time.monotonic() - started)
        self.floors.update(floors)
        for request in group:
            request.done.set()
        self._on_commit(floors)

    def _count(self, result: str, seconds: float | None = None) -> None:
        if self._metrics:
            self._metrics.commits.labels(self._job, result).inc()
            if seconds is not None:
                self._metrics.commit_duration.observe(seconds)
                self._metrics.command_duration.labels("checkpoint").observe(seconds)

    async def _transaction(self, commands: list[tuple[Any, ...]], fields: dict[str, str]) -> None:
        """Apply the commands and move the checkpoint in one conditional script; exactly once.

        The script runs only if the job's commit sequence is still the one this committer last wrote, and
        advances it. A retry after a lost reply (or an attempt that reaches Redis late, after its retry)
        finds the sequence moved and does nothing, so effects never apply twice; an instance that finds it
        moved by someone else has been fenced out.
        """
        expected = self.seq
        new = f"{int(expected.partition(':')[0] or 0) + 1}:{self._token}"
        argv: list[Any] = ["EVAL", _COMMIT_SCRIPT, 1, self.key, self._seq_field, expected, new, 2 * len(fields)]
        for item in fields.items():
            argv.extend(item)
        for command in commands:
            argv.append(len(command))
            argv.extend(command)
        payload = hiredis.pack_command(tuple(argv))
        deadline = time.monotonic() + self.budget_s
        delay = 0.05
        while True:
            try:
                reply = await self._roundtrip(payload)
                break
            except Exception as exc:
                if not is_retriable(exc):
                    raise
                if self._metrics:
                    self._metrics.redis_error("checkpoint", exc)
                if time.monotonic() + delay > deadline:
                    raise CommitError(f"commit to {self.key} failed for {self.budget_s:.0f}s: {exc}") from exc
                logger.warning("commit to %s failed (%s); sending it again (it applies at most once)", self.key, exc)
                await anyio.sleep(random.uniform(0, delay))
                delay = min(delay * 2, 5.0)
        status, current, *errors = reply
        if status == b"stale" and text(current) != new:
            self._check_rolled_back(text(current))
            raise FencingError(
                f"{self.key} was committed by another instance of job {self._job} shard {self.shard} "
                f"(commit sequence {text(current)}, this instance expected {expected}): stopping"
            )
        self.seq = new
        for error in errors:
            logger.error("a handler's command failed in the commit of %s: %s", self.key, text(error))

    def _check_rolled_back(self, current: str) -> None:
        """Our own token with a lower number: Redis lost commits it acknowledged (FAULTS T9/T10)."""
        number, _, token = current.partition(":")
        if token == self._token and number.isdigit() and int(number) < int(self.seq.partition(":")[0] or 0):
            raise FencingError(
                f"{self.key} went back from commit {self.seq} to {current}: Redis lost commits it had acknowledged "
                "(restarted from a torn AOF, or failed over to a lagging replica). Stopping (exit 75): a restart "
                "resumes from the checkpoint Redis kept and replays what came after it"
            )

    async def _roundtrip(self, payload: bytes) -> Any:
        pool = self.redis.connection_pool
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            with anyio.fail_after(self.timeout_s):  # a TimeoutError (OSError): retried like a lost connection
                await conn.send_packed_command(payload, check_health=False)
                return await conn.read_response()
        except BaseException as exc:
            # the connection's state is unknown (half-read, or cancelled mid-reply): never reuse it
            with anyio.CancelScope(shield=True):
                await conn.disconnect()
            if isinstance(exc, RuntimeError) and is_retriable(exc):
                raise RedisConnectionError(str(exc)) from exc
            if isinstance(exc, ResponseError):
                raise ReplaydError(f"Redis refused the commit to {self.key}: {exc}") from exc
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await pool.release(conn)


def seq_field(shard: Shard) -> str:
    """The checkpoint hash field holding a (job, shard)'s commit sequence."""
    return "seq" + (f":{shard}" if shard.total > 1 else "")


_CLAIM_SCRIPT = """
local n = tonumber(string.match(redis.call('HGET', KEYS[1], ARGV[1]) or '', '^(%d+)')) or 0
local seq = (n + 1) .. ':' .. ARGV[2]
redis.call('HSET', KEYS[1], ARGV[1], seq)
return seq
"""

# KEYS[1] checkpoint hash; ARGV: seq field, expected seq, new seq, 2k, k checkpoint field/value pairs, then per
# command its argument count and arguments. pcall, as EXEC does, keeps going past a failing handler command.
_COMMIT_SCRIPT = """
local current = redis.call('HGET', KEYS[1], ARGV[1]) or ''
if current ~= ARGV[2] then return {'stale', current} end
local reply = {'ok', ARGV[3]}
local i = 5 + tonumber(ARGV[4])
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  local result = redis.pcall(unpack(ARGV, i + 1, i + n))
  if type(result) == 'table' and result.err then reply[#reply + 1] = ARGV[i + 1] .. ': ' .. result.err end
  i = i + n + 1
end
if tonumber(ARGV[4]) > 0 then redis.call('HSET', KEYS[1], unpack(ARGV, 5, 4 + tonumber(ARGV[4]))) end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return reply
"""
