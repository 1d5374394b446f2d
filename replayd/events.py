"""Value types of the data path: stream entry IDs and the `Event` handed to handlers."""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Final, NamedTuple

from replayd.errors import DecodeError

MAX_SEQ = 2**64 - 1
"""The largest sequence number of an entry ID: `<ms>-18446744073709551615` ends a millisecond."""

Id = tuple[int, int]
"""An entry ID as (milliseconds, sequence); tuples compare in stream order."""

ZERO: Id = (0, 0)
"""Below every real entry (Redis never assigns 0-0), so 'after ZERO' is the whole stream."""

TOP: Id = (2**64 - 1, MAX_SEQ)


ARTICLE_FIELDS = ("stream_id", "event_id", "event_type", "data", "timestamp", "metadata", "stream")
"""The article's `ReplayEvent` fields (and `stream`), in its order: what equality and repr compare and show."""

RawValue = str | bytes
"""An entry field's value as `Event.fields` holds it: text, or bytes when they are not UTF-8."""


class Event:
    """One stream entry, decoded. Field names follow the article's `ReplayEvent` so its handlers port over.

    A plain value with slots (the article's positional constructor, equality and repr). The events the codec
    makes come with `data` decoded and decode `timestamp`, `metadata` and `fields` on first read
    (`codec.LazyEvent`): what no filter, router or handler reads is never decoded.
    """

    __slots__ = (*ARTICLE_FIELDS, "fields")

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
    fields: dict[str, RawValue]
    """Every field of the entry as the producer wrote it, whatever the codec made of them: `fields["user_id"]`.
    Values are text, or bytes where they are not UTF-8. Not part of equality (two codecs of one entry agree)."""

    def __init__(
        self,
        stream_id: str,
        event_id: str,
        event_type: str,
        data: dict[str, Any],
        timestamp: float,
        metadata: dict[str, Any],
        stream: str,
        *,
        fields: dict[str, RawValue] | None = None,
    ) -> None:
        self.stream_id = stream_id
        self.event_id = event_id
        self.event_type = event_type
        self.data = data
        self.timestamp = timestamp
        self.metadata = metadata
        self.stream = stream
        self.fields = {} if fields is None else fields

    def astuple(self) -> tuple[str, str, str, dict[str, Any], float, dict[str, Any], str]:
        """Every field, in the article's order (decoding what is not decoded yet)."""
        return (self.stream_id, self.event_id, self.event_type, self.data, self.timestamp, self.metadata,
                self.stream)  # fmt: skip

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Event) and self.astuple() == other.astuple()

    __hash__ = None  # type: ignore[assignment] # a value holding dicts, like the NamedTuple it was

    def __repr__(self) -> str:
        return "Event(" + ", ".join(f"{name}={self._shown(name)}" for name in ARTICLE_FIELDS) + ")"

    def _shown(self, name: str) -> str:
        try:
            return repr(getattr(self, name))
        except DecodeError:  # a repr never raises: logs and debuggers show poison events too
            return "<undecodable>"


PartitionBy = str | Callable[["Event"], Any] | None
"""What orders a job's events: a path (a bare name is a field of `data`; `fields.user_id`, `metadata.tenant`,
`data.a.b`, `@stream`), a function of the event returning its key (None: no key), or None (the stream)."""


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Final = _Missing()
"""What `path_getter`'s functions return for a part the event does not have."""

STREAM_KEY = "@stream"
"""The path of the stream key (`partition_by = "@stream"`: one ordered lane per stream)."""

ATTRIBUTES = ("event_type", "event_id", "stream_id", "timestamp", "stream")

PATHS = "data.<field>[.<field>...], metadata.<field>..., fields.<entry field>, @stream, " + ", ".join(ATTRIBUTES)
"""The paths to the parts of an event, for messages."""


def path_getter(path: str, *, bare: str | None = None) -> Callable[[Event], Any]:
    """A path to a part of an event -> a function reading it, `MISSING` where the event lacks that part.

    `data.a.b` and `metadata.a` reach into the decoded JSON, `fields.user_id` reads an entry field as the producer
    wrote it, `@stream` is the stream key, and an attribute (`event_type`, ...) is itself. A bare name means
    `<bare>.<name>` when `bare` is given (`partition_by = "customer_id"` is `data.customer_id`); otherwise it
    must be an attribute. ValueError says which paths exist.
    """
    head, _, rest = path.partition(".")
    if head == "fields" and rest:
        return lambda e: e.fields.get(rest, MISSING)
    if head in ("data", "metadata") and rest:
        return _nested(operator.attrgetter(head), rest.split("."))
    if path == STREAM_KEY:
        return operator.attrgetter("stream")
    if bare is not None and path and head not in ("data", "metadata", "fields"):
        return _nested(operator.attrgetter(bare), [path])  # today's meaning: the whole name is one field's
    if path in ATTRIBUTES:
        return operator.attrgetter(path)
    raise ValueError(f"{path!r} is not a path to a part of an event: use one of {PATHS}")


def _nested(root: Callable[[Event], Any], parts: list[str]) -> Callable[[Event], Any]:
    def get(e: Event) -> Any:
        node: Any = root(e)
        for part in parts:
            if not isinstance(node, dict) or part not in node:
                return MISSING
            node = node[part]
        return node

    return get


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


def display_id(text: str) -> str:
    """An entry ID as a person reads it: an end bound of a whole millisecond (`<ms>-18446744073709551615`, what
    `--to 2026-11-25T11:00:00Z` means) as just `<ms>`, which Redis's XRANGE reads the same way."""
    ms, _, seq = text.partition("-")
    return ms if seq == str(MAX_SEQ) else text


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


def resolve_end(bound: Bound, last: Id | None, now_ms: int) -> Id | None:
    """The inclusive end ID, or None to follow."""
    if bound.kind == "follow":
        return None
    if bound.kind == "now":
        return last or ZERO
    if bound.kind == "age":
        return age_to_id(bound.age_ms, now_ms, end=True)
    return bound.id


def resolve_start(bound: Bound, now_ms: int) -> Id:
    """The exclusive start ID."""
    if bound.kind == "age":
        return age_to_id(bound.age_ms, now_ms, end=False)
    if bound.kind == "id":
        return bound.id
    return ZERO  # beginning, or checkpoint of a job that has none yet


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


def preview(fields: Mapping[str, object], limit: int = 200) -> str:
    """An entry's `fields` for a log line, each value cut to `limit` characters with its full length stated: an
    entry can be megabytes, a log line must not."""
    shown = []
    for name, value in fields.items():
        text = str(value)
        if len(text) > limit:
            text = f"{text[:limit]}... ({len(text)} chars)"
        shown.append(f"{str(name)[:limit]}={text!r}")
    return "{" + ", ".join(shown) + "}"
