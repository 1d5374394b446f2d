"""Medians, ratios, the targets (issues 3, 22 and 24), the printed table and the JSON file."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from importlib.metadata import version
from operator import attrgetter
from pathlib import Path
from typing import Any

from tests.bench.core import Sample

MIB = 1024 * 1024


@dataclass(frozen=True)
class Row:
    """A line of the table: a measurement, its peer and its raw limit (keys of the results)."""

    key: str
    label: str
    short: str
    """The name used in the targets' lines."""
    peer: str | None = None
    raw: str | None = None


@dataclass(frozen=True)
class Target:
    """`key`'s rate ≥ `factor` times `ref`'s rate; with `per_event="redis_cpu_s"`, `key`'s Redis CPU per event
    ≤ `factor` times `ref`'s."""

    key: str
    ref: str
    factor: float
    per_event: str | None = None

    def describe(self, labels: dict[str, str]) -> str:
        if self.per_event:
            return f"Redis CPU per event: {labels[self.key]} ≤ {self.factor:g}x {labels[self.ref]}"
        return f"{labels[self.key]} ≥ {self.factor:g}x {labels[self.ref]}"

    def ratio(self, results: dict[str, list[Sample]]) -> float | None:
        if (what := self.per_event) is not None:
            return _paired(results, self.key, self.ref, lambda s: float(s.extra[what]) / s.events)
        return _paired(results, self.key, self.ref)

    def holds(self, ratio: float | None) -> bool | None:
        if ratio is None:
            return None
        return ratio <= self.factor if self.per_event else ratio >= self.factor


FORM_LABELS = {
    "async": "plain async function",
    "sync": "plain sync function",
    "projection": "Projection method",
    "batch": "batch handler",
}

ROWS = [
    Row("article_replay", "article EventReplayer.replay_all, no-op (peer)", "article replayer"),
    Row("raw_read", "raw read limit (XRANGE, 1 in flight, msgspec)", "raw read"),
    Row("handwritten_noop", "hand-written redis.asyncio loop, no-op (peer)", "hand-written loop"),
    *(
        Row(
            f"read_{form}_p{p}",
            f"replayd no-op reading data, {label}, P={p}",
            f"{label} P={p}",
            "handwritten_noop",
            "raw_read",
        )
        for form, label in FORM_LABELS.items()
        for p in (1, 16)
    ),
    Row("article_rebuild", "article ProjectionRebuilder.rebuild (peer)", "article rebuild"),
    Row("write_pipeline", "write ceiling, redis-py pipeline", "pipeline ceiling"),
    Row("write_packed", "write ceiling, hiredis-packed", "hiredis-packed ceiling"),
    Row("handwritten_rebuild", "hand-written loop, order_summary (peer)", "hand-written rebuild"),
    Row("replayd_rebuild", "replayd order_summary rebuild", "rebuild", "handwritten_rebuild", "write_packed"),
    Row("sequential_io", "sequential loop, sleep 1 ms/event (peer)", "sequential loop"),
    Row("io_floor", "64 lanes of bare sleeps, nothing read (ceiling)", "I/O floor", "sequential_io"),
    Row("replayd_io_p64", "replayd sleep 1 ms/event, 64 partitions", "I/O P=64", "sequential_io", "io_floor"),
    Row("count_projection", "replayd count per customer, a Projection (peer)", "Projection"),
    Row("count_function", "replayd count per customer, a plain sync function", "plain function", "count_projection"),
    Row("workers_1", "replayd CPU-bound, --workers 1 (peer)", "workers 1"),
    Row("workers_2", "replayd CPU-bound, --workers 2", "workers 2", "workers_1"),
]

TARGETS = [
    *(
        Target(f"read_{form}_p{p}", "raw_read", 1.0 if form == "batch" else 0.6)
        for form in FORM_LABELS
        for p in (1, 16)
    ),
    Target("replayd_rebuild", "write_packed", 0.85),
    Target("replayd_rebuild", "handwritten_rebuild", 1.0, "redis_cpu_s"),
    Target("replayd_io_p64", "sequential_io", 40),
    Target("workers_2", "workers_1", 1.7),
    Target("count_function", "count_projection", 0.7),
]

RSS_LIMIT_MB = 45.0
RSS_GROWTH_LIMIT_MB = 5.0
"""Peak RSS of the 10M-event replay over the 1M one: flat is within this."""


def median_rate(samples: list[Sample]) -> float:
    return float(statistics.median(s.rate for s in samples))


def median_rss_mb(samples: list[Sample]) -> float:
    return float(statistics.median(s.extra["peak_rss_kib"] for s in samples)) / 1024


