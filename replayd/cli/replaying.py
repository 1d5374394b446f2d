"""The one-shot commands: `replay`, `plan`, `rebuild`, `verify`, their dry runs, progress bar and signals."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, TypeVar

import anyio
from pydantic import ValidationError

from replayd.api import Replay
from replayd.cli.shared import _client, _confirm
from replayd.config import JobSpec, Settings, describe
from replayd.connection import Client, retrying, text, text_hash
from replayd.errors import DataError, UsageError
from replayd.events import display_id, parse_end, parse_start
from replayd.handlers.loader import load_handler
from replayd.jobs.daemon import drain_on_signals, start_http
from replayd.jobs.engine import Engine
from replayd.jobs.plan import dry_run, dry_run_spec, plan
from replayd.jobs.progress import Stats
from replayd.jobs.rebuild import Rebuild, rebuild_in_place
from replayd.jobs.shape import sample
from replayd.jobs.verify import verify
from replayd.jobs.versions import Versions, namespace
from replayd.ops.console import summary, with_progress
from replayd.ops.http import Readiness
from replayd.ops.metrics import Metrics
from replayd.pipeline.commit import Tally, job_key
from replayd.pipeline.filters import entity_miss

T = TypeVar("T")


def job_from_args(args: argparse.Namespace, settings: Settings, *, one_shot: dict[str, Any]) -> JobSpec:
    """A JobSpec from a job of the config (`--job NAME` naming one) and/or the command-line flags."""
    base = next((job for job in settings.jobs if job.name == args.job), None)
    values: dict[str, Any] = base.model_dump() if base else {}
    if not base and not args.handler:
        raise UsageError("--handler is required (or --job naming a job of --config)")
    if not base and not args.stream:
        raise UsageError("--stream is required (or --job naming a job of --config)")
    flags = {
        "streams": args.stream or None,
        "handler": args.handler,
        "partition_by": args.partition_by,
        "partitions": args.partitions,
        "concurrency": args.concurrency,
        "batch_size": args.batch_size,
        "ordering": args.ordering,
        "shard": getattr(args, "shard", None) or settings.shard,
        "codec": args.codec,
        "fields": {**values.get("fields", {}), **dict(args.fields)} if args.fields else None,
        "check_shape": False if args.no_check_shape else None,
    }
    values.update({k: v for k, v in flags.items() if v is not None})
    values.update(one_shot)
    values.setdefault("name", args.job or _default_name(values["handler"]))
    try:
        return JobSpec(**values)
    except ValidationError as exc:
        raise UsageError(describe(exc, None).replace("invalid configuration", "invalid arguments")) from None


def _default_name(handler: str) -> str:
    # distinct from the daemon's job of the same projection, whose checkpoint an ad-hoc replay must not move
    return "replay-" + handler.rsplit(":", 1)[-1].replace(".", "_")


def _replay_spec(args: argparse.Namespace, settings: Settings) -> JobSpec:
    if args.start and args.after:
        raise UsageError("--from and --after are exclusive")
    start = args.start or ("checkpoint" if args.job else "beginning")
    one_shot: dict[str, Any] = {
        "start": "beginning" if start == "checkpoint" else start,
        "after": args.after,
        "resume": start == "checkpoint" and not args.after,
        "end": args.end,
        "types": [t for t in (args.types or "").split(",") if t],
        "entity": args.entity,
        "where": args.where,
        "filter": args.filter,
    }
    if args.on_gap:
        one_shot["on_gap"] = args.on_gap
    if args.allow_reset:
        one_shot["allow_reset"] = True
    if args.rate_limit is not None:
        one_shot["rate_limit"] = args.rate_limit
    if args.speed is not None:
        one_shot["speed"] = args.speed
    _check_range(args.after or start, args.end, after=bool(args.after))
    return job_from_args(args, settings, one_shot=one_shot)


def _check_range(start: str, end: str, *, after: bool) -> None:
    """Refuse a range that ends before it starts (it would replay nothing and exit 0): two IDs or times, or two
    ages. Text that does not parse is left to the JobSpec's validation, which names the flag."""
    try:
        first, last = parse_start(start, after=after), parse_end(end)
    except ValueError:
        return
    if (first.kind == last.kind == "id" and first.id >= last.id) or (
        first.kind == last.kind == "age" and first.age_ms < last.age_ms
    ):
        raise UsageError(f"--{'after' if after else 'from'} {start} is not before --to {end}: the range is empty")


