"""Checkpoints: where each (job, stream, partition) is, committed atomically with the handler's writes.

Layout of `replayd:{job}:checkpoint` (one hash per job; the braces are a Cluster hash tag):
    <stream>#<p>             the last entry of partition p whose effects are committed (a stream name holding
                             `#` or `%` is written with them percent-encoded, so no name runs into another's fields)
    <stream>#*               the stream's floor: every routed entry at or below it is committed, whatever its
                             partition (so partitions that get no events, and filtered events, still advance)
    <stream>#*i/N            the same, for shard i of N
    <stream>#replay_until    entries at or below it are history (`ctx.replaying`) for a following job
    partitions               P, fixed for the job's lifetime (changing it would re-route committed keys)
    seq, seq:i/N             the commit sequence `<n>:<token>` of the job (or shard): each commit runs only if it
                             is unchanged, which makes retries apply once and fences out a second instance; a claim
                             moves the sequences of every other shard layout too (and an operator command's, all)
"""

from __future__ import annotations

import logging
import random
import secrets
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from urllib.parse import unquote

import anyio
import hiredis
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from redis.asyncio import RedisCluster
from redis.crc import key_slot
from redis.exceptions import DataError as RedisDataError
from redis.exceptions import ResponseError

from replayd.connection import Client, Memory, OwnConnection, explain, is_retriable, text, text_hash
from replayd.errors import CheckpointLost, CommitError, ConfigError, DataError, FencingError, ReplaydError, RestartJob
from replayd.events import WHOLE, ZERO, Event, Id, Shard, format_id, parse_id, parse_shard
from replayd.handlers import beyond_limit
from replayd.ops.metrics import Metrics
from replayd.pipeline.script import COMMIT_SCRIPT, Refused, script_args

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

    def __init__(self, redis: Client, job: str, partitions: int, shard: Shard = WHOLE) -> None:
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

    async def claim(self, token: str, alias: str | None = None) -> tuple[str, int]:
        """Move the commit sequence to `<n+1>:<token>` unconditionally; return it, and the projection version the
        `alias` key names at that moment (0 without one).

        Done once the lease is held and before the checkpoint is read: an instance that lost its lease (paused
        past the TTL) can then no longer commit, so the checkpoint this one resumes from is final. The version
        is read in the same step, because a rebuild's flip moves both: a flip after this claim fences the run."""
        keys = [self.key, alias] if alias else [self.key]
        seq, version = await self.redis.eval(
            _CLAIM_SCRIPT, len(keys), *keys, seq_field(self.shard), token, str(self.shard.total)
        )
        return text(seq), int(version)

    def replay_until(self, stream: str) -> Id | None:
        text = self.fields.get(_replay_until_field(stream))
        return parse_id(text) if text else None

    async def init_stream(self, stream: str, replay_until: Id) -> None:
        await self.redis.hset(
            self.key, mapping={"partitions": self.partitions, _replay_until_field(stream): format_id(replay_until)}
        )

    async def reset(self) -> None:
        """Forget this job's positions; a shard forgets only its own (the others may be running)."""
        if self.shard.total == 1:
            await self.redis.unlink(self.key)
            return
        own_floor, own_seq = FLOOR + self.shard.suffix, seq_field(self.shard)
        fields = text_hash(await self.redis.hgetall(self.key))
        mine = [
            name
            for name in fields
            if name == own_seq
            or (tail := name.partition("#")[2]) == own_floor
            or (tail.isdigit() and self.shard.owns(int(tail)))
        ]
        if mine:
            await self.redis.hdel(self.key, *mine)


def stream_field(stream: str) -> str:
    """A stream's name as its checkpoint fields begin: as it is, unless it holds `#` or `%`, which are then
    percent-encoded. No encoded name holds a `#`, so the first `#` of a field ends the name, and no name can
    collide with another's fields (streams `ev` and `ev#*`); checkpoints of ordinary names read as they always did."""
    return stream.replace("%", "%25").replace("#", "%23") if "#" in stream or "%" in stream else stream


def partition_field(stream: str, partition: int) -> str:
    return f"{stream_field(stream)}#{partition}"


def _replay_until_field(stream: str) -> str:
    return f"{stream_field(stream)}#replay_until"


