"""The shape check: before a job reads, do its streams' entries have the fields its codec reads?

A stream written with other field names than the configured ones would otherwise replay silently as events of
type `unknown` with empty `data`. Each stream's first and last entries are sampled (two reads, whatever the
stream's length). When none of them has the field the codec reads `event_type` from, or none has its `data`
field while they hold fields the codec does not read, the job stops (exit 65) before anything runs, naming
the fields the entries have and the flag or config line that maps them. A codec plugin is run on the sampled
entries instead: an entry it cannot decode is the mismatch. `check_shape = false` (`--no-check-shape`) runs
the job anyway.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from replayd.config import JobSpec
from replayd.connection import Client
from replayd.errors import DataError
from replayd.handlers.loader import load_codec
from replayd.pipeline.codec import RawEntry, Shape
from replayd.pipeline.codecs import SHAPES, CodecFactory, codec_factory, is_plugin, shape_of
from replayd.pipeline.source import last_entry

_NEEDED = ("event_type", "data")
"""What every event needs from its entry: without them it is `unknown` with empty `data`."""

_TYPE_LIKE = ("type", "event_type", "eventType", "event", "kind", "name", "ce_type")
_DATA_LIKE = ("payload", "data", "body", "value", "event_data", "json", "message", "ce_data")


class StreamShape(NamedTuple):
    """What the sampled entries of one stream look like, against the job's codec."""

    stream: str
    fields: list[str]
    """The field names of the sampled entries (empty: an empty or missing stream)."""
    problem: str | None
    """Why the codec does not fit them, with the fix; None when it fits."""

    def describe(self) -> dict[str, Any]:
        return {"fields": self.fields, "fits": self.problem is None, "problem": self.problem}


def job_codecs(spec: JobSpec) -> CodecFactory:
    """What makes the codec of each of the job's streams (a plugin is imported here: ConfigError if it fails)."""
    return codec_factory(spec.codec, spec.fields, load_codec(spec.codec) if is_plugin(spec.codec) else None)


async def check_shapes(redis: Client, spec: JobSpec, codec_for: CodecFactory | None = None) -> dict[str, StreamShape]:
    """Each stream's shape; DataError (exit 65) naming the first stream the codec does not fit."""
    shapes = await detect_shapes(redis, spec, codec_for or job_codecs(spec))
    for shape in shapes.values():
        if shape.problem is not None:
            raise DataError(shape.problem)
    return shapes


async def detect_shapes(redis: Client, spec: JobSpec, codec_for: CodecFactory) -> dict[str, StreamShape]:
    """Each stream's shape, without judging (`plan` shows them)."""
    return {stream: inspect(stream, await sample(redis, stream), spec, codec_for) for stream in spec.streams}


async def sample(redis: Client, stream: str) -> list[RawEntry]:
    """The stream's first and last entries (one when it has one, none when it is empty or missing)."""
    last = await last_entry(redis, stream)  # first: a key of another type is named (DataError)
    if last is None:
        return []
    first: list[Any] = await redis.execute_command("XRANGE", stream, "-", "+", "COUNT", 1)
    return [*first, last] if first and first[0][0] != last[0] else [last]


def inspect(stream: str, entries: Sequence[RawEntry], spec: JobSpec, codec_for: CodecFactory) -> StreamShape:
    fields = list(dict.fromkeys(key.decode(errors="replace") for _, flat in entries for key in flat[::2]))
    if not entries:
        return StreamShape(stream, fields, None)
    if is_plugin(spec.codec):
        poison = codec_for(stream, None).decode(entries).poison
        problem = f"entry {poison[0].stream_id}: {poison[0].error}" if poison else None
    else:
        problem = _missing(shape_of(spec.codec, spec.fields), entries)
    if problem is None:
        return StreamShape(stream, fields, None)
    return StreamShape(stream, fields, f"stream {stream}: the entries do not fit codec {spec.codec!r}: {problem}; "
                                       f"they have the fields {', '.join(fields)}. {_fix(fields)}")  # fmt: skip


def _missing(shape: Shape, entries: Sequence[RawEntry]) -> str | None:
    """Which needed fields none of the sampled entries has (one that some have is optional), or None."""
    lacking = []
    layouts = [(shape.layout_names(flat[::2]), flat[::2]) for _, flat in entries]
    unread = any(set(keys) - set(names.values()) for names, keys in layouts)
    for role in _NEEDED:
        if role == "data" and not unread:
            continue  # entries with nothing but what the codec reads: events without data, as the article allows
        if all(role in names and names[role] not in keys for names, keys in layouts):
            lacking.append(f"{role} (field {layouts[0][0][role].decode()!r})")
    if not lacking:
        return None
    ids = " and ".join(entry_id.decode() for entry_id, _ in entries)
    which = "the first and last entries" if len(entries) > 1 else "its one entry"
    return f"{which} ({ids}) have no {' and no '.join(lacking)}"


def _fix(fields: list[str]) -> str:
    """The flags (and config lines) that map `fields`, as far as their names tell."""
    codecs = [name for name, shape in SHAPES.items() if name != "flat" and _fits(shape, fields)]
    mapping = {role: next((f for f in like if f in fields), None) for role, like in
               (("event_type", _TYPE_LIKE), ("data", _DATA_LIKE))}  # fmt: skip
    ways = [f'--codec {name} (config: codec = "{name}")' for name in codecs]
    if mapping["event_type"] and mapping["data"]:
        flags = " ".join(f"--field {role}={field}" for role, field in mapping.items())
        toml = ", ".join(f'{role} = "{field}"' for role, field in mapping.items())
        ways.append(f"{flags} (config: fields = {{ {toml} }})")
    elif mapping["event_type"]:  # no payload field: the fields themselves are the data
        toml = f'fields = {{ event_type = "{mapping["event_type"]}" }}'
        ways.append(f'--codec flat --field event_type={mapping["event_type"]} (config: codec = "flat", {toml})')
    if not ways:
        ways.append("--field event_type=FIELD --field data=FIELD (config: fields = { event_type = ..., data = ... })")
    return f"Map them with {', or '.join(ways)}; or run anyway with --no-check-shape (config: check_shape = false)."


def _fits(shape: Shape, fields: list[str]) -> bool:
    if shape.prefix and not {"specversion", f"{shape.prefix}specversion"} & set(fields):
        return False  # CloudEvents say so: `type` and `data` alone are as likely any producer's
    names = shape.layout_names([field.encode() for field in fields])
    return all(names[role].decode() in fields for role in _NEEDED if role in names)
