"""A deterministic sample history of the article's order events, for the demo, the tests and the benchmark.

`order_events` yields stream entries in the article's schema (event_id, event_type, data, timestamp,
metadata); the same seed always gives the same entries. About 60% are `OrderCreated`, 25% `OrderShipped`,
8% `OrderCancelled` (both only for orders created earlier), and 7% types the order_summary projection has
no handler for (`PaymentReceived`, `CustomerRegistered`), so skipped counts are exercised too.

Totals are written as JSON numbers with two decimals ("19.90", "20.00") or, for one order in ten, as
integers ("20"). A JSON reader turns those into 19.9, 20.0 and 20, and redis-py stores them as "19.9",
"20.0" and "20": a projection that copies the raw number text, or that normalises numbers, diverges from
the article's rebuild, and the sample is meant to show it.

`load_history` / `load_history_sync` append the entries to a stream with XADD `*` ids, in pipelines.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    import redis
    import redis.asyncio
    from redis.typing import EncodableT, FieldT

__all__ = ["load_history", "load_history_sync", "order_events"]

# Follow-ups pick from the most recent orders only, so memory stays flat however long the history is.
_POOL_SIZE = 50_000

_CARRIERS = ("ups", "fedex", "dhl", "usps")
_REASONS = ("customer_request", "out_of_stock", "payment_failed", "address_invalid")
_METHODS = ("card", "paypal", "bank_transfer")

_META_ORDER = '{"source":"orders-api","entity_type":"order","version":1}'
_META_PAYMENT = '{"source":"payments-api","entity_type":"payment","version":1}'
_META_CUSTOMER = '{"source":"customers-api","entity_type":"customer","version":1}'


def _amount(rng: random.Random) -> str:
    """A JSON number: two decimals kept even when they are zeros, or an integer one time in ten."""
    cents = 500 + int(rng.random() * 100_000)
    if rng.random() < 0.1:
        return str(cents // 100)
    return f"{cents // 100}.{cents % 100:02d}"


def order_events(
    n: int, *, seed: int = 7, customers: int = 10_000, start_ts: float = 1_700_000_000.0
) -> Iterator[dict[str, str]]:
    """Yield `n` entries, one millisecond apart from `start_ts`; the same arguments yield the same entries."""
    rng = random.Random(seed)
    rand = rng.random
    # Ring buffer of (order_id, customer_id) of recent orders.
    pool: list[tuple[str, str]] = []
    orders = 0
    for i in range(n):
        roll = rand()
        # JSON built by hand: an encoder would print 19.90 as 19.9, and the values are plain ASCII with
        # nothing to escape (and an f-string is 2x faster than a JSON encoder, 20x than json.dumps).
        if roll < 0.60 or not pool:
            order_id = f"ord_{orders}"
            customer_id = f"cust_{int(rand() * customers)}"
            if len(pool) < _POOL_SIZE:
                pool.append((order_id, customer_id))
            else:
                pool[orders % _POOL_SIZE] = (order_id, customer_id)
            orders += 1
            event_type = "OrderCreated"
            data = (
                f'{{"order_id":"{order_id}","customer_id":"{customer_id}",'
                f'"total":{_amount(rng)},"items":{1 + int(rand() * 5)}}}'
            )
            metadata = _META_ORDER
        elif roll < 0.93:
            order_id, customer_id = pool[int(rand() * len(pool))]
            metadata = _META_ORDER
            if roll < 0.85:
                event_type = "OrderShipped"
                extra = f'"carrier":"{_CARRIERS[int(rand() * 4)]}"'
            else:
                event_type = "OrderCancelled"
                extra = f'"reason":"{_REASONS[int(rand() * 4)]}"'
            data = f'{{"order_id":"{order_id}","customer_id":"{customer_id}",{extra}}}'
        elif roll < 0.97:
            order_id, customer_id = pool[int(rand() * len(pool))]
            event_type = "PaymentReceived"
            data = (
                f'{{"payment_id":"pay_{i}","order_id":"{order_id}","customer_id":"{customer_id}",'
                f'"amount":{_amount(rng)},"method":"{_METHODS[int(rand() * 3)]}"}}'
            )
            metadata = _META_PAYMENT
        else:
            event_type = "CustomerRegistered"
            customer_id = f"cust_{int(rand() * customers)}"
            data = f'{{"customer_id":"{customer_id}","email":"{customer_id}@example.com"}}'
            metadata = _META_CUSTOMER
        yield {
            "event_id": f"evt-{seed}-{i}",
            "event_type": event_type,
            "data": data,
            # Fixed three decimals: start_ts + i * 0.001 in binary floating point would print as
            # 1700000000.0030003 and the like.
            "timestamp": f"{start_ts + i * 0.001:.3f}",
            "metadata": metadata,
        }


def _chunks(events: Iterator[dict[str, str]], chunk: int) -> Iterator[list[dict[str, str]]]:
    batch: list[dict[str, str]] = []
    for fields in events:
        batch.append(fields)
        if len(batch) >= chunk:
            yield batch
            batch = []
    if batch:
        yield batch


async def load_history(
    redis: redis.asyncio.Redis,
    stream: str,
    n: int,
    *,
    seed: int = 7,
    chunk: int = 5000,
    customers: int = 10_000,
    start_ts: float = 1_700_000_000.0,
) -> int:
    """Append `n` sample events to `stream` with server-assigned ids; return `n`."""
    events = order_events(n, seed=seed, customers=customers, start_ts=start_ts)
    for batch in _chunks(events, max(1, chunk)):
        # No transaction: the history only has to end up complete and in order, not be applied atomically.
        pipe = redis.pipeline(transaction=False)
        for fields in batch:
            pipe.xadd(stream, cast("dict[FieldT, EncodableT]", fields))
        await pipe.execute()
    return n


def load_history_sync(
    redis: redis.Redis,
    stream: str,
    n: int,
    *,
    seed: int = 7,
    chunk: int = 5000,
    customers: int = 10_000,
    start_ts: float = 1_700_000_000.0,
) -> int:
    """Blocking twin of `load_history`, for sync clients."""
    events = order_events(n, seed=seed, customers=customers, start_ts=start_ts)
    for batch in _chunks(events, max(1, chunk)):
        pipe = redis.pipeline(transaction=False)
        for fields in batch:
            pipe.xadd(stream, cast("dict[FieldT, EncodableT]", fields))
        pipe.execute()
    return n