def summarise(results: dict[str, list[Sample]], anatomy: dict[str, list[float]] | None = None) -> dict[str, Any]:
    """Medians, ratios and target verdicts (None: not measured); `anatomy`: Redis CPU µs per event of each
    commit-script variant, per round."""
    rates = {key: median_rate(samples) for key, samples in results.items() if samples}
    labels = {row.key: row.short for row in ROWS}
    rows = []
    for row in ROWS:
        rate = rates.get(row.key)
        runs = results.get(row.key, [])
        rows.append(
            {
                "key": row.key,
                "label": row.label,
                "events_per_s": rate,
                "redis_cpu_us_per_event": _median_per_event(runs, "redis_cpu_s"),
                "client_cpu_us_per_event": _median_per_event(runs, "client_cpu_s"),
                "peer": row.peer,
                "vs_peer": _paired(results, row.key, row.peer),
                "raw": row.raw,
                "vs_raw": _paired(results, row.key, row.raw),
                "runs": [_sample_json(s) for s in runs],
            }
        )
    targets = []
    for target in TARGETS:
        ratio = target.ratio(results)
        targets.append(
            {"target": target.describe(labels), "ratio": ratio, "required": target.factor,
             "holds": target.holds(ratio)}
        )  # fmt: skip
    script: dict[str, Any] = {}
    if anatomy:
        script = {name: statistics.median(values) for name, values in anatomy.items()}
        first, last = next(iter(anatomy.values())), list(anatomy.values())[-1]
        ratio = statistics.median(a / b for a, b in zip(first, last, strict=True) if b > 0)
        targets.append(
            {"target": "Redis CPU per committed event: commit script ≤ 1x a plain pipeline of the same writes",
             "ratio": ratio, "required": 1.0, "holds": ratio <= 1.0}
        )  # fmt: skip
    rss: dict[str, Any] = {}
    for key in ("rss_1m", "rss_10m"):
        if results.get(key):
            rss[key + "_mb"] = median_rss_mb(results[key])
            rss[key + "_runs"] = [_sample_json(s) for s in results[key]]
    peak = rss.get("rss_1m_mb")
    targets.append(
        {"target": f"peak RSS of the replay ≤ {RSS_LIMIT_MB:g} MB", "ratio": peak, "required": RSS_LIMIT_MB,
         "holds": None if peak is None else peak <= RSS_LIMIT_MB}
    )  # fmt: skip
    growth = rss["rss_10m_mb"] - rss["rss_1m_mb"] if "rss_10m_mb" in rss and "rss_1m_mb" in rss else None
    rss["growth_mb"] = growth
    targets.append(
        {
            "target": f"peak RSS flat: 10M events ≤ the replay's + {RSS_GROWTH_LIMIT_MB:g} MB",
            "ratio": growth,
            "required": RSS_GROWTH_LIMIT_MB,
            "holds": None if growth is None else growth <= RSS_GROWTH_LIMIT_MB,
        }
    )
    return {"rows": rows, "targets": targets, "rss": rss, "script_us_per_event": script}


def _median_per_event(samples: list[Sample], what: str) -> float | None:
    values = [s.extra[what] / s.events * 1e6 for s in samples if what in s.extra and s.events]
    return float(statistics.median(values)) if values else None


def _paired(
    results: dict[str, list[Sample]],
    key: str,
    ref: str | None,
    figure: Callable[[Sample], float] = attrgetter("rate"),
) -> float | None:
    """The median over the rounds of key's rate (or other `figure`) / ref's in the same round.

    Both ran minutes apart at most, under the same load: on a shared machine the paired ratio is steadier
    than a ratio of medians (it equals it when the load is steady)."""
    samples, refs = results.get(key), results.get(ref or "")
    if not samples or not refs:
        return None
    ratios = [figure(s) / figure(r) for s, r in zip(samples, refs, strict=False) if figure(r) > 0]
    return float(statistics.median(ratios)) if ratios else None


def _sample_json(sample: Sample) -> dict[str, Any]:
    figures = {"events": sample.events, "seconds": round(sample.seconds, 4), "events_per_s": round(sample.rate, 1)}
    return figures | {k: v for k, v in sample.extra.items() if isinstance(v, int | float | bool)}


def _mark(holds: bool | None) -> str:
    return "-" if holds is None else ("✓" if holds else "✗")


def _x(ratio: float | None) -> str:
    return "" if ratio is None else f"{ratio:.2f}x"


