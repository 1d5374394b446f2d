"""A built-in handler that writes every event as one JSON line, to a file or to stdout.

    REPLAYD_JSONL_PATH=events.jsonl replayd replay --stream events:orders --handler jsonl_dump --from 24h
    replayd replay --stream events:orders --handler jsonl_dump --from 24h > events.jsonl   # stdout

Settings (environment variables, read when the handler is loaded; a bad value is a config error at start-up):
    REPLAYD_JSONL_PATH   the file to append to; `-`, empty or unset: standard output. The file is created if
                         missing and opened in append mode, so a resumed run continues it.

Each line is an object with the keys `stream`, `stream_id`, `event_id`, `event_type`, `data`, `timestamp`
(the producer's time, seconds) and `metadata`. Lines of one stream are in stream order: `partition_by = None`
makes each stream one ordered lane (keep the job's default `ordering = "key"` and no `partition_by`). Lines of
different streams of one job interleave batch by batch. A batch is written and flushed in one piece, in a
worker thread, so a slow reader of stdout slows the replay down without stalling the event loop.

Delivery is at-least-once: the file is outside Redis, so it cannot be part of replayd's atomic commit. A
batch is written before its checkpoint commits; after a crash (or a failed commit), the events after the last
checkpoint are written again. Deduplicate downstream by `event_id` (or `stream` + `stream_id`) when that
matters, or start a new file with a fresh job (`--from ...` without resuming).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import anyio
import anyio.to_thread
import msgspec

from replayd.errors import ConfigError, ReplaydError
from replayd.events import Event
from replayd.handlers import Context, Outcome, Projection

logger = logging.getLogger(__name__)

PATH_ENV = "REPLAYD_JSONL_PATH"
STDOUT = "-"


def event_line(event: Event) -> bytes:
    """One event as a JSON object followed by a newline."""
    return (
        msgspec.json.encode(
            {
                "stream": event.stream,
                "stream_id": event.stream_id,
                "event_id": event.event_id,
                "event_type": event.event_type,
                "data": event.data,
                "timestamp": event.timestamp,
                "metadata": event.metadata,
            }
        )
        + b"\n"
    )


def _path_from_env() -> Path | None:
    """The configured file, or None for stdout."""
    value = os.environ.get(PATH_ENV, "").strip()
    if not value or value == STDOUT:
        return None
    path = Path(value).expanduser()
    if path.is_dir():
        raise ConfigError(f"{PATH_ENV}={value!r} is a directory: give a file path, or '-' for stdout")
    parent = path.parent
    if not parent.is_dir():
        raise ConfigError(f"{PATH_ENV}={value!r}: directory {str(parent)!r} does not exist")
    writable = os.access(path, os.W_OK) if path.exists() else os.access(parent, os.W_OK | os.X_OK)
    if not writable:
        raise ConfigError(f"{PATH_ENV}={value!r}: not writable by this process")
    return path


class JsonlDump(Projection):
    """Appends each event as a JSON line to `REPLAYD_JSONL_PATH` (or stdout)."""

    name = "jsonl_dump"
    writes_projection = False  # nothing is written to Redis
    partition_by = None

    def __init__(self) -> None:
        self.path = _path_from_env()
        """The file written to; None for stdout."""
        self.written = 0
        """Events written by this instance."""
        self._file: BinaryIO | None = None
        self._lock = anyio.Lock()  # one batch at a time: lines of concurrent lanes never mix within a batch

    @property
    def target(self) -> str:
        return "stdout" if self.path is None else str(self.path)

    def _open(self) -> None:
        if self.path is None:
            return
        if self._file is None:
            try:
                self._file = self.path.open("ab")
            except OSError as exc:
                raise ReplaydError(f"{self.name}: cannot open {self.path} for appending: {exc}") from exc

    def _write(self, payload: bytes) -> None:
        """Write and flush one batch (runs in a worker thread)."""
        if self.path is None:
            out = sys.stdout  # looked up at each write: whatever stdout is now (redirected, captured)
            out.flush()  # text written before must come first
            binary = getattr(out, "buffer", None)
            if binary is not None:
                binary.write(payload)
                binary.flush()
            else:
                out.write(payload.decode())
                out.flush()
            return
        self._open()
        assert self._file is not None
        try:
            self._file.write(payload)
            self._file.flush()
        except OSError:
            self._drop()  # its buffer holds the failed batch: a later flush must not write it out of place
            raise

    def _drop(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()
            except OSError as exc:
                logger.warning("%s: closing %s failed: %s", self.name, self.path, exc)

    async def startup(self, ctx: Context) -> None:
        self._open()

    async def handle(self, event: Event, ctx: Context) -> None:
        await self.handle_batch([event], ctx)

    async def handle_batch(self, events: Sequence[Event], ctx: Context) -> Outcome:
        payload = b"".join(map(event_line, events))
        async with self._lock:
            try:
                await anyio.to_thread.run_sync(self._write, payload)
            except OSError as exc:
                # not handled: the batch is not committed and the job stops; a restart writes it again
                raise ReplaydError(f"{self.name}: writing to {self.target} failed: {exc}") from exc
        self.written += len(events)
        return Outcome(handled=len(events))

    async def shutdown(self, ctx: Context) -> None:
        async with self._lock:
            await anyio.to_thread.run_sync(self._drop)
