"""Medians, ratios, the targets of issue 3, the printed table and the JSON file."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
from dataclasses import dataclass
from importlib.metadata import version
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
    """`key`'s rate ≥ `factor` times `ref`'s rate."""

    key: str
    ref: str
    factor: float

    def describe(self, labels: dict[str, str]) -> str:
        return f"{labels[self.key]} ≥ {self.factor:g}x {labels[self.ref]}"


ROWS = [
    Row("article_replay", "article EventReplayer.replay_all, no-op (peer)", "article replayer"),
    Row("raw_read", "raw read limit (XRANGE, 1 in flight, msgspec)", "raw read"),
    Row("replayd_noop_p1", "replayd no-op, 1 partition", "no-op P=1", "article_replay", "raw_read"),
    Row("replayd_noop_p16", "replayd no-op, 16 partitions", "no-op P=16", "article_replay", "raw_read"),
    Row("article_rebuild", "article ProjectionRebuilder.rebuild (peer)", "article rebuild"),
    Row("write_pipeline", "write ceiling, redis-py pipeline", "pipeline ceiling"),
    Row("write_packed", "write ceiling, hiredis-packed", "hiredis-packed ceiling"),
    Row("replayd_rebuild", "replayd order_summary rebuild", "rebuild", "article_rebuild", "write_packed"),
    Row("sequential_io", "sequential loop, sleep 1 ms/event (peer)", "sequential loop"),
    Row("io_floor", "64 lanes of bare sleeps, nothing read (ceiling)", "I/O floor", "sequential_io"),
    Row("replayd_io_p64", "replayd sleep 1 ms/event, 64 partitions", "I/O P=64", "sequential_io", "io_floor"),
    Row("count_projection", "replayd count per customer, a Projection (peer)", "Projection"),
    Row("count_function", "replayd count per customer, a plain sync function", "plain function", "count_projection"),
    Row("workers_1", "replayd CPU-bound, --workers 1 (peer)", "workers 1"),
    Row("workers_2", "replayd CPU-bound, --workers 2", "workers 2", "workers_1"),
]

TARGETS = [
    Target("replayd_noop_p1", "raw_read", 0.7),
    Target("replayd_noop_p1", "article_replay", 4),
    Target("replayd_noop_p16", "raw_read", 0.7),
    Target("replayd_noop_p16", "article_replay", 4),
    Target("replayd_rebuild", "write_packed", 0.5),
    Target("replayd_io_p64", "sequential_io", 40),
    Target("workers_2", "workers_1", 1.7),
    Target("count_function", "count_projection", 0.7),
]

RSS_GROWTH_LIMIT_MB = 20.0


def median_rate(samples: list[Sample]) -> float:
    return float(statistics.median(s.rate for s in samples))


def median_rss_mb(samples: list[Sample]) -> float:
    return float(statistics.median(s.extra["peak_rss_kib"] for s in samples)) / 1024


def summarise(results: dict[str, list[Sample]]) -> dict[str, Any]:
    """Medians, ratios and target verdicts (None: not measured)."""
    rates = {key: median_rate(samples) for key, samples in results.items() if samples}
    labels = {row.key: row.short for row in ROWS}
    rows = []
    for row in ROWS:
        rate = rates.get(row.key)
        rows.append(
            {
                "key": row.key,
                "label": row.label,
                "events_per_s": rate,
                "peer": row.peer,
                "vs_peer": _paired(results, row.key, row.peer),
                "raw": row.raw,
                "vs_raw": _paired(results, row.key, row.raw),
                "runs": [_sample_json(s) for s in results.get(row.key, [])],
            }
        )
    targets = []
    for target in TARGETS:
        ratio = _paired(results, target.key, target.ref)
        targets.append(
            {
                "target": target.describe(labels),
                "ratio": ratio,
                "required": target.factor,
                "holds": None if ratio is None else ratio >= target.factor,
            }
        )
    rss: dict[str, Any] = {}
    for key in ("rss_100k", "rss_10m"):
        if results.get(key):
            rss[key + "_mb"] = median_rss_mb(results[key])
            rss[key + "_runs"] = [_sample_json(s) for s in results[key]]
    growth = rss["rss_10m_mb"] - rss["rss_100k_mb"] if "rss_10m_mb" in rss and "rss_100k_mb" in rss else None
    rss["growth_mb"] = growth
    targets.append(
        {
            "target": f"peak RSS(10M) ≤ peak RSS(100k) + {RSS_GROWTH_LIMIT_MB:g} MB",
            "ratio": growth,
            "required": RSS_GROWTH_LIMIT_MB,
            "holds": None if growth is None else growth <= RSS_GROWTH_LIMIT_MB,
        }
    )
    return {"rows": rows, "targets": targets, "rss": rss}


def _paired(results: dict[str, list[Sample]], key: str, ref: str | None) -> float | None:
    """The median over the rounds of key's rate / ref's rate in the same round.

    Both ran minutes apart at most, under the same load: on a shared machine the paired ratio is steadier
    than a ratio of medians (it equals it when the load is steady)."""
    samples, refs = results.get(key), results.get(ref or "")
    if not samples or not refs:
        return None
    ratios = [s.rate / r.rate for s, r in zip(samples, refs, strict=False) if r.rate > 0]
    return float(statistics.median(ratios)) if ratios else None


def _sample_json(sample: Sample) -> dict[str, Any]:
    figures = {"events": sample.events, "seconds": round(sample.seconds, 4), "events_per_s": round(sample.rate, 1)}
    return figures | {k: v for k, v in sample.extra.items() if isinstance(v, int | float | bool)}


def _mark(holds: bool | None) -> str:
    return "-" if holds is None else ("✓" if holds else "✗")


def _x(ratio: float | None) -> str:
    return "" if ratio is None else f"{ratio:.2f}x"


def render(summary: dict[str, Any], notes: list[str]) -> str:
    """The table, the RSS figures, the targets, then notes."""
    lines = [f"{'measurement':<48} {'events/s':>11} {'x peer':>8} {'x raw':>8}", "-" * 78]
    for row in summary["rows"]:
        rate = row["events_per_s"]
        shown = "not run" if rate is None else f"{rate:,.0f}"
        lines.append(f"{row['label']:<48} {shown:>11} {_x(row['vs_peer']):>8} {_x(row['vs_raw']):>8}")
    rss = summary["rss"]
    for key, label in (("rss_100k_mb", "peak RSS, replay of 100k events"), ("rss_10m_mb", "peak RSS, 10M events")):
        value = rss.get(key)
        lines.append(f"{label:<48} {'not run' if value is None else f'{value:,.1f} MB':>11}")
    if rss.get("growth_mb") is not None:
        lines.append(f"{'peak RSS growth 100k → 10M':<48} {rss['growth_mb']:>8,.1f} MB")
    lines += ["", "targets (issues 3 and 22):"]
    for target in summary["targets"]:
        ratio = target["ratio"]
        shown = "not measured" if ratio is None else (f"{ratio:.1f} MB" if "RSS" in target["target"] else _x(ratio))
        lines.append(f"  {_mark(target['holds'])} {target['target']}: {shown}")
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)


def markdown(summary: dict[str, Any], info: dict[str, Any], config: dict[str, Any]) -> str:
    """The table of docs/performance.md: the run (commit, machine), each measurement with its ratios, the targets."""
    load = info.get("load_average_at_start", (0.0,))[0]
    rounds = f"{config['repeat']} round{'s' if config['repeat'] != 1 else ''}"
    lines = [
        f"`make bench` on commit {_commit()} ({config['events']:,} events, {rounds}, medians; "
        f"{info['cpu_model'] or 'unknown CPU'}, {info['nproc']} CPUs, Python {info['python']}, Redis "
        f"{info['redis_server']}; load average {load:.2f} at the start).",
        "",
        "| measurement | events/s | x peer | x raw |",
        "|---|---:|---:|---:|",
    ]
    for row in summary["rows"]:
        rate = row["events_per_s"]
        shown = "not run" if rate is None else f"{rate:,.0f}"
        lines.append(f"| {row['label']} | {shown} | {_x(row['vs_peer'])} | {_x(row['vs_raw'])} |")
    rss = summary["rss"]
    for key, label in (("rss_100k_mb", "peak RSS, replay of 100k events"), ("rss_10m_mb", "peak RSS, 10M events")):
        value = rss.get(key)
        lines.append(f"| {label} | {'not run' if value is None else f'{value:,.1f} MB'} | | |")
    lines += ["", "| target | measured | held |", "|---|---:|:---:|"]
    for target in summary["targets"]:
        ratio = target["ratio"]
        shown = "not measured" if ratio is None else (f"{ratio:.1f} MB" if "RSS" in target["target"] else _x(ratio))
        lines.append(f"| {target['target']} | {shown} | {_mark(target['holds'])} |")
    return "\n".join(lines)


def _commit() -> str:
    try:
        done = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "(not a git checkout)"
    return done.stdout.strip()


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
        "nproc": int(nproc),
        "cpu_model": model,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "redis_server": redis_version,
        "packages": packages,
    }


def _version(name: str) -> str | None:
    try:
        return version(name)
    except Exception:  # noqa: BLE001 - a missing distribution is reported as None
        return None
