"""The article's behaviour, re-written from its description as a test oracle and benchmark peer;
not the article's code.

The article is "How to Handle Event Replay with Redis Streams"
(https://oneuptime.com/blog/post/2026-01-21-redis-event-replay-streams/view). This module reproduces what its
replayers select and what its order_summary rebuild leaves in Redis, quirks included, with a blocking
`redis.Redis` client:

- every replay reads XRANGE batches of `batch_size` (100) from an exclusive start, `(<last id>`, except that
  the start "0-0" is read as "-", and stops at the first empty batch;
- `replay_range` is one XRANGE without COUNT, both ends inclusive; `replay_by_time` maps seconds to ids by
  truncating to milliseconds, and ends at `<ms>-9999999999`;
- entries decode with the stdlib json and the defaults event_id = entry id, event_type = "unknown",
  data = metadata = "{}", timestamp = 0; a decoding error ends the replay (it is not counted as an error);
- the rebuild deletes `projection:<name>:*` (SCAN + DEL), then each handler writes with its own non-pipelined
  commands, values passed to redis-py untouched (so floats are stored as repr(), ints as str()), and finally
  `projection:<name>:meta` gets rebuilt_at, total_events and processed_events.

Checkpointed, parallel and monitored replay (the article's later sections) are not modelled.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import redis

logger = logging.getLogger(__name__)

__all__ = [
    "EventReplayer",
    "ProjectionHandler",
    "ProjectionRebuilder",
    "ReplayEvent",
    "SelectiveReplayer",
    "decode_event",
    "order_summary_rebuilder",
]

Entry = tuple[Any, Mapping[Any, Any]]


# Models "Basic Event Replay": the ReplayEvent dataclass.
@dataclass
class ReplayEvent:
    stream_id: str
    event_id: str
    event_type: str
    data: Any
    timestamp: float
    metadata: Any


Handler = Callable[[ReplayEvent], None]


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


# Models "Basic Event Replay": EventReplayer._decode_event (identical in the Selective and Parallel sections).
def decode_event(stream_id: bytes | str, fields: Mapping[Any, Any]) -> ReplayEvent:
    """Decode one XRANGE entry with the article's defaults; bad JSON or timestamps raise."""
    entry_id = _text(stream_id)
    decoded = {_text(k): _text(v) for k, v in fields.items()}
    return ReplayEvent(
        stream_id=entry_id,
        event_id=decoded.get("event_id", entry_id),
        event_type=decoded.get("event_type", "unknown"),
        data=json.loads(decoded.get("data", "{}")),
        timestamp=float(decoded.get("timestamp", 0)),
        metadata=json.loads(decoded.get("metadata", "{}")),
    )


# Models the article's read loop, shared by EventReplayer.replay_from/stream_events and
# SelectiveReplayer.replay_event_types: exclusive start except for "0-0", until an empty batch.
def _batches(client: redis.Redis, stream_key: str, start_id: str, batch_size: int) -> Iterator[list[Entry]]:
    current_id = start_id
    while True:
        min_id = f"({current_id}" if current_id != "0-0" else "-"
        entries = cast("list[Entry]", client.xrange(stream_key, min=min_id, max="+", count=batch_size))
        if not entries:
            return
        yield entries
        current_id = _text(entries[-1][0])


# Models "Basic Event Replay": EventReplayer.
class EventReplayer:
    def __init__(self, redis_client: redis.Redis, stream_key: str) -> None:
        self.redis = redis_client
        self.stream_key = stream_key

    def replay_all(self, handler: Handler, batch_size: int = 100) -> int:
        return self.replay_from("0-0", handler, batch_size)

    def replay_from(self, start_id: str, handler: Handler, batch_size: int = 100) -> int:
        """Entries after `start_id` (exclusive; "0-0" means from the start)."""
        count = 0
        for entries in _batches(self.redis, self.stream_key, start_id, batch_size):
            for stream_id, fields in entries:
                handler(self._decode_event(stream_id, fields))
                count += 1
            logger.info("Replayed %d events", count)
        return count

    def replay_range(self, start_id: str, end_id: str, handler: Handler) -> int:
        """Entries from `start_id` to `end_id`, both inclusive, in a single XRANGE."""
        count = 0
        entries = cast("list[Entry]", self.redis.xrange(self.stream_key, min=start_id, max=end_id))
        for stream_id, fields in entries:
            handler(self._decode_event(stream_id, fields))
            count += 1
        return count

    def replay_by_time(self, start_time: float, end_time: float, handler: Handler) -> int:
        start_id = f"{int(start_time * 1000)}-0"
        # The article's bound: entries of the last millisecond with a sequence number above 9999999999
        # are missed. replayd uses the correct `<ms>-18446744073709551615`.
        end_id = f"{int(end_time * 1000)}-9999999999"
        return self.replay_range(start_id, end_id, handler)

    def stream_events(self, start_id: str = "0-0", batch_size: int = 100) -> Iterator[ReplayEvent]:
        for entries in _batches(self.redis, self.stream_key, start_id, batch_size):
            for stream_id, fields in entries:
                yield self._decode_event(stream_id, fields)

    def _decode_event(self, stream_id: bytes | str, fields: Mapping[Any, Any]) -> ReplayEvent:
        return decode_event(stream_id, fields)


ProjectionHandler = Callable[[Any, str], None]
_H = TypeVar("_H", bound=ProjectionHandler)


