"""The handler plugin contract: `Projection` classes with `@on(...)` methods, plain functions, or any object
with `handle`/`handle_batch`; `Context` carries `ctx.tx` (writes committed with the checkpoint), `ctx.key`,
`ctx.replaying` and a Redis client for reads.

Hooks, when called:
- `startup(ctx)`: once, before the first event of a run.
- `handle(event, ctx)`: per event, in stream order within a partition key.
- `handle_batch(events, ctx)`: per lane batch instead of `handle`, for handlers that pipeline their own work.
- `on_caught_up(ctx)`: once, when a following job first reaches the stream head it saw at start.
- `shutdown(ctx)`: once, after the last commit of a run.
Each may be sync or async. A sync plain function runs in worker threads, a read batch's events per thread call
(it may block: the event loop, and other jobs, go on meanwhile; its partitions run one after another,
so blocking I/O per event belongs in an `async def`, whose partitions run concurrently in lanes); sync `Projection`
methods run on the event loop and must only queue writes on `ctx.tx` (make them async to await anything).
"""

from __future__ import annotations

import inspect
import logging
from asyncio import CancelledError
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import cached_property
from itertools import accumulate, chain
from types import CoroutineType
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

import anyio
import anyio.to_thread
from redis.asyncio import Redis, RedisCluster

from replayd.errors import DecodeError, HandlerTimeout, StopReplay
from replayd.events import Event, PartitionBy, preview
from replayd.handlers.upcast import Upcast, Upcasters

if TYPE_CHECKING:
    from replayd.handlers.timeouts import HandlerWatch, Watched

logger = logging.getLogger(__name__)

Arg = str | bytes | int | float
F = TypeVar("F", bound=Callable[..., Any])


def projection_prefix(name: str, *, cluster: bool = False) -> str:
    """The key prefix of projection `name`: `projection:<name>`, or under Redis Cluster `projection:{<name>}`,
    a hash tag that puts every key of the projection in the slot of the job named after it (`replayd:{<name>}:...`),
    so its writes and the job's checkpoint can commit in one script."""
    return f"projection:{{{name}}}" if cluster else f"projection:{name}"


MAX_ARGS = 7_000
"""The most arguments a queued command may have: the commit runs each from a Lua script, and a call from Lua takes
at most about 8,000 values. `Tx` splits a longer HSET, HDEL, DEL, SADD, SREM, RPUSH or ZADD into commands of the
same effect, and refuses a longer `execute_command` or XADD, or one of no arguments (ValueError)."""

CHECKED_COMMANDS = frozenset({
    "HSET", "HMSET", "HSETNX", "HINCRBY", "HINCRBYFLOAT", "HDEL", "SET", "INCR", "INCRBY", "DECR", "DECRBY", "DEL",
    "UNLINK", "SADD", "SREM", "RPUSH", "LPUSH", "ZADD", "ZREM", "ZINCRBY", "EXPIRE", "PEXPIRE", "XADD",
})  # fmt: skip
"""The commands a commit can queue: before it writes anything, the commit script checks each of them against the
keys as the commands before it leave them (type, stored counter, arguments), so that Redis refuses none of them
once the first write ran. Others are refused when queued (`Tx.execute_command` raises ValueError): a command
whose refusal cannot be foreseen could leave a commit half applied."""


