"""Which events a job handles: types, the article's entity match, `--where`, plugin predicates (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from replayd.events import Event
from replayd.pipeline.filters import Predicate, build_filter, entity_predicate, parse_where


def ev(
    event_type: str = "OrderCreated",
    data: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
    *,
    stream_id: str = "1-0",
    stream: str = "orders",
    timestamp: float = 1700000000.0,
) -> Event:
    return Event(stream_id, "evt", event_type, data or {}, timestamp, metadata or {}, stream)


def where(text: str) -> Predicate:
    return parse_where(text)


def test_no_conditions_means_no_filter() -> None:
    assert build_filter() is None


def test_types() -> None:
    keep = build_filter(types=["OrderCreated", "OrderShipped"])
    assert keep is not None
    assert keep(ev("OrderCreated"))
    assert keep(ev("OrderShipped"))
    assert not keep(ev("OrderCancelled"))


def test_types_the_handler_does_not_take_are_filtered() -> None:
    keep = build_filter(handled=frozenset({"OrderShipped"}))
    assert keep is not None
    assert keep(ev("OrderShipped"))
    assert not keep(ev("OrderCreated"))


def test_all_conditions_must_hold() -> None:
    keep = build_filter(types=["OrderCreated"], where=["data.total>10"], plugin=lambda e: e.stream == "orders")
    assert keep is not None
    assert keep(ev("OrderCreated", {"total": 11}))
    assert not keep(ev("OrderShipped", {"total": 11}))
    assert not keep(ev("OrderCreated", {"total": 9}))
    assert not keep(ev("OrderCreated", {"total": 11}, stream="other"))


# --- entity: type from data.aggregate_type or metadata.entity_type, ID from data.aggregate_id or data.<type>_id


@pytest.mark.parametrize(
    ("data", "metadata"),
    [
        ({"aggregate_type": "order", "aggregate_id": "42"}, {}),
        ({"order_id": "42"}, {"entity_type": "order"}),
        ({"aggregate_type": "order", "order_id": "42"}, {"entity_type": "customer"}),
        ({"aggregate_type": "", "aggregate_id": "", "order_id": "42"}, {"entity_type": "order"}),
    ],
)
def test_entity_matches(data: dict[str, Any], metadata: dict[str, Any]) -> None:
    assert entity_predicate("order", "42")(ev(data=data, metadata=metadata))


@pytest.mark.parametrize(
    ("data", "metadata"),
    [
        ({"aggregate_type": "customer", "order_id": "42"}, {"entity_type": "order"}),  # data's type wins
        ({"order_id": "43"}, {"entity_type": "order"}),
        ({"order_id": "42"}, {}),  # no type at all
        ({"aggregate_id": "7", "order_id": "42"}, {"entity_type": "order"}),  # aggregate_id wins
        ({"customer_id": "42"}, {"entity_type": "order"}),
        ({"order_id": 42}, {"entity_type": "order"}),  # IDs compare as they are, like the article
    ],
)
def test_entity_does_not_match(data: dict[str, Any], metadata: dict[str, Any]) -> None:
    assert not entity_predicate("order", "42")(ev(data=data, metadata=metadata))


def test_entity_id_may_contain_colons() -> None:
    keep = build_filter(entity="order:eu:42")
    assert keep is not None
    assert keep(ev(data={"order_id": "eu:42"}, metadata={"entity_type": "order"}))


# --- --where


@pytest.mark.parametrize(
    ("text", "data", "expected"),
    [
        ("data.total>1000", {"total": 1500}, True),
        ("data.total>1000", {"total": 1000}, False),
        ("data.total>=1000", {"total": 1000}, True),
        ("data.total<1000", {"total": 999.5}, True),
        ("data.total<=1000", {"total": 1000.0}, True),
        ("data.total<=1000", {"total": 1000.01}, False),
        ("data.total > 1000", {"total": "1500"}, True),  # a numeric string compares as a number
        ("data.total>9", {"total": 10}, True),  # numerically, not as text ("10" < "9")
        ("data.total=20", {"total": 20.0}, True),
        ("data.total==20", {"total": "20"}, True),
        ("data.total!=20", {"total": 21}, True),
        ("data.total!=20", {"total": 20}, False),
        ("data.status=shipped", {"status": "shipped"}, True),
        ("data.status=shipped", {"status": "Shipped"}, False),
        ("data.status!=shipped", {"status": "created"}, True),
        ("data.name~ali", {"name": "Natalie"}, True),
        ("data.name~ali", {"name": "Bob"}, False),
        ("data.total~15", {"total": 1500}, True),
        ("data.name>m", {"name": "zoe"}, True),
        ("data.name>m", {"name": "adam"}, False),
        ("data.name>5", {"name": "abc"}, False),  # text against a number never orders
        ("data.paid=true", {"paid": True}, True),
        ("data.paid=true", {"paid": "true"}, False),
        ("data.paid=false", {"paid": False}, True),
        ("data.note=null", {"note": None}, True),
        ("data.customer.tier=gold", {"customer": {"tier": "gold"}}, True),
        ("data.customer.tier=gold", {"customer": {"tier": "silver"}}, False),
        ("data.customer.address.city=Oslo", {"customer": {"address": {"city": "Oslo"}}}, True),
        ('data.name="Ada Lovelace"', {"name": "Ada Lovelace"}, True),
        ("data.name='Ada Lovelace'", {"name": "Ada Lovelace"}, True),
        ('data.code="a=b"', {"code": "a=b"}, True),
        ('data.empty=""', {"empty": ""}, True),
        ("data.order-ref=x1", {"order-ref": "x1"}, True),
    ],
)
def test_where_on_data(text: str, data: dict[str, Any], expected: bool) -> None:
    assert where(text)(ev(data=data)) is expected


@pytest.mark.parametrize(
    "text",
    [
        "data.total>1",
        "data.total<1",
        "data.total=1",
        "data.total!=1",
        "data.total~1",
        "data.note=null",
        "data.customer.tier!=gold",
        "metadata.source!=x",
    ],
)
def test_a_missing_field_never_matches(text: str) -> None:
    assert not where(text)(ev(data={"customer": "not an object"}))


def test_where_on_metadata() -> None:
    assert where("metadata.source=orders-api")(ev(metadata={"source": "orders-api"}))
    assert not where("metadata.source=orders-api")(ev(metadata={"source": "billing"}))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("event_type=OrderCreated", True),
        ("event_type!=OrderCreated", False),
        ("stream=orders", True),
        ("stream_id=5-1", True),
        ("event_id=evt", True),
        ("timestamp>=1700000000", True),
        ("timestamp>1700000000", False),
    ],
)
def test_where_on_event_attributes(text: str, expected: bool) -> None:
    assert where(text)(ev(stream_id="5-1")) is expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("data.total", "expected PATH OP VALUE"),
        ("", "expected PATH OP VALUE"),
        (">5", "expected PATH OP VALUE"),
        ("data.total>", "expected PATH OP VALUE"),
        ("total>5", "PATH must be"),
        ("data=5", "PATH must be"),
        ("payload.total>5", "PATH must be"),
        ("event_type.x=5", "PATH must be"),
    ],
)
def test_bad_where_raises_a_clear_error(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        parse_where(text)
    assert repr(text) in str(info.value)


def test_build_filter_rejects_a_bad_where() -> None:
    with pytest.raises(ValueError, match="PATH"):
        build_filter(where=["nope"])