# Models "Projection Rebuilding": ProjectionRebuilder.
class ProjectionRebuilder:
    def __init__(self, redis_client: redis.Redis, stream_key: str) -> None:
        self.redis = redis_client
        self.stream_key = stream_key
        self._handlers: dict[str, ProjectionHandler] = {}

    def on_event(self, event_type: str) -> Callable[[_H], _H]:
        def decorator(func: _H) -> _H:
            self._handlers[event_type] = func
            return func

        return decorator

    def rebuild(self, projection_name: str, clear_existing: bool = True) -> dict[str, int]:
        """Return total/processed/skipped/errors; the meta hash keeps only total and processed."""
        stats = {"total_events": 0, "processed_events": 0, "skipped_events": 0, "errors": 0}
        if clear_existing:
            self._clear_projection(projection_name)
        logger.info("Rebuilding projection: %s", projection_name)

        def process_event(event: ReplayEvent) -> None:
            stats["total_events"] += 1
            handler = self._handlers.get(event.event_type)
            if not handler:
                stats["skipped_events"] += 1
                return
            try:
                handler(event.data, projection_name)
                stats["processed_events"] += 1
            except Exception as e:  # noqa: BLE001 - the article counts any handler failure and goes on
                stats["errors"] += 1
                logger.error("Error processing %s: %s", event.event_type, e)  # noqa: TRY400 - as the article

        EventReplayer(self.redis, self.stream_key).replay_all(process_event)
        self.redis.hset(
            f"projection:{projection_name}:meta",
            mapping={
                "rebuilt_at": time.time(),
                "total_events": stats["total_events"],
                "processed_events": stats["processed_events"],
            },
        )
        logger.info("Projection rebuilt: %s", stats)
        return stats

    def _clear_projection(self, projection_name: str) -> None:
        pattern = f"projection:{projection_name}:*"
        cursor = 0
        while True:
            cursor, keys = self.redis.scan(cursor=cursor, match=pattern)
            if keys:
                self.redis.delete(*keys)
            if cursor == 0:
                break


# Models "Projection Rebuilding": the order summary example's three handlers. As in the article, each writes
# with separate commands in this order, so a handler that fails midway leaves its earlier writes behind, and
# values go to redis-py exactly as JSON decoded them.
def order_summary_rebuilder(redis_client: redis.Redis, stream_key: str) -> ProjectionRebuilder:
    """The article's rebuilder with its OrderCreated/OrderShipped/OrderCancelled handlers registered."""
    r = redis_client
    rebuilder = ProjectionRebuilder(r, stream_key)

    @rebuilder.on_event("OrderCreated")
    def handle_order_created(data: Any, projection: str) -> None:
        order_id = data["order_id"]
        r.hset(
            f"projection:{projection}:order:{order_id}",
            mapping={
                "order_id": order_id,
                "customer_id": data["customer_id"],
                "total": data["total"],
                "status": "created",
            },
        )
        r.hincrby(f"projection:{projection}:customer:{data['customer_id']}", "order_count", 1)
        r.hincrbyfloat(f"projection:{projection}:customer:{data['customer_id']}", "total_spent", data["total"])

    @rebuilder.on_event("OrderShipped")
    def handle_order_shipped(data: Any, projection: str) -> None:
        order_id = data["order_id"]
        r.hset(f"projection:{projection}:order:{order_id}", "status", "shipped")

    @rebuilder.on_event("OrderCancelled")
    def handle_order_cancelled(data: Any, projection: str) -> None:
        order_id = data["order_id"]
        r.hset(f"projection:{projection}:order:{order_id}", "status", "cancelled")

    return rebuilder


# Models "Selective Event Replay": SelectiveReplayer. Its time and id ranges are EventReplayer's.
class SelectiveReplayer:
    def __init__(self, redis_client: redis.Redis, stream_key: str) -> None:
        self.redis = redis_client
        self.stream_key = stream_key

    def replay_event_types(self, event_types: set[str], handler: Handler, batch_size: int = 100) -> int:
        count = 0
        for entries in _batches(self.redis, self.stream_key, "0-0", batch_size):
            for stream_id, fields in entries:
                event = self._decode_event(stream_id, fields)
                if event.event_type in event_types:
                    handler(event)
                    count += 1
        return count

    def replay_for_entity(self, entity_type: str, entity_id: str, handler: Handler) -> int:
        """The whole `events:<type>:<id>` stream if it exists, else matching events of the main stream."""
        entity_stream = f"events:{entity_type}:{entity_id}"
        if self.redis.exists(entity_stream):
            return EventReplayer(self.redis, entity_stream).replay_all(handler)

        count = 0
        for event in EventReplayer(self.redis, self.stream_key).stream_events():
            # `or`, not a presence test: a falsy aggregate_type ("", 0, null) falls through to the
            # metadata, and a falsy aggregate_id to `<type>_id`.
            event_entity_type = event.data.get("aggregate_type") or event.metadata.get("entity_type")
            event_entity_id = event.data.get("aggregate_id") or event.data.get(f"{entity_type}_id")
            if event_entity_type == entity_type and event_entity_id == entity_id:
                handler(event)
                count += 1
        return count

    def replay_with_filter(
        self, filter_func: Callable[[ReplayEvent], bool], handler: Handler, batch_size: int = 100
    ) -> int:
        count = 0
        for event in EventReplayer(self.redis, self.stream_key).stream_events(batch_size=batch_size):
            if filter_func(event):
                handler(event)
                count += 1
        return count

    def replay_range(self, start_id: str, end_id: str, handler: Handler) -> int:
        return EventReplayer(self.redis, self.stream_key).replay_range(start_id, end_id, handler)

    def replay_by_time(self, start_time: float, end_time: float, handler: Handler) -> int:
        return EventReplayer(self.redis, self.stream_key).replay_by_time(start_time, end_time, handler)

    def _decode_event(self, stream_id: bytes | str, fields: Mapping[Any, Any]) -> ReplayEvent:
        return decode_event(stream_id, fields)
