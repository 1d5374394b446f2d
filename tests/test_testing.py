"""`replayd.testing`: events in, what the handler wrote out, through the engine on the harness's own Redis."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from replayd import Context, Event
from replayd.errors import ConfigError, DataError
from replayd.testing import Harness, replayd_harness, run_events  # noqa: F401 - the fixture, as users import it
from tests.plugins import Recorder

pytestmark = pytest.mark.anyio

DOCS = Path(__file__).parents[1] / "docs" / "handlers.md"
EXAMPLE = Path(__file__).parent / "test_docs_example.py"


def test_the_docs_show_the_example_test_the_suite_runs() -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.DOTALL)
    assert EXAMPLE.read_text() in blocks


def index(event: Event, ctx: Context) -> None:
    ctx.tx.sadd(ctx.key("types"), event.event_type)
    ctx.tx.rpush(ctx.key("stream", event.stream), event.event_id)


async def test_events_and_dicts_from_several_streams_go_through_the_engine(
    replayd_harness: Harness,  # noqa: F811 - the fixture imported above
) -> None:
    events: list[Event | dict[str, Any]] = [
        {"event_type": "A", "event_id": "a1"},
        Event("0-0", "b1", "B", {}, 1.0, {}, "other"),
        {"event_type": "A", "event_id": "a2", "data": {"n": 1}},
    ]
    result = await replayd_harness.run(index, events)
    assert result.namespace == "projection:index"
    assert result.projection == {"types": {"A", "B"}, "stream:events": ["a1", "a2"], "stream:other": ["b1"]}
    assert result.keys["projection:index:types"] == {"A", "B"}
    assert (result.stats.processed, result.stats.total) == (3, 3)


async def test_each_run_starts_from_an_empty_redis() -> None:
    await run_events(index, [{"event_type": "A", "event_id": "x"}])
    result = await run_events(index, [{"event_type": "B", "event_id": "y"}])
    assert result.projection == {"types": {"B"}, "stream:events": ["y"]}


async def test_job_settings_apply_and_a_failing_handler_raises() -> None:
    events = [{"event_type": "OrderCreated", "data": {"order": "o1", "customer": "a", "amount": "1.5"}}]
    recorder = Recorder()
    await run_events(recorder, events, upcasters="tests.plugins:ORDER_UPCASTERS")
    assert recorder.events[0].data == {"order_id": "o1", "customer_id": "a", "total_cents": 150}
    with pytest.raises(DataError, match="handler failed for good"):
        await run_events(Recorder(fail_on=lambda e: True), events, retries=0)


async def test_an_event_without_a_type_is_refused() -> None:
    with pytest.raises(ConfigError, match="event 1: needs an event_type"):
        await run_events(index, [{"event_type": "A"}, {"data": {}}])