class Tx:
    """replayd's own command buffer: commands are queued here and packed once per batch into the
    atomic commit (one Lua script) that also moves the checkpoint: effects and checkpoint commit together."""

    __slots__ = ("commands", "owners")

    def __init__(self) -> None:
        self.commands: list[tuple[Arg, ...]] = []
        self.owners: list[tuple[int, Event]] = []
        """`(end, event)` as each event is done: the commands up to `end` (after the previous end) are that
        event's, so a write Redis would refuse is blamed on the event that queued it."""

    def __len__(self) -> int:
        return len(self.commands)

    def execute_command(self, *args: Arg) -> None:
        """Queue a Redis command of CHECKED_COMMANDS (its reply is not returned: it runs at commit); ValueError for
        another, TypeError for a value no Redis command takes."""
        _within_limit(args)
        name = args[0].decode() if isinstance(args[0], bytes) else str(args[0])
        if name.upper() not in CHECKED_COMMANDS:
            raise ValueError(
                f"ctx.tx cannot queue {name!r}: a commit runs only commands it can check before its first write "
                f"({', '.join(sorted(CHECKED_COMMANDS))}), so that Redis never refuses one half way through"
            )
        for arg in args:
            if not isinstance(arg, str | bytes | int | float):
                raise TypeError(f"ctx.tx cannot queue {name} with a {type(arg).__name__} argument: Redis takes "
                                 "strings, bytes and numbers")  # fmt: skip
        self.commands.append((name.upper(), *args[1:]))

    def hset(
        self, key: str, field: str | None = None, value: Arg | None = None, *, mapping: dict[str, Arg] | None = None
    ) -> None:
        pairs = chain.from_iterable(mapping.items()) if mapping else ()
        if field is not None and value is not None:
            self._queue(("HSET", key, field, value, *pairs), 2, 2)
        else:
            self._queue(("HSET", key, *pairs), 2, 2)

    def hincrby(self, key: str, field: str, amount: int = 1) -> None:
        self.commands.append(("HINCRBY", key, field, amount))

    def hincrbyfloat(self, key: str, field: str, amount: float = 1.0) -> None:
        self.commands.append(("HINCRBYFLOAT", key, field, amount))

    def hdel(self, key: str, *fields: str) -> None:
        self._queue(("HDEL", key, *fields), 2)

    def set(self, key: str, value: Arg, *, ex: int | None = None) -> None:
        self.commands.append(("SET", key, value) + (("EX", ex) if ex else ()))

    def delete(self, *keys: str) -> None:
        self._queue(("DEL", *keys), 1)

    def incrby(self, key: str, amount: int = 1) -> None:
        self.commands.append(("INCRBY", key, amount))

    def sadd(self, key: str, *members: Arg) -> None:
        self._queue(("SADD", key, *members), 2)

    def srem(self, key: str, *members: Arg) -> None:
        self._queue(("SREM", key, *members), 2)

    def rpush(self, key: str, *values: Arg) -> None:
        self._queue(("RPUSH", key, *values), 2)

    def zadd(self, key: str, mapping: dict[str, float]) -> None:
        args: list[Arg] = ["ZADD", key]
        for member, score in mapping.items():
            args += [score, member]
        self._queue(tuple(args), 2, 2)

    def expire(self, key: str, seconds: int) -> None:
        self.commands.append(("EXPIRE", key, seconds))

    def xadd(self, key: str, fields: dict[str, Arg], *, id: str = "*") -> None:
        args: list[Arg] = ["XADD", key, id]
        for item in fields.items():
            args.extend(item)
        self.commands.append(_within_limit(tuple(args)))

    def _queue(self, command: tuple[Arg, ...], head: int, step: int = 1) -> None:
        """Queue `command`; past MAX_ARGS, as several with its first `head` arguments and the rest in parts (of
        whole `step`s: field/value pairs stay together), which in order have the same effect."""
        if len(command) <= MAX_ARGS:
            self.commands.append(command)
            return
        room = (MAX_ARGS - head) // step * step
        for start in range(head, len(command), room):
            self.commands.append(command[:head] + command[start : start + room])

    def _rollback(self, mark: int) -> None:
        del self.commands[mark:]


def beyond_limit(command: tuple[Any, ...]) -> str | None:
    """Why the commit script cannot run `command` (no arguments, or more than MAX_ARGS), or None."""
    if 0 < len(command) <= MAX_ARGS:
        return None
    return f"a command of {len(command)} arguments: a commit runs commands of 1 to {MAX_ARGS}"


def _within_limit(command: tuple[Arg, ...]) -> tuple[Arg, ...]:
    if error := beyond_limit(command):
        raise ValueError(error)
    return command


