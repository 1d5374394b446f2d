"""The peers and the raw limits replayd is compared with.

- the article's code (tests/article.py): `EventReplayer.replay_all` with a no-op handler, and
  `ProjectionRebuilder.rebuild("order_summary")`, on a blocking `redis.Redis` with its default settings;
- the hand-written loop the article's readers write: `redis.asyncio`, XRANGE batches of 1000, `json.loads` of
  every `data`, the handler's writes and a checkpoint in one pipeline (MULTI/EXEC) per batch;
- the raw read limit: the best plain loop over XRANGE with one request always in flight;
- the raw write ceilings of the order_summary shape: a redis-py pipeline, and hiredis-packed commands;
- the sequential loop the I/O-bound handler is compared with, and the floor of its 64 lanes: the same sleeps
  on an event loop with nothing else to do.

Every asyncio client here is `replayd.connection.create_redis`'s (hiredis parser, RESP2, no XRANGE reply
callback), the client replayd itself reads with.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import anyio
import hiredis
import msgspec
import redis
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection

from replayd.config import FieldNames, RedisConfig
from replayd.connection import create_redis
from replayd.pipeline.codec import Codec
from replayd.pipeline.router import Router
from replayd.sample import order_events
from tests.article import EventReplayer, ReplayEvent, order_summary_rebuilder
from tests.bench.core import BATCH, PROJECTION, Sample, clear_projection
from tests.bench.handlers import PARTITION_BY

Command = tuple[str | int | float, ...]

_DATA = b"data"


# --- the article's code -----------------------------------------------------------------------------------------


def _noop(event: ReplayEvent) -> None:
    """The article's handler, minus its print."""


def article_replay(url: str, stream: str) -> Sample:
    """`EventReplayer.replay_all(handler)` with a no-op handler, called as the article calls it: its default
    batch_size of 100 (the article never passes another)."""
    with redis.Redis.from_url(url) as client:
        client.ping()
        start = time.perf_counter()
        count = EventReplayer(client, stream).replay_all(_noop)
        return Sample(count, time.perf_counter() - start)


def article_rebuild(url: str, stream: str) -> Sample:
    """`ProjectionRebuilder.rebuild("order_summary")`: its own clear, one command per write, then the meta hash."""
    with redis.Redis.from_url(url) as client:
        clear_projection(client)
        rebuilder = order_summary_rebuilder(client, stream)
        start = time.perf_counter()
        stats = rebuilder.rebuild(PROJECTION)
        return Sample(stats["total_events"], time.perf_counter() - start, {"processed": stats["processed_events"]})


# --- the hand-written loop -------------------------------------------------------------------------------------


def _order_summary(pipe: Any, event_type: bytes, data: dict[str, Any]) -> None:
    """The article's order_summary writes for one event, queued on a redis-py pipeline."""
    prefix = f"projection:{PROJECTION}"
    if event_type == b"OrderCreated":
        customer_key = f"{prefix}:customer:{data['customer_id']}"
        mapping = {"order_id": data["order_id"], "customer_id": data["customer_id"], "total": data["total"]}
        pipe.hset(f"{prefix}:order:{data['order_id']}", mapping=mapping | {"status": "created"})
        pipe.hincrby(customer_key, "order_count", 1)
        pipe.hincrbyfloat(customer_key, "total_spent", data["total"])
    elif event_type in (b"OrderShipped", b"OrderCancelled"):
        status = "shipped" if event_type == b"OrderShipped" else "cancelled"
        pipe.hset(f"{prefix}:order:{data['order_id']}", "status", status)


async def handwritten(url: str, stream: str, project: bool) -> Sample:
    """The loop as a reader of the article writes it with `redis.asyncio` (hiredis replies when installed, as
    here): read 1000 entries, `json.loads` each `data`, queue the handler's writes (the order_summary ones when
    `project`, else none) and the checkpoint on one transactional pipeline, execute it, read on."""
    client = Redis.from_url(url)
    checkpoint = f"handwritten:{stream}:checkpoint"
    try:
        await client.delete(checkpoint)
        start = time.perf_counter()
        count = 0
        after = b"-"
        while True:
            entries: list[tuple[bytes, dict[bytes, bytes]]] = await client.xrange(stream, after, "+", BATCH)  # type: ignore[assignment]
            if not entries:
                break
            pipe = client.pipeline()
            for _entry_id, fields in entries:
                data = json.loads(fields[b"data"])
                if project:
                    _order_summary(pipe, fields[b"event_type"], data)
            last: bytes = entries[-1][0]
            pipe.set(checkpoint, last)
            await pipe.execute()
            count += len(entries)
            after = b"(" + last
        return Sample(count, time.perf_counter() - start)
    finally:
        await client.aclose()


# --- raw read limit -----------------------------------------------------------------------------------------------


async def raw_read(cfg: RedisConfig, stream: str) -> Sample:
    """XRANGE COUNT 1000 from an exclusive start; the next request is written before the current batch is
    decoded (one request in flight on one connection); every `data` field is decoded with msgspec (replayd's
    codec; orjson is slower here)."""
    client = create_redis(cfg)
    assert isinstance(client, Redis)  # one server
    pool = client.connection_pool
    conn: AbstractConnection = await pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        start = time.perf_counter()
        count = 0
        await conn.send_command("XRANGE", stream, "-", "+", "COUNT", BATCH)
        loads = msgspec.json.Decoder().decode
        while True:
            entries: list[Any] = await conn.read_response()
            more = len(entries) == BATCH
            if more:  # in flight while this batch is decoded
                await conn.send_command("XRANGE", stream, b"(" + entries[-1][0], "+", "COUNT", BATCH)
            for _id, flat in entries:
                loads(flat[flat.index(_DATA) + 1])
            count += len(entries)
            if not more:
                break
        return Sample(count, time.perf_counter() - start)
    finally:
        await pool.release(conn)
        await client.aclose()


