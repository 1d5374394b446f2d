"""replayd: an event-replay daemon for Redis Streams.

The plugin contract (`Projection`, `on`, `Event`, `Context`, `Upcasters`, `StopReplay`) and the Python API
(`replay`, `Replay`, `run`); `replayd.testing` runs a projection over a list of events in a test.

Every name is imported on first use: a plugin's `from replayd import Projection, on` (and the workers the CLI
starts, which import plugins) does not load the engine, its settings and its clients.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from replayd.version import __version__

if TYPE_CHECKING:
    from replayd.api import Replay, job_spec, replay, run
    from replayd.errors import ConfigError, DataError, ReplaydError, StopReplay
    from replayd.events import Event
    from replayd.handlers import Context, Handler, Outcome, Projection, Tx, on
    from replayd.handlers.upcast import Upcasters
    from replayd.jobs.progress import Stats

_WHERE = {
    "replayd.api": ("Replay", "job_spec", "replay", "run"),
    "replayd.errors": ("ConfigError", "DataError", "ReplaydError", "StopReplay"),
    "replayd.events": ("Event",),
    "replayd.handlers": ("Context", "Handler", "Outcome", "Projection", "Tx", "on"),
    "replayd.handlers.upcast": ("Upcasters",),
    "replayd.jobs.progress": ("Stats",),
}
_MODULE = {name: module for module, names in _WHERE.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _MODULE.get(name)
    if module is None:
        raise AttributeError(f"module 'replayd' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


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
