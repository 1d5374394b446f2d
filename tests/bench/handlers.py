"""Handlers the benchmark runs through replayd (also loadable as `tests.bench.handlers:<Name>` by the CLI).

- `SleepPerEvent`: an I/O-bound handler (`await anyio.sleep(0.001)` per event) that records the order in which
  it saw the events' IDs, so the benchmark can check afterwards that per-key order was kept.
- `Cpu`: a CPU-bound handler, about 50 µs of pure-Python work per event (for `--workers`).
- `count_orders` and `CountOrders`: the same small projection (an order count per customer, queued on `ctx.tx`)
  as a plain sync function and as a `Projection`, to compare what each form costs.
- `read_data_async`, `read_data_sync`, `ReadData` and `ReadDataBatch`: the no-op as users write it, reading every
  event's `data` (so it is decoded), as a plain async function, a plain sync function, a `Projection` method and a
  batch handler.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from typing import Any

import anyio

from replayd.events import Event, Id, parse_id
from replayd.handlers import Context, Outcome, Projection, on

PARTITION_BY = "customer_id"
"""Every benchmark handler partitions by customer, as the order_summary projection does."""

BURN_ITERATIONS = 440
"""Loop turns of `burn`: about 50 µs on the 2-core Xeon the benchmark was written on (the run reports the
cost measured on its own machine)."""


def burn(iterations: int = BURN_ITERATIONS) -> int:
    """Deterministic pure-Python work (it holds the GIL throughout, as real CPU-bound handler code does)."""
    x = 0
    for i in range(iterations):
        x = (x * 31 + i) & 0xFFFFFFFF
    return x


class SleepPerEvent:
    """Awaits `delay` seconds per event, then records the event's ID: nothing else, the sleep is the handler.

    It reads nothing from the event (decoding `data` for its key would add a JSON decode per event to the timed
    run): `order_violations` finds each event's key after the run.
    """

    name = "bench_io"
    partition_by = PARTITION_BY

    def __init__(self, delay: float = 0.001) -> None:
        self.delay = delay
        self.handled: list[str] = []
        """Entry IDs in the order the handler finished them."""

    async def handle(self, event: Event, ctx: Context) -> None:
        await anyio.sleep(self.delay)
        self.handled.append(event.stream_id)

    def order_violations(self, keys: dict[str, str]) -> int:
        """How many keys saw their events out of stream order (or one twice), given each entry ID's key."""
        per_key: dict[str, list[Id]] = {}
        for stream_id in self.handled:
            per_key.setdefault(keys[stream_id], []).append(parse_id(stream_id))
        return sum(1 for ids in per_key.values() if any(a >= b for a, b in pairwise(ids)))


class Cpu:
    """Burns about 50 µs of CPU per event."""

    name = "bench_cpu"
    partition_by = PARTITION_BY

    def handle_batch(self, events: Sequence[Event], ctx: Context) -> Outcome:
        for _ in events:
            burn()
        return Outcome(handled=len(events))


def count_orders(event: Event, ctx: Context) -> None:
    """A plain sync function: one HINCRBY per event, committed with the checkpoint."""
    ctx.tx.hincrby(ctx.key("customer", event.data["customer_id"]), "events", 1)


class CountOrders(Projection):
    """`count_orders` as a Projection (sync `@on("*")` method: called inline, no lanes)."""

    name = "bench_count"
    partition_by = PARTITION_BY

    @on("*")
    def count(self, event: Event, ctx: Context) -> None:
        count_orders(event, ctx)


async def read_data_async(event: Event) -> Any:
    """A per-event no-op as a plain `async def`: it reads `data` (decoding it), nothing else."""
    return event.data


def read_data_sync(event: Event) -> Any:
    """`read_data_async` as a plain sync function."""
    return event.data


class ReadData(Projection):
    """`read_data_async` as a sync `Projection` method."""

    name = "bench_read"
    partition_by = PARTITION_BY
    writes_projection = False

    @on("*")
    def read(self, event: Event, ctx: Context) -> Any:
        return event.data


class ReadDataBatch:
    """A batch handler that reads every event's `data`."""

    name = "bench_read_batch"
    partition_by = PARTITION_BY

    def handle_batch(self, events: Sequence[Event], ctx: Context) -> Outcome:
        for event in events:
            event.data  # noqa: B018 - reading it is the work: it decodes the field
        return Outcome(handled=len(events))
