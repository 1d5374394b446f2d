"""Partition key -> partition with a stable crc32, stream order kept within a partition (pure)."""

from __future__ import annotations

from typing import Any

from replayd.config import FieldNames
from replayd.events import Event, Poison, Shard
from replayd.pipeline.codec import Codec
from replayd.pipeline.router import Router


def ev(i: int, data: dict[str, Any] | None = None, *, stream: str = "orders") -> Event:
    return Event(f"{i}-0", f"evt-{i}", "OrderCreated", data or {}, 0.0, {}, stream)


def by_customer(partitions: int = 16) -> Router:
    return Router(partitions, partition_by="customer_id", ordering="key")


def test_partition_is_crc32_of_the_key() -> None:
    # crc32 values, fixed forever: a run in another process (another PYTHONHASHSEED) must agree
    router = by_customer()
    assert router.partition(ev(1, {"customer_id": "cust_1"})) == 7
    assert router.partition(ev(2, {"customer_id": "cust_2"})) == 13


def test_same_key_same_partition_across_router_instances() -> None:
    events = [ev(i, {"customer_id": f"cust_{i % 50}"}) for i in range(200)]
    first, second = by_customer(), by_customer()
    assert [first.partition(e) for e in events] == [second.partition(e) for e in events]


def test_numeric_key_and_its_text_share_a_partition() -> None:
    router = by_customer()
    assert router.partition(ev(1, {"customer_id": 42})) == router.partition(ev(2, {"customer_id": "42"}))


def test_split_keeps_stream_order_within_each_partition() -> None:
    events = [ev(i, {"customer_id": f"c{i % 5}"}) for i in range(1, 101)]
    parts = by_customer(4).split(events)
    assert sum(map(len, parts.values())) == 100
    for bucket in parts.values():
        seqs = [int(e.stream_id.split("-")[0]) for e in bucket]
        assert seqs == sorted(seqs)
    for key in range(5):
        owners = {p for p, bucket in parts.items() for e in bucket if e.data["customer_id"] == f"c{key}"}
        assert len(owners) == 1


def test_events_without_the_field_go_to_the_default_key() -> None:
    router = by_customer()
    assert router.partition(ev(1, {})) == router.partition(ev(2, {"customer_id": "default"})) == 15


def test_stream_key_partitioning() -> None:
    router = Router(16, partition_by="@stream", ordering="key")
    assert router.partition(ev(1, {"customer_id": "cust_1"})) == router.partition(ev(2)) == 14  # crc32("orders")
    parts = router.split([ev(i, {"customer_id": f"c{i}"}) for i in range(10)])
    assert list(parts) == [14]
    assert [e.stream_id for e in parts[14]] == [f"{i}-0" for i in range(10)]


def test_no_partition_key_means_the_stream_key() -> None:
    plain = Router(16, partition_by=None, ordering="key")
    assert plain.partition(ev(1, stream="a")) == Router(16, partition_by="@stream", ordering="key").partition(
        ev(1, stream="a")
    )
    assert plain.partition(ev(1, stream="a")) != plain.partition(ev(1, stream="orders"))


def test_ordering_none_spreads_one_key_over_partitions() -> None:
    router = Router(16, partition_by="customer_id", ordering="none")
    parts = router.split([ev(i, {"customer_id": "same"}) for i in range(200)])
    assert len(parts) > 8
    again = Router(16, partition_by="customer_id", ordering="none")
    assert all(again.partition(e) == p for p, bucket in parts.items() for e in bucket)


def test_one_partition_takes_everything_in_order() -> None:
    events = [ev(i, {"customer_id": f"c{i}"}) for i in range(20)]
    assert by_customer(1).split(events) == {0: events}


def test_empty_batch_has_no_parts() -> None:
    assert by_customer().split([]) == {}


def test_skip_drops_what_a_partition_already_committed() -> None:
    router = by_customer(16)
    events = [ev(i, {"customer_id": c}) for i, c in enumerate(["cust_1", "cust_2"] * 5, start=1)]
    # cust_1 -> partition 7 has committed up to 5-0; cust_2 -> partition 13 has nothing to skip
    parts = router.split(events, skip={7: (5, 0)})
    assert [e.stream_id for e in parts[7]] == ["7-0", "9-0"]
    assert [e.stream_id for e in parts[13]] == ["2-0", "4-0", "6-0", "8-0", "10-0"]


def test_skip_everything_of_a_partition_leaves_no_empty_bucket() -> None:
    parts = by_customer(16).split([ev(1, {"customer_id": "cust_1"})], skip={7: (9, 0)})
    assert parts == {}


