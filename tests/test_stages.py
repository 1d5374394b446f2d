"""The stages a read batch goes down, each on its own: the decode stage, then the poison stage.

The engine's tests run them together against Redis; these hand each stage a batch and look at what it hands down.
"""

from __future__ import annotations

import pytest

from replayd.events import Poison
from replayd.jobs.deadletter import DeadLetters
from replayd.jobs.poison import PoisonStage
from replayd.jobs.progress import Stats
from replayd.ops.metrics import Metrics
from replayd.pipeline.codec import Codec
from replayd.pipeline.decode import Decoder, Read
from replayd.pipeline.router import Router
from replayd.pipeline.source import Batch
from tests.test_codec import raw

STREAM = "orders"


def batch(*entries: tuple[str, str], oversized: tuple[Poison, ...] = ()) -> Batch:
    """A read batch of entries (ID, customer), `{"customer": ...}` as their data; `None` data is undecodable."""
    raws = [raw(i, event_type="OrderCreated", data=f'{{"customer": "{c}"}}' if c else "{") for i, c in entries]
    last = max([i for i, _ in entries] + [p.stream_id for p in oversized], key=lambda i: int(i.partition("-")[0]))
    return Batch(STREAM, raws, (int(last.partition("-")[0]), 0), True, 0.0, oversized)


def decoder(stats: Stats, metrics: Metrics, skip: dict[int, tuple[int, int]] | None = None) -> Decoder:
    router = Router(4, partition_by="customer", ordering="key")
    return Decoder(Codec(STREAM, router=router), router, predicate=None, upcasters=None, skip=skip or {},
                   counts=stats, metrics=metrics, job="j", sizer=None)  # fmt: skip


def test_the_decode_stage_hands_down_the_batch_routed_and_counts_what_it_read() -> None:
    stats, metrics = Stats("j", [STREAM]), Metrics()
    decode = decoder(stats, metrics)
    read = decode(batch(("1-0", "a"), ("2-0", ""), ("3-0", "b"), ("4-0", "a")))
    assert [e.stream_id for e in read.events] == ["1-0", "3-0", "4-0"]
    assert sorted(e.stream_id for events in read.routed.parts.values() for e in events) == ["1-0", "3-0", "4-0"]
    assert read.routed.routed == 3
    assert [p.stream_id for p in read.poison] == ["2-0"], "the entry whose key cannot be read is set apart"
    assert read.first is not None and read.first.stream_id == "1-0"
    assert stats.total == 4
    assert metrics.registry.get_sample_value("replayd_events_read_total", {"stream": STREAM}) == 4


def test_the_decode_stage_drops_what_a_partition_committed_until_the_stream_passes_it() -> None:
    """Resuming: each partition skips its events at or below its checkpoint, only in the batches that reach it."""
    stats, metrics = Stats("j", [STREAM]), Metrics()
    router = Router(4, partition_by="customer", ordering="key")
    a = router.partitioner["a"]
    decode = decoder(stats, metrics, skip={a: (2, 0)})
    first = decode(batch(("1-0", "a"), ("2-0", "a"), ("3-0", "a")))
    assert [e.stream_id for e in first.routed.parts[a]] == ["3-0"]
    assert stats.skipped == 2
    later = decode(batch(("1-0", "a")))  # past the checkpoints now: nothing more is dropped
    assert [e.stream_id for e in later.routed.parts[a]] == ["1-0"]
    assert stats.skipped == 2


def letters(mode: str) -> DeadLetters:
    return DeadLetters("j", mode, retries=0, backoff_s=0.0, key_of=None)


async def settle(mode: str, stats: Stats, metrics: Metrics) -> list[str]:
    """Poison found by three stages, out of stream order; the IDs of the dead letters the stage hands down."""
    read = decoder(stats, metrics)(batch(("1-0", "a"), ("3-0", ""), oversized=(Poison(STREAM, "2-0", {}, "big"),)))
    read = Read(read.batch, read.events, read.routed._replace(poison=[Poison(STREAM, "0-5", {}, "filter")]),
                read.poison)  # fmt: skip
    # no dispatch: only `stop` hands events down from here
    commands = await PoisonStage("j", letters(mode), stats, metrics).settle(read, None)  # type: ignore[arg-type]
    return [str(dict(zip(c[3::2], c[4::2], strict=True))["id"]) for c in commands]


@pytest.mark.anyio
async def test_the_poison_stage_dead_letters_what_each_stage_found_in_stream_order() -> None:
    stats, metrics = Stats("j", [STREAM]), Metrics()
    assert await settle("dead-letter", stats, metrics) == ["0-5", "2-0", "3-0"]
    assert (stats.poison, stats.failed, stats.dead_lettered) == (3, 3, 3)
    failed = {"stream": STREAM, "replay": "j", "outcome": "failed"}
    assert metrics.registry.get_sample_value("replayd_handler_events_total", failed) == 3


@pytest.mark.anyio
async def test_under_skip_the_poison_stage_counts_and_hands_down_no_letters() -> None:
    stats, metrics = Stats("j", [STREAM]), Metrics()
    assert await settle("skip", stats, metrics) == []
    assert (stats.poison, stats.failed, stats.dead_lettered) == (3, 3, 0)