async def _require_streams(client: Client, settings: Settings, spec: JobSpec) -> None:
    """A one-shot command on a stream that does not exist would replay nothing and exit 0: most often a typo."""
    if spec.end == "follow":
        return  # following waits for the stream to appear
    budget = settings.redis.unavailable_timeout_s
    for stream in spec.streams:
        if not await retrying(partial(client.exists, stream), what="exists", budget_s=budget):
            raise UsageError(f"stream {stream!r} does not exist in Redis: check its name (--stream)")


async def cmd_plan(args: argparse.Namespace, settings: Settings) -> int:
    spec = _replay_spec(args, settings)
    async with _client(settings) as client:
        await _require_streams(client, settings, spec)
        engine = Engine(spec, client, redis_cfg=settings.redis)
        report = await plan(engine)
        if report["measured_rate_events_per_s"] is None:
            await _rate_of_a_kin(client, report, engine.handler.name)
    _selected_types(report, spec.types)
    if args.json:
        print(json.dumps(report, indent=2))
        return _shape_problems(spec, report)
    rate = report["measured_rate_events_per_s"]
    print(f"job {report['job']}: handler {report['handler']}, {report['partitions']} partitions")
    for stream, about in report["streams"].items():
        how = "exactly" if about["exact"] else "estimated"
        start = "its checkpoint" if about["resumes_from_checkpoint"] else display_id(about["after"])
        to = display_id(about["to"])
        print(f"  {stream}: after {start} to {to}: {about['entries']:,} entries ({how}){_of_selected(about)}")
        shape = about["shape"]
        fit = "fits" if shape["fits"] else "DOES NOT FIT"
        print(f"    shape: fields {', '.join(shape['fields']) or '(no entries)'}; codec {shape['codec']} {fit}")
        for kind, count in about["types"].items():
            print(f"    {kind}: {count:,}")
    by = f" (job {report['rate_measured_by']})" if report.get("rate_measured_by") else ""
    print(
        f"  duration: ~{report['estimated_seconds']} s at the last measured {rate:,.0f} events/s{by}"
        if rate
        else "  duration: no measured rate yet (neither this job nor its projection's has completed a run)"
    )
    effects = report["side_effects_skipped_while_replaying"]
    print(f"  side effects skipped while replaying: {', '.join(effects) if effects else 'none'}")
    return _shape_problems(spec, report)


def _shape_problems(spec: JobSpec, report: dict[str, Any]) -> int:
    """65 after the plan when a stream's entries do not fit the codec (as the replay would stop), else 0."""
    problems = [about["shape"]["problem"] for about in report["streams"].values() if about["shape"]["problem"]]
    for problem in problems:
        print(f"replayd: {problem}", file=sys.stderr)
    return DataError.exit_code if problems and spec.check_shape else 0


def _selected_types(report: dict[str, Any], types: list[str]) -> None:
    """With --types, each stream's count by type keeps the selected types only (all entries are still read)."""
    if not types:
        return
    for about in report["streams"].values():
        about["types"] = {kind: about["types"].get(kind, 0) for kind in types}
        about["selected_entries"] = sum(about["types"].values())


def _of_selected(about: dict[str, Any]) -> str:
    return f", {about['selected_entries']:,} of the selected types" if "selected_entries" in about else ""


async def _rate_of_a_kin(client: Client, report: dict[str, Any], projection: str) -> None:
    """The job has no completed run of its own (`plan` after a rebuild, whose job is the projection's, or after a
    sharded run): the rate of the latest completed run of its shards, of the projection's job or of the
    projection's last rebuild stands in."""
    runs = []
    for job in dict.fromkeys([report["job"], projection]):
        async for key in client.scan_iter(match=job_key(job, "progress") + "*", count=100):
            progress = text_hash(await client.hgetall(key))
            if progress.get("status") == "completed" and float(progress.get("events_per_second") or 0) > 0:
                runs.append((float(progress.get("completed_at") or 0), float(progress["events_per_second"]), job))
    meta = text_hash(await client.hgetall(f"projection:{projection}:meta"))  # a rebuild's, whose job is gone
    if float(meta.get("events_per_second") or 0) > 0:
        runs.append((float(meta.get("rebuilt_at") or 0), float(meta["events_per_second"]), f"rebuild of {projection}"))
    if runs:
        _, rate, job = max(runs)
        report["measured_rate_events_per_s"], report["rate_measured_by"] = rate, job
        report["estimated_seconds"] = round(report["entries"] / rate, 1)


