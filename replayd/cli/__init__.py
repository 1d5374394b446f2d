"""`replayd run|replay|rebuild|status|checkpoint|demo|version`: a thin face over the one engine.

Exit codes: 0 done or stopped cleanly, 2 usage, 65 data, 69 Redis unavailable, 70 internal, 75 lease held
elsewhere, 78 config. User mistakes get one clear line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import difflib
import json
import logging
import os
import select
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from functools import partial
from typing import Any, TypeVar

import anyio
import redis.exceptions
from pydantic import BaseModel, ValidationError

from replayd.api import Replay
from replayd.config import JobSpec, Settings, describe, load_settings
from replayd.connection import Client, create_redis, is_retriable, retrying, text, text_hash
from replayd.errors import ConfigError, DataError, FencingError, ReplaydError, UsageError, most_telling
from replayd.events import MAX_SEQ, WHOLE, format_id, parse_end, parse_id, parse_shard, parse_start
from replayd.handlers.builtin import jsonl_dump, republish
from replayd.handlers.loader import load_handler
from replayd.jobs.daemon import Daemon, drain_on_signals, start_http
from replayd.jobs.deadletter import Letters
from replayd.jobs.engine import Engine, rebuild_in_place
from replayd.jobs.lease import fenced, lease_key, owners_key
from replayd.jobs.plan import dry_run, dry_run_spec, plan
from replayd.jobs.progress import Stats
from replayd.jobs.rebuild import Rebuild
from replayd.jobs.shape import sample
from replayd.jobs.verify import verify
from replayd.jobs.versions import Versions, namespace
from replayd.jobs.workers import Supervisor, without_workers
from replayd.ops.console import display_id, summary, with_progress
from replayd.ops.http import Readiness
from replayd.ops.logs import redact_text, setup_logging
from replayd.ops.metrics import Metrics
from replayd.pipeline.codec import ROLES
from replayd.pipeline.commit import Tally, floor_field, job_key, stream_field, stream_positions
from replayd.pipeline.filters import entity_miss
from replayd.pipeline.pacing import parse_speed
from replayd.version import __version__

logger = logging.getLogger("replayd")

_M_MMAP_THRESHOLD = -3
"""glibc's `mallopt` parameter (malloc.h)."""

T = TypeVar("T")

EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_CONFIG = 78
EX_PIPE = 128 + 13
"""Stdout's reader went away: what a shell reports for a command that SIGPIPE ended (`yes | head -1`)."""
DRY_RUN = "run filters and handlers but discard their writes; report what they would write"
NO_CHECK_SHAPE = "run even when the streams' first and last entries lack the fields the codec reads"


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", help="TOML config file (also REPLAYD_CONFIG)")
    common.add_argument("--redis-url", metavar="URL", help="Redis URL (also REPLAYD_REDIS__URL)")
    common.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], default=None)
    common.add_argument("--log-format", choices=["auto", "json", "text"], default=None)

    scale = argparse.ArgumentParser(add_help=False)
    scale.add_argument(
        "--shard", type=_shard, metavar="I/N", help="handle only partitions p with p mod N == I (a replica)"
    )
    scale.add_argument("--workers", type=int, metavar="K", help="run K processes as shards 0/K ... K-1/K")

    parser = argparse.ArgumentParser(prog="replayd", description="Event replay for Redis Streams.")
    parser.add_argument("--version", action="version", version=f"replayd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run", parents=[common, scale], help="the daemon: run every job of the config, follow live"
    )
    run.add_argument("--no-check-shape", action="store_true", help=NO_CHECK_SHAPE)
    run.set_defaults(func=cmd_run)

    selection = argparse.ArgumentParser(add_help=False)
    _job_arguments(selection)
    selection.add_argument(
        "--from",
        dest="start",
        metavar="X",
        help="beginning | checkpoint | ID (inclusive) | ISO time | age like 24h "
        "(default: checkpoint with --job, else beginning)",
    )
    selection.add_argument("--after", metavar="ID", help="start after this entry ID (exclusive)")
    selection.add_argument("--to", dest="end", default="now", metavar="Y", help="now | follow | ID | ISO time | age")
    selection.add_argument("--types", metavar="A,B", help="only these event types")
    selection.add_argument("--entity", metavar="TYPE:ID", help="only this entity's events")
    selection.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="EXPR",
        help="field predicate, e.g. 'data.total>1000' (repeatable, all must hold)",
    )
    selection.add_argument("--filter", metavar="MOD:FUNC", help="plugin predicate")
    selection.add_argument("--on-gap", choices=["fail", "warn", "skip"], help="stream trimmed past the checkpoint")
    selection.add_argument("--allow-reset", action="store_true", help="start over when the checkpoint was lost")
    selection.add_argument("--rate-limit", type=float, metavar="N", help="read at most N entries per second")
    selection.add_argument(
        "--speed", type=_speed, metavar="Kx", help="play back at the events' original pace times K (e.g. 10x)"
    )

    replay = commands.add_parser(
        "replay", parents=[common, scale, selection], help="one-shot replay of a range into a handler"
    )
    _metrics_arguments(replay)
    replay.add_argument("--dry-run", action="store_true", help=DRY_RUN)
    replay.set_defaults(func=cmd_replay)

    plan = commands.add_parser(
        "plan", parents=[common, selection], help="what a replay would read and do, before anything runs"
    )
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    plan.set_defaults(func=cmd_plan)

    rebuild = commands.add_parser(
        "rebuild", parents=[common], help="rebuild a projection from history as a new version, then flip readers to it"
    )
    _job_arguments(rebuild)
    _metrics_arguments(rebuild)
    rebuild.add_argument(
        "--in-place", action="store_true", help="the article's way: clear the live keys, then replay into them"
    )
    rebuild.add_argument("--dry-run", action="store_true", help=DRY_RUN)
    rebuild.add_argument(
        "--yes", action="store_true", help="go on without asking when the projection's keys move to a version"
    )
    rebuild.add_argument(
        "--retain-old",
        type=float,
        metavar="S",
        help="keep the replaced version this long for readers still on it (default: the job's retain_old_s, 60)",
    )
    rebuild.set_defaults(func=cmd_rebuild)

    verify = commands.add_parser(
        "verify", parents=[common], help="rebuild into a shadow version and diff it against the current one"
    )
    _job_arguments(verify)
    _metrics_arguments(verify)
    verify.add_argument("--keep", action="store_true", help="keep the shadow version (the next rebuild flips to it)")
    verify.add_argument("--show", type=int, default=10, metavar="N", help="print the first N differences")
    verify.add_argument("--json", action="store_true", help="machine-readable output")
    verify.set_defaults(func=cmd_verify)

    status = commands.add_parser("status", parents=[common], help="progress and checkpoints of jobs")
    status.add_argument("job", nargs="?", help="one job (default: all jobs found in Redis)")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_status)

    checkpoint = commands.add_parser("checkpoint", parents=[common], help="show, set or reset a job's checkpoint")
    checkpoint.add_argument("action", choices=["show", "set", "reset"])
    checkpoint.add_argument("job")
    checkpoint.add_argument("--stream", help="with set: the stream")
    checkpoint.add_argument("--to", metavar="ID", help="with set: the entry ID every partition resumes after")
    checkpoint.add_argument("--yes", action="store_true", help="do it without asking")
    checkpoint.add_argument("--json", action="store_true", help="with show: machine-readable output")
    checkpoint.set_defaults(func=cmd_checkpoint)

    for verb, what in (("pause", "stop routing new events (what is routed drains and commits)"),
                       ("resume", "go on after a pause")):  # fmt: skip
        control = commands.add_parser(verb, parents=[common], help=f"{what}: through the job's progress hash")
        control.add_argument("job")
        control.set_defaults(func=cmd_pause)

    dlq = commands.add_parser("dlq", parents=[common], help="inspect and resolve a job's dead letters")
    dlq.add_argument("action", choices=["list", "show", "retry", "discard"])
    dlq.add_argument("job")
    dlq.add_argument("ids", nargs="*", metavar="ID", help="dead-letter entry IDs (show, retry, discard)")
    dlq.add_argument("--all", action="store_true", help="with discard: every dead letter of the job")
    dlq.add_argument("--handler", metavar="MOD:ATTR", help="with retry: the handler (default: the job's in --config)")
    dlq.add_argument("--json", action="store_true", help="machine-readable output")
    dlq.add_argument("--yes", action="store_true", help="discard without asking")
    dlq.set_defaults(func=cmd_dlq)

    demo = commands.add_parser("demo", parents=[common], help="embedded Redis, sample history, rebuild, follow live")
    demo.add_argument("--events", type=int, default=50_000, help="sample history size (default 50000)")
    demo.add_argument("--rate", type=float, default=20.0, help="live events per second the producer appends")
    demo.set_defaults(func=cmd_demo)

    job = commands.add_parser("job", parents=[common], help="manage a job as a whole")
    job.add_argument("action", choices=["delete"], help="delete: remove all of the job's state in Redis")
    job.add_argument("job")
    job.add_argument("--yes", action="store_true", help="do it without asking")
    job.set_defaults(func=cmd_job)

    version = commands.add_parser("version", help="print the version")
    version.set_defaults(func=None)
    for command in commands.choices.values():
        command.set_defaults(usage=command)
    return parser


