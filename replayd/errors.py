"""The replayd error tree.

    ReplaydError                 root; `exit_code` is what the CLI exits with
    ├── UsageError               bad command-line arguments (exit 2)
    ├── ConfigError              invalid settings, missing config file, bad plugin path (exit 78)
    ├── DataError                the stream cannot be replayed as asked: gap, divergence (exit 65)
    │   ├── DecodeError          a field of an entry cannot be decoded: the entry is poison
    │   ├── JobBlocked           a dead letter holds the whole stream back, or the circuit breaker tripped
    │   ├── RefusedWrite         Redis would refuse a write an event queued: the event is poison
    │   └── CheckpointLost       the job's checkpoint hash vanished while it ran (evicted or deleted)
    ├── HandlerTimeout           a handler call outlived `handler_timeout_s` (a failure of its event)
    ├── SourceError              Redis unreachable or failing while reading (exit 69, retriable)
    ├── CommitError              a checkpoint transaction failed (exit 69, retriable)
    └── FencingError             another instance of the same job and shard committed (exit 75)
        └── RestartJob           start again from what Redis holds: the projection was flipped to a new
                                 version, or Redis lost commits it had acknowledged (the daemon restarts the job)

`StopReplay` is not an error: a handler raises it to end a run early after its work is committed.
"""

from __future__ import annotations

from typing import ClassVar


class ReplaydError(Exception):
    """Raised when replayd cannot go on; the message is meant for the operator."""

    exit_code: ClassVar[int] = 70
    retriable: ClassVar[bool] = False


class UsageError(ReplaydError):
    """Raised when command-line arguments are inconsistent."""

    exit_code = 2


class ConfigError(ReplaydError):
    """Raised when settings are invalid, a config file is missing, or a plugin cannot be loaded."""

    exit_code = 78


class DataError(ReplaydError):
    """Raised when the stream cannot be replayed as asked without losing or doubling events."""

    exit_code = 65


class DecodeError(DataError):
    """Raised when a field of an entry is read and cannot be decoded: the entry is poison.

    Fields are decoded when first read, so this surfaces where the field is first needed: while filtering or
    routing (the entry goes to the job's `on_poison` policy before any handler sees it) or inside a handler
    (`handlers` catches it around the handler: not retried, then the same policy).
    """

    def __init__(self, stream: str, stream_id: str, fields: dict[str, str], reason: str) -> None:
        super().__init__(f"entry {stream} {stream_id} cannot be decoded ({reason})")
        self.stream = stream
        self.stream_id = stream_id
        self.fields = fields
        """The raw fields, decoded leniently for display and dead letters."""
        self.reason = reason
        """Why, e.g. `JSONDecodeError: unexpected character: line 1 column 2 (char 1)`."""


class RefusedWrite(DataError):
    """Raised (and handed to the poison policy) when Redis would refuse a write an event's handler queued: a key of
    another type, a stored value that is not a number, a value no command takes, or more writes than a commit
    carries. Nothing of the commit was applied."""


class CheckpointLost(DataError):
    """Raised when the job's checkpoint hash is gone while the job runs (evicted, deleted, or a Redis restored
    without it): committing on would let a restart replay everything onto the projection."""


class SourceError(ReplaydError):
    """Raised when reading from Redis fails."""

    exit_code = 69
    retriable = True


class CommitError(ReplaydError):
    """Raised when a checkpoint transaction fails."""

    exit_code = 69
    retriable = True


class FencingError(ReplaydError):
    """Raised when another instance of the same job and shard has committed: this one must stop."""

    exit_code = 75


class JobBlocked(DataError):
    """Raised when a job cannot go on without an operator: the stream waits behind a dead letter of its only key,
    or the circuit breaker tripped. A one-shot command exits 65; a following job waits, `blocked`, for
    `replayd resume`."""


class HandlerTimeout(ReplaydError):
    """Recorded (as the error of an event or batch) when a handler call outlived `handler_timeout_s`."""


class RestartJob(FencingError):
    """Raised when a job's in-flight work no longer matches Redis and the job must start again from its
    checkpoint: the daemon does that at once; a one-shot command exits 75 and a rerun does it."""


class StopReplay(Exception):
    """Raised by a handler to end the run once the work done so far is committed."""


def leaves(error: BaseException) -> list[BaseException]:
    """The errors inside (nested) exception groups from task groups, in order."""
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in leaves(inner)]
    return [error]


def most_telling(error: BaseException) -> BaseException:
    """Ours first, then any other Exception, then whatever it is: the one error worth reporting."""
    found = leaves(error)
    for kind in (ReplaydError, Exception, BaseException):
        for leaf in found:
            if isinstance(leaf, kind):
                return leaf
    return error
