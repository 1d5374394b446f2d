"""What a replay would do, before it is done.

`plan` works it out without running anything, read-only. Per stream: the ID range, how many entries and of
which types (counted exactly up to a bound, estimated beyond it from the part counted), the duration at the
job's last measured rate, and which handler methods are side effects that a replay skips
(`@on(..., replay=False)`).

`dry_run` (`--dry-run`) runs the replay itself, filters and handlers included, with the handlers' writes
tallied by key pattern and discarded.
"""

from __future__ import annotations

import secrets
from typing import Any

import anyio

from replayd.config import JobSpec
from replayd.connection import Client, text_hash
from replayd.events import ZERO, Id, format_id, parse_id, resolve_end, resolve_start
from replayd.handlers import Projection
from replayd.jobs.engine import Engine
from replayd.jobs.progress import Stats
from replayd.jobs.shape import detect_shapes
from replayd.pipeline.codec import Codec
from replayd.pipeline.commit import CheckpointStore, job_key
from replayd.pipeline.source import head, redis_time_ms


def dry_run_spec(spec: JobSpec) -> JobSpec:
    """A throwaway copy of a job for a dry run: its own keys, and an end (a following job's is now)."""
    return spec.model_copy(
        update={
            "name": f"{spec.name}.dry-run-{secrets.token_hex(3)}",
            "end": "now" if spec.end == "follow" else spec.end,
        }
    )


async def dry_run(trial: Engine, job: str) -> Stats:
    """Run `trial` (an engine on a `dry_run_spec` copy of `job`, with a Tally to discard into) from `job`'s
    checkpoint; delete the copy's own keys after."""
    redis, name = trial.redis, trial.spec.name
    positions = {k: v for k, v in text_hash(await redis.hgetall(job_key(job, "checkpoint"))).items()
                 if not k.startswith("seq")}  # fmt: skip
    if trial.spec.resume and positions:
        await redis.hset(job_key(name, "checkpoint"), mapping=positions)  # type: ignore[arg-type]
    try:
        return await trial.run()
    finally:
        with anyio.CancelScope(shield=True):
            await redis.unlink(*[job_key(name, kind) for kind in ("checkpoint", "progress", "lease", "parked")])


async def plan(engine: Engine, *, exact_up_to: int = 100_000, page: int = 5000) -> dict[str, Any]:
    spec, redis = engine.spec, engine.redis
    store = CheckpointStore(redis, spec.name, spec.partitions, engine.shard)
    await store.load()
    now_ms = await redis_time_ms(redis)
    shapes = await detect_shapes(redis, spec, engine.codec_for)
    streams = {}
    for stream in spec.streams:
        last = await head(redis, stream)
        end = resolve_end(spec.end_bound, last, now_ms)
        resume = store.resume(stream) if spec.resume else None
        after = resume.after if resume else resolve_start(spec.start_bound, now_ms)
        upper = end if end is not None else (last or ZERO)
        codec = engine.codec_for(stream, None)
        counted = await _count(redis, stream, after, upper, codec, exact_up_to, page)
        streams[stream] = {
            "after": format_id(after),
            "to": "follow" if end is None else format_id(upper),
            "resumes_from_checkpoint": resume is not None,
            **counted,
            "shape": {"codec": spec.codec, **shapes[stream].describe()},
        }
    progress = text_hash(await redis.hgetall(engine.progress.key))
    rate = float(progress["events_per_second"]) if progress.get("status") == "completed" else None
    total = sum(s["entries"] for s in streams.values())
    return {
        "job": spec.name,
        "handler": spec.handler,
        "partitions": spec.partitions,
        "streams": streams,
        "entries": total,
        "measured_rate_events_per_s": rate,
        "estimated_seconds": round(total / rate, 1) if rate else None,
        "side_effects_skipped_while_replaying": _side_effects(engine),
    }


async def _count(
    redis: Client, stream: str, after: Id, upper: Id, codec: Codec, exact_up_to: int, page: int
) -> dict[str, Any]:
    """Entries in (after, upper] by type: exact up to `exact_up_to`, then extrapolated by entry-ID time."""
    types: dict[str, int] = {}
    counted, pos = 0, after
    while pos < upper and counted < exact_up_to:
        entries: list[Any] = await redis.execute_command(
            "XRANGE", stream, "(" + format_id(pos), format_id(upper), "COUNT", page
        )
        if not entries:
            break
        events, poison, _ = codec.decode(entries)
        for kind in [event.event_type for event in events] + ["(undecodable)"] * len(poison):
            types[kind] = types.get(kind, 0) + 1
        counted += len(entries)
        pos = parse_id(entries[-1][0])
        if len(entries) < page:
            pos = upper
    exact = pos >= upper
    scale = 1.0 if exact else (upper[0] - after[0]) / max(pos[0] - after[0], 1)
    return {
        "entries": round(counted * scale),
        "exact": exact,
        "types": {kind: round(n * scale) for kind, n in sorted(types.items(), key=lambda item: -item[1])},
    }


def _side_effects(engine: Engine) -> list[str]:
    handler = engine.handler
    if not isinstance(handler, Projection):
        return []
    return [f"{attr} ({kind})" for kind, (attr, replay) in handler._routes.items() if not replay]