async def cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    spec = _replay_spec(args, settings)
    if args.dry_run:
        return await _dry_run(spec, settings)
    async with _client(settings) as client:
        await _require_streams(client, settings, spec)
    metrics = Metrics()
    replay = Replay(spec, settings.redis, metrics=metrics)
    work = _serving_metrics(args, settings, metrics, with_progress(replay.stats, replay.run()))
    _, code = await _drained_on_signals(replay.stop, work, settings)
    await _report_entity_miss(spec, replay.stats, settings)
    print(summary("replayed", replay.stats), file=sys.stderr)  # stdout belongs to handlers writing data (jsonl_dump)
    return code


async def _report_entity_miss(spec: JobSpec, stats: Stats, settings: Settings) -> None:
    """`--entity` that matched none of the events read says why (its IDs may be in another field)."""
    if not (spec.entity and stats.total) or stats.processed or stats.failed:
        return
    async with _client(settings) as client:
        entries = await sample(client, stats.streams[0])
    fields = sorted({text(key) for _, flat in entries for key in flat[::2]})
    print(f"replayd: {entity_miss(spec.entity, stats.total, fields)}", file=sys.stderr)


async def _drained_on_signals(stop: Callable[[], None], work: Awaitable[T], settings: Settings) -> tuple[T | None, int]:
    """Await `work`; a SIGINT or SIGTERM meanwhile stops it as it stops the daemon (`drain_on_signals`: what is
    routed drains and commits). Returns what `work` returned (None if the drain deadline cancelled it) and the
    exit code: 0, or 128 + the signal's number when a signal stopped it before its end."""
    received: list[int] = []
    result: T | None = None
    async with anyio.create_task_group() as tg:
        tg.start_soon(drain_on_signals, stop, tg.cancel_scope, settings.shutdown_timeout_s, received)
        result = await work
        tg.cancel_scope.cancel()
    return result, 128 + received[0] if received else 0


async def _within(scope: anyio.CancelScope, work: Awaitable[T]) -> T | None:
    """`work`'s result, or None when `scope` was cancelled first."""
    with scope:
        return await work
    return None


async def _serving_metrics(args: argparse.Namespace, settings: Settings, metrics: Metrics, work: Awaitable[T]) -> T:
    """Await `work`, while /metrics, /healthz and /readyz are served on --metrics-host:--metrics-port if given."""
    if args.metrics_port is None:
        return await work
    readiness = Readiness(config_ok=True, plugins_loaded=True)  # the engine is built: its plugins loaded
    async with anyio.create_task_group() as tg:
        await start_http(tg, metrics, readiness, settings.redis, host=args.metrics_host, port=args.metrics_port)
        result = await work
        tg.cancel_scope.cancel()
    return result


def _rebuild_name(args: argparse.Namespace) -> dict[str, str]:
    """An ad-hoc rebuild works on the projection's own job, named after the projection (`OrderSummary`'s job is
    `order_summary`, the name its keys and a daemon job of it use), not a `replay-` one."""
    return {"name": load_handler(args.handler).name} if not args.job and args.handler else {}