def _floor_shard(tail: str) -> Shard | None:
    """The shard whose floor a field's tail (`*`, `*i/N`) names, or None when it names none."""
    if tail == FLOOR:
        return Shard()
    try:
        return parse_shard(tail[1:]) if tail.startswith(FLOOR) else None
    except ValueError:
        return None


def partition_positions(
    fields: dict[str, str], stream: str, partitions: int, shard: Shard | None = None
) -> dict[int, Id] | None:
    """Per partition (of `shard`, or all): the ID after which it resumes. None when nothing is stored.

    A partition's position is the highest of its own checkpoint and every floor that covers it: the job's
    floor `<stream>#*`, and the floor `<stream>#*i/N` of a shard that owns it.
    """
    prefix = stream_field(stream) + "#"
    own: dict[int, Id] = {}
    floors: list[tuple[Shard, Id]] = []
    for name, value in fields.items():
        if not name.startswith(prefix):
            continue
        tail = name[len(prefix) :]
        if tail.isdigit():
            own[int(tail)] = parse_id(value)
        elif (owner := _floor_shard(tail)) is not None:
            floors.append((owner, parse_id(value)))
    if not own and not floors:
        return None
    return {
        p: max([own.get(p, ZERO)] + [floor for owner, floor in floors if owner.owns(p)])
        for p in range(partitions)
        if shard is None or shard.owns(p)
    }


def stream_positions(checkpoint: dict[str, str]) -> dict[str, Id]:
    """Per stream: the position a restart resumes after (the lowest over all partitions and shards)."""
    partitions = int(checkpoint.get("partitions") or 1)
    streams = {unquote(field.partition("#")[0]) for field in checkpoint if "#" in field}
    result = {}
    for stream in sorted(streams):
        per_partition = partition_positions(checkpoint, stream, partitions)
        if per_partition:
            result[stream] = min(per_partition.values())
    return result


def floor_field(stream: str, shard: Shard) -> str:
    return f"{stream_field(stream)}#{FLOOR}{shard.suffix}"


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
        moved = self.peek(commands)
        self.pop(moved)
        return moved

    def peek(self, commands: list[tuple[Any, ...]]) -> dict[str, Id]:
        """What `advance` would return (and append), leaving the marks in place: a commit it goes with may fail."""
        moved: dict[str, Id] = {}
        for stream, marks in self._marks.items():
            for mark in marks:
                if mark.remaining > 0:
                    break
                moved[stream] = mark.last_id
                commands.extend(mark.commands)
        return moved

    def pop(self, moved: dict[str, Id]) -> None:
        """Drop the marks `peek` returned as `moved` once committed (not those done since: they were not)."""
        for stream, floor in moved.items():
            marks = self._marks[stream]
            while marks and marks[0].last_id <= floor:
                marks.popleft()

    def pending(self) -> int:
        return sum(len(marks) for marks in self._marks.values())


class Tally:
    """What commits would have written, by key pattern (the key with its last part as `*`): a dry run's report."""

    def __init__(self, *, distinct_up_to: int = 1_000_000) -> None:
        self.commands: dict[str, Counter[str]] = {}
        self.keys: dict[str, set[str]] = {}
        self._room = distinct_up_to

    def add(self, commands: list[tuple[Any, ...]]) -> None:
        for command in commands:
            key = text(command[1]) if len(command) > 1 else ""
            pattern = key.rpartition(":")[0] + ":*" if ":" in key else key
            self.commands.setdefault(pattern, Counter())[text(command[0]).upper()] += 1
            keys = self.keys.setdefault(pattern, set())
            if self._room and key not in keys:  # a bounded count: past the bound it reads "at least"
                keys.add(key)
                self._room -= 1

    def lines(self) -> list[str]:
        more = "+" if not self._room else ""
        return [
            f"{pattern}: {sum(counts.values()):,} commands ({', '.join(f'{n} {c:,}' for n, c in counts.items())}) "
            f"on {len(self.keys[pattern]):,}{more} keys"
            for pattern, counts in sorted(self.commands.items())
        ]


