"""Value types of the data path: stream entry IDs and the `Event` handed to handlers."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any, NamedTuple

from replayd.errors import DecodeError

MAX_SEQ = 2**64 - 1
"""The largest sequence number of an entry ID: `<ms>-18446744073709551615` ends a millisecond."""

Id = tuple[int, int]
"""An entry ID as (milliseconds, sequence); tuples compare in stream order."""

ZERO: Id = (0, 0)
"""Below every real entry (Redis never assigns 0-0), so 'after ZERO' is the whole stream."""

TOP: Id = (2**64 - 1, MAX_SEQ)


class Event:
    """One stream entry, decoded. Field names follow the article's `ReplayEvent` so its handlers port over.

    A plain value with slots (the article's positional constructor, equality and repr). The events the codec
    makes decode `data`, `timestamp` and `metadata` on first read (`codec.LazyEvent`): what no filter, router
    or handler reads is never decoded.
    """

    __slots__ = ("stream_id", "event_id", "event_type", "data", "timestamp", "metadata", "stream")  # noqa: RUF023 - the article's order

    stream_id: str
    """The entry ID, e.g. `1700000000000-0`."""
    event_id: str
    """The producer's event ID (the entry ID when the entry has none)."""
    event_type: str
    """The producer's event type (`unknown` when the entry has none)."""
    data: dict[str, Any]
    """The decoded `data` JSON object."""
    timestamp: float
    """The producer's time in seconds: replay keeps it, never replaces it by the replay's time."""
    metadata: dict[str, Any]
    """The decoded `metadata` JSON object."""
    stream: str
    """The stream key the entry was read from."""

    def __init__(
        self,
        stream_id: str,
        event_id: str,
        event_type: str,
        data: dict[str, Any],
        timestamp: float,
        metadata: dict[str, Any],
        stream: str,
    ) -> None:
        self.stream_id = stream_id
        self.event_id = event_id
        self.event_type = event_type
        self.data = data
        self.timestamp = timestamp
        self.metadata = metadata
        self.stream = stream

    def astuple(self) -> tuple[str, str, str, dict[str, Any], float, dict[str, Any], str]:
        """Every field, in the article's order (decoding what is not decoded yet)."""
        return (self.stream_id, self.event_id, self.event_type, self.data, self.timestamp, self.metadata,
                self.stream)  # fmt: skip

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Event) and self.astuple() == other.astuple()

    __hash__ = None  # type: ignore[assignment] # a value holding dicts, like the NamedTuple it was

    def __repr__(self) -> str:
        return "Event(" + ", ".join(f"{name}={self._shown(name)}" for name in Event.__slots__) + ")"

    def _shown(self, name: str) -> str:
        try:
            return repr(getattr(self, name))
        except DecodeError:  # a repr never raises: logs and debuggers show poison events too
            return "<undecodable>"


def parse_id(text: str | bytes, *, end: bool = False) -> Id:
    """Parse `ms-seq` (or bare `ms`, which means the millisecond's first or, with `end`, last entry)."""
    if isinstance(text, bytes):
        text = text.decode()
    ms, sep, seq = text.partition("-")
    if not ms.isdigit() or (sep and not seq.isdigit()):
        raise ValueError(f"not a stream entry ID: {text!r} (expected <ms>-<seq>)")
    if int(ms) > MAX_SEQ or (sep and int(seq) > MAX_SEQ):
        raise ValueError(f"not a stream entry ID: {text!r} (each part of <ms>-<seq> is at most {MAX_SEQ})")
    if not sep:
        return (int(ms), MAX_SEQ if end else 0)
    return (int(ms), int(seq))


def format_id(id_: Id) -> str:
    return f"{id_[0]}-{id_[1]}"


def before(id_: Id) -> Id:
    """The ID just below `id_`: turns an inclusive start into the exclusive one that reads resume from."""
    ms, seq = id_
    if seq:
        return (ms, seq - 1)
    return (ms - 1, MAX_SEQ) if ms else ZERO


class Bound(NamedTuple):
    """Where a replay starts or ends, as configured; resolved against the stream when the job starts."""

    kind: str
    """`beginning`, `checkpoint`, `id` or `age` for a start; `now`, `follow`, `id` or `age` for an end."""
    id: Id = ZERO
    """For `id`: the exclusive start (reads begin after it) or the inclusive end."""
    age_ms: int = 0
    """For `age`: how far before Redis's current time."""


_AGE = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d|w)$")
_AGE_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}


def parse_start(text: str, *, after: bool = False) -> Bound:
    """`beginning`, `checkpoint`, an entry ID (inclusive; exclusive with `after`), an ISO-8601 time or an age."""
    if after:
        return Bound("id", parse_id(text, end=True))
    if text in ("beginning", "checkpoint"):
        return Bound(text)
    return _point(text, end=False)


def parse_end(text: str) -> Bound:
    """`now`, `follow`, an entry ID (inclusive), an ISO-8601 time or an age."""
    if text in ("now", "follow"):
        return Bound(text)
    return _point(text, end=True)


def _point(text: str, *, end: bool) -> Bound:
    age = _AGE.match(text)
    if age:
        try:
            return Bound("age", age_ms=int(float(age[1]) * _AGE_MS[age[2]]))
        except OverflowError:
            raise ValueError(f"{text!r}: age too large") from None
    if re.fullmatch(r"\d+(-\d+)?", text):
        id_ = parse_id(text, end=end)
    else:
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(
                f"{text!r} is not an entry ID (<ms>-<seq>), an ISO-8601 time or an age such as 24h or 7d"
            ) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        ms = int(moment.timestamp() * 1000)
        id_ = (ms, MAX_SEQ) if end else (ms, 0)
    return Bound("id", id_ if end else before(id_))


def age_to_id(age_ms: int, now_ms: int, *, end: bool) -> Id:
    """An age resolved against Redis's clock (the clock that stamps entry IDs)."""
    ms = max(now_ms - age_ms, 0)
    return (ms, MAX_SEQ) if end else before((ms, 0))


class Shard(NamedTuple):
    """Shard i of N owns the partitions p with p mod N == i: disjoint, so checkpoints never collide."""

    ordinal: int = 0
    """i: which shard."""
    total: int = 1
    """N: how many shards."""

    def owns(self, partition: int) -> bool:
        return partition % self.total == self.ordinal

    def __str__(self) -> str:
        return f"{self.ordinal}/{self.total}"

    @property
    def suffix(self) -> str:
        """`""` for the whole job, `"i/N"` for a shard: appended to the names of per-shard state."""
        return "" if self.total == 1 else str(self)


def parse_shard(text: str) -> Shard:
    """`i/N` with 0 <= i < N."""
    index, sep, count = text.partition("/")
    if not (sep and index.isdigit() and count.isdigit()) or not 0 <= int(index) < int(count):
        raise ValueError(f"shard {text!r}: expected i/N with 0 <= i < N, e.g. 0/3")
    return Shard(int(index), int(count))


WHOLE = Shard()
"""The whole job: one process owns every partition."""


class Poison(NamedTuple):
    """An entry that could not be decoded: counted, logged and accounted for, never a crash."""

    stream: str
    """The stream key."""
    stream_id: str
    """The entry ID."""
    fields: dict[str, str]
    """The raw fields, decoded leniently for display."""
    error: str
    """Why it could not be decoded."""

    @classmethod
    def of(cls, error: DecodeError) -> Poison:
        return cls(error.stream, error.stream_id, error.fields, error.reason)
