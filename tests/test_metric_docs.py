"""The metric table of docs/operations.md is the metric set: every metric replayd exports has a row, every row is
exported, with the type the row says (.ci/lint-deploy checks the alerts and the dashboard against the same rows)."""

from __future__ import annotations

import re
from pathlib import Path

from replayd.ops.metrics import Metrics

DOCS = Path(__file__).parent.parent / "docs" / "operations.md"


def documented() -> dict[str, str]:
    rows = re.findall(r"^\| `(replayd_[a-z0-9_]+)` \| ([a-z]+)", DOCS.read_text(), re.M)
    return dict(rows)


def exported() -> dict[str, str]:
    families = Metrics().registry.collect()
    return {
        family.name + ("_total" if family.type == "counter" else "") + ("_info" if family.type == "info" else ""):
        family.type
        for family in families
        if family.name.startswith("replayd_")
    }  # fmt: skip


def test_every_exported_metric_has_a_row_and_every_row_is_exported() -> None:
    rows, metrics = documented(), exported()
    assert sorted(rows) == sorted(metrics)
    for name, kind in metrics.items():
        assert rows[name] == ("gauge" if kind in ("info", "stateset") else kind), name
