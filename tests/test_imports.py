"""The package's import graph: no cycles, and every module imports only from its own layer or the ones below.

The layers are those docs/architecture.md describes. Every import counts: one inside a function (a cycle hidden in a
function is still a cycle) and one under `if TYPE_CHECKING:` (a module that needs another's types depends on it).
"""

from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

import replayd

PACKAGE = Path(replayd.__file__).parent

LAYERS = [
    ("values", ["replayd.version", "replayd.errors", "replayd.events", "replayd.pipeline.filters",
                "replayd.pipeline.pacing", "replayd.sample", "replayd.embedded"]),
    ("plugin contract", ["replayd.handlers", "replayd.handlers.loader", "replayd.handlers.upcast",
                         "replayd.handlers.timeouts"]),
    ("settings and instruments", ["replayd.config", "replayd.ops.logs", "replayd.ops.metrics"]),
    ("Redis access", ["replayd.connection", "replayd.ops.http"]),
    ("pipeline", ["replayd.pipeline.*", "replayd.handlers.builtin*"]),
    ("jobs", ["replayd.jobs.*"]),
    ("faces", ["replayd.api", "replayd.testing", "replayd.ops.console", "replayd.demo", "replayd.cli",
               "replayd.cli.*", "replayd.__main__", "replayd"]),
]  # fmt: skip
"""Lowest first. A module is in the first layer with a pattern it matches."""


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(("replayd", *path.relative_to(PACKAGE).with_suffix("").parts))
        found[name.removesuffix(".__init__")] = path
    return found


def imports(path: Path, known: set[str]) -> set[str]:
    """The replayd modules `path` imports, wherever in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from replayd.pipeline import codec` imports the module codec; `from replayd.x import name`, x
            found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                      for a in node.names}  # fmt: skip
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found & known


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(path, set(found)) - {name} for name, path in found.items()}


def layer(module: str) -> int:
    for index, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(module, pattern) for pattern in patterns):
            return index
    raise AssertionError(f"{module} is in no layer: add it to LAYERS and to docs/architecture.md")


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the modules along it, or None."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for dep in sorted(edges[module]):
            if state.get(dep) == "open":
                return [*path[path.index(dep) :], dep]
            if dep not in state and (found := visit(dep)):
                return found
        state[module] = "done"
        path.pop()
        return None

    for module in sorted(edges):
        if module not in state and (found := visit(module)):
            return found
    return None


def test_the_package_has_no_import_cycle() -> None:
    found = cycle(graph())
    assert found is None, "import cycle: " + " -> ".join(found or [])


def test_modules_import_only_from_their_layer_or_below() -> None:
    upward = [
        f"{module} ({LAYERS[layer(module)][0]}) imports {dep} ({LAYERS[layer(dep)][0]})"
        for module, deps in graph().items()
        for dep in sorted(deps)
        if layer(dep) > layer(module)
    ]
    assert not upward, "\n".join(upward)


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None
