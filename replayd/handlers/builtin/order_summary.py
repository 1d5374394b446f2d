"""The article's order-summary projection, written as any third-party plugin would be.

Keys (as the article's ProjectionRebuilder leaves them):
    projection:order_summary:order:<order_id>        hash  order_id, customer_id, total, status
    projection:order_summary:customer:<customer_id>  hash  order_count, total_spent
"""

from __future__ import annotations

from replayd.events import Event
from replayd.handlers import Context, Projection, on


class OrderSummary(Projection):
    name = "order_summary"
    # a customer's running total_spent is a float sum: its events must be applied in stream order
    partition_by = "customer_id"

    @on("OrderCreated")
    def created(self, event: Event, ctx: Context) -> None:
        data = event.data
        customer = ctx.key("customer", data["customer_id"])
        ctx.tx.hset(
            ctx.key("order", data["order_id"]),
            mapping={
                "order_id": data["order_id"],
                "customer_id": data["customer_id"],
                "total": data["total"],
                "status": "created",
            },
        )
        ctx.tx.hincrby(customer, "order_count", 1)
        ctx.tx.hincrbyfloat(customer, "total_spent", data["total"])

    @on("OrderShipped")
    def shipped(self, event: Event, ctx: Context) -> None:
        ctx.tx.hset(ctx.key("order", event.data["order_id"]), "status", "shipped")

    @on("OrderCancelled")
    def cancelled(self, event: Event, ctx: Context) -> None:
        ctx.tx.hset(ctx.key("order", event.data["order_id"]), "status", "cancelled")
