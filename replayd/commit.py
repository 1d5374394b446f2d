"""Checkpoints: where each (job, stream, partition) is, committed with the handler's writes in one MULTI/EXEC.

Layout of `replayd:{job}:checkpoint` (one hash per job; the braces are a Cluster hash tag):
    <stream>#<p>             the last entry of partition p whose effects are committed
    <stream>#*               the stream's floor: every routed entry at or below it is committed, whatever its
                             partition (so partitions that get no events, and filtered events, still advance)
    <stream>#replay_until    entries at or below it are history (`ctx.replaying`) for a following job
    partitions               P, fixed for the job's lifetime (changing it would re-route committed keys)
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import anyio
import hiredis
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from redis.asyncio import Redis
from redis.exceptions import ResponseError

try:  # the sentinel redis-py's hiredis parser hands its reader for an incomplete reply
    from redis._parsers.hiredis import NOT_ENOUGH_DATA as _NOT_ENOUGH_DATA
except ImportError:  # pragma: no cover - other redis-py layouts
    _NOT_ENOUGH_DATA = object()

from replayd.connection import RETRIABLE, text, text_hash
from replayd.errors import CommitError, ConfigError, ReplaydError
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

    def replay_until(self, stream: str) -> Id | None:
        text = self.fields.get(f"{stream}#replay_until")
        return parse_id(text) if text else None

    async def init_stream(self, stream: str, replay_until: Id) -> None:
        await self.redis.hset(
            self.key, mapping={"partitions": self.partitions, f"{stream}#replay_until": format_id(replay_until)}
        )

    async def reset(self) -> None:
        await self.redis.unlink(self.key)


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

    def advance(self) -> dict[str, Id]:
        """Pop the done prefix of each stream; return the streams whose floor moved, with the new floor."""
        moved: dict[str, Id] = {}
        for stream, marks in self._marks.items():
            while marks and marks[0].remaining <= 0:
                moved[stream] = marks.popleft().last_id
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
    """Commits lane batches. Requests that are ready together share one MULTI/EXEC (group commit).

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
        floors = self.watermark.advance()
        for stream, floor in floors.items():
            fields[floor_field(stream, self.shard)] = format_id(floor)
        if fields and self._layout:
            fields.update(self._layout)
            self._layout = {}
        if fields or commands:
            checkpoint: list[Any] = ["HSET", self.key]
            for item in fields.items():
                checkpoint.extend(item)
            commands.append(tuple(checkpoint))
            started = time.monotonic()
            try:
                await self._transaction(commands)
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

    async def _transaction(self, commands: list[tuple[Any, ...]]) -> None:
        """Send one MULTI/EXEC; after a connection error, find out whether it applied before sending it again.

        The checkpoint HSET is in the transaction, so reading those fields back tells: all new values present
        means EXEC ran (its effects exist once); otherwise nothing of it ran and it is safe to resend.
        """
        payload = b"".join([b"*1\r\n$5\r\nMULTI\r\n", *map(hiredis.pack_command, commands), b"*1\r\n$4\r\nEXEC\r\n"])
        deadline = time.monotonic() + self.budget_s
        delay = 0.05
        while True:
            try:
                results = await self._roundtrip(payload, len(commands))
                break
            except RETRIABLE as exc:
                if self._metrics:
                    self._metrics.redis_error("checkpoint", exc)
                logger.warning("commit to %s failed (%s); checking whether it applied", self.key, exc)
                if await self._applied(commands[-1], deadline):
                    logger.warning("commit to %s had applied: only its reply was lost", self.key)
                    return
                if time.monotonic() + delay > deadline:
                    raise CommitError(f"commit to {self.key} failed for {self.budget_s:.0f}s: {exc}") from exc
                await anyio.sleep(random.uniform(0, delay))
                delay = min(delay * 2, 5.0)
        if any(issubclass(kind, Exception) for kind in set(map(type, results))):  # rare: check at C speed first
            for command, result in zip(commands, results, strict=True):
                if isinstance(result, Exception):
                    logger.error("command %s failed in the commit of %s: %s", command[0], self.key, result)

    async def _roundtrip(self, payload: bytes, queued: int) -> list[Any]:
        pool = self.redis.connection_pool
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            with anyio.fail_after(self.timeout_s):  # a TimeoutError (OSError): retried like a lost connection
                return await _exchange(conn, payload, queued)
        except BaseException:
            # the connection's state is unknown (half-read, or cancelled mid-reply): never reuse it
            with anyio.CancelScope(shield=True):
                await conn.disconnect()
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await pool.release(conn)

    async def _applied(self, checkpoint: tuple[Any, ...], deadline: float) -> bool:
        """Whether the transaction holding `checkpoint` ran. Asks until Redis answers: resending a
        transaction whose outcome is unknown could apply its effects twice."""
        fields, values = list(checkpoint[2::2]), checkpoint[3::2]
        delay = 0.05
        while True:
            try:
                current = await self.redis.hmget(self.key, fields)
                return all(c is not None and text(c) == str(v) for c, v in zip(current, values, strict=True))
            except RETRIABLE as exc:
                if time.monotonic() + delay > deadline:
                    raise CommitError(f"commit to {self.key}: Redis unavailable for {self.budget_s:.0f}s") from exc
                await anyio.sleep(random.uniform(0, delay))
                delay = min(delay * 2, 5.0)


async def _exchange(conn: Any, payload: bytes, queued: int) -> list[Any]:
    """Send MULTI, the commands and EXEC in one write and read the queued+2 replies.

    Replies are taken straight from the connection's hiredis reader: redis-py's per-reply `read_response`
    costs microseconds of Python per QUEUED acknowledgement, more than the rest of a rebuild's work per
    command. Error replies come back as exception objects (the reader's replyError), not raised.
    """
    await conn.send_packed_command(payload, check_health=False)
    parser = conn._parser
    reader = getattr(parser, "_reader", None)
    if reader is None or not hasattr(parser, "read_from_socket"):  # not the hiredis parser: the slow way
        replies = [await _reply(conn) for _ in range(queued + 2)]
    else:
        replies = []
        append, gets, pending = replies.append, reader.gets, queued + 2
        while pending:
            reply = gets()
            if reply is False or reply is _NOT_ENOUGH_DATA:
                await parser.read_from_socket()
            elif reply.__class__ is bytes:  # OK, QUEUED: nothing to look at
                pending -= 1
            else:
                append(reply)
                pending -= 1
    results = replies.pop() if replies else None
    for reply in replies:
        if isinstance(reply, RETRIABLE):  # e.g. LOADING after a restart: nothing of it ran
            raise reply
    rejected = [str(reply) for reply in replies if isinstance(reply, Exception)]
    if isinstance(results, RETRIABLE):
        raise results
    if not isinstance(results, list):
        raise ReplaydError(f"Redis refused the commit ({results}); rejected commands: {rejected}")
    return results


async def _reply(conn: Any) -> Any:
    try:
        return await conn.read_response()
    except ResponseError as exc:
        return exc
