"""Load handlers and predicates from `package.module:attr` or from the entry-point group `replayd.handlers`.

Every failure is a ConfigError at start-up, naming the plugin: a replay never starts half-configured.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from replayd.errors import ConfigError
from replayd.events import Event
from replayd.handlers import FunctionHandler, Handler, ObjectHandler, Projection

GROUP = "replayd.handlers"


def import_from_string(spec: str) -> Any:
    """`package.module:attr.sub` -> the object (uvicorn's importer, with our error type)."""
    module_name, sep, attrs = spec.partition(":")
    if not sep or not module_name or not attrs:
        raise ConfigError(f"plugin {spec!r}: expected 'package.module:attribute'")
    if os.getcwd() not in sys.path:  # as uvicorn's --app-dir ".": plugins next to the config are importable
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"plugin {spec!r}: cannot import module {module_name!r}: {exc}") from None
    except Exception as exc:
        raise ConfigError(f"plugin {spec!r}: importing {module_name!r} raised {type(exc).__name__}: {exc}") from exc
    for attr in attrs.split("."):
        try:
            obj = getattr(obj, attr)
        except AttributeError:
            raise ConfigError(f"plugin {spec!r}: module {module_name!r} has no attribute {attrs!r}") from None
    return obj


def resolve(spec: str) -> Any:
    """A `module:attr` string, or the name of an entry point in the `replayd.handlers` group."""
    if ":" in spec:
        return import_from_string(spec)
    found = entry_points().select(group=GROUP, name=spec)
    if not found:
        known = sorted(ep.name for ep in entry_points().select(group=GROUP))
        raise ConfigError(f"handler {spec!r}: not 'module:attr' and no entry point of that name (known: {known})")
    entry = next(iter(found))
    try:
        return entry.load()
    except Exception as exc:
        raise ConfigError(f"handler {spec!r}: entry point {entry.value!r} failed to load: {exc}") from exc


def load_handler(spec: str) -> Handler:
    """A Projection class or instance, a function, or an object with handle/handle_batch."""
    return as_handler(resolve(spec), spec.rsplit(":", 1)[-1].rsplit(".", 1)[-1], where=f"handler {spec!r}")


def as_handler(obj: Any, name: str, *, where: str = "handler") -> Handler:
    """`obj` as the engine calls it: a Projection (a class is instantiated), a function, or an object with
    handle/handle_batch (named `name` unless it has a `name`)."""
    if inspect.isclass(obj):
        try:
            obj = obj()
        except Exception as exc:
            raise ConfigError(f"{where}: cannot instantiate {obj.__name__}: {exc}") from exc
    if isinstance(obj, Projection | FunctionHandler | ObjectHandler):
        return obj
    if hasattr(obj, "handle") or hasattr(obj, "handle_batch"):
        return ObjectHandler(obj, name)
    if callable(obj):
        return FunctionHandler(obj, name)
    raise ConfigError(f"{where}: {type(obj).__name__} is not a Projection, function or handler object")


def load_predicate(spec: str) -> Callable[[Event], bool]:
    """A plugin predicate `module:func` taking an Event and returning a bool."""
    obj = import_from_string(spec)
    if not callable(obj) or inspect.iscoroutinefunction(obj):
        raise ConfigError(f"filter {spec!r}: must be a plain (sync) function of one Event returning bool")
    func: Callable[[Event], bool] = obj
    return func


def load_codec(spec: str) -> Callable[..., Any]:
    """A codec plugin `module:func` taking an `Entry` and returning an Event (`replayd.pipeline.codecs`)."""
    obj = import_from_string(spec)
    if not callable(obj) or inspect.iscoroutinefunction(obj):
        raise ConfigError(f"codec {spec!r}: must be a plain (not async) function taking an Entry, returning an Event")
    return obj  # type: ignore[no-any-return]
