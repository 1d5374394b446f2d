"""The example of docs/handlers.md, "Testing your projection": a user's projection and its test."""

from replayd import Context, Event, Projection, on
from replayd.testing import replay_events


class CustomerTotals(Projection):
    """Orders and their total per customer; a cancelled order is taken off again."""

    name = "customer_totals"
    partition_by = "customer_id"

    @on("OrderCreated")
    def created(self, event: Event, ctx: Context) -> None:
        customer = ctx.key("customer", event.data["customer_id"])
        ctx.tx.hincrby(customer, "orders", 1)
        ctx.tx.hincrbyfloat(customer, "total", event.data["total"])

    @on("OrderCancelled")
    def cancelled(self, event: Event, ctx: Context) -> None:
        customer = ctx.key("customer", event.data["customer_id"])
        ctx.tx.hincrby(customer, "orders", -1)
        ctx.tx.hincrbyfloat(customer, "total", -event.data["total"])


def test_a_cancelled_order_is_taken_off_its_customer_s_total() -> None:
    result = replay_events(
        CustomerTotals(),
        [
            {"event_type": "OrderCreated", "data": {"order_id": "o1", "customer_id": "c1", "total": 20}},
            {"event_type": "OrderCreated", "data": {"order_id": "o2", "customer_id": "c1", "total": 5.5}},
            {"event_type": "OrderCreated", "data": {"order_id": "o3", "customer_id": "c2", "total": 7}},
            {"event_type": "OrderCancelled", "data": {"order_id": "o1", "customer_id": "c1", "total": 20}},
        ],
    )
    assert result.projection["customer:c1"] == {"orders": "1", "total": "5.5"}
    assert result.projection["customer:c2"] == {"orders": "1", "total": "7"}
    assert result.stats.processed == 4