def test_keys_the_codec_decodes_route_as_the_whole_data_does() -> None:
    """Routing by a data field, the codec decodes `data` once, with the batch, and keeps it in the event: every
    event lands where its decoded `data` would put it (numbers, nulls, objects, a missing field, a missing
    `data`), and `data` that is not a JSON object is poison at once."""
    datas = [b'{"customer_id":"cust_1","x":[1,{"y":"z"}]}', b'{"customer_id":42}', b'{"other":1}',
             b'{"customer_id":4.5}', b'{"customer_id":null}', b'{"customer_id":{"a":[1]}}']  # fmt: skip
    entries: list[Any] = [[f"{i}-0".encode(), [b"event_type", b"A", b"data", d]] for i, d in enumerate(datas, 1)]
    entries += [[b"8-0", [b"event_type", b"A"]], [b"9-0", [b"event_type", b"A", b"data", b"[1, 2]"]]]
    router = by_customer()
    events, poison, parts = Codec("orders", FieldNames(), router).decode(entries)
    (bad,) = poison
    assert bad.stream_id == "9-0"
    assert bad.error == "TypeError: data: must be a JSON object, not list"  # as a lazy read of `data` says
    assert all("data" in vars(e) for e in events)  # decoded with the batch (8-0 has none: {})
    expected = {e.stream_id: router.partition(ev(0, e.data)) for e in events}  # a plain Event decodes `data` whole
    assert {e.stream_id: router.partition(e) for e in events} == expected
    assert {e.stream_id: p for p, part in router.split(events).items() for e in part} == expected
    # the codec's own split, which inlines the partitioner's formula
    assert parts is not None and {e.stream_id: p for p, part in parts.items() for e in part} == expected


def test_each_shard_decodes_only_the_entries_of_its_partitions() -> None:
    """Routing by a data field, the codec splits the batch as it decodes it; a shard builds only its partitions'
    events (in stream order, split as the router splits them) and reports only their undecodable entries. An
    entry whose key cannot be read belongs to no partition: shard 0 reports it."""
    entries: list[Any] = [
        [f"{i}-0".encode(), [b"event_type", b"A", b"data", f'{{"customer_id": "c{i % 7}"}}'.encode()]]
        for i in range(1, 41)
    ]
    entries[4][1][1] = b"\xff"  # 5-0: an event type that is not UTF-8
    entries[9][1][3] = b"{broken"  # 10-0: no key to route by
    entries.append([b"41-0", None])  # a tombstone: no key either
    whole = Router(4, partition_by="customer_id", ordering="key")
    shards = [Router(4, partition_by="customer_id", ordering="key", shard=Shard(i, 2)) for i in range(2)]
    everything = Codec("orders", FieldNames(), whole).decode(entries)
    owner = whole.partition(ev(0, {"customer_id": "c5"})) % 2  # the shard that owns 5-0
    seen: list[str] = []
    for index, router in enumerate(shards):
        events, poison, parts = Codec("orders", FieldNames(), router).decode(entries)
        assert parts == router.split(everything.events)
        assert events == [e for e in everything.events if router.partitioner.mine[router.partition(e)]]
        expected = (["5-0"] if index == owner else []) + (["10-0", "41-0"] if index == 0 else [])
        assert sorted(p.stream_id for p in poison) == sorted(expected)
        seen += [e.stream_id for e in events]
    assert sorted(seen) == sorted(e.stream_id for e in everything.events)  # each event in exactly one shard


def test_each_undecodable_entry_is_one_shards_to_report() -> None:
    """Entries set apart before routing (too large, or undecodable without a partitioning codec) are reported by
    one shard: the owner of their partition when it does not depend on their data, else shard 0."""
    entries = [Poison("a", f"{i}-0", {}, "tombstone") for i in range(1, 40)] + [Poison("b", "1-0", {}, "too large")]

    def shares(partitions: int, partition_by: str, ordering: str) -> list[list[Poison]]:
        shards = [Shard(i, 3) for i in range(3)]
        return [Router(partitions, partition_by=partition_by, ordering=ordering, shard=s).own(entries) for s in shards]

    cases = [(8, "@stream", "key"), (8, "customer_id", "none"), (8, "customer_id", "key"), (1, "customer_id", "key")]
    for case in cases:
        reported = [(e.stream, e.stream_id) for share in shares(*case) for e in share]
        assert sorted(reported) == sorted((e.stream, e.stream_id) for e in entries), case  # each entry once
    by_stream = shares(8, "@stream", "key")
    for stream in "ab":  # a stream is one partition: one shard reports all its entries
        assert sum(any(e.stream == stream for e in share) for share in by_stream) == 1
    assert sum(map(bool, shares(8, "customer_id", "none"))) > 1  # by entry ID: spread over the shards
    assert [len(share) for share in shares(8, "customer_id", "key")] == [40, 0, 0]  # no key read: shard 0's
    assert Router(8, partition_by="customer_id", ordering="key").own(entries) == entries


def test_an_event_with_no_key_to_route_by_is_shard_0s_to_report() -> None:
    """Events whose key the codec did not decode (routing reads `data` then): one whose `data` cannot be decoded
    is in no partition, and only shard 0 reports it, as with the entries the codec sets apart itself."""
    (bad,) = Codec("orders", FieldNames()).decode([[b"3-0", [b"event_type", b"A", b"data", b"{broken"]]]).events
    events = [ev(1, {"customer_id": "c1"}), ev(2, {"customer_id": "c2"}), bad]
    shards = [Router(4, partition_by="customer_id", ordering="key", shard=Shard(i, 2)) for i in range(2)]
    reported = [[p.stream_id for p in router.route(events, None).poison] for router in shards]
    assert reported == [["3-0"], []]
    routed = [e.stream_id for router in shards for part in router.route(events, None).parts.values() for e in part]
    assert sorted(routed) == ["1-0", "2-0"]
