"""A job's state in Redis: `status`, `checkpoint`, `job delete`, `dlq`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from typing import Any

from replayd.cli.shared import _client, _confirm
from replayd.config import Settings
from replayd.connection import Client, text, text_hash
from replayd.errors import FencingError, UsageError
from replayd.events import MAX_SEQ, WHOLE, display_id, format_id, parse_id
from replayd.handlers.loader import load_handler
from replayd.jobs.deadletter import Letters
from replayd.jobs.lease import fenced, lease_key, owners_key
from replayd.pipeline.commit import floor_field, job_key, stream_field, stream_positions


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
    target = format_id(parse_id(args.to, end=True)) if _parses(parse_id, args.to) else None
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


def _parses(parse: Callable[[str], object], text: str) -> bool:
    """Whether `parse` takes `text` (a stream ID, a number) without a ValueError."""
    try:
        parse(text)
    except ValueError:
        return False
    return True


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
    shown = {name: _iso(float(value)) if name == "failed_at" and _parses(float, value) else value
             for name, value in fields.items()}  # fmt: skip
    return "\n".join([f"dead letter {entry_id}", *(f"  {name}: {value}" for name, value in shown.items())])