class Unit(NamedTuple):
    """The commands of a commit request that one event queued: what a refused write is blamed on."""

    start: int
    end: int
    """`commands[start:end]` of the request."""
    events: tuple[Event, ...]
    """The event; every event of the batch for a handler taking whole batches (its writes are not told apart)."""
    where: str
    """The checkpoint field of its partition, `<stream>#<p>`."""
    settled: bool = False
    """Its commands are what the poison policy queued for it (a dead letter) instead of the handler's."""
    ends: tuple[int, ...] | None = None
    """A slice's events packed in one unit: where each one's commands end (`per_event` unpacks them)."""


def per_event(units: tuple[Unit, ...]) -> tuple[Unit, ...]:
    """`units` with every packed one (`ends`) unpacked into a unit per event: built only when a write must be
    blamed or a request cut, not for every event committed."""
    if all(unit.ends is None for unit in units):
        return units
    unpacked: list[Unit] = []
    for unit in units:
        if unit.ends is None:
            unpacked.append(unit)
            continue
        starts = (unit.start, *unit.ends[:-1])
        unpacked += (Unit(start, end, (event,), unit.where, unit.settled)
                     for start, end, event in zip(starts, unit.ends, unit.events, strict=True))  # fmt: skip
    return tuple(unpacked)


class CommitRequest(NamedTuple):
    """A lane batch's writes and checkpoint fields, waiting for its transaction."""

    commands: list[tuple[Any, ...]]
    checkpoints: dict[str, str]
    marks: list[Mark]
    then: Callable[[], None] | None = None
    """Called once the request is committed (a lane that did not wait for it releases its events here)."""
    units: tuple[Unit, ...] = ()
    """Which event queued which commands (none: replayd's own writes)."""
    size: int = 0
    """The bytes of the commands' arguments (`size_of`): the committer groups requests up to `max_bytes`."""
    parks: int = 0
    """How many keys the lanes had parked at commit time when they made it (`Committer.screen` catches up)."""


Resolution = tuple[CommitRequest, ReplaydError | None]
"""What replaces a request with a refused command (the event that queued it settled by the poison policy), and
the error to stop the job with once it is committed (policy `stop`), or None."""


async def _unresolved(request: CommitRequest, index: int, reason: str) -> Resolution:
    raise DataError(f"Redis would refuse a write of this commit: {reason}")


def size_of(commands: Sequence[tuple[Any, ...]]) -> int:
    """The bytes of the commands' arguments, about as sent (a number counts 8)."""
    return sum(len(arg) if isinstance(arg, str | bytes) else 8 for command in commands for arg in command)


MAX_COMMANDS = 10_000
"""Commands one commit carries at most, by default (`max_commit_commands`): checking and running 10,000 writes takes
Redis about 10 ms, far below the 5 s after which it answers other clients BUSY."""
MAX_BYTES = 64 << 20
"""Bytes of command arguments one commit carries at most, by default (`max_commit_bytes`): as big an entry as a job
reads (`max_entry_bytes`), so a handler can copy one."""