async def sequential_io(cfg: RedisConfig, stream: str, delay: float = 0.001) -> Sample:
    """The plain loop an I/O-bound handler would otherwise run in: read batches of 1000, await per event (the
    handler is the sleep: like replayd's `SleepPerEvent`, it decodes nothing)."""
    client = create_redis(cfg)
    assert isinstance(client, Redis)  # one server
    pool = client.connection_pool
    conn: AbstractConnection = await pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        start = time.perf_counter()
        count = 0
        after = b"-"
        while True:
            await conn.send_command("XRANGE", stream, after, "+", "COUNT", BATCH)
            entries: list[Any] = await conn.read_response()
            for _entry in entries:
                await anyio.sleep(delay)
            count += len(entries)
            if len(entries) < BATCH:
                break
            after = b"(" + entries[-1][0]
        return Sample(count, time.perf_counter() - start)
    finally:
        await pool.release(conn)
        await client.aclose()


async def lanes_floor(cfg: RedisConfig, stream: str, partitions: int = 64, delay: float = 0.001) -> Sample:
    """The I/O-bound run at zero cost: one task per partition sleeping `delay` once per event of its partition
    (partitioned as replayd partitions the stream by customer), nothing read, decoded or committed. Its time is
    that of the heaviest partition's chain of sleeps on a loop that dozens of timers keep busy: the most any
    replay with this many partitions could achieve against the sequential loop."""
    client = create_redis(cfg)
    try:
        entries: list[Any] = await client.execute_command("XRANGE", stream, "-", "+")
    finally:
        await client.aclose()
    router = Router(partitions, partition_by=PARTITION_BY, ordering="key")
    sizes = Counter(router.partition(event) for event in Codec(stream, FieldNames()).decode(entries).events)

    async def lane(n: int) -> None:
        for _ in range(n):
            await anyio.sleep(delay)

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for n in sizes.values():
            tg.start_soon(lane, n)
    return Sample(len(entries), time.perf_counter() - start, {"heaviest_partition": max(sizes.values())})


# --- raw write ceilings -------------------------------------------------------------------------------------------


def order_summary_commands(n: int) -> list[Command]:
    """The article's order_summary writes for the first `n` events of the sample history, in order.

    Values are what JSON decoding gives (floats and ints), as the article hands them to redis-py.
    """
    prefix = f"projection:{PROJECTION}"
    commands: list[Command] = []
    for fields in order_events(n):
        event_type = fields["event_type"]
        if event_type == "OrderCreated":
            data = msgspec.json.decode(fields["data"])
            order, customer, total = data["order_id"], data["customer_id"], data["total"]
            order_key = f"{prefix}:order:{order}"
            customer_key = f"{prefix}:customer:{customer}"
            commands.append(
                ("HSET", order_key, "order_id", order, "customer_id", customer, "total", total, "status", "created")
            )
            commands.append(("HINCRBY", customer_key, "order_count", 1))
            commands.append(("HINCRBYFLOAT", customer_key, "total_spent", total))
        elif event_type in ("OrderShipped", "OrderCancelled"):
            data = msgspec.json.decode(fields["data"])
            status = "shipped" if event_type == "OrderShipped" else "cancelled"
            commands.append(("HSET", f"{prefix}:order:{data['order_id']}", "status", status))
    return commands


def _chunks(commands: Sequence[Command], size: int) -> Iterator[Sequence[Command]]:
    for i in range(0, len(commands), size):
        yield commands[i : i + size]


async def write_pipeline(cfg: RedisConfig, commands: Sequence[Command], events: int) -> Sample:
    """The writes through `redis.asyncio` pipelines (transaction=False), 1000 commands per round trip."""
    client = create_redis(cfg)
    try:
        await client.ping()
        start = time.perf_counter()
        for chunk in _chunks(commands, BATCH):
            pipe = client.pipeline(transaction=False)
            for command in chunk:
                pipe.execute_command(*command)
            await pipe.execute()
        return Sample(events, time.perf_counter() - start, {"commands": len(commands)})
    finally:
        await client.aclose()


async def write_packed(host: str, port: int, commands: Sequence[Command], events: int) -> Sample:
    """The writes packed with `hiredis.pack_command` (packing timed), 1000 per round trip on one connection,
    replies read with a `hiredis.Reader`."""
    pack = hiredis.pack_command
    reader = hiredis.Reader()
    async with await anyio.connect_tcp(host, port) as sock:
        start = time.perf_counter()
        for chunk in _chunks(commands, BATCH):
            # (hiredis's stub types the argument as a 1-tuple)
            await sock.send(b"".join([pack(command) for command in chunk]))  # type: ignore[arg-type]
            pending = len(chunk)
            while pending:
                reader.feed(await sock.receive(1 << 16))
                while pending and (reply := reader.gets()) is not False:
                    if isinstance(reply, hiredis.ReplyError):
                        raise reply
                    pending -= 1
        return Sample(events, time.perf_counter() - start, {"commands": len(commands)})
