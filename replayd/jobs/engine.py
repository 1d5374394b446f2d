"""The one engine: it wires a job's stages in one task group and runs the job's life around them.

Each stream's read batches go down `_route`: the decode stage (codec, upcasters, filters, router), the poison
stage, pacing, then the dispatch into the lanes, which commit. Here: the lease, the start (plans, checkpoints,
parked keys), watchers, pause and resume, a blocked job's wait, the stop.

The daemon and every CLI command call `Engine.run`; `replayd.jobs.rebuild` wraps it for rebuilds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial

import anyio
import anyio.lowlevel
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from prometheus_client import Counter
from redis.asyncio import RedisCluster

from replayd.config import JobSpec, RedisConfig
from replayd.connection import (
    Client,
    check_eviction_policy,
    close_reads_client,
    is_retriable,
    reads_client,
    retrying,
)
from replayd.errors import (
    ConfigError,
    DataError,
    FencingError,
    JobBlocked,
    ReplaydError,
    most_telling,
)
from replayd.events import TOP, ZERO, Id, display_id, format_id, resolve_end, resolve_start
from replayd.handlers import Context, Handler, Outcome, projection_prefix
from replayd.handlers.loader import import_from_string, load_handler, load_predicate
from replayd.handlers.timeouts import HandlerWatch
from replayd.handlers.upcast import Upcasters, as_upcasters
from replayd.jobs.deadletter import DeadLetters
from replayd.jobs.gaps import find_gap
from replayd.jobs.lease import Lease
from replayd.jobs.poison import PoisonStage
from replayd.jobs.progress import ProgressWriter, Stats
from replayd.jobs.shape import check_shapes, job_codecs
from replayd.jobs.versions import ProjectionFlipped, Versions
from replayd.jobs.watchers import sweep_retired, watch_eviction_policy, watch_heads
from replayd.ops.logs import current_job
from replayd.ops.metrics import JobView, Metrics
from replayd.pipeline.commit import (
    CheckpointStore,
    CommitRequest,
    Committer,
    Resume,
    Tally,
    Watermark,
    job_key,
    slot_of,
)
from replayd.pipeline.decode import Decoder
from replayd.pipeline.dispatch import Dispatch
from replayd.pipeline.filters import Predicate, build_filter
from replayd.pipeline.lanes import Feed, InFlight, Lanes, fewer_collections
from replayd.pipeline.pacing import Pacer
from replayd.pipeline.router import STREAM_KEY, Router
from replayd.pipeline.source import Batch, BatchSizer, StreamReader, head, redis_time_ms

logger = logging.getLogger(__name__)

FINAL_WRITE_S = 2.0
"""How long each of a run's last two steps may take: the progress hash's final write (with the handler's
shutdown), then the lease's release. Together they are what `drain_on_signals` keeps of `shutdown_timeout_s`
after the drain, so a stop fits in it even with Redis not answering (a container's stop grace, then SIGKILL)."""
CLOSING_S = 2 * FINAL_WRITE_S


@dataclass
class _Plan:
    """A stream's resolved reading plan."""

    stream: str
    after: Id
    end: Id | None
    replay_until: Id
    skip: dict[int, Id]


class Engine:
    """Runs one job until its end bound, a StopReplay, or `stop()`."""

    def __init__(
        self,
        spec: JobSpec,
        redis: Client,
        *,
        redis_cfg: RedisConfig | None = None,
        handler: Handler | None = None,
        unavailable_budget_s: float | None = None,
        metrics: Metrics | None = None,
        version: int | None = None,
        ends: dict[str, Id] | None = None,
        discard: Tally | None = None,
    ) -> None:
        self.spec = spec
        self.redis = redis
        self.redis_cfg = redis_cfg or RedisConfig()
        self.handler = handler or load_handler(spec.handler)
        self.version = version or 0
        """The projection version this job writes: a rebuild's, given; a live job's, read from its alias at start."""
        self.ends = ends or {}
        """Per stream: an end ID that overrides the spec's end bound (a rebuild catching up to a paused job)."""
        self.discard = discard
        """A dry run: the handlers' writes are tallied here instead of committed."""
        self.on_leased: Callable[[], Awaitable[None]] | None = None
        """Run once the job's lease is held, before anything is read (an in-place rebuild clears its keys); retried
        through a Redis restart, as the start is, so it must be idempotent."""
        self.budget_s = unavailable_budget_s or self.redis_cfg.unavailable_timeout_s
        self.cluster = isinstance(redis, RedisCluster)
        # a live job follows its projection's alias, which a rebuild flips (no versions on a cluster, yet)
        follows = version is None and bool(self.handler.name) and not self.cluster
        self.alias = Versions(redis, self.handler.name) if follows else None
        self.namespace = projection_prefix(self.handler.name, cluster=self.cluster)
        self._refuse_split_commits()
        # handlers read through a client with redis-py's usual reply parsing (on the same pool for one server)
        self.handler_redis = reads_client(redis)
        self.metrics = metrics or Metrics()
        self._build_state()
        self._build_stages()

    def _build_state(self) -> None:
        """The job's state: its counters, its keys in Redis (checkpoint, progress, lease), its lifecycle events."""
        spec = self.spec
        self.shard = spec.shard_of
        self.stats = Stats(spec.name, list(spec.streams))
        self.stop_requested = anyio.Event()
        self._running = anyio.Event()
        self._running.set()
        self._cancel_wait = anyio.CancelScope()
        """Cancels the wait of a blocked job for `replayd resume` (on stop)."""
        self.caught_up = anyio.Event()
        self.store = CheckpointStore(self.redis, spec.name, spec.partitions, self.shard)
        self.progress = ProgressWriter(self.redis, self.stats, spec.progress_interval_s, self.shard)
        self.lease = Lease(self.redis, spec.name, self.shard, ttl_ms=int(spec.lease_ttl_s * 1000),
                           wait=spec.on_lease_held == "wait")  # fmt: skip
        self._plans: list[_Plan] = []
        self.seq = ""
        self.view = JobView(spec.name, self.stats.streams, self._state, self.stats.position,
                            inflight=lambda: self.inflight.count,
                            parked_keys=lambda: len(self.dead_letters.parked))  # fmt: skip

    def _build_stages(self) -> None:
        """The stages of the data path and what they share. Those of each stream (its reader, decoder and dispatch)
        are built by `_read_all`, for each run."""
        spec = self.spec
        self.filter = self._build_filter(spec.entity)
        self.upcasters = self._load_upcasters()
        self.codec_for = job_codecs(spec)
        partition_by = spec.partition_by or self.handler.partition_by
        self.router = Router(spec.partitions, partition_by=partition_by, ordering=spec.ordering, shard=self.shard)
        self.dead_letters = DeadLetters(
            spec.name, spec.poison_policy, retries=spec.retries, backoff_s=spec.retry_backoff_s,
            key_of=self.router.key_of if spec.ordering == "key" else None,
            whole_stream=partition_by in (None, STREAM_KEY), breaker=spec.breaker_failures,
            max_backoff_s=min(5.0, spec.handler_timeout_s / 4),
        )  # fmt: skip
        self.poison = PoisonStage(spec.name, self.dead_letters, self.stats, self.metrics)
        # playback at the original pace moves in small steps, so events are not released in bursts
        most = min(spec.batch_size, 10) if spec.speed else spec.batch_size
        self.sizer = BatchSizer(most, minimum=min(spec.min_batch_size, most), target_s=spec.batch_target_s,
                                max_bytes=spec.max_batch_bytes)  # fmt: skip
        self.pacer = Pacer(spec.rate_limit, spec.speed)
        self.watermark = Watermark()
        self.inflight = InFlight(spec.max_in_flight)
        timeouts = self.metrics.handler_timeouts
        self.watch = HandlerWatch(spec.handler_timeout_s, self.handler.name or spec.handler,
                                  lambda action: timeouts.labels(spec.name, action).inc())  # fmt: skip
        self._handled: dict[str, Counter] = {}
        """Stream -> its `replayd_handler_events{outcome="ok"}` counter: looked up once, not per lane batch."""

    def _state(self) -> str:
        state = self.stats.state()
        if state in ("catching_up", "live") and self.watch.overrunning:
            return "stalled"  # a handler call past its time-out that cannot be cancelled
        running = state in ("catching_up", "live", "blocked")
        return "draining" if running and self.stop_requested.is_set() else state

    @property
    def following(self) -> bool:
        return self.spec.end_bound.kind == "follow" and not self.ends

    def stop(self) -> None:
        """Stop reading; what is routed drains and commits, then `run` returns."""
        self.stop_requested.set()
        self._running.set()  # a paused job stops too
        self._cancel_wait.cancel()  # and a blocked one

    def _refuse_split_commits(self) -> None:
        """Under Redis Cluster a commit is one script on one node: the projection's keys (`projection:{<name>}:...`)
        must be in the slot of the job's keys (`replayd:{<job>}:...`), which holds when the job is named after its
        projection. Handlers that declare `writes_projection = False` are checked per commit instead."""
        if not self.cluster or not getattr(self.handler, "writes_projection", True):
            return
        name, job = self.handler.name, self.spec.name
        if slot_of(self.namespace) != slot_of(job_key(job, "checkpoint")):
            raise ConfigError(
                f"job {job!r}: on a Redis Cluster, projection {name}'s keys ({self.namespace}:...) and the job's "
                f"keys (replayd:{{{job}}}:...) are in different hash slots, so its writes cannot commit atomically "
                f"with its checkpoint. Name the job after its projection: name = {name!r} in [[jobs]], or "
                f"--job {name} for replay and rebuild."
            )

    def new_context(self) -> Context:
        ctx = Context(
            self.spec.name, self.handler_redis, f"{self.namespace}:v{self.version}" if self.version else self.namespace
        )
        ctx.failures = self.dead_letters
        if getattr(self.handler, "awaits", True) or getattr(self.handler, "threads", False):
            ctx.watch = self.watch  # code that neither awaits nor runs in a thread cannot hang but by blocking the loop
        return ctx

    def _load_upcasters(self) -> Upcasters | None:
        """The job's `upcasters` setting, else the handler's own."""
        if self.spec.upcasters:
            return as_upcasters(import_from_string(self.spec.upcasters), f"upcasters {self.spec.upcasters!r}")
        return as_upcasters(getattr(self.handler, "upcasters", None), f"handler {self.handler.name!r} upcasters")

    def _build_filter(self, entity: str | None) -> Predicate | None:
        spec = self.spec
        return build_filter(
            types=spec.types,
            entity=entity,
            where=spec.where,
            plugin=load_predicate(spec.filter) if spec.filter else None,
            handled=self.handler.event_types,
        )

    async def run(self) -> Stats:
        token = current_job.set(self.spec.name)  # every log line of this job's tasks carries its name
        try:
            while True:
                try:
                    return await self._run()
                except BaseException as exc:
                    blocked = self.poison.blocked(exc)
                    if blocked is None:
                        raise
                    if not self.following or self.stop_requested.is_set():
                        raise blocked from None
                    await self._wait_for_resume(blocked)
                if self.stop_requested.is_set():
                    return self.stats
        except BaseException as exc:  # our own error, not the task groups' wrapping, for callers
            error = most_telling(exc)
            if isinstance(error, FencingError) and await self._flipped():
                raise ProjectionFlipped(
                    f"projection {self.handler.name} of job {self.spec.name} was flipped to a new version: "
                    "starting again on it"
                ) from None
            if isinstance(error, ReplaydError) and error is not exc:
                raise error from None
            raise
        finally:
            current_job.reset(token)
            with anyio.move_on_after(2, shield=True):
                await close_reads_client(self.handler_redis, self.redis)

    async def _wait_for_resume(self, blocked: JobBlocked) -> None:
        """A following job that blocked waits (`blocked` in status and metrics) until `replayd resume` clears the
        `paused` field it sets, then starts again from its checkpoint: the event it stopped at comes first."""
        self.stats.blocked = str(blocked)
        self.stats.status = "blocked"
        logger.error("%s; waiting for `replayd resume %s`", blocked, self.spec.name)
        with anyio.CancelScope() as scope:
            self._cancel_wait = scope
            await retrying(partial(self.redis.hset, self.progress.key, "paused", "blocked"), what="progress",
                           budget_s=self.budget_s, metrics=self.metrics)  # fmt: skip
            await self.progress.write()
            while not self.stop_requested.is_set() and await self._still_paused():  # noqa: ASYNC110 - Redis changes
                await anyio.sleep(0.5)
        self.poison.reset()
        self.watermark, self.inflight = Watermark(), InFlight(self.spec.max_in_flight)
        if self.stop_requested.is_set():
            self.stats.status = "stopped"
            with anyio.move_on_after(5, shield=True):
                await self.progress.write()
        else:
            self.stats.status = "catching_up"
            logger.info("job %s resumed: starting again from its checkpoint", self.spec.name)

    async def _still_paused(self) -> bool:
        try:
            return await self.redis.hget(self.progress.key, "paused") is not None
        except Exception as exc:
            if not is_retriable(exc):
                raise
            return True  # Redis away: asked again in a moment

    async def _flipped(self) -> bool:
        """Whether the live version moved under this job (a rebuild's flip), which also fences it."""
        if self.alias is None:
            return False
        with anyio.move_on_after(5, shield=True):
            return await self.alias.current() != self.version
        return False

    async def _run(self) -> Stats:
        if self.spec.check_shape:  # before the lease: a job that cannot decode its streams waits for nothing
            await retrying(
                partial(check_shapes, self.redis, self.spec, self.codec_for),
                what="start",
                budget_s=self.budget_s,
                metrics=self.metrics,
            )
        acquire = partial(self.lease.acquire, self.stop_requested)
        if not await retrying(acquire, what="lease", budget_s=self.budget_s, metrics=self.metrics):
            self.stats.status = "stopped"  # asked to stop while waiting for another instance's lease
            return self.stats
        try:
            return await self._run_leased()
        finally:
            # a stop must fit in the stop grace (and a failure is not to wait twice); a run that completed can wait
            # out a Redis restart
            budget_s = self.budget_s if self.stats.status == "completed" else FINAL_WRITE_S
            with anyio.move_on_after(budget_s, shield=True) as release:
                try:  # through a Redis restart: a lease left behind holds the next run back for its TTL
                    await retrying(self.lease.release, what="lease", budget_s=budget_s, metrics=self.metrics)
                except Exception as exc:  # noqa: BLE001 - a lease not released expires by itself
                    logger.warning("lease %s not released (%s): it expires in %.0fs", self.lease.key, exc,
                                   self.spec.lease_ttl_s)  # fmt: skip
            if release.cancelled_caught:
                logger.warning("lease %s release timed out after %.0fs (Redis did not answer): it expires in %.0fs",
                               self.lease.key, budget_s, self.spec.lease_ttl_s)  # fmt: skip

    async def _run_leased(self) -> Stats:
        if self.on_leased is not None:
            await retrying(self.on_leased, what="start", budget_s=self.budget_s, metrics=self.metrics)
        await retrying(self._prepare, what="start", budget_s=self.budget_s, metrics=self.metrics)
        ctx = self.new_context()
        self.stats.status = "catching_up"
        try:
            await self.handler.startup(ctx)
            await self._pipeline()
            self.stats.status = "stopped" if self.stop_requested.is_set() else "completed"
        except BaseException:
            self.stats.status = "stopped" if self.stop_requested.is_set() else "failed"
            raise
        finally:
            with anyio.move_on_after(FINAL_WRITE_S, shield=True) as final:
                self.stats.completed_at = time.time()
                elapsed = self.stats.completed_at - self.stats.started_at
                await self.progress.write(rate=self.stats.total / elapsed if elapsed > 0 else 0.0)
                await self.handler.shutdown(ctx)
            if final.cancelled_caught:
                logger.warning("final progress hash write (%s) and handler shutdown timed out after %.0fs: the hash "
                               "keeps the status last written until the job runs again",
                               self.progress.key, FINAL_WRITE_S)  # fmt: skip
        return self.stats

    async def _prepare(self) -> None:
        spec = self.spec
        self._plans = []
        await check_eviction_policy(self.redis, allow=self.redis_cfg.allow_allkeys_eviction)
        if not spec.resume:  # an explicit start begins the job anew: old positions (and layout) would mislead
            await self.store.reset()
        had_checkpoint = bool(await self.redis.exists(self.store.key))
        alias = self.alias.current_key if self.alias else None
        self.seq, version = await self.store.claim(self.lease.token.rpartition(":")[2], alias)
        self.version = version if self.alias else self.version
        await self.store.load()
        if await self.redis.hget(self.progress.key, "paused") in (b"blocked", "blocked"):
            # a run that blocked left it, waiting for `replayd resume`: starting again is going on (a fixed handler
            # is deployed by a restart); what still holds the job back blocks it again
            await self.redis.hdel(self.progress.key, "paused")
        await self.poison.load_parked(self.redis)
        if not had_checkpoint:
            await self._refuse_lost_checkpoint()
        streams = list(spec.streams)
        if spec.entity:
            entity_type, entity_id = spec.entity.split(":", 1)
            own = f"events:{entity_type}:{entity_id}"
            if await self.redis.exists(own):  # the article's per-entity stream, when the producer keeps one
                streams = [own]
                self.filter = self._build_filter(None)
        self.stats.streams = self.view.streams = streams
        now_ms = await redis_time_ms(self.redis)
        for stream in streams:
            self._plans.append(await self._plan(stream, now_ms))
        self.metrics.add_job(self.view)

    async def _refuse_lost_checkpoint(self) -> None:
        """A job that has run (its progress hash is there) but whose checkpoint is gone would silently start
        over from its start position: refuse that unless asked to (fault matrix T30)."""
        spec = self.spec
        if not spec.resume or spec.allow_reset:
            return
        if await self.redis.hget(self.progress.key, "checkpointed"):
            for stream in spec.streams:
                self.metrics.gaps.labels(stream, "checkpoint_missing").inc()
            raise DataError(
                f"job {spec.name} has committed before ({self.progress.key} says so) but {self.store.key} is gone "
                "(evicted, deleted or a Redis restored without it): refusing to start over from "
                f"{spec.start}. Set allow_reset = true (or --allow-reset) to replay from there."
            )

    async def _check_gap(self, stream: str, position: Id, *, what: str = "checkpoint") -> bool:
        """Apply `on_gap` to what the stream lost after `position`: at start, and from a reader while it runs.
        True when a gap was found (and passed on, under `warn` or `skip`)."""
        gap = await find_gap(self.redis, stream, position, what=what)
        if gap is None:
            return False
        self.metrics.gaps.labels(stream, gap.kind).inc()
        if self.spec.on_gap == "fail":
            raise DataError(f"{gap.message} (job {self.spec.name}; on_gap = 'warn' or 'skip' goes on)")
        log = logger.warning if self.spec.on_gap == "warn" else logger.info
        log("%s; going on from there (on_gap = %s)", gap.message, self.spec.on_gap)
        return True

    async def _plan(self, stream: str, now_ms: int) -> _Plan:
        spec = self.spec
        last = await head(self.redis, stream)
        if last is None and spec.require_stream and not await self.redis.exists(stream):
            raise DataError(f"stream {stream} does not exist (job {spec.name}, require_stream = true)")
        end = self.ends[stream] if stream in self.ends else resolve_end(spec.end_bound, last, now_ms)
        resume = self.store.resume(stream) if spec.resume else None
        if resume is None:
            resume = Resume(resolve_start(spec.start_bound, now_ms), {})
        else:
            await self._check_gap(stream, resume.after)
        if end is None:  # following: what is in the stream now is history, unless an earlier run said so
            replay_until = self.store.replay_until(stream)
            if replay_until is None:
                replay_until = last or ZERO
                await self.store.init_stream(stream, replay_until)
        else:
            replay_until = TOP
        target = end if end is not None else last
        self.view.head[stream] = last
        self.stats.start[stream] = resume.after
        self.stats.position[stream] = resume.after
        self.stats.target[stream] = target
        logger.info(
            "job %s: stream %s after %s to %s%s",
            spec.name,
            stream,
            format_id(resume.after),
            "follow" if end is None else display_id(format_id(end)),
            f", {len(resume.skip)} partitions further along" if resume.skip else "",
        )
        return _Plan(stream, resume.after, end, replay_until, resume.skip)

    def _check_caught_up(self) -> None:
        for stream, target in self.stats.target.items():
            if target is not None and self.stats.position[stream] < target:
                return
        if not self.caught_up.is_set():
            self.stats.caught_up_at = time.time()
            self.caught_up.set()

    def _on_commit(self, floors: dict[str, Id]) -> None:
        if floors:
            self.stats.checkpointed = True
            self.stats.position.update(floors)
            now = time.time()
            for stream in floors:
                self.view.last_progress[stream] = now
            self._check_caught_up()

    def _on_outcome(self, stream: str, outcome: Outcome) -> None:
        self.stats.processed += outcome.handled
        self.stats.failed += outcome.failed
        self.stats.dead_lettered += outcome.dead_lettered
        self.stats.poison += outcome.poison
        self.stats.parked += outcome.parked
        self.poison.on_outcome(outcome)
        events = self.metrics.handler_events
        if outcome.handled > 0:  # negative: events counted handled whose writes Redis would refuse
            handled = self._handled.get(stream)
            if handled is None:
                handled = self._handled[stream] = events.labels(stream, self.spec.name, "ok")
            handled.inc(outcome.handled)
        for label, count in (("failed", outcome.failed), ("retried", outcome.retried),
                             ("dead_lettered", outcome.dead_lettered), ("parked", outcome.parked)):  # fmt: skip
            if count:
                events.labels(stream, self.spec.name, label).inc(count)

    async def _pipeline(self) -> None:
        commit_send, commit_receive = anyio.create_memory_object_stream[CommitRequest](
            max_buffer_size=self.spec.partitions + len(self._plans)
        )
        committer = self._committer(commit_send)
        lanes = self._lanes(committer)
        self._check_caught_up()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.lease.keep)
            tg.start_soon(self.progress.run)
            tg.start_soon(watch_heads, self.redis, self.stats, self.view, self.sizer)
            tg.start_soon(self.watch.run)
            tg.start_soon(partial(watch_eviction_policy, self.redis, allow=self.redis_cfg.allow_allkeys_eviction))
            if self.alias:
                tg.start_soon(sweep_retired, self.alias)
            async with anyio.create_task_group() as pipeline:
                pipeline.start_soon(committer.run, commit_receive)
                async with commit_send:
                    feeds = [lanes.feed() for _ in self._plans]
                    with fewer_collections():
                        async with anyio.create_task_group() as work:
                            # the reader first: its first read is on its way while the lanes start
                            work.start_soon(self._read_all, feeds, committer)
                            work.start_soon(lanes.run)
            tg.cancel_scope.cancel()

    def _committer(self, send: MemoryObjectSendStream[CommitRequest]) -> Committer:
        return Committer(
            self.redis,
            self.spec.name,
            self.watermark,
            send,
            on_commit=self._on_commit,
            layout={"partitions": str(self.spec.partitions)},
            metrics=self.metrics,
            budget_s=self.budget_s,
            timeout_s=self.redis_cfg.socket_timeout_s,
            shard=self.shard,
            seq=self.seq,
            discard=self.discard,
            max_commands=self.spec.max_commit_commands,
            max_bytes=self.spec.max_commit_bytes,
        )

    def _lanes(self, committer: Committer) -> Lanes:
        lanes = Lanes(
            self.spec.partitions,
            self.handler,
            self.new_context,
            committer.commit,
            submit=committer.submit,
            concurrency=self.spec.concurrency,
            sizer=self.sizer,
            inflight=self.inflight,
            on_outcome=self._on_outcome,
            on_batch=self.metrics.handler_batch.labels(self.spec.name).observe,
            stop=self.stop_requested,
            max_commands=self.spec.max_commit_commands,
            max_bytes=self.spec.max_commit_bytes,
        )
        committer.on_refused, committer.screen = lanes.refused, lanes.screen
        return lanes

    async def _read_all(self, feeds: list[Feed], committer: Committer) -> None:
        """Readers and their stages; cancelled as one on stop, which closes the lanes' inboxes so they drain."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watch, tg.cancel_scope)
            async with anyio.create_task_group() as readers:
                for plan, feed in zip(self._plans, feeds, strict=True):
                    send, receive = anyio.create_memory_object_stream[Batch](max_buffer_size=0)
                    readers.start_soon(
                        partial(self._reader(plan).run, send, after=plan.after, end=plan.end,
                                replay_until=plan.replay_until)
                    )  # fmt: skip
                    readers.start_soon(self._route, receive, *self._stages(plan, feed, committer))
            tg.cancel_scope.cancel()  # everything was read: stop the watcher

    def _reader(self, plan: _Plan) -> StreamReader:
        return StreamReader(
            self.redis,
            plan.stream,
            sizer=self.sizer,
            block_ms=self.redis_cfg.block_ms,
            budget_s=self.budget_s,
            metrics=self.metrics,
            on_gap=partial(self._check_gap, plan.stream, what="read position"),
            max_entry_bytes=self.spec.max_entry_bytes,
        )

    def _stages(self, plan: _Plan, feed: Feed, committer: Committer) -> tuple[Decoder, Dispatch]:
        """A stream's own stages: its decoder (with its checkpoints, resuming) and its way into the lanes."""
        decode = Decoder(
            self.codec_for(plan.stream, self.router),
            self.router,
            predicate=self.filter,
            upcasters=self.upcasters,
            skip=plan.skip,
            counts=self.stats,
            metrics=self.metrics,
            job=self.spec.name,
            sizer=None if feed.inline else self.sizer,  # reads for a handler that never awaits: not sized by decoding
        )
        return decode, Dispatch(feed, committer, self.inflight, self.sizer, max_in_flight=self.spec.max_in_flight)

    async def _watch(self, scope: anyio.CancelScope) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._announce_caught_up)
            tg.start_soon(self._follow_pause)
            await self.stop_requested.wait()
            scope.cancel()

    async def _follow_pause(self, every_s: float = 0.5) -> None:
        """`replayd pause JOB` sets `paused` in the progress hash: routing waits (what is routed still drains and
        commits) until `replayd resume JOB` clears it."""
        resumed_status = self.stats.status
        while True:
            await anyio.sleep(every_s)
            try:
                paused = await self.redis.hget(self.progress.key, "paused") is not None
            except Exception as exc:
                if not is_retriable(exc):
                    raise
                continue
            if paused and self._running.is_set():
                resumed_status = self.stats.status
                self._running = anyio.Event()
                await self.inflight.drained()  # "paused" promises that all it routed is committed
                self.stats.status = "paused"
                await self.progress.write()
                logger.info("job %s paused", self.spec.name)
            elif not paused and not self._running.is_set():
                self.stats.status = resumed_status
                self._running.set()
                logger.info("job %s resumed", self.spec.name)

    async def _announce_caught_up(self) -> None:
        await self.caught_up.wait()
        if self._plans and all(plan.end is None for plan in self._plans):
            self.stats.status = "live"
            logger.info("job %s caught up", self.spec.name)
            await self.handler.on_caught_up(self.new_context())

    async def _route(self, receive: MemoryObjectReceiveStream[Batch], decode: Decoder, dispatch: Dispatch) -> None:
        """One stream's read batches down the stages: decode, poison, pause, pace, dispatch."""
        try:
            async with receive:
                async for batch in receive:
                    # let the reader send its next XRANGE before this batch is decoded: that overlap is
                    # what the one-batch prefetch is for
                    await anyio.lowlevel.checkpoint()
                    read = decode(batch)
                    letters = await self.poison.settle(read, dispatch)
                    await self._running.wait()  # set unless the job is paused
                    await self.pacer.pace(len(batch.entries), read)
                    await dispatch(read, letters)
                    # freed now rather than when the next batch's names replace them, after its decoding: that
                    # decoding then reuses this memory while the caches hold it (16 partitions, no-op: +9 %)
                    del batch, read, letters
        finally:
            dispatch.close()
