"""replayd: an event-replay daemon for Redis Streams.

The plugin contract (`Projection`, `on`, `Event`, `Context`, `Upcasters`, `StopReplay`) and the Python API
(`replay`, `Replay`, `run`); `replayd.testing` runs a projection over a list of events in a test.
"""

from __future__ import annotations

from replayd.api import Replay, job_spec, replay, run
from replayd.errors import ConfigError, DataError, ReplaydError, StopReplay
from replayd.events import Event
from replayd.handlers import Context, Handler, Outcome, Projection, Tx, on
from replayd.handlers.upcast import Upcasters
from replayd.jobs.progress import Stats
from replayd.version import __version__

__all__ = [
    "ConfigError",
    "Context",
    "DataError",
    "Event",
    "Handler",
    "Outcome",
    "Projection",
    "Replay",
    "ReplaydError",
    "Stats",
    "StopReplay",
    "Tx",
    "Upcasters",
    "__version__",
    "job_spec",
    "on",
    "replay",
    "run",
]