@dataclass(eq=False)
class Context:
    """What a handler gets beside the event."""

    job: str
    """The job's name."""
    redis: Redis | RedisCluster
    """A client for reads (writes belong on `tx`, so they commit with the checkpoint)."""
    namespace: str
    """The projection's key prefix, e.g. `projection:order_summary` (`projection:{order_summary}` on a cluster)."""
    replaying: bool = True
    """True while history is replayed; False for live events a following job receives."""
    tx: Tx = field(default_factory=Tx)
    """Writes queued here run in the same atomic commit as the checkpoint of the batch."""
    failures: FailurePolicy | None = None
    """What a handler error leads to (None: log, count, go on)."""
    watch: HandlerWatch | None = field(default=None, repr=False)
    """The job's handler time-outs (None: none)."""
    watched: Watched | None = field(default=None, repr=False)
    """The time-out registration of the lane batch being handled."""

    def key(self, *parts: object) -> str:
        """A key in the projection's namespace: `ctx.key("order", 42)` -> `projection:<name>:order:42`
        (`projection:{<name>}:order:42` on a Redis Cluster)."""
        if len(parts) == 2:  # the common `kind, id` shape, without building a list
            return f"{self.namespace}:{parts[0]}:{parts[1]}"
        return ":".join((self.namespace, *map(str, parts)))


class Handler(Protocol):
    """What the engine calls. `load_handler` adapts Projections, functions and objects to it."""

    @property
    def name(self) -> str:
        """The projection's name: its keys live under `projection:<name>:`."""

    @property
    def partition_by(self) -> PartitionBy:
        """What orders events: a data field or another path, a function of the event (None: the stream key)."""

    @property
    def event_types(self) -> frozenset[str] | None:
        """The types it handles; others are skipped before routing (None: all)."""

    async def startup(self, ctx: Context) -> None: ...

    async def handle_batch(self, events: Sequence[Event], ctx: Context) -> Outcome: ...

    async def on_caught_up(self, ctx: Context) -> None: ...

    async def shutdown(self, ctx: Context) -> None: ...


@dataclass
class Outcome:
    """How a lane batch went."""

    handled: int = 0
    """Events handled without error."""
    failed: int = 0
    """Events whose handler raised (their queued writes are dropped)."""
    stopped_at: int | None = None
    """Index of the event that raised StopReplay: it and those before it count, later ones are not handled."""
    failed_at: int | None = None
    """Index of the event that failed for good under the `stop` policy: those before it count, it and later do not."""
    retried: int = 0
    """Attempts repeated after a handler error."""
    dead_lettered: int = 0
    """Events that failed for good and were written to the dead-letter stream (those parked behind one: `parked`)."""
    poison: int = 0
    """Events a field of which the handler read could not be decoded (also counted in `failed`)."""
    parked: int = 0
    """Events not handled because their key waits behind a dead letter (dead-lettered as `Parked`, or skipped)."""


Bounds = tuple[tuple[int, int], tuple[int, int]]
"""Where a slice's work lies in `ctx.tx`: its lengths (owners, commands) before the slice and after it."""
Handled = tuple[Outcome, Bounds]


CATCH_ALL = "*"
"""`@on("*")`: the method of every event type no other method of the projection handles."""


def on(*event_types: str, replay: bool = True) -> Callable[[F], F]:
    """Mark a Projection method as the handler of `event_types` (`"*"`: every type no other method handles).
    `replay=False` marks a side effect (email, webhook) that must not run again for replayed history."""

    def mark(func: F) -> F:
        func.__replayd_on__ = (event_types, replay)  # type: ignore[attr-defined]
        return func

    return mark


