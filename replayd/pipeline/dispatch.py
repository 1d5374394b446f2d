"""The dispatch stage: a stream's routed read batches into the lanes, within the bound on events in flight.

Each read batch gets its mark (`Watermark`): the stream's floor moves past it once every slice of it is committed,
with the dead letters of its poison in that commit. A batch with nothing to handle only nudges the committer, so
the floor moves over what was filtered out.
"""

from __future__ import annotations

from typing import Any

from replayd.pipeline.commit import Committer
from replayd.pipeline.decode import Read
from replayd.pipeline.lanes import Feed, InFlight
from replayd.pipeline.source import IN_FLIGHT_READS, BatchSizer


class Dispatch:
    """One stream's way down: its feed into the lanes, the job's committer (its watermark) and events in flight."""

    def __init__(
        self, feed: Feed, committer: Committer, inflight: InFlight, sizer: BatchSizer, *, max_in_flight: int
    ) -> None:
        self.feed, self.committer, self.inflight, self.sizer = feed, committer, inflight, sizer
        self.max_in_flight = max_in_flight

    async def __call__(self, read: Read, letters: list[tuple[Any, ...]]) -> None:
        """Hand `read` to its lanes; `letters` (dead letters) commit with its mark."""
        batch, parts = read.batch, read.routed.parts
        mark = self.committer.watermark.add(batch.stream, batch.last_id, len(parts))
        mark.commands = letters
        if not parts:
            await self.committer.nudge()
            return
        # big entries, fewer of them in flight: memory stays near IN_FLIGHT_READS x max_batch_bytes. Lanes get no
        # more than IN_FLIGHT_READS full reads ahead of their commits either: reading further only holds memory,
        # and decoding it all in the first moments takes the event loop from the lanes just started (64 lanes
        # sleeping 1 ms per event: 0.87 -> 0.90-0.92 of the benchmark's floor). A handler called inline is not
        # held back so: its commits overlap its next batches, the more the better.
        fit = self.sizer.fit if self.feed.inline else min(self.sizer.fit, self.sizer.maximum)
        self.inflight.limit = min(self.max_in_flight, IN_FLIGHT_READS * fit)
        await self.inflight.acquire(read.routed.routed)
        await self.feed.deliver(parts, mark, batch.replaying)

    async def drained(self) -> None:
        """Wait until every event handed down is committed."""
        await self.inflight.drained()

    def close(self) -> None:
        """No more batches from this stream: its lanes end when every stream's dispatch is closed."""
        self.feed.close()
