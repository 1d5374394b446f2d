"""Entry fields -> Event with the article's defaults; anything undecodable is Poison, never an exception.

`data`, `timestamp` and `metadata` are decoded when first read: `decoded` reads every field, as a job whose
filter, router or handler reads them all does.
"""

from __future__ import annotations

import pytest

from replayd.config import FieldNames
from replayd.errors import DecodeError
from replayd.events import Event, Poison
from replayd.pipeline.codec import Codec, RawEntry, decode_all, decode_data

CODEC = Codec("orders", FieldNames())


def raw(entry_id: str, **fields: bytes | str) -> RawEntry:
    """An entry as hiredis returns it: `[id, [field, value, ...]]`, all bytes."""
    flat: list[bytes] = []
    for name, value in fields.items():
        flat += [name.encode(), value if isinstance(value, bytes) else value.encode()]
    return [entry_id.encode(), flat]


def decoded(entries: list[RawEntry], codec: Codec = CODEC) -> tuple[list[Event], list[Poison]]:
    """Decode, then read every field (lazy fields included)."""
    events, poison, _ = codec.decode(entries)
    events, unreadable = decode_all(events)
    return events, sorted(poison + unreadable, key=lambda p: p.stream_id)


def one(entry: RawEntry, codec: Codec = CODEC) -> Event:
    events, poison = decoded([entry], codec)
    assert poison == []
    assert len(events) == 1
    return events[0]


def poisoned(entry: RawEntry) -> Poison:
    events, poison = decoded([entry])
    assert events == []
    assert len(poison) == 1
    return poison[0]


def test_full_entry() -> None:
    event = one(
        raw(
            "1-0",
            event_id="evt-1",
            event_type="OrderCreated",
            data='{"order_id": "o1", "total": 19.9}',
            timestamp="1700000000.5",
            metadata='{"source": "api"}',
        )
    )
    assert event == Event(
        "1-0", "evt-1", "OrderCreated", {"order_id": "o1", "total": 19.9}, 1700000000.5, {"source": "api"}, "orders"
    )


def test_missing_fields_take_the_article_defaults_and_the_entry_ids_time() -> None:
    event = one(raw("1700000000123-1", other="x"))
    assert event.event_id == "1700000000123-1"
    assert event.event_type == "unknown"
    assert event.data == {}
    assert event.metadata == {}
    assert event.timestamp == 1700000000.123  # when Redis added the entry, not 0.0 (the article's default)
    assert event.stream == "orders"


def test_integer_timestamp_is_a_float() -> None:
    event = one(raw("1-0", timestamp="1700000000"))
    assert event.timestamp == 1700000000.0
    assert isinstance(event.timestamp, float)


def test_custom_field_names() -> None:
    names = FieldNames(event_id="id", event_type="type", data="payload", timestamp="ts", metadata="meta")
    codec = Codec("s", names)
    event = one(raw("1-0", id="a", type="T", payload='{"x": 1}', ts="2.5", meta='{"m": true}'), codec)
    assert (event.event_id, event.event_type, event.data, event.timestamp, event.metadata) == (
        "a",
        "T",
        {"x": 1},
        2.5,
        {"m": True},
    )


def test_custom_field_names_ignore_the_default_names() -> None:
    codec = Codec("s", FieldNames(event_type="type"))
    assert one(raw("1-0", event_type="Ignored"), codec).event_type == "unknown"


@pytest.mark.parametrize(
    ("fields", "error"),
    [  # the error as replayd (or Python) words it: what msgspec says after it differs between its releases
        ({"data": "{not json"}, ": data: "),
        ({"data": "[1, 2]"}, "TypeError: data: must be a JSON object, not list"),
        ({"data": "null"}, "TypeError: data: must be a JSON object, not NoneType"),
        ({"metadata": '"text"'}, "TypeError: metadata: must be a JSON object, not str"),
        ({"timestamp": "yesterday"}, "ValueError: timestamp: "),
        ({"event_type": b"\xff\xfe"}, "UnicodeDecodeError: "),
        ({"event_id": b"\xc3("}, "UnicodeDecodeError: "),
        ({"data": b'{"x": "\xff"}'}, ": data: "),
    ],
)
def test_undecodable_entries_are_poison(fields: dict[str, bytes | str], error: str) -> None:
    poison = poisoned(raw("7-0", **fields))
    assert poison.stream == "orders"
    assert poison.stream_id == "7-0"
    assert error in poison.error


def test_poison_keeps_the_raw_fields_readable() -> None:
    poison = poisoned(raw("7-0", event_type=b"\xffBad", data="{"))
    assert poison.fields["data"] == "{"
    assert poison.fields["event_type"].endswith("Bad")


def test_a_deleted_entry_without_fields_is_a_tombstone() -> None:
    _, poison = decoded([[b"3-0", None]])
    assert [p.error for p in poison] == ["tombstone: entry has no fields"]


def test_poison_does_not_stop_the_rest_of_the_batch() -> None:
    events, poison = decoded(
        [raw("1-0", event_type="A"), raw("2-0", data="oops"), raw("3-0", event_type="C", data="{}")]
    )
    assert [e.stream_id for e in events] == ["1-0", "3-0"]
    assert [p.stream_id for p in poison] == ["2-0"]


def test_json_and_timestamp_are_decoded_only_when_read() -> None:
    events, poison, _ = CODEC.decode([raw("1-0", event_type="A", data="{broken", timestamp="x", metadata='{"m": 1}')])
    assert poison == []
    (event,) = events
    assert (event.stream_id, event.event_type, event.metadata) == ("1-0", "A", {"m": 1})
    with pytest.raises(DecodeError, match=": data: ") as error:  # the field named; the rest is msgspec's words
        _ = event.data
    assert (error.value.stream, error.value.stream_id, error.value.fields["data"]) == ("orders", "1-0", "{broken")
    with pytest.raises(DecodeError, match="ValueError: timestamp"):
        _ = event.timestamp
    assert "data=<undecodable>" in repr(event)  # a repr never raises


def test_a_decoded_field_is_kept() -> None:
    events, *_ = CODEC.decode([raw("1-0", data='{"x": 1}')])
    assert events[0].data is events[0].data
    events[0].data["y"] = 2  # a handler may change its own copy; nothing is shared between events
    assert events[0].data == {"x": 1, "y": 2}


def test_data_is_decoded_in_one_loop_and_bad_data_only_where_it_is_read() -> None:
    """`decode_data` (the lanes call it before a handler gets a slice) decodes every `data` at once; one that is not
    a JSON object does not make its entry poison by itself: its first read raises, as a lazy field's does."""
    events, poison, _ = CODEC.decode([raw("1-0", data='{"x": 1}'), raw("2-0", data="[1]"), raw("3-0", event_type="A")])
    assert poison == []
    assert [vars(e).get("data") for e in events] == [None, None, None]  # the router's decoding stays short
    decode_data(events)
    assert [vars(e).get("data") for e in events] == [{"x": 1}, None, None]
    assert events[2].data == {}
    with pytest.raises(DecodeError, match="must be a JSON object"):
        _ = events[1].data
