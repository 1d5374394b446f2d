"""`replayd run|replay|rebuild|status|checkpoint|demo|version`: a thin face over the one engine.

Exit codes: 0 done or stopped cleanly, 2 usage, 65 data, 69 Redis unavailable, 70 internal, 75 lease held
elsewhere, 78 config. User mistakes get one clear line on stderr, never a traceback.

Here: the parser, `main`/`run_cli` and errors to exit codes. The commands live by group in `replaying` (replay, plan,
rebuild, verify), `daemon` (run, pause/resume, demo) and `state` (status, checkpoint, job delete, dlq).
"""

from __future__ import annotations

import argparse
import ctypes
import difflib
import logging
import os
import select
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import anyio
import redis.exceptions
from pydantic import BaseModel

from replayd.cli.daemon import cmd_demo, cmd_pause, cmd_run
from replayd.cli.replaying import cmd_plan, cmd_rebuild, cmd_replay, cmd_verify
from replayd.cli.state import cmd_checkpoint, cmd_dlq, cmd_job, cmd_status
from replayd.config import Settings, load_settings
from replayd.connection import is_retriable
from replayd.errors import ReplaydError, UsageError, most_telling
from replayd.events import parse_shard
from replayd.handlers.builtin import jsonl_dump, republish
from replayd.jobs.workers import Supervisor, without_workers
from replayd.ops.logs import redact_text, setup_logging
from replayd.pipeline.codec import ROLES
from replayd.pipeline.pacing import parse_speed
from replayd.version import __version__

logger = logging.getLogger("replayd")


_M_MMAP_THRESHOLD = -3
"""glibc's `mallopt` parameter (malloc.h)."""


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
    common.add_argument("--log-level", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"], default=None)
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