def parse(argv: list[str]) -> argparse.Namespace:
    """The arguments; an option the command does not know is reported with that command's usage, not replayd's."""
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:
        args.usage.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def _shard(text: str) -> str:
    try:
        parse_shard(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _speed(text: str) -> float:
    try:
        return parse_speed(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _field(text: str) -> tuple[str, str]:
    role, sep, name = text.partition("=")
    if not sep or role not in ROLES or not name:
        raise argparse.ArgumentTypeError(f"{text!r}: expected PART=FIELD with PART one of {', '.join(ROLES)}")
    return role, name


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (0-65535)")
    return port


def _metrics_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--metrics-port",
        type=_port,
        metavar="PORT",
        help=f"serve /metrics, /healthz and /readyz on this port while the {parser.prog.split()[-1]} runs "
        "(0: any free port)",
    )
    parser.add_argument(
        "--metrics-host", default="127.0.0.1", metavar="HOST", help="address for --metrics-port (default 127.0.0.1)"
    )


def _job_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--job", metavar="NAME", help="job name (keys its checkpoint), or a job of --config")
    parser.add_argument("--stream", action="append", default=[], metavar="S", help="stream key (repeatable)")
    parser.add_argument("--handler", metavar="MOD:ATTR", help="handler: module:attr or an entry-point name")
    parser.add_argument(
        "--partition-by",
        metavar="PATH",
        help="what orders events: a data field (customer_id), data.a.b, metadata.tenant, fields.user_id (an entry "
        "field), or @stream (the stream)",
    )
    parser.add_argument(
        "--codec",
        metavar="NAME",
        help="the entries' shape: article (default), payload, flat, cloudevents, or a plugin module:function",
    )
    parser.add_argument(
        "--field",
        dest="fields",
        action="append",
        type=_field,
        default=[],
        metavar="PART=FIELD",
        help="the entry field holding a part of the event, e.g. event_type=type or data=payload (repeatable; "
        "parts: " + ", ".join(ROLES) + ")",
    )
    parser.add_argument("--no-check-shape", action="store_true", help=NO_CHECK_SHAPE)
    parser.add_argument("--partitions", type=int, metavar="P", help="virtual partitions (default 16)")
    parser.add_argument("--concurrency", type=int, metavar="C", help="lanes running at once (default 16)")
    parser.add_argument("--batch-size", type=int, metavar="N", help="entries per read (default 1000)")
    parser.add_argument("--ordering", choices=["key", "none"], help="keep order per key (default) or not at all")


def main(argv: Sequence[str] | None = None) -> None:
    _hold_mmap_threshold()
    sys.exit(run_cli(argv))


def _hold_mmap_threshold() -> None:
    """Keep glibc's malloc mapping blocks of 4 MiB and more on their own, returned to the system when freed. By
    default its threshold rises to the largest block freed, and after one big reply (a 16 MB entry) buffers of
    that size come from the heap and stay in RSS (fault matrix T21). Lower, every 1 MiB socket read would be a mapping
    of its own (+25 % CPU on a no-op replay at 128 KiB). Nothing to do where malloc is not glibc's."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, 4 << 20)


def run_cli(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    try:
        settings = _settings(args)
        setup_logging(
            getattr(args, "log_level", None) or settings.log_level,
            getattr(args, "log_format", None) or settings.log_format,
        )
        _warn_unknown_environment(os.environ)
        if settings.redis.tls_allow_unverified:
            logger.warning(
                "redis.tls_allow_unverified = true: the server's certificate is not checked, so anyone on the "
                "path to Redis can read and change replayd's traffic (meant for tests only)"
            )
        if args.command == "version":
            print(f"replayd {__version__}")
            return 0
        if getattr(args, "workers", None) is not None:
            return _supervise(args, argv, settings)
        return _run_async(args.func, args, settings)
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:  # noqa: BLE001 - the one place that turns errors into exit codes
        return _report(exc)


OTHER_ENVIRONMENT = {"REPLAYD_CONFIG", "REPLAYD_REDIS_SERVER", jsonl_dump.PATH_ENV, republish.STREAM_ENV,
                     republish.MAXLEN_ENV, republish.DEDUPE_ENV}  # fmt: skip
"""`REPLAYD_*` variables read outside the settings: the config file's path, the embedded server, built-in handlers."""


def known_environment() -> set[str]:
    """Every `REPLAYD_*` name replayd reads: `REPLAYD_<SETTING>`, `REPLAYD_<SECTION>__<KEY>`, and the others."""
    names = set(OTHER_ENVIRONMENT)
    for name, field in Settings.model_fields.items():
        names.add(f"REPLAYD_{name.upper()}")
        section = field.annotation
        if isinstance(section, type) and issubclass(section, BaseModel):
            names |= {f"REPLAYD_{name.upper()}__{key.upper()}" for key in section.model_fields}
    return names


def _warn_unknown_environment(environ: Mapping[str, str]) -> None:
    """A mistyped variable (`REPLAYD_REDIS_URL`, one underscore) would be ignored, and replayd would silently use
    a default such as localhost: say so, naming the variable meant."""
    known = known_environment()
    for name in sorted(n for n in environ if n.startswith("REPLAYD_") and n.upper() not in known):
        meant = difflib.get_close_matches(name.upper(), known, n=1)
        hint = f": did you mean {meant[0]}?" if meant else " (settings are REPLAYD_<SECTION>__<KEY>)"
        logger.warning("ignoring %s, which is not a replayd variable%s", name, hint)  # a log line: JSON in the daemon


def _supervise(args: argparse.Namespace, argv: list[str], settings: Settings) -> int:
    if args.workers < 1:
        raise UsageError("--workers must be at least 1")
    if args.shard:
        raise UsageError("--workers assigns shards itself: drop --shard")
    return Supervisor(run_cli, without_workers(argv), args.workers, _listen(args, settings)).run()


def _listen(args: argparse.Namespace, settings: Settings) -> tuple[str, int] | None:
    """The address the command serves /metrics, /healthz and /readyz on, if it does."""
    if getattr(args, "metrics_port", None) is not None:
        return args.metrics_host, int(args.metrics_port)
    if args.command == "run" and settings.http.enabled:
        return settings.http.host, settings.http.port
    return None


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    if getattr(args, "shard", None):
        overrides["shard"] = args.shard
    if getattr(args, "redis_url", None):
        overrides["redis"] = {"url": args.redis_url}
    return load_settings(getattr(args, "config", None), **overrides)


def _run_async(
    func: Callable[[argparse.Namespace, Settings], Awaitable[int]], args: argparse.Namespace, settings: Settings
) -> int:
    result: int = anyio.run(func, args, settings, backend_options={"use_uvloop": True})
    return result


def _stdout_closed() -> bool:
    """Whether stdout's reader went away (`replayd dlq list JOB | head -1`), as opposed to a Redis connection: a
    pipe with no reader polls as an error. Stdout is then pointed at /dev/null, so the interpreter's last flush
    does not fail again."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    if not any(events & select.POLLERR for _, events in poller.poll(0)):
        return False
    os.dup2(os.open(os.devnull, os.O_WRONLY), fd)
    return True


def _report(exc: BaseException) -> int:
    """Turn an error into one line on stderr and an exit code; a traceback only for our own bugs."""
    error = most_telling(exc)
    if isinstance(error, BrokenPipeError) and _stdout_closed():
        return EX_PIPE
    if isinstance(error, ReplaydError):
        _say(f"replayd: {error}")
        return error.exit_code
    if isinstance(error, redis.exceptions.AuthenticationError | redis.exceptions.NoPermissionError):
        _say(f"replayd: Redis refused the credentials or an ACL permission: {error}")
        return EX_CONFIG
    if isinstance(error, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError | OSError) or (
        isinstance(error, redis.exceptions.RedisClusterException) and is_retriable(error)
    ):
        _say(f"replayd: cannot reach Redis: {error}")
        return EX_UNAVAILABLE
    if isinstance(error, KeyboardInterrupt):
        return 130
    logger.error("internal error", exc_info=error)
    return EX_SOFTWARE


def _say(message: str) -> None:
    """An error line on stderr, never with a secret in it (a library's message may quote a URL)."""
    print(redact_text(message), file=sys.stderr)


# --- one-shot jobs ---------------------------------------------------------------------------------------------


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


async def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    if not settings.jobs:
        raise ConfigError("no jobs configured: add [[jobs]] tables to the config file (see config.example.toml)")
    if args.no_check_shape:
        settings.jobs = [job.model_copy(update={"check_shape": False}) for job in settings.jobs]
    await Daemon(settings).run()
    return 0


class _client:
    """`async with _client(settings) as redis`: the data path's client, closed on exit."""

    def __init__(self, settings: Settings) -> None:
        self.redis = create_redis(settings.redis)

    async def __aenter__(self) -> Client:
        return self.redis

    async def __aexit__(self, *exc: object) -> None:
        with anyio.move_on_after(2, shield=True):
            await self.redis.aclose()


# --- state inspection ------------------------------------------------------------------------------------------


async def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    async with _client(settings) as client:
        jobs = [args.job] if args.job else await _job_names(client)
        report = {job: await _job_state(client, job) for job in jobs}
    if args.job and not any(report[args.job][part] for part in ("progress", "shards", "checkpoint")):
        print(f"replayd: no job {args.job!r} in Redis", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
        return 0
    if not report:
        print("no replayd jobs found")
    for job, state in report.items():
        for shard, progress in [("", state["progress"]), *state["shards"].items()]:
            if progress or (not shard and not state["shards"]):
                owner = state["owners"].get(shard)
                print(f"{job}{f' shard {shard}' if shard else ''}: {_progress_line(progress, owner)}")
        for stream, position in state["positions"].items():
            print(f"  {stream}: position {display_id(position)}")
    return 0


RUNNING = ("starting", "catching_up", "live", "paused", "stalled", "draining")
"""Progress statuses of a job that runs: shown with whether an owner still holds its lease. (A `blocked` job
waiting for `replayd resume` holds none: it is not among them.)"""


def _progress_line(progress: dict[str, str], owner: str | None) -> str:
    """Status, counts (what waits included), rate, percent, position; and, blocked, why, on a line of its own."""
    status = progress.get("status", "never run" if not progress else "?")
    if status in RUNNING:
        status += f" (owner {owner})" if owner else " (no owner holds the lease: not running, last seen so)"
    line = (
        f"{status}  processed {progress.get('processed_events', 0)}  failed {progress.get('failed_events', 0)}  "
        f"dead-lettered {progress.get('dead_lettered_events', 0)}  parked {progress.get('parked_events', 0)} "
        f"({progress.get('parked_keys', 0)} keys)  {progress.get('events_per_second', '0')} ev/s  "
        f"{progress.get('percent', '0')}%  at {progress.get('current_stream_id', '-')}{_updated(progress)}"
    )
    return line + (f"\n  blocked: {progress['blocked']}" if progress.get("blocked") else "")


def _updated(progress: dict[str, str]) -> str:
    """When the progress hash was last written, as an ISO time (it stores epoch seconds)."""
    try:
        return f"  updated {_iso(float(progress['updated_at']))}"
    except (KeyError, ValueError):
        return ""


def _iso(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


async def _job_names(client: Client) -> list[str]:
    names = set()
    async for key in client.scan_iter(match="replayd:{*}:*", count=500):
        text = key.decode() if isinstance(key, bytes) else key
        names.add(text[len("replayd:{") : text.rindex("}")])
    return sorted(names)


async def _job_state(client: Client, job: str) -> dict[str, Any]:
    checkpoint = text_hash(await client.hgetall(job_key(job, "checkpoint")))
    shards = {}
    async for key in client.scan_iter(match=job_key(job, "progress") + "*", count=100):
        name = text(key).removeprefix(job_key(job, "progress")).removeprefix(":") or "all"
        shards[name] = text_hash(await client.hgetall(key))
    progress = shards.pop("all", {})
    return {"progress": progress, "shards": shards, "checkpoint": checkpoint, "positions": _positions(checkpoint),
            "owners": await _owners(client, job)}  # fmt: skip


async def _owners(client: Client, job: str) -> dict[str, str]:
    """Lease key suffix ("" for an unsharded job, else the shard) -> the owner holding it: who runs the job now."""
    owners = {}
    async for key in client.scan_iter(match=lease_key(job) + "*", count=100):
        token = await client.get(key)
        if token is not None:
            owners[text(key).removeprefix(lease_key(job)).removeprefix(":")] = text(token)
    return owners


def _positions(checkpoint: dict[str, str]) -> dict[str, str]:
    return {stream: format_id(position) for stream, position in stream_positions(checkpoint).items()}


async def cmd_checkpoint(args: argparse.Namespace, settings: Settings) -> int:
    key = job_key(args.job, "checkpoint")
    async with _client(settings) as client:
        if args.action == "show":
            return await _checkpoint_show(args, client, key)
        if args.action == "reset":
            return await _checkpoint_reset(args, client, key)
        return await _checkpoint_set(args, client, key)


async def _checkpoint_show(args: argparse.Namespace, client: Client, key: str) -> int:
    fields = text_hash(await client.hgetall(key))
    if args.json:
        print(json.dumps({"checkpoint": fields, "positions": _positions(fields)}, indent=2, sort_keys=True))
    else:
        for field, value in sorted(fields.items()):
            print(f"{field}\t{value}")
    if not fields:
        print(f"replayd: job {args.job!r} has no checkpoint ({key} is absent; `replayd status` lists the "
              "jobs in Redis)", file=sys.stderr)  # fmt: skip
    return 0 if fields else 1


async def _checkpoint_reset(args: argparse.Namespace, client: Client, key: str) -> int:
    _confirm(args, f"delete {key}: job {args.job} replays from its start position next run")

    async def reset() -> None:
        progress = [k async for k in client.scan_iter(match=job_key(args.job, "progress") + "*")]
        await client.unlink(key, *progress)  # an intended reset: not to be mistaken for a lost checkpoint

    await fenced(client, args.job, "checkpoint_reset", reset)
    print(f"reset {key}")
    return 0


async def _checkpoint_set(args: argparse.Namespace, client: Client, key: str) -> int:
    if not args.stream or not args.to:
        raise UsageError("checkpoint set needs --stream S and --to ID")
    target = format_id(parse_id(args.to, end=True)) if _is_id(args.to) else None
    if target is None:
        raise UsageError(f"--to {args.to!r} is not an entry ID (<ms>-<seq>, each at most {MAX_SEQ})")
    _confirm(args, f"set every partition of {args.stream} in {key} to {target}")

    async def move() -> None:
        # every partition resumes after the stream's floor once its own checkpoint and the shards' floors
        # are gone (what counts as history, replay_until, stays)
        fields = text_hash(await client.hgetall(key))
        prefix = stream_field(args.stream) + "#"
        positions = [f for f in fields if f.startswith(prefix) and f != prefix + "replay_until"]
        async with client.pipeline(transaction=True) as tx:
            if positions:
                tx.hdel(key, *positions)
            tx.hset(key, floor_field(args.stream, WHOLE), target)
            await tx.execute()

    await fenced(client, args.job, "checkpoint_set", move)
    print(f"set {args.stream} of {args.job} to {target}")
    return 0


def _is_id(text: str) -> bool:
    try:
        parse_id(text)
    except ValueError:
        return False
    return True


def _confirm(args: argparse.Namespace, what: str) -> None:
    if args.yes:
        return
    if not sys.stdin.isatty():
        raise UsageError(f"refusing to {what} without --yes")
    if input(f"{what}? [y/N] ").strip().lower() not in ("y", "yes"):
        raise UsageError("cancelled")


async def cmd_job(args: argparse.Namespace, settings: Settings) -> int:
    async with _client(settings) as client:
        keys = sorted(text(key) for key in await _scan(client, job_key(args.job, "*")))
        if not keys:
            print(f"replayd: no job {args.job!r} in Redis", file=sys.stderr)
            return 1
        lease = job_key(args.job, "lease")
        if owners_key(args.job) in keys or any(key == lease or key.startswith(lease + ":") for key in keys):
            raise FencingError(f"job {args.job} is running (its lease is held): stop it first, then delete it")
        _confirm(args, f"delete job {args.job} ({', '.join(k.rpartition('}:')[2] for k in keys)})")

        async def delete() -> int:
            # under the command's own lease (`fenced`): an instance that starts meanwhile waits, or exits 75
            mine = (job_key(args.job, "lease:job_delete"), owners_key(args.job))
            found = [key for key in await _scan(client, job_key(args.job, "*")) if text(key) not in mine]
            return int(await client.unlink(*found)) if found else 0

        deleted = await fenced(client, args.job, "job_delete", delete)
    print(f"deleted job {args.job}: {deleted} keys")
    return 0


async def _scan(client: Client, pattern: str) -> list[bytes | str]:
    return [key async for key in client.scan_iter(match=pattern, count=500)]


async def cmd_pause(args: argparse.Namespace, settings: Settings) -> int:
    async with _client(settings) as client:
        keys = [key async for key in client.scan_iter(match=job_key(args.job, "progress") + "*")]
        if not keys:
            raise UsageError(f"no job {args.job!r} in Redis (it has no progress hash)")
        if args.command == "pause" and not await _owners(client, args.job):
            print(f"replayd: job {args.job!r} is not running (no instance holds its lease): nothing to pause",
                  file=sys.stderr)  # fmt: skip
            return 1
        for key in keys:
            if args.command == "pause":
                await client.hset(key, "paused", "1")
            else:
                await client.hdel(key, "paused")
    print(f"{args.command}d {args.job}" + (f" ({len(keys)} shards)" if len(keys) > 1 else ""))
    return 0


async def cmd_dlq(args: argparse.Namespace, settings: Settings) -> int:
    async with _client(settings) as client:
        letters = Letters(client, args.job)
        try:
            return await _dlq(args, settings, letters)
        finally:
            await letters.aclose()


async def _dlq(args: argparse.Namespace, settings: Settings, letters: Letters) -> int:
    entries = await letters.entries()
    if args.action in ("list", "show"):
        shown = [(i, f) for i, f in entries if args.action == "list" or i in args.ids]
        if args.json:
            print(json.dumps([{"dlq_id": i, **f} for i, f in shown], indent=2))
        for entry_id, fields in [] if args.json else shown:
            print(_letter_line(entry_id, fields) if args.action == "list" else _letter_text(entry_id, fields))
        if not shown and args.action == "show":
            print(f"replayd: no dead letter {' '.join(args.ids)} in job {args.job!r}: `replayd dlq list {args.job}` "
                  "shows the letters' IDs (the first column, not the entry's stream ID)", file=sys.stderr)  # fmt: skip
        return 0 if shown or args.action == "list" else 1
    if args.action == "discard":
        ids = [i for i, _ in entries] if args.all else args.ids
        if not ids:
            raise UsageError("dlq discard needs entry IDs or --all")
        _confirm(args, f"discard {len(ids)} dead letter(s) of job {args.job}")
        discarded = await fenced(letters.client, args.job, "dlq_discard", partial(letters.discard, ids))
        print(f"discarded {discarded} dead letter(s)")
        return 0
    handler = load_handler(args.handler or _job_handler(settings, args.job))
    retry = partial(letters.retry, handler, args.ids or None)
    done, left = await fenced(letters.client, args.job, "dlq_retry", retry)
    print(f"retried: {done} handled and removed, {left} left")
    return 0 if left == 0 else 1


def _job_handler(settings: Settings, job: str) -> str:
    spec = next((j for j in settings.jobs if j.name == job), None)
    if spec is None:
        raise UsageError(f"dlq retry: give --handler, or --config with a job named {job!r}")
    return spec.handler


def _letter_line(entry_id: str, fields: dict[str, str]) -> str:
    return (
        f"{entry_id}  {fields.get('stream')} {fields.get('id')}  key={fields.get('key') or '-'}  "
        f"{fields.get('event_type', '(undecodable)')}  {fields.get('error_type')}: {fields.get('error', '')[:80]}"
    )


def _letter_text(entry_id: str, fields: dict[str, str]) -> str:
    shown = {name: _iso(float(value)) if name == "failed_at" and _is_number(value) else value
             for name, value in fields.items()}  # fmt: skip
    return "\n".join([f"dead letter {entry_id}", *(f"  {name}: {value}" for name, value in shown.items())])


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


async def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from replayd.demo import run_demo

    await run_demo(args, settings)
    return 0
