"""Handlers and predicates the tests load by name (`tests.plugins:...`) or pass to the engine directly."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

from replayd.errors import StopReplay
from replayd.events import Event
from replayd.handlers import Context, Projection, on
from replayd.handlers.upcast import Upcasters
from replayd.pipeline.codecs import Entry

record_event_log: list[tuple[str, int]] = []
"""What `record_event` saw: (entry ID, thread ident)."""


def record_event(event: Event) -> None:
    """A plain sync function handler."""
    record_event_log.append((event.stream_id, threading.get_ident()))


def big_orders(event: Event) -> bool:
    """A plugin predicate: orders with a total of 100 or more."""
    total = event.data.get("total")
    return isinstance(total, int | float) and total >= 100


class Recorder:
    """Records what it handles and which hooks ran; optionally writes per event, fails or stops on some."""

    name = "recorder"

    def __init__(
        self,
        *,
        partition_by: str | None = None,
        write: bool = False,
        fail_on: Callable[[Event], bool] | None = None,
        stop_on: Callable[[Event], bool] | None = None,
        decode: bool = False,
    ) -> None:
        self.partition_by = partition_by
        self.decode = decode
        """Read every field of each event (fields are decoded when first read: this finds the undecodable)."""
        self.write = write
        self.fail_on = fail_on
        self.stop_on = stop_on
        self.events: list[Event] = []
        self.replaying: list[bool] = []
        self.hooks: list[str] = []

    @property
    def ids(self) -> list[str]:
        return [e.stream_id for e in self.events]

    async def startup(self, ctx: Context) -> None:
        self.hooks.append("startup")

    async def handle(self, event: Event, ctx: Context) -> None:
        self.record(event, ctx)

    def record(self, event: Event, ctx: Context) -> None:
        if self.decode:
            event.astuple()
        if self.write:
            ctx.tx.set(ctx.key("seen", event.stream_id), event.event_type)
        if self.fail_on is not None and self.fail_on(event):
            raise RuntimeError(f"handler fails on {event.stream_id}")
        self.events.append(event)
        self.replaying.append(ctx.replaying)
        if self.stop_on is not None and self.stop_on(event):
            raise StopReplay

    async def on_caught_up(self, ctx: Context) -> None:
        self.hooks.append("on_caught_up")

    async def shutdown(self, ctx: Context) -> None:
        self.hooks.append("shutdown")


class SyncRecorder(Recorder):
    """A Recorder whose `handle` never awaits: the engine calls it inline, without lanes."""

    def handle(self, event: Event, ctx: Context) -> None:  # type: ignore[override]
        self.record(event, ctx)


class BatchRecorder:
    """A handler object with `handle_batch` only."""

    name = "batches"

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    async def handle_batch(self, events: list[Event], ctx: Context) -> None:
        self.batches.append([e.stream_id for e in events])
        for event in events:
            ctx.tx.sadd(ctx.key("ids"), event.stream_id)


class Notifier(Projection):
    """A projection with a side effect that must not run for replayed history."""

    name = "notifier"

    def __init__(self) -> None:
        self.applied: list[str] = []
        self.notified: list[str] = []

    @on("OrderCreated")
    def created(self, event: Event, ctx: Context) -> None:
        self.applied.append(event.stream_id)

    @on("OrderShipped", replay=False)
    def notify(self, event: Event, ctx: Context) -> None:
        self.notified.append(event.stream_id)


def order_v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    """OrderCreated v1 named its fields `order`, `customer`, and sent `amount` as text in dollars."""
    if data.get("bad"):
        raise ValueError("cannot read this order")
    return {"order_id": data["order"], "customer_id": data["customer"], "amount": float(data["amount"])}


def order_v2_to_v3(data: dict[str, Any]) -> dict[str, Any]:
    """v3 counts cents."""
    amount = data.pop("amount")
    return {**data, "total_cents": round(amount * 100)}


ORDER_UPCASTERS = Upcasters({("OrderCreated", 1): order_v1_to_v2, ("OrderCreated", 2): order_v2_to_v3})
"""OrderCreated v1 -> v2 -> v3 (version in `metadata.schema_version`, 1 when absent)."""


class OrderTotals(Projection):
    """Written for OrderCreated v3 only: older versions reach it upcast."""

    name = "order_totals"
    partition_by = "customer_id"
    upcasters = ORDER_UPCASTERS

    def __init__(self) -> None:
        self.versions: list[int] = []

    @on("OrderCreated")
    def created(self, event: Event, ctx: Context) -> None:
        data = event.data
        self.versions.append(event.metadata["schema_version"])
        ctx.tx.hset(ctx.key("order", data["order_id"]), mapping={"customer": data["customer_id"],
                                                                 "cents": data["total_cents"]})  # fmt: skip
        ctx.tx.hincrby(ctx.key("customer", data["customer_id"]), "cents", data["total_cents"])


async def always_fail(event: Event) -> None:
    """An async handler that fails on every event (its retries happen while the first failure is being handled)."""
    raise RuntimeError(f"cannot handle {event.stream_id}")


def pipe_codec(entry: Entry) -> Event:
    """A codec plugin for a producer of its own: one field `e` holding `<type>|<JSON data>`."""
    kind, sep, body = str(entry.fields["e"]).partition("|")
    if not sep:
        raise ValueError("no '|' between type and data")
    return Event(entry.stream_id, entry.stream_id, kind, json.loads(body), 0.0, {}, entry.stream)