def render(summary: dict[str, Any], notes: list[str]) -> str:
    """The table, the commit script's anatomy, the RSS figures, the targets, then notes."""
    head = f"{'measurement':<56} {'events/s':>10} {'x peer':>7} {'x raw':>7} {'client':>7} {'redis':>6}"
    lines = [head, f"{'':<56} {'':>10} {'':>7} {'':>7} {'µs/ev':>7} {'µs/ev':>6}", "-" * len(head)]
    for row in summary["rows"]:
        rate = row["events_per_s"]
        shown = "not run" if rate is None else f"{rate:,.0f}"
        lines.append(
            f"{row['label']:<56} {shown:>10} {_x(row['vs_peer']):>7} {_x(row['vs_raw']):>7} "
            f"{_us(row['client_cpu_us_per_event']):>7} {_us(row['redis_cpu_us_per_event']):>6}"
        )
    if summary["script_us_per_event"]:
        lines += ["", "commit script anatomy (Redis CPU µs per committed event, same writes):"]
        lines += [f"  {name:<62} {us:5.2f}" for name, us in summary["script_us_per_event"].items()]
    if summary.get("wire"):
        lines += [
            "",
            "bytes per event: "
            + ", ".join(f"{k.removesuffix('_per_event')} {v:g}" for k, v in summary["wire"].items()),
        ]
    rss = summary["rss"]
    lines.append("")
    for key, label in (
        ("imports_mb", "peak RSS, the CLI's imports alone"),
        ("rss_1m_mb", "peak RSS, CLI replay of the history"),
        ("rss_10m_mb", "peak RSS, 10M events"),
    ):
        value = rss.get(key)
        lines.append(f"{label:<56} {'not run' if value is None else f'{value:,.1f} MB':>10}")
    if rss.get("growth_mb") is not None:
        lines.append(f"{'peak RSS growth → 10M':<56} {rss['growth_mb']:>7,.1f} MB")
    lines += ["", "targets (issues 3, 22 and 24; ratios are medians of same-round ratios):"]
    for target in summary["targets"]:
        ratio = target["ratio"]
        shown = "not measured" if ratio is None else (f"{ratio:.1f} MB" if "RSS" in target["target"] else _x(ratio))
        lines.append(f"  {_mark(target['holds'])} {target['target']}: {shown}")
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)


def _us(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def machine_info(redis_version: str) -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "")
    except OSError:
        model = platform.processor()
    try:
        nproc = subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        nproc = str(len(os.sched_getaffinity(0)))
    packages = {name: _version(name) for name in ("replayd", "redis", "hiredis", "msgspec", "anyio", "uvloop")}
    return {
        "commit": _commit(),
        "nproc": int(nproc),
        "cpu_model": model,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "redis_server": redis_version,
        "packages": packages,
    }


def _commit() -> str:
    """The checked-out commit (with `+dirty` when the work tree has changes), or '' outside a git clone."""
    try:
        run = partial(subprocess.run, capture_output=True, text=True, check=True, cwd=Path(__file__).parent)
        head = run(["git", "rev-parse", "--short", "HEAD"]).stdout.strip()
        dirty = run(["git", "status", "--porcelain", "--untracked-files=no"]).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""
    return head + ("+dirty" if dirty else "")


def markdown(document: dict[str, Any]) -> str:
    """The table of docs/performance.md: the commit, the machine, the load, the measurements and the targets."""
    info, summary = document["machine"], document["summary"]
    load = " → ".join(f"{pair[0]:.1f}" for pair in (info["load_average_at_start"], info["load_average_at_end"]))
    lines = [
        f"`make bench` at commit `{info.get('commit') or 'unknown'}` on {info['cpu_model']} ({info['nproc']} CPUs), "
        f"Python {info['python']}, redis-server {info['redis_server']} (embedded, no persistence); "
        f"{document['config']['events']:,} events, {document['config']['repeat']} interleaved rounds; load average "
        f"{load} (the machine was shared: ratios of paired, same-round runs are what counts, not events/s).",
        "",
        "| measurement | events/s | x peer | x raw | client µs/event | Redis µs/event |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in summary["rows"]:
        rate = row["events_per_s"]
        lines.append(
            f"| {row['label']} | {'not run' if rate is None else f'{rate:,.0f}'} | {_x(row['vs_peer'])} | "
            f"{_x(row['vs_raw'])} | {_us(row['client_cpu_us_per_event'])} | {_us(row['redis_cpu_us_per_event'])} |"
        )
    if summary.get("script_us_per_event"):
        lines += ["", "| commit of the same writes | Redis µs/event |", "| --- | ---: |"]
        lines += [f"| {name.strip()} | {us:.2f} |" for name, us in summary["script_us_per_event"].items()]
    rss = summary["rss"]
    lines += ["", "| target | measured | holds |", "| --- | ---: | :---: |"]
    for target in summary["targets"]:
        ratio = target["ratio"]
        shown = "not measured" if ratio is None else (f"{ratio:.1f} MB" if "RSS" in target["target"] else _x(ratio))
        lines.append(f"| {target['target']} | {shown} | {_mark(target['holds'])} |")
    if rss.get("rss_1m_mb") is not None:
        imports = f" (its imports alone: {rss['imports_mb']:.1f} MB)" if rss.get("imports_mb") else ""
        lines += ["", f"Peak RSS of the CLI replay: {rss['rss_1m_mb']:.1f} MB{imports}."]
    if summary.get("wire"):
        wire = ", ".join(f"{k.removesuffix('_per_event').replace('_', ' ')} {v:g}" for k, v in summary["wire"].items())
        lines += ["", f"Per event: {wire}."]
    return "\n".join(lines) + "\n"


def _version(name: str) -> str | None:
    try:
        return version(name)
    except Exception:  # noqa: BLE001 - a missing distribution is reported as None
        return None


if __name__ == "__main__":  # `python -m tests.bench.report bench-results.json`: the docs' table from a run's JSON
    sys.stdout.write(markdown(json.loads(Path(sys.argv[1]).read_text())))
