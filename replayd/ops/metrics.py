"""Prometheus metrics: one injected registry, Prometheus names and base units, labels from static config.

Counters and histograms are updated where things happen (per batch, never per event); gauges that describe
a job's position (lag, checkpoint and head timestamps, state, in-flight) are computed at scrape time from
the running engines by `JobCollector`, so they are never stale.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import hiredis
import redis
from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from replayd.version import __version__

STATES = ("starting", "catching_up", "live", "stalled", "paused", "blocked", "draining", "stopped")
OUTCOMES = ("ok", "retried", "failed", "tombstone", "dead_lettered", "parked", "skipped")
STALL_AFTER_S = 300.0
"""A job with lag whose checkpoint has not moved for this long is `stalled` (Burrow's idle vs stalled)."""


@dataclass
class JobView:
    """What the collector reads from a running job (kept by the engine; read at scrape time)."""

    replay: str
    streams: list[str]
    status: Callable[[], str]
    position: dict[str, tuple[int, int]]
    head: dict[str, tuple[int, int] | None] = field(default_factory=dict)
    lag_entries: dict[str, int] = field(default_factory=dict)
    retention: dict[str, int] = field(default_factory=dict)
    last_progress: dict[str, float] = field(default_factory=dict)
    inflight: Callable[[], int] = lambda: 0
    parked_keys: Callable[[], int] = lambda: 0
    rebuild_targets: dict[str, tuple[int, int] | None] | None = None
    """A rebuild's: the end of each stream it runs to (filled as it plans); None for any other job."""


class Metrics:
    """All of replayd's metrics on one registry (a fresh one unless given: tests and embedding stay isolated)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call] # the `_created` series only add cardinality here
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        Info("replayd_build", "replayd build information", registry=r).info(_build())
        self.events_read = Counter("replayd_events_read", "Entries returned by XRANGE/XREAD", ["stream"], registry=r)
        self.handler_events = Counter(
            "replayd_handler_events", "Events by handler outcome", ["stream", "replay", "outcome"], registry=r
        )
        self.handler_batch = Histogram(
            "replayd_handler_batch_duration_seconds", "Handler time per lane batch", ["replay"], registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )  # fmt: skip
        self.read_batch = Histogram(
            "replayd_read_batch_entries", "Entries per read", ["stream"], registry=r,
            buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000),
        )  # fmt: skip
        self.commits = Counter(
            "replayd_checkpoint_commits", "Checkpoint transactions", ["replay", "result"], registry=r
        )
        self.commit_duration = Histogram(
            "replayd_checkpoint_commit_duration_seconds", "Checkpoint transaction round trip", registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5),
        )  # fmt: skip
        self.command_duration = Histogram(
            "replayd_redis_command_duration_seconds", "Client-side Redis latency", ["command"], registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )  # fmt: skip
        self.redis_errors = Counter("replayd_redis_errors", "Redis errors", ["command", "error"], registry=r)
        self.reconnects = Counter("replayd_redis_reconnects", "Successful retries after Redis errors", registry=r)
        self.gaps = Counter("replayd_gap_detected", "Data-loss signals", ["stream", "kind"], registry=r)
        self.unkeyed = Counter(
            "replayd_unkeyed_events", "Events without their partition key (they share the key 'default')",
            ["stream", "replay"], registry=r,
        )  # fmt: skip
        self.handler_timeouts = Counter(
            "replayd_handler_timeouts", "Handler calls past handler_timeout_s: cancelled, or reported (a sync call "
            "in a thread)", ["replay", "action"], registry=r,
        )  # fmt: skip
        self.collector = JobCollector()
        r.register(self.collector)

    def add_job(self, view: JobView) -> None:
        """Register a job and pre-initialise its label sets, so no series is missing before the first event."""
        for stream in view.streams:
            self.events_read.labels(stream)
            self.read_batch.labels(stream)
            self.unkeyed.labels(stream, view.replay)
            for outcome in OUTCOMES:
                self.handler_events.labels(stream, view.replay, outcome)
        self.handler_batch.labels(view.replay)
        for result in ("ok", "fenced", "error"):
            self.commits.labels(view.replay, result)
        for action in ("cancelled", "reported"):
            self.handler_timeouts.labels(view.replay, action)
        self.collector.jobs[view.replay] = view

    def redis_error(self, command: str, exc: BaseException) -> None:
        self.redis_errors.labels(command, error_class(exc)).inc()


def error_class(exc: BaseException) -> str:
    """A closed enum of Redis error kinds for the `error` label (never the message)."""
    text = str(exc)
    if isinstance(exc, redis.TimeoutError | TimeoutError):
        return "timeout"
    if isinstance(exc, redis.BusyLoadingError) or text.startswith("LOADING"):
        return "loading"
    if isinstance(exc, redis.ReadOnlyError) or text.startswith("READONLY"):
        return "readonly"
    if isinstance(exc, redis.ConnectionError | ConnectionError | OSError):
        return "connection"
    if isinstance(exc, redis.exceptions.OutOfMemoryError) or "OOM command not allowed" in text:  # 6.2: in a script's
        return "oom"
    if isinstance(exc, redis.exceptions.NoPermissionError) or text.startswith("NOPERM"):
        return "noperm"
    return "other"


class JobCollector(Collector):
    """Scrape-time gauges: positions, heads, lag, progress heartbeat, state, in-flight, rebuild target."""

    def __init__(self) -> None:
        self.jobs: dict[str, JobView] = {}

    def collect(self) -> Iterable[Metric]:
        checkpoint = GaugeMetricFamily(
            "replayd_checkpoint_timestamp_seconds", "Time part of the checkpoint ID (Redis clock)",
            labels=["stream", "replay"],
        )  # fmt: skip
        head = GaugeMetricFamily(
            "replayd_stream_head_timestamp_seconds", "Time part of the stream's last ID", labels=["stream"]
        )
        lag = GaugeMetricFamily("replayd_lag_seconds", "Head minus checkpoint, same clock", labels=["stream", "replay"])
        lag_entries = GaugeMetricFamily(
            "replayd_lag_entries", "Entries after the checkpoint (only when counted exactly)",
            labels=["stream", "replay"],
        )  # fmt: skip
        retention = GaugeMetricFamily(
            "replayd_retention_margin_entries", "Entries kept at or before the checkpoint (trim risk; when <= 1000)",
            labels=["stream", "replay"],
        )  # fmt: skip
        progress = GaugeMetricFamily(
            "replayd_last_progress_timestamp_seconds", "Wall time the checkpoint last moved",
            labels=["stream", "replay"],
        )  # fmt: skip
        state = GaugeMetricFamily("replayd_state", "Job state (one-hot)", labels=["replay", "state"])
        inflight = GaugeMetricFamily("replayd_inflight_entries", "Events read but not committed", labels=["replay"])
        parked = GaugeMetricFamily(
            "replayd_parked_keys", "Partition keys whose events wait behind a dead letter", labels=["replay"]
        )
        rebuilding = GaugeMetricFamily("replayd_rebuild_running", "1 while a rebuild runs", labels=["replay"])
        target = GaugeMetricFamily(
            "replayd_rebuild_target_timestamp_seconds", "Head snapshot the rebuild runs to", labels=["replay"]
        )
        heads_done: set[str] = set()
        for job in list(self.jobs.values()):  # scraped from the HTTP thread while the loop adds jobs
            self._collect_job(job, checkpoint, head, lag, lag_entries, retention, progress, heads_done)
            current = job_state(job)
            for name in STATES:
                state.add_metric([job.replay, name], 1.0 if name == current else 0.0)
            inflight.add_metric([job.replay], job.inflight())
            parked.add_metric([job.replay], job.parked_keys())
            ends = [end for end in dict(job.rebuild_targets or {}).values() if end is not None]
            rebuilding.add_metric(
                [job.replay], 1.0 if job.rebuild_targets is not None and current != "stopped" else 0.0
            )
            if ends:
                target.add_metric([job.replay], max(ends)[0] / 1000)
        return [checkpoint, head, lag, lag_entries, retention, progress, state, inflight, parked, rebuilding, target]

    @staticmethod
    def _collect_job(
        job: JobView,
        checkpoint: GaugeMetricFamily,
        head: GaugeMetricFamily,
        lag: GaugeMetricFamily,
        lag_entries: GaugeMetricFamily,
        retention: GaugeMetricFamily,
        progress: GaugeMetricFamily,
        heads_done: set[str],
    ) -> None:
        position_of, head_of = dict(job.position), dict(job.head)  # copies: the loop thread updates them
        lag_of, beat_of, kept_of = dict(job.lag_entries), dict(job.last_progress), dict(job.retention)
        for stream in list(job.streams):
            position = position_of.get(stream)
            if position is not None:
                checkpoint.add_metric([stream, job.replay], position[0] / 1000)
            top = head_of.get(stream)
            if top is not None and stream not in heads_done:
                head.add_metric([stream], top[0] / 1000)
                heads_done.add(stream)
            if top is not None and position is not None:
                lag.add_metric([stream, job.replay], max(top[0] - position[0], 0) / 1000)
            if stream in lag_of:
                lag_entries.add_metric([stream, job.replay], lag_of[stream])
            if stream in kept_of:
                retention.add_metric([stream, job.replay], kept_of[stream])
            if stream in beat_of:
                progress.add_metric([stream, job.replay], beat_of[stream])


def job_state(job: JobView) -> str:
    """The engine's status mapped onto the metric's closed enum, with `stalled` derived from lag and heartbeat."""
    status = job.status()
    if status in ("completed", "failed", "stopped"):
        return "stopped"
    if status == "live" or status == "catching_up":
        heads, positions = dict(job.head), dict(job.position)  # copies: the loop thread updates them
        lagging = any((head := heads.get(s)) is not None and head > positions.get(s, (0, 0)) for s in job.streams)
        beat = max(dict(job.last_progress).values(), default=0.0)
        if lagging and beat and time.time() - beat > STALL_AFTER_S:
            return "stalled"
    return status if status in STATES else "starting"


def merge_expositions(expositions: Mapping[str, str], label: str) -> bytes:
    """Several processes' /metrics as one exposition: each sample gains `label="<its key>"` (so no two series
    collide), and each family keeps one HELP and TYPE line with the samples of every process under it."""
    families: dict[str, Metric] = {}
    for value, text in expositions.items():
        for family in text_string_to_metric_families(text):
            merged = families.setdefault(
                family.name, Metric(family.name, family.documentation, family.type, family.unit)
            )
            merged.samples.extend(sample._replace(labels={**sample.labels, label: value}) for sample in family.samples)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))
    return generate_latest(registry)


class _Families(Collector):
    """Metric families already collected (parsed from other processes' expositions)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


def _build() -> dict[str, str]:
    return {
        "version": __version__,
        "python": platform.python_version(),
        "redis_py": redis.__version__,
        "hiredis": getattr(hiredis, "__version__", "unknown"),
    }
