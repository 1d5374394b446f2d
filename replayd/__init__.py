"""replayd: an event-replay daemon for Redis Streams."""

from __future__ import annotations

from replayd.errors import ConfigError, DataError, ReplaydError, StopReplay
from replayd.events import Event
from replayd.handlers import Context, Handler, Outcome, Projection, Tx, on

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "Context",
    "DataError",
    "Event",
    "Handler",
    "Outcome",
    "Projection",
    "ReplaydError",
    "StopReplay",
    "Tx",
    "__version__",
    "on",
]