class Committer:
    """Commits lane batches. Requests that are ready together share one commit script (group commit).

    One task owns all writes to the checkpoint hash, so commits are applied in order and the floor of a
    stream can be computed without races.
    """

    def __init__(
        self,
        redis: Client,
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
        discard: Tally | None = None,
        max_commands: int = MAX_COMMANDS,
        max_bytes: int = MAX_BYTES,
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
        self.discard = discard
        """A dry run: handler writes are tallied here and dropped; only the (throwaway) checkpoint moves."""
        self._layout: dict[str, str] = dict(layout or {})
        """Written with the first commit of the run (P, so a changed P is caught at the next start)."""
        self._cluster = redis if isinstance(redis, RedisCluster) else None
        self._own = OwnConnection(redis)
        self._slot = slot_of(self.key)
        """Under Redis Cluster, the slot of the job's keys: every key a commit writes must be in it."""
        self.max_commands = max_commands
        self.max_bytes = max_bytes
        """Requests ready together share a commit up to these bounds (lanes cut their batches to fit them)."""
        self.on_refused: Callable[[CommitRequest, int, str], Awaitable[Resolution]] = _unresolved
        """Given a request, the index of its command the commit script refused and why: what replaces the request
        (the lanes settle the event that queued it). Called in commit order: later requests wait."""
        self.screen: Callable[[CommitRequest], CommitRequest] = lambda request: request
        """Each request before it is committed: the lanes park the events of keys that wait behind a dead letter
        made since they handled them (at commit time, by `on_refused`)."""

    async def commit(self, request: CommitRequest) -> None:
        """Queue a request (its `then` is replaced) and wait until it is committed."""
        committed = anyio.Event()
        await self.submit(request._replace(then=committed.set))
        await committed.wait()

    async def submit(self, request: CommitRequest) -> None:
        """Queue a request without waiting for its commit (which calls `then`). A lane's requests are committed
        in the order it queues them: one task commits them all."""
        try:
            self._send.send_nowait(request)  # no checkpoint: the lane yields when its inbox runs dry
        except anyio.WouldBlock:
            await self._send.send(request)

    async def nudge(self) -> None:
        """Ask for a commit of the floors alone (after batches whose events were all filtered out)."""
        await self._send.send(CommitRequest([], {}, []))

    async def run(self, receive: MemoryObjectReceiveStream[CommitRequest]) -> None:
        async with receive, self._own:
            await self._own.warm()  # while the first batch is read: its commit does not wait for a connection
            held: CommitRequest | None = None
            while True:
                if held is None:
                    try:
                        held = await receive.receive()
                    except anyio.EndOfStream:
                        return
                group, held = self._group(held, receive)
                await self._flush(group)

    def _group(
        self, first: CommitRequest, receive: MemoryObjectReceiveStream[CommitRequest]
    ) -> tuple[list[CommitRequest], CommitRequest | None]:
        """The requests ready now that fit one commit with `first`, and the first one that did not fit."""
        group, commands, size = [first], len(first.commands), first.size
        while True:
            try:
                request = receive.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream):
                return group, None
            commands += len(request.commands)
            size += request.size
            if commands > self.max_commands or size > self.max_bytes:
                return group, request
            group.append(request)

    async def _flush(self, group: Sequence[CommitRequest]) -> None:
        """Commit the group; a request with a command Redis would refuse is replaced by what `on_refused` makes of
        it (and, under `stop`, the requests after it are left out and the job stops once the rest is committed)."""
        group = list(group)
        stop: ReplaydError | None = None
        while True:
            group = [self.screen(request) for request in group]
            try:
                floors = await self._apply(group)
                break
            except Refused as refusal:
                at, index = _owner(group, refusal.index)
                if at < 0:
                    raise DataError(
                        f"Redis would refuse a write replayd queued itself in the commit of {self.key} "
                        f"(a dead letter of an undecodable entry?): {refusal.reason}"
                    ) from None
                replacement, error = await self.on_refused(group[at], index, refusal.reason)
                if error is not None:
                    group, stop = [*group[:at], replacement], error
                else:
                    group[at] = replacement
        self.floors.update(floors)
        for request in group:
            if request.then is not None:
                request.then()
        self._on_commit(floors)
        if stop is not None:
            raise stop

    async def _apply(self, group: list[CommitRequest]) -> dict[str, Id]:
        """One commit of the group's writes, checkpoints and the floors they complete: all of it, or (Refused, or
        any error) none of it. Returns the floors that moved."""
        commands: list[tuple[Any, ...]] = []
        fields: dict[str, str] = {}
        for request in group:
            commands.extend(request.commands)
            fields.update(request.checkpoints)
            for mark in request.marks:
                mark.remaining -= 1
        try:
            floors = self.watermark.peek(commands)
            commands = await self._screen(commands)
            for stream, floor in floors.items():
                fields[floor_field(stream, self.shard)] = format_id(floor)
            if fields and self._layout:
                fields.update(self._layout)
            if fields or commands:
                await self._timed(commands, fields)
        except BaseException:
            for request in group:
                for mark in request.marks:
                    mark.remaining += 1
            raise
        if fields:
            self._layout = {}
        self.watermark.pop(floors)
        return floors

    async def _timed(self, commands: list[tuple[Any, ...]], fields: dict[str, str]) -> None:
        started = time.monotonic()
        try:
            await self._transaction(commands, fields)
        except FencingError:
            self._count("fenced")
            raise
        except Refused:
            raise
        except BaseException:
            self._count("error")
            raise
        self._count("ok", time.monotonic() - started)

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
        deadline = time.monotonic() + self.budget_s
        delay = 0.05
        while True:
            try:
                reply = await self._roundtrip(script_args(self.key, self._seq_field, expected, new, fields, commands))
                break
            except (TypeError, RedisDataError):  # raised making or packing the script's arguments: nothing was sent
                for index, command in enumerate(commands):
                    if error := _unpackable(command):
                        raise Refused(index, error) from None
                raise
            except Exception as exc:
                if not is_retriable(exc):
                    raise
                if self._metrics:
                    self._metrics.redis_error("checkpoint", exc)
                Memory.note(exc)
                if time.monotonic() + delay > deadline:
                    raise CommitError(f"commit to {self.key} failed for {self.budget_s:.0f}s: {explain(exc)}") from exc
                logger.warning("commit to %s failed (%s); sending it again (it applies at most once)", self.key,
                               explain(exc))  # fmt: skip
                await anyio.sleep(random.uniform(0, delay))
                delay = min(delay * 2, 5.0)
        self._settle(reply, fields, expected, new)

    def _settle(self, reply: list[Any], fields: dict[str, str], expected: str, new: str) -> None:
        """Act on the script's reply: applied (`ok`, or `stale` on our own new sequence: a retry after a lost
        reply), or raise."""
        status = text(reply[0])
        if status == "refused":
            raise Refused(int(reply[1]), text(reply[2]))
        if status == "lost":
            self._lost(fields, expected)
        if status == "stale" and text(reply[1]) != new:
            self._check_rolled_back(text(reply[1]))
            raise FencingError(
                f"{self.key} was committed by another instance of job {self._job} shard {self.shard} "
                f"(commit sequence {text(reply[1])}, this instance expected {expected}): stopping"
            )
        self.seq = new
        Memory.note(None)

    def _lost(self, fields: dict[str, str], expected: str) -> None:
        streams = {name.rpartition("#")[0] for name in fields if "#" in name} | set(self.floors)
        if self._metrics:
            for stream in streams:
                self._metrics.gaps.labels(stream, "checkpoint_missing").inc()
        raise CheckpointLost(
            f"{self.key} is gone (checkpoint missing) while job {self._job} runs, its commit sequence {expected} "
            "with it: evicted (maxmemory-policy), deleted, or Redis restarted without it. Nothing of this commit "
            "was written. A restart would replay the stream onto the projection: check Redis's maxmemory-policy "
            "and persistence, then rebuild, or set the checkpoint back (replayd checkpoint set)"
        )

    async def _screen(self, commands: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        """The commands to send: none in a dry run (they are tallied), and under Redis Cluster only when every
        key is in the job's slot."""
        if self.discard is not None:
            self.discard.add(commands)
            return []
        if self._cluster is not None and commands:
            await self._check_slot(self._cluster, commands)
        return commands

    async def _check_slot(self, cluster: RedisCluster, commands: list[tuple[Any, ...]]) -> None:
        """Refuse a commit that would write outside the job's slot: Redis Cluster runs a script on one node, and
        a key of another slot would be refused there, or (Redis < 7) written on a node that does not serve it.
        Nothing of the commit is sent; the job stops (exit 78) instead of splitting the transaction."""
        for command in commands:
            name = str(command[0]).upper()
            if name in _FIRST_KEY_ONLY:
                keys: Sequence[Any] = command[1:2]
            else:  # any other command a handler queued: its keys as the server's command table says
                keys = await cluster.commands_parser.get_keys(*command) or ()
            for key in keys:
                if slot_of(key) != self._slot:
                    raise ConfigError(
                        f"job {self._job}: a commit writes {text(key)!r} (slot {slot_of(key)}), outside the slot of "
                        f"the job's keys ({self.key}, slot {self._slot}). Under Redis Cluster a commit is one script "
                        "in one slot: name the job after its projection (ctx.key keys are tagged "
                        "projection:{<projection>}:...), or give the key the job's hash tag "
                        f"{{{self._job}}}. Nothing of this commit was written."
                    )

    def _check_rolled_back(self, current: str) -> None:
        """Our own token with a lower number: Redis lost commits it acknowledged (fault matrix T9/T10)."""
        number, _, token = current.partition(":")
        if token == self._token and number.isdigit() and int(number) < int(self.seq.partition(":")[0] or 0):
            raise RestartJob(
                f"{self.key} went back from commit {self.seq} to {current}: Redis lost commits it had acknowledged "
                "(restarted from a torn AOF, or failed over to a lagging replica). Starting again from the checkpoint "
                "Redis kept (a one-shot command exits 75): what came after it is replayed"
            )

    async def _roundtrip(self, args: list[Any]) -> Any:
        """The commit script (under a cluster, on the node serving the job's slot)."""
        try:
            with anyio.fail_after(self.timeout_s):  # a TimeoutError (OSError): retried like a lost connection
                return await self._own.call("EVAL", COMMIT_SCRIPT, *args)
        except ResponseError as exc:
            if not is_retriable(exc):
                raise ReplaydError(f"Redis refused the commit to {self.key}: {exc}") from exc
            raise


_FIRST_KEY_ONLY = frozenset(
    {"HSET", "HINCRBY", "HINCRBYFLOAT", "HDEL", "SET", "INCRBY", "SADD", "SREM", "RPUSH", "ZADD", "EXPIRE", "XADD"}
)
"""Commands `ctx.tx` queues whose one key is their first argument (the others ask the command table)."""


def _owner(group: Sequence[CommitRequest], index: int) -> tuple[int, int]:
    """Which request of `group` holds command `index` of their commands, and its index there; (-1, -1) for one
    after them all (the dead letters the watermark adds)."""
    for at, request in enumerate(group):
        if index < len(request.commands):
            return at, index
        index -= len(request.commands)
    return -1, -1


def sendable(commands: list[tuple[Any, ...]], where: str) -> list[tuple[Any, ...]]:
    """The commands without those holding a value no Redis command takes (None, a dict: a handler's bug), which
    are logged and left out (`dlq retry`'s transaction; a commit refuses them instead, blaming the event)."""
    kept = []
    for command in commands:
        error = _unpackable(command)
        if error is None:
            kept.append(command)
        else:
            logger.error("a handler's command cannot be sent, left out of %s: %s (%s)", where, shown(command), error)
    return kept


def _unpackable(command: tuple[Any, ...]) -> str | None:
    """Why `command` cannot be sent (no arguments, too many for the commit script, or an argument of a type no Redis
    command takes), or None."""
    if error := beyond_limit(command):
        return error
    try:
        hiredis.pack_command(tuple(command))
    except TypeError as exc:
        return str(exc)
    return None


def shown(command: tuple[Any, ...], most: int = 6) -> str:
    """A command for a log line or a dead letter: its first arguments, each cut short."""
    return " ".join(repr(arg)[:60] for arg in command[:most]) + (" ..." if len(command) > most else "")


def slot_of(key: str | bytes) -> int:
    """The Redis Cluster hash slot of `key` (its `{tag}`, when it has one, decides)."""
    return key_slot(key.encode() if isinstance(key, str) else key)


def seq_field(shard: Shard) -> str:
    """The checkpoint hash field holding a (job, shard)'s commit sequence."""
    return "seq" + (f":{shard}" if shard.total > 1 else "")


async def fence_commits(redis: Client, job: str, token: str) -> None:
    """Move every commit sequence of `job`: no commit of any instance started before applies after this (an
    operator command changing the job's state, which no instance may run meanwhile)."""
    await redis.eval(_CLAIM_SCRIPT, 1, job_key(job, "checkpoint"), "", token, "")


# KEYS: checkpoint hash, [alias]; ARGV: the seq field to claim ('' for none), token, layout N ('' for none). The
# sequences of other layouts move too: their shards own other sets of partitions, and one paused past its lease
# must not commit beside the new layout (the lease keeps live ones out; this fences late ones).
_CLAIM_SCRIPT = """
local function bump(f)
  local n = tonumber(string.match(redis.call('HGET', KEYS[1], f) or '', '^(%d+)')) or 0
  local seq = (n + 1) .. ':' .. ARGV[2]
  redis.call('HSET', KEYS[1], f, seq)
  return seq
end
for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
  if f ~= ARGV[1] and (f == 'seq' or string.match(f, '^seq:%d+/%d+$'))
      and (string.match(f, '/(%d+)$') or '1') ~= ARGV[3] then
    bump(f)
  end
end
local seq = ''
if ARGV[1] ~= '' then seq = bump(ARGV[1]) end
return {seq, KEYS[2] and redis.call('GET', KEYS[2]) or '0'}
"""
