"""Gaps and divergence: what a stream lost, or forgot, since a job's checkpoint was written.

- trimmed: entries after the checkpoint were removed (XTRIM/MAXLEN, or XDEL) before the job read them: the
  stream's first entry is beyond a non-zero checkpoint (or the stream is empty though IDs were generated past
  it). Neither Redis 6.2 nor 7 can tell a trim that stopped exactly at the checkpoint entry (7.0's
  `max-deleted-entry-id` only follows XDEL), so that case reads as a gap too; `on_gap` decides.
- diverged: the checkpoint is above the stream's `last-generated-id` (a failover to a lagging replica, a torn
  AOF, a recreated stream): new entries would reuse IDs at or below the checkpoint and be skipped silently.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from redis.exceptions import ResponseError

from replayd.connection import Client
from replayd.events import ZERO, Id, format_id, parse_id


class Gap(NamedTuple):
    """A data-loss signal for one stream."""

    kind: str
    """`trimmed` or `diverged` (the `kind` label of replayd_gap_detected_total)."""
    message: str
    """What happened, naming the stream, the checkpoint and the head."""


async def find_gap(redis: Client, stream: str, position: Id, *, what: str = "checkpoint") -> Gap | None:
    """Compare a checkpoint (or, with `what`, a reader's position) with what the stream still holds; None when
    nothing was lost."""
    if position == ZERO:
        return None
    try:
        info: dict[str, Any] = await redis.xinfo_stream(stream)
    except ResponseError:  # no such key
        return Gap("diverged", f"stream {stream} is gone but the {what} is at {format_id(position)}")
    last = parse_id(info["last-generated-id"])
    first_entry = info.get("first-entry")
    first = parse_id(first_entry[0]) if first_entry else None
    where = f"stream {stream}: {what} {format_id(position)}, last-generated-id {format_id(last)}"
    if position > last:
        return Gap("diverged", f"{where}: the stream went back behind the {what} (failover to a lagging "
                   "replica, torn AOF, restored backup or recreated stream); new entries would be skipped")  # fmt: skip
    if (first is None and last > position) or (first is not None and first > position):
        first_text = format_id(first) if first else "none (empty)"
        return Gap("trimmed", f"{where}, first entry {first_text}: entries after the {what} were trimmed "
                   f"before they were replayed ({_lost(position, first or last)})")  # fmt: skip
    return None


def _lost(position: Id, upto: Id) -> str:
    """The estimated loss: the span of entry IDs (Redis's clock) between the position and what remains."""
    seconds = max(0, upto[0] - position[0]) / 1000
    span = f"{format_id(position)} and before {format_id(upto)}"
    return f"estimated loss: the entries after {span}, {seconds:.3f}s of history"