class Projection:
    """Base class of projections: methods decorated with `@on("Type")` handle events of those types."""

    name: ClassVar[str] = ""
    partition_by: PartitionBy = None
    """A data field (`customer_id`), a path (`fields.user_id`, `metadata.tenant`), or a method of the event."""
    upcasters: ClassVar[Upcasters | Mapping[tuple[str, int], Upcast] | None] = None
    """Upcasters of the old versions of its event types (`replayd.handlers.upcast`): events reach its `@on`
    methods, and the job's filters, in their newest shape."""
    writes_projection: ClassVar[bool] = True
    """It queues writes to its own keys (`ctx.key`) on `ctx.tx`. Under Redis Cluster such a job must be named after
    the projection (checked at start). False for handlers that write nothing there, or keys of their own naming
    (checked per commit)."""
    _routes: ClassVar[dict[str, tuple[str, bool]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        routes = dict(cls._routes)
        for attr, member in vars(cls).items():
            marked = getattr(member, "__replayd_on__", None)
            if marked:
                for event_type in marked[0]:
                    routes[event_type] = (attr, marked[1])
        cls._routes = routes
        if not cls.name:
            cls.name = cls.__name__.lower()

    @property
    def event_types(self) -> frozenset[str] | None:
        """The `@on` types, which the job's filter keeps (None, every type, with an `@on("*")` method)."""
        if CATCH_ALL in self._routes:
            return None
        return frozenset(self._routes) or None

    async def startup(self, ctx: Context) -> None:
        """Called once before the first event of a run."""

    async def on_caught_up(self, ctx: Context) -> None:
        """Called once when a following job first reaches the head it saw at start."""

    async def shutdown(self, ctx: Context) -> None:
        """Called once after the last commit of a run."""

    @cached_property
    def awaits(self) -> bool:
        """Whether its event code may await (and so read through `ctx.redis`): not when every `@on` method is
        sync, which only queues writes. Lanes hand the next batch of a handler that never awaits to it while
        the previous batch commits."""
        cls = type(self)
        if cls.handle is not Projection.handle or cls.handle_batch is not Projection.handle_batch:
            return True
        return any(inspect.iscoroutinefunction(method) for method, _replay in self._bound.values())

    @cached_property
    def _bound(self) -> dict[str, tuple[Callable[[Event, Context], Any], bool]]:
        # bound once per instance: the per-event dispatch is a dict lookup, not getattr
        return {kind: (getattr(self, attr), replay) for kind, (attr, replay) in self._routes.items()}

    @cached_property
    def _catch_all(self) -> tuple[Callable[[Event, Context], Any], bool] | None:
        return self._bound.get(CATCH_ALL)

    def _dispatch(self, event: Event, ctx: Context) -> Any:
        """Call the `@on` method of the event's type (else the `@on("*")` one): None, or an awaitable for async
        methods."""
        route = self._bound.get(event.event_type) or self._catch_all
        if route is None or (ctx.replaying and not route[1]):
            return None
        return route[0](event, ctx)

    async def handle(self, event: Event, ctx: Context) -> None:
        result = self._dispatch(event, ctx)
        if result is not None:
            await result

    def handle_batch(self, events: Sequence[Event], ctx: Context) -> Coroutine[Any, Any, Outcome]:
        return _each(events, ctx, self._dispatcher(ctx.replaying))

    @cached_property
    def _methods(self) -> tuple[dict[str, Callable[[Event, Context], Any] | None], ...]:
        """Event type -> the method `_dispatch` calls (None: none), for live events and for replayed history."""
        live: dict[str, Callable[[Event, Context], Any] | None] = {k: method for k, (method, _) in self._bound.items()}
        return live, {kind: method if replay else None for kind, (method, replay) in self._bound.items()}

    def _dispatcher(self, replaying: bool) -> Callable[[Event, Context], Any]:
        """`_dispatch` for a batch of one mode: its table picked once, and the method itself when `@on("*")` is
        the only one (a lookup and a call per event fewer)."""
        methods = self._methods[replaying]
        default = methods.get(CATCH_ALL)
        if default is not None and len(methods) == 1:
            return default
        get = methods.get

        def dispatch(event: Event, ctx: Context) -> Any:
            method = get(event.event_type, default)
            return None if method is None else method(event, ctx)

        return dispatch


class FailurePolicy(Protocol):
    """What happens when a handler raises on an event (replayd.jobs.deadletter implements it)."""

    retries: int
    """Attempts after the first, with exponential backoff and jitter."""

    @property
    def parks(self) -> bool:
        """Whether some key waits behind a dead letter now (else `parked_behind` is None for every event)."""

    def backoff_s(self, attempt: int) -> float:
        """How long to wait before attempt `attempt` (2, 3, ...)."""

    def parked_behind(self, event: Event) -> str | None:
        """The dead letter this event's key waits behind (ordering `key`), or None."""

    def give_up(self, event: Event, error: BaseException | str, attempts: int, tx: Tx) -> str:
        """The event failed for good: `stop` (the batch ends before it), `dead_lettered` (queued on `tx`), or
        `skipped`."""


async def _each(
    events: Sequence[Event], ctx: Context, call: Callable[[Event, Context], Any], *, cancellable: bool = True
) -> Outcome:
    """Handle events one by one, in order; a StopReplay, or a failure under the `stop` policy, ends the batch.

    With time-outs, the job's `HandlerWatch` watches the batch (not a timer per event): when it cancels a call
    that outlived `handler_timeout_s`, that event fails (retried, then the poison policy) and the batch goes on
    after it. `cancellable` is False for sync functions in worker threads: reported only.
    """
    outcome = Outcome()
    watch = ctx.watch
    if watch is None:
        await _loop(events, 0, ctx, call, outcome)
        return outcome
    start = 0
    while start < len(events):
        watched = ctx.watched = watch.watch(events, outcome, cancellable=cancellable)
        try:
            await _loop(events, start, ctx, call, outcome)
            break
        except CancelledError:
            if not watched.expired():  # a shutdown, not a time-out
                raise
        finally:
            watch.unwatch(watched)
        index = watched.index()
        verdict = await _settle(events[index], ctx, call, outcome, _timeout(events[index], watch), len(ctx.tx))
        if verdict == "stop":
            outcome.failed_at = index
            break
        ctx.tx.owners.append((len(ctx.tx), events[index]))
        if verdict == "stopped":
            outcome.stopped_at = index
            break
        start = index + 1
    ctx.watched = None
    return outcome


async def _loop(
    events: Sequence[Event], start: int, ctx: Context, call: Callable[[Event, Context], Any], outcome: Outcome
) -> None:
    """The per-event hot path: one call and, for async handlers, one await per event (driving the coroutine with
    `coro.send(None)` instead measured slower: the StopIteration it ends with costs more than the await); parked
    keys and failures take the slower paths below. The adapters' `handle_batch` is a plain `def` returning the
    `_each` coroutine, not awaiting it: every suspend and resume of every event then passes one frame fewer."""
    tx, policy = ctx.tx, ctx.failures
    commands, done = tx.commands, tx.owners.append  # bound once: the loop reads them for every event
    parking = policy is not None and policy.parks
    for index, event in enumerate(events[start:] if start else events, start):
        verdict = _parked(event, tx, policy, outcome) if parking else None
        if verdict is None:
            mark = len(commands)
            try:
                result = call(event, ctx)
                # an `async def`'s coroutine is awaited (which runs it right here until it first suspends: no
                # event-loop round trip when it never does); the type tests spare most results isawaitable's ABC
                # check (1 µs for a returned dict, more than the rest of the loop)
                if result is not None and (
                    type(result) is CoroutineType or (type(result) not in _PLAIN and inspect.isawaitable(result))
                ):
                    await result
            except Exception as exc:  # noqa: BLE001 - StopReplay, poison, or an error to retry: `_settle` says
                failure = exc
            except BaseException:  # cancelled (a time-out, a shutdown): the event's writes go with it
                tx._rollback(mark)
                raise
            else:
                outcome.handled += 1
                done((len(commands), event))
                continue
            # settled outside the `except`: a retry's error would otherwise chain this one, and its log show both
            verdict = await _settle(event, ctx, call, outcome, failure, mark)
        parking = policy is not None and policy.parks  # a dead letter may have parked its key just now
        if verdict == "stop":
            outcome.failed_at = index
            break
        done((len(commands), event))
        if verdict == "stopped":
            outcome.stopped_at = index
            break


def _timeout(event: Event, watch: HandlerWatch) -> HandlerTimeout:
    return HandlerTimeout(
        f"handler call on {event.stream} {event.stream_id} outlived handler_timeout_s = {watch.timeout_s:g}"
    )


_PLAIN = frozenset({dict, list, tuple, str, bytes, int, float, bool})
"""Types of values a sync handler may return that are never awaitable."""


def _parked(event: Event, tx: Tx, policy: FailurePolicy | None, outcome: Outcome) -> str | None:
    """The verdict for an event whose key waits behind a dead letter, or None when its key is not parked."""
    behind = policy.parked_behind(event) if policy is not None else None
    if policy is None or behind is None:
        return None
    verdict = policy.give_up(event, f"parked behind dead letter {behind} of its key", 0, tx)
    if verdict in ("dead_lettered", "skipped"):
        outcome.parked += 1
    return verdict


def _poisoned(event: Event, error: DecodeError, tx: Tx, policy: FailurePolicy | None, outcome: Outcome) -> str:
    logger.error(
        "undecodable entry %s %s: %s (fields %s)", event.stream, event.stream_id, error.reason, preview(error.fields)
    )
    outcome.failed += 1
    outcome.poison += 1
    return _count(outcome, policy.give_up(event, error, 1, tx) if policy else "skipped")


async def _settle(
    event: Event, ctx: Context, call: Callable[[Event, Context], Any], outcome: Outcome, exc: Exception, mark: int
) -> str:
    """The verdict after the handler raised `exc` on `event` (the slow path): a StopReplay ends the batch with the
    event handled; an undecodable field makes it poison, never retried; any other error is retried as the policy
    says, its queued writes dropped after each failed attempt, then given up on."""
    tx, policy = ctx.tx, ctx.failures
    attempt = 1
    while True:
        if isinstance(exc, StopReplay):
            outcome.handled += 1
            return "stopped"
        tx._rollback(mark)
        if isinstance(exc, DecodeError):
            return _poisoned(event, exc, tx, policy, outcome)
        if policy is None or attempt > policy.retries:
            break
        attempt += 1
        outcome.retried += 1
        await anyio.sleep(policy.backoff_s(attempt))
        failed = await _attempt(event, ctx, call)
        if failed is None:
            outcome.handled += 1
            return "handled"
        exc = failed
    logger.error(
        "handler failed on %s %s (event %s, %s) after %d attempt(s)",
        event.stream, event.stream_id, event.event_id, event.event_type, attempt, exc_info=exc,
    )  # fmt: skip
    outcome.failed += 1
    return _count(outcome, policy.give_up(event, exc, attempt, tx) if policy else "skipped")


async def _attempt(event: Event, ctx: Context, call: Callable[[Event, Context], Any]) -> Exception | None:
    """One more call of the handler on `event`: what it raised (HandlerTimeout past `handler_timeout_s`), or None."""
    watch = ctx.watch
    if watch is None:
        return await _call(event, ctx, call)
    outer = ctx.watched
    if outer is not None:
        outer.paused = True  # the batch's clock waits while this call has one of its own
    watched = watch.watch([event], None, cancellable=outer is None or outer.cancellable)
    try:
        return await _call(event, ctx, call)
    except CancelledError:
        if not watched.expired():
            raise
        return _timeout(event, watch)
    finally:
        watch.unwatch(watched)
        if outer is not None:
            outer.paused = False


async def _call(event: Event, ctx: Context, call: Callable[[Event, Context], Any]) -> Exception | None:
    try:
        result = call(event, ctx)
        if result is not None and inspect.isawaitable(result):
            await result
    except Exception as exc:  # noqa: BLE001 - the caller decides
        return exc
    return None


def _count(outcome: Outcome, verdict: str) -> str:
    if verdict == "dead_lettered":
        outcome.dead_lettered += 1
    return verdict


class FunctionHandler:
    """Adapts a plain function `f(event)` or `f(event, ctx)`, sync or async, to the Handler protocol."""

    partition_by: PartitionBy = None
    event_types: frozenset[str] | None = None
    writes_projection = False
    """A plain function names no projection: keys it queues on `ctx.tx` are checked per commit under Cluster."""

    def __init__(self, func: Callable[..., Any], name: str) -> None:
        self.name = name
        self._async = inspect.iscoroutinefunction(func)
        self.threads = not self._async
        """It runs in worker threads, where a call can block for ever: the engine watches its time-outs."""
        self.awaits = self._async
        """False for a sync function: it runs in worker threads, partition after partition of each read batch, with
        no lanes (as a sync `Projection` runs), so its commits overlap its next batches. In lanes, with a thread
        call per lane batch, it ran at 0.45-0.7x the events/s of the same work as a Projection (lane batches of ~10
        events, a commit each)."""
        params = inspect.signature(func).parameters
        self._call: Callable[[Event, Context], Any] = func if len(params) >= 2 else lambda e, _c: func(e)

    async def startup(self, ctx: Context) -> None:
        """Functions have no hooks."""

    async def on_caught_up(self, ctx: Context) -> None:
        """Functions have no hooks."""

    async def shutdown(self, ctx: Context) -> None:
        """Functions have no hooks."""

    def handle_batch(self, events: Sequence[Event], ctx: Context) -> Coroutine[Any, Any, Outcome]:
        return _each(events, ctx, self._call) if self._async else self._one(events, ctx)

    async def _one(self, events: Sequence[Event], ctx: Context) -> Outcome:
        outcome, _bounds = (await self.handle_slices([events], ctx))[0]
        return outcome

    async def handle_slices(self, slices: Sequence[Sequence[Event]], ctx: Context) -> list[Handled]:
        """A sync function on a read batch's slices (each a partition's events), in order: blocking code runs in a
        worker thread, so the event loop goes on meanwhile. One thread call runs the function on the events, slice
        after slice, until one raises or waits behind a dead letter (a thread call per event cost 3-15x the work of
        a small function; one per slice, 16 a read batch at 16 partitions, doubled the cost of a no-op); that one
        takes `_each`'s slow path here, on the loop, and the next thread call goes on after it (after the end of
        its slice, when it stopped the slice: StopReplay or the `stop` policy). Returns each slice's outcome with
        its bounds in `ctx.tx`. With time-outs, the thread call is watched (it cannot be cancelled: a call past
        `handler_timeout_s` is reported)."""
        tx, policy, watch = ctx.tx, ctx.failures, ctx.watch
        events = slices[0] if len(slices) == 1 else list(chain.from_iterable(slices))
        ends = list(accumulate(map(len, slices)))
        outcomes = [Outcome() for _ in slices]
        bounds = [(len(tx.owners), len(tx.commands))]
        """`ctx.tx`'s lengths (owners, commands) where each slice starts, and where the last one ends."""
        start = 0
        while start < len(events):
            watched = ctx.watched = watch.watch(events, None, cancellable=False, at=start) if watch else None
            try:
                index, mark, error = await anyio.to_thread.run_sync(
                    self._until_error, events, start, ends, outcomes, bounds, ctx
                )
            finally:
                if watch is not None and watched is not None:
                    watch.unwatch(watched)
            if index == len(events):
                break
            at = len(bounds) - 1
            outcome, event = outcomes[at], events[index]
            if error is None:
                verdict = _parked(event, tx, policy, outcome)
            else:
                verdict = await _settle(event, ctx, self._in_thread, outcome, error, mark)
            first = ends[at] - len(slices[at])
            if verdict == "stop":
                outcome.failed_at = index - first
            elif verdict is not None:
                tx.owners.append((len(tx.commands), event))
            if verdict == "stopped":
                outcome.stopped_at = index - first
            # None: not parked after all, so it is called; the slice ends where its handler stopped it
            start = ends[at] if verdict in ("stop", "stopped") else index if verdict is None else index + 1
            if start == ends[at]:
                bounds.append((len(tx.owners), len(tx.commands)))
        ctx.watched = None
        return [(outcome, (bounds[at], bounds[at + 1])) for at, outcome in enumerate(outcomes)]

    def _until_error(
        self,
        events: Sequence[Event],
        start: int,
        ends: Sequence[int],
        outcomes: Sequence[Outcome],
        bounds: list[tuple[int, int]],
        ctx: Context,
    ) -> tuple[int, int, Exception | None]:
        """In a worker thread: call the function on `events[start:]` in order, counting each slice's handled events
        and appending `ctx.tx`'s lengths to `bounds` as each slice (that ends at `ends`) is done. Returns the index
        of the first event that raised (with the length of `ctx.tx` before it and the error) or whose key waits
        behind a dead letter (error None), else `len(events)`. Each event's index is shown to the time-out watch as
        it starts."""
        call, tx, policy, watched = self._call, ctx.tx, ctx.failures, ctx.watched
        # read once, as `_each` does: a failure here returns to the loop, and the next thread call reads it again
        parking = policy is not None and policy.parks
        for at in range(len(bounds) - 1, len(ends)):
            end, outcome = ends[at], outcomes[at]
            for index in range(start, end):
                event = events[index]
                if parking and policy is not None and policy.parked_behind(event) is not None:
                    outcome.handled += index - start
                    return index, len(tx.commands), None
                mark = len(tx.commands)
                if watched is not None:
                    watched.at = index
                try:
                    call(event, ctx)
                except Exception as exc:  # noqa: BLE001 - StopReplay, poison or a retry: `_settle` says, on the loop
                    outcome.handled += index - start
                    return index, mark, exc
                tx.owners.append((len(tx.commands), event))
            outcome.handled += end - start
            bounds.append((len(tx.owners), len(tx.commands)))
            start = end
        return len(events), len(tx.commands), None

    def _in_thread(self, event: Event, ctx: Context) -> Awaitable[Any]:
        # a retry of one event (`_settle`): in a worker thread too, as it may block
        return anyio.to_thread.run_sync(self._call, event, ctx)


class ObjectHandler:
    """Adapts any object with `handle` and/or `handle_batch` (and optional hooks) to the Handler protocol."""

    def __init__(self, obj: Any, name: str) -> None:
        self.obj = obj
        self.name = getattr(obj, "name", None) or name
        self.partition_by = getattr(obj, "partition_by", None)
        types = getattr(obj, "event_types", None)
        self.event_types = frozenset(types) if types else None
        self.writes_projection = bool(getattr(obj, "writes_projection", True))
        self.upcasters = getattr(obj, "upcasters", None)
        method = getattr(obj, "handle_batch", None) or getattr(obj, "handle", None)
        self.awaits = method is None or inspect.iscoroutinefunction(method)
        """Whether its event code may await (see `Projection.awaits`): an `async def` handle_batch or handle."""

    async def _hook(self, hook: str, ctx: Context) -> None:
        method = getattr(self.obj, hook, None)
        if method is not None:
            result = method(ctx)
            if inspect.isawaitable(result):
                await result

    async def startup(self, ctx: Context) -> None:
        await self._hook("startup", ctx)

    async def on_caught_up(self, ctx: Context) -> None:
        await self._hook("on_caught_up", ctx)

    async def shutdown(self, ctx: Context) -> None:
        await self._hook("shutdown", ctx)

    def handle_batch(self, events: Sequence[Event], ctx: Context) -> Coroutine[Any, Any, Outcome]:
        batch = getattr(self.obj, "handle_batch", None)
        if batch is None:
            return _each(events, ctx, self.obj.handle)
        return self._batch(batch, events, ctx)

    async def _batch(self, batch: Callable[..., Any], events: Sequence[Event], ctx: Context) -> Outcome:
        mark = len(ctx.tx)
        try:
            # one timer per batch (a `handle_batch` call is the unit that fails); none for code that never awaits
            deadline = anyio.move_on_after(ctx.watch.timeout_s) if ctx.watch else None
            with deadline or nullcontext():
                result = batch(events, ctx)
                if inspect.isawaitable(result):
                    await result
            if deadline is not None and deadline.cancelled_caught and ctx.watch is not None:
                ctx.tx._rollback(mark)
                ctx.watch.batch_timed_out(events)
                return Outcome(failed=len(events))
        except StopReplay:
            return Outcome(handled=len(events), stopped_at=len(events) - 1)
        except DecodeError:
            ctx.tx._rollback(mark)
            return await self._without_poison(events, ctx)
        except Exception:
            ctx.tx._rollback(mark)
            logger.exception("handle_batch failed on %d events from %s", len(events), events[0].stream_id)
            return Outcome(failed=len(events))
        return Outcome(handled=len(events))

    async def _without_poison(self, events: Sequence[Event], ctx: Context) -> Outcome:
        """`handle_batch` read a field that cannot be decoded. Every field of the batch is decoded to find the
        undecodable entries: they go to the poison policy, and the others are handed over again (only those
        before the first undecodable one when the policy stops there)."""
        outcome = Outcome()
        good: list[int] = []
        for index, event in enumerate(events):
            try:
                event.astuple()
            except DecodeError as error:
                if _poisoned(event, error, ctx.tx, ctx.failures, outcome) == "stop":
                    outcome.failed_at = index
                    break
            else:
                good.append(index)
        if good:
            again = await self.handle_batch([events[i] for i in good], ctx)
            outcome.handled += again.handled
            outcome.failed += again.failed
            if again.stopped_at is not None:  # the handler ended the run before any later entry
                outcome.stopped_at, outcome.failed_at = good[again.stopped_at], None
        return outcome