async def cmd_rebuild(args: argparse.Namespace, settings: Settings) -> int:
    one_shot: dict[str, Any] = {"start": "beginning", "after": None, "resume": False, "end": "now"}
    one_shot |= _rebuild_name(args)
    if args.retain_old is not None:
        one_shot["retain_old_s"] = args.retain_old
    spec = job_from_args(args, settings, one_shot=one_shot)
    if args.dry_run:
        return await _dry_run(spec, settings, next_version=not args.in_place)
    metrics = Metrics()
    async with _client(settings) as client:
        await _require_streams(client, settings, spec)
        if args.in_place:  # refused (exit 75) while the job runs: it would clear what the running job writes
            engine = Engine(
                spec.model_copy(update={"on_lease_held": "exit"}), client, redis_cfg=settings.redis, metrics=metrics
            )
            work = _serving_metrics(args, settings, metrics, with_progress(engine.stats, rebuild_in_place(engine)))
            _, code = await _drained_on_signals(engine.stop, work, settings)
            done = "stopped rebuilding" if code else "rebuilt"
            print(summary(f"{done} projection:{engine.handler.name} from", engine.stats), file=sys.stderr)
            return code
        rebuild = Rebuild(spec, client, redis_cfg=settings.redis, metrics=metrics)
        await _confirm_versioning(args, rebuild.versions)
        run = _serving_metrics(args, settings, metrics, rebuild.run(retain_s=spec.retain_old_s, watch=with_progress))
        result, code = await _drained_on_signals(rebuild.stop, run, settings)
        built, old = namespace(rebuild.handler.name, rebuild.version), result[1] if result else None
        if old is None:  # stopped before the flip
            if rebuild.engines:
                print(summary(f"stopped building {built} from", rebuild.engines[0].stats), file=sys.stderr)
            print(f"nothing flipped: the same `replayd rebuild` resumes {built}", file=sys.stderr)
            return code
        print(summary(f"rebuilt {built} from", rebuild.engines[0].stats), file=sys.stderr)
        retained = f"is kept {spec.retain_old_s:g} s (the live job or the next rebuild deletes it)"
        replaced = namespace(rebuild.handler.name, old)
        print(f"{built} is current; {replaced} {retained if spec.retain_old_s else 'is deleted'}", file=sys.stderr)
    return code


async def _confirm_versioning(args: argparse.Namespace, versions: Versions) -> None:
    """A first versioned rebuild moves an unversioned projection's keys: its readers must follow the alias."""
    if args.yes or not await versions.unversioned():
        return
    name = versions.name
    print(
        f"projection {name} is unversioned: its keys are projection:{name}:*. This rebuild writes "
        f"projection:{name}:v1:* and, once it is current, deletes the unversioned keys after --retain-old seconds: "
        f"an application reading projection:{name}:* directly then finds nothing. Readers must resolve "
        f"projection:{name}:current first (replayd.jobs.versions.current_namespace). `rebuild --in-place` keeps the "
        "keys where they are.",
        file=sys.stderr,
    )
    _confirm(args, f"move projection {name} to versioned keys")


async def cmd_verify(args: argparse.Namespace, settings: Settings) -> int:
    spec = job_from_args(args, settings, one_shot=_rebuild_name(args))
    async with _client(settings) as client:
        metrics = Metrics()
        rebuild = Rebuild(spec, client, redis_cfg=settings.redis, metrics=metrics)
        # a signal cancels at once: what the shadow committed stays (a kept one resumes), nothing else is worth a drain
        scope = anyio.CancelScope()
        work = _within(
            scope, _serving_metrics(args, settings, metrics, verify(rebuild, keep=args.keep, show=args.show))
        )
        diff, code = await _drained_on_signals(scope.cancel, work, settings)
    if diff is None:
        kept = "kept (`replayd rebuild` resumes it)" if args.keep else "deleted"
        print(f"verify stopped before its comparison: the live job runs on, its shadow is {kept}", file=sys.stderr)
        return code
    if args.json:
        print(json.dumps(dataclasses.asdict(diff) | {"equal": diff.equal}, indent=2))
    else:
        print(diff.summary())
        for line in diff.examples:
            print(f"  {line}")
        if args.keep:
            print(f"kept {diff.right}: `replayd rebuild` with the same arguments flips to it")
    return 0 if diff.equal else 1


async def _dry_run(spec: JobSpec, settings: Settings, *, next_version: bool = False) -> int:
    tally, handler = Tally(), load_handler(spec.handler)
    async with _client(settings) as client:
        # what a rebuild would write is the version after the current one
        await _require_streams(client, settings, spec)
        version = await Versions(client, handler.name).current() + 1 if next_version else None
        trial = Engine(dry_run_spec(spec), client, redis_cfg=settings.redis, handler=handler, version=version,
                       discard=tally)  # fmt: skip
        stats = await with_progress(trial.stats, dry_run(trial, spec.name))
    print(summary("dry run: read", stats), file=sys.stderr)
    print("nothing was written; the handlers would have written:" if tally.commands else "no writes")
    for line in tally.lines():
        print(f"  {line}")
    return 0
