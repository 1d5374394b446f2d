"""`python -m tests.bench` (`make bench`): replayd against its peers (the article's code, the hand-written
redis.asyncio loop) and the raw Redis limits.

One redis-server (embedded, no persistence) and one deterministic history, loaded once. Every round runs each
measurement once, in the same order; the figures are the medians over the rounds. Only the replay or the
writes are timed; state is reset (projection keys, the job's `replayd:{job}:*` keys) before each run.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import redis

from replayd.config import RedisConfig
from replayd.embedded import EmbeddedRedis
from replayd.sample import load_history_sync
from tests.bench import peers, replayd_runs, script, wire
from tests.bench.core import Sample, clear_projection, run_async, snapshot_projection
from tests.bench.handlers import burn
from tests.bench.report import machine_info, markdown, render, summarise

MAIN = "bench:orders"
REBUILD_PREFIX = "bench:orders:rebuild-prefix"
IO = "bench:orders:io"
CPU = "bench:orders:cpu"
COUNT = "bench:orders:count"
RSS_10M = "bench:orders:rss-10m"


@dataclass
class Step:
    """One measurement of a round: `run` returns a Sample that must cover `events` events."""

    key: str
    events: int
    run: Callable[[], Sample]
    before: Callable[[], None] | None = None
    """Untimed preparation (e.g. clearing the projection)."""
    after: Callable[[], None] | None = None
    """Untimed clean-up: what a step leaves behind (a projection's ~400k hashes) would weigh on the Redis CPU of
    the next round's steps, whose jobs' resets SCAN the keyspace."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=1_000_000, help="events in the main history (default 1,000,000)")
    p.add_argument("--repeat", type=int, default=3, help="rounds; figures are medians (default 3)")
    p.add_argument("--article-rebuild-events", type=int, default=50_000, help="prefix the article rebuilds")
    p.add_argument(
        "--write-events", type=int, help="events whose writes the ceilings replay (default: all, as the rebuild)"
    )
    p.add_argument("--io-events", type=int, default=20_000, help="events of the I/O-bound comparison")
    p.add_argument("--workers-events", type=int, default=200_000, help="events of the --workers comparison")
    p.add_argument(
        "--count-events", type=int, default=200_000, help="events of the plain function vs Projection comparison"
    )
    p.add_argument(
        "--script-events", type=int, default=200_000, help="events whose writes the commit-script anatomy commits"
    )
    p.add_argument("--rss-10m", action="store_true", help="also measure peak RSS on 10M events (slow to load)")
    p.add_argument("--json", default="bench-results.json", metavar="PATH", help="where to write all figures")
    p.add_argument("--docs", metavar="PATH", help="rewrite the table between the bench markers of this page")
    p.add_argument("--profile", metavar="DIR", help="after the rounds, profile replayd runs with pyinstrument")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.perf_counter()
    with EmbeddedRedis(Path(tempfile.mkdtemp(prefix="replayd-bench-"))) as server:
        url = server.url
        cfg = RedisConfig(url=url)
        notes: list[str] = []
        replayd_runs.compile_cli()
        has_workers = replayd_runs.cli_has_workers()
        if not has_workers:
            notes.append("workers: not implemented yet (`replayd replay --help` lists no --workers)")
            print(notes[-1])
        with redis.Redis.from_url(url) as client:
            redis_version = str(client.info("server")["redis_version"])
            loaded = load(client, args, workers=has_workers)
        info = machine_info(redis_version)
        info["load_average_at_start"] = os.getloadavg()
        print(f"redis-server {redis_version} at {url}; {info['cpu_model']}, {info['nproc']} CPUs", flush=True)
        print(f"loaded {loaded['events']:,} events into {len(loaded['streams'])} streams in {loaded['seconds']:.1f}s")
        write_n = min(args.write_events or args.events, args.events)
        commands = peers.order_summary_commands(write_n)
        gc.freeze()  # ~2 commands per event, held all run: full collections in the replayd runs leave them alone
        steps = plan(args, cfg, server.port, commands, write_n, has_workers)
        results: dict[str, list[Sample]] = {step.key: [] for step in steps}
        for round_ in range(args.repeat):
            for step in steps:
                results[step.key].append(measure(step, url, round_, args.repeat))
                if round_ == 0 and step.key == "article_rebuild":
                    notes.append(verify_rebuild(url, cfg))
                    print(notes[-1], flush=True)
        anatomy = script_anatomy(url, args)
        bytes_per_event = wire.measure(url, "127.0.0.1", server.port, MAIN, commands, write_n)
        if args.rss_10m:
            results["rss_10m"] = [measure_rss_10m(url, cfg)]
        summary = summarise(results, anatomy)
        summary["rss"]["imports_mb"] = replayd_runs.cli_imports_rss() / 1024
        summary["wire"] = bytes_per_event
        info["load_average_at_end"] = os.getloadavg()
        if info["load_average_at_start"][0] > 0.5:
            notes.append(
                f"the machine was busy when the run began (load average {info['load_average_at_start'][0]:.2f}): "
                "other processes compete for the same cores"
            )
        notes += describe(args, write_n, len(commands))
        if results.get("workers_2"):
            notes.append(workers_ceiling(results, info["nproc"]))
        table = render(summary, notes)
        print()
        print(table)
        if args.profile:
            profile(cfg, Path(args.profile))
    duration = time.perf_counter() - began
    print(f"\nbenchmark took {duration:.0f}s (loading {loaded['seconds']:.0f}s)")
    document = {
        "machine": info,
        "config": {key: value for key, value in vars(args).items() if key not in ("json", "profile", "docs")},
        "batch_size": 1000,
        "load": loaded,
        "summary": summary,
        "notes": notes,
        "cpu_handler_us_per_event": cpu_cost_us(),
        "duration_s": round(duration, 1),
    }
    Path(args.json).write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    print(f"figures written to {args.json}")
    if args.docs:
        write_docs(Path(args.docs), markdown(document))
    return 0


def load(client: redis.Redis, args: argparse.Namespace, *, workers: bool) -> dict[str, Any]:
    """Every stream the run needs; prefixes of the same deterministic history (same seed, same first events)."""
    sizes = {
        MAIN: args.events,
        REBUILD_PREFIX: min(args.article_rebuild_events, args.events),
        IO: args.io_events,
        COUNT: args.count_events,
    }
    if workers:
        sizes[CPU] = args.workers_events
    start = time.perf_counter()
    for stream, n in sizes.items():
        client.delete(stream)
        load_history_sync(client, stream, n)
    return {"streams": sizes, "events": sum(sizes.values()), "seconds": round(time.perf_counter() - start, 1)}


def plan(
    args: argparse.Namespace,
    cfg: RedisConfig,
    port: int,
    commands: list[peers.Command],
    write_n: int,
    has_workers: bool,
) -> list[Step]:
    """The measurements of one round, in the order every round runs them."""
    url = cfg.url.get_secret_value()
    n = args.events
    prefix = min(args.article_rebuild_events, n)

    def clear() -> None:
        with redis.Redis.from_url(url) as client:
            clear_projection(client)

    steps = [
        Step("article_replay", n, partial(peers.article_replay, url, MAIN)),
        Step("raw_read", n, lambda: run_async(partial(peers.raw_read, cfg, MAIN))),
        Step("handwritten_noop", n, lambda: run_async(partial(peers.handwritten, url, MAIN, False))),
    ]
    for form in replayd_runs.FORMS:
        for partitions in (1, 16):
            run = partial(replayd_runs.read_data, cfg, MAIN, form, partitions)
            steps.append(Step(f"read_{form}_p{partitions}", n, partial(run_async, run)))
    steps += [
        Step("article_rebuild", prefix, partial(peers.article_rebuild, url, REBUILD_PREFIX)),
        Step(
            "write_pipeline",
            write_n,
            lambda: run_async(partial(peers.write_pipeline, cfg, commands, write_n)),
            clear,
            clear,
        ),
        Step(
            "write_packed",
            write_n,
            lambda: run_async(partial(peers.write_packed, "127.0.0.1", port, commands, write_n)),
            clear,
            clear,
        ),
        Step("handwritten_rebuild", n, lambda: run_async(partial(peers.handwritten, url, MAIN, True)), clear, clear),
        Step("replayd_rebuild", n, lambda: run_async(partial(replayd_runs.rebuild, cfg, MAIN)), clear, clear),
        Step("sequential_io", args.io_events, lambda: run_async(partial(peers.sequential_io, cfg, IO))),
        Step("io_floor", args.io_events, lambda: run_async(partial(peers.lanes_floor, cfg, IO))),
        Step("replayd_io_p64", args.io_events, lambda: run_async(partial(replayd_runs.io_bound, cfg, IO))),
        Step("count_projection", args.count_events,
             lambda: run_async(partial(replayd_runs.counted, cfg, COUNT, "projection"))),
        Step("count_function", args.count_events,
             lambda: run_async(partial(replayd_runs.counted, cfg, COUNT, "function"))),
    ]  # fmt: skip
    if has_workers:
        steps += [
            Step(
                f"workers_{k}", args.workers_events, partial(replayd_runs.cli_workers, cfg, CPU, args.workers_events, k)
            )
            for k in (1, 2)
        ]
    steps.append(Step("rss_1m", n, partial(replayd_runs.cli_rss, cfg, MAIN, n)))
    return steps


def measure(step: Step, url: str, round_: int, rounds: int) -> Sample:
    """Run a step; beside its timing, note the CPU seconds the client side and redis-server spent on it."""
    if step.before is not None:
        step.before()
    gc.collect()
    client_before, redis_before = _cpu(), _redis_cpu(url)
    sample = step.run()
    sample.extra["client_cpu_s"] = round(_cpu() - client_before, 2)
    sample.extra["redis_cpu_s"] = round(_redis_cpu(url) - redis_before, 2)
    if step.after is not None:
        step.after()
    if sample.events != step.events:
        raise AssertionError(f"{step.key} covered {sample.events} events, expected {step.events}")
    rss = sample.extra.get("peak_rss_kib")
    shown = f", peak RSS {rss / 1024:.1f} MB" if rss else ""
    print(
        f"  [{round_ + 1}/{rounds}] {step.key:<18} {sample.rate:>11,.0f} events/s  ({sample.seconds:.2f}s; CPU "
        f"client {sample.extra['client_cpu_s']:.2f}s, redis {sample.extra['redis_cpu_s']:.2f}s{shown})",
        flush=True,
    )
    return sample


def _cpu() -> float:
    """CPU seconds of this process and of the subprocesses it has waited for (the CLI runs)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _redis_cpu(url: str) -> float:
    with redis.Redis.from_url(url) as client:
        info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def verify_rebuild(url: str, cfg: RedisConfig) -> str:
    """replayd's rebuild of the article's prefix must leave exactly what the article's rebuild left."""
    with redis.Redis.from_url(url) as client:
        article = snapshot_projection(client)
        clear_projection(client)
        run_async(partial(replayd_runs.rebuild, cfg, REBUILD_PREFIX))
        ours = snapshot_projection(client)
        clear_projection(client)
    if ours != article:
        differing = [key for key in article.keys() | ours.keys() if article.get(key) != ours.get(key)]
        raise AssertionError(f"replayd's rebuild differs from the article's on {len(differing)} keys: {differing[:5]}")
    return f"rebuild check: replayd's order_summary equals the article's on the prefix ({len(ours):,} hashes)"


def script_anatomy(url: str, args: argparse.Namespace) -> dict[str, list[float]]:
    """Redis CPU µs per event of each commit-script variant (tests/bench/script.py), `--repeat` interleaved
    rounds over the order_summary writes of the first `--script-events` events."""
    n = min(args.script_events, args.events)
    batches = script.commits(peers.order_summary_commands(n), n)
    results: dict[str, list[float]] = {name: [] for name in script.VARIANTS}
    print(f"commit script anatomy: the order_summary writes of {n:,} events, commits of ~1000 events", flush=True)
    for round_ in range(args.repeat):
        for name, pack in script.VARIANTS.items():
            results[name].append(script.run_variant(url, pack, batches) / n * 1e6)
            print(f"  [{round_ + 1}/{args.repeat}] {name.strip():<56} {results[name][-1]:5.2f} µs/event", flush=True)
    return results


def measure_rss_10m(url: str, cfg: RedisConfig) -> Sample:
    n = 10_000_000
    print(f"loading {n:,} events for the 10M RSS run ...", flush=True)
    start = time.perf_counter()
    with redis.Redis.from_url(url) as client:
        client.delete(RSS_10M)
        load_history_sync(client, RSS_10M, n)
        print(f"loaded in {time.perf_counter() - start:.0f}s", flush=True)
        try:
            return measure(Step("rss_10m", n, partial(replayd_runs.cli_rss, cfg, RSS_10M, n)), url, 0, 1)
        finally:
            client.delete(RSS_10M)


def describe(args: argparse.Namespace, write_n: int, commands: int) -> list[str]:
    return [
        f"history: {args.events:,} events (seed 7, ~10k customers); events/s are medians of {args.repeat} "
        "interleaved rounds, ratios the medians of the same-round ratios; batches of 1000 everywhere a reader "
        "or writer has the choice",
        "article replayer: replay_all with its default batch_size=100, as the article calls it (earlier runs "
        "passed 1000, about 5% faster); the article's rebuild reads batches of 100 "
        f"(rebuild() takes no batch size) over the first {min(args.article_rebuild_events, args.events):,} events",
        f"write ceilings: the article's order_summary writes for {'the' if write_n == args.events else 'the first'} "
        f"{write_n:,} events ({commands:,} commands), 1000 per round trip; events/s counts every event "
        "(also those no handler writes for), as the rebuild's events/s does",
        "I/O and workers runs: partitioned by customer_id; workers figures are CLI wall time, start-up included",
        "read_* rows: a per-event no-op that reads every event's `data`, as a plain async function, a plain sync "
        "function, a sync Projection method, and a sync batch handler; P = partitions by customer_id",
        "hand-written loop: redis.asyncio, XRANGE of 1000, json.loads of every data, the writes and a checkpoint "
        "in one MULTI/EXEC pipeline per batch",
        "Redis CPU: used_cpu_user + used_cpu_sys from INFO around each run, per event",
        f"peak RSS: `replayd replay` (the CLI, start-up and imports included) of the {args.events:,}-event history "
        "with the per-event async no-op",
    ]


def workers_ceiling(results: dict[str, list[Sample]], cores: int) -> str:
    """The most `--workers 2` could gain in each round, from the CPU its run took: with both workers, their
    supervisor and redis-server keeping every core busy all along, its wall time is their CPU seconds / cores."""
    ceilings = [
        min(2.0, one.seconds * cores / (two.extra["client_cpu_s"] + two.extra["redis_cpu_s"]))
        for one, two in zip(results["workers_1"], results["workers_2"], strict=False)
    ]
    # what the run got: below `cores`, other processes held the rest, and the ratio measures the machine's load
    used = [(two.extra["client_cpu_s"] + two.extra["redis_cpu_s"]) / two.seconds for two in results["workers_2"]]
    return (
        f"--workers 2 ceiling on {cores} cores: {statistics.median(ceilings):.2f}x workers 1 (median; per round "
        f"{', '.join(f'{c:.2f}x' for c in ceilings)}): workers 1's wall time over workers 2's CPU seconds (its "
        "processes and redis-server's) spread over every core; each worker reads and decodes every entry. "
        f"The workers 2 runs used {', '.join(f'{u:.2f}' for u in used)} of the {cores} cores (CPU seconds over wall "
        "time): with other processes runnable, each of its processes gets a share of a core, not one"
    )


def cpu_cost_us(calls: int = 5000) -> float:
    """The CPU-bound handler's cost per event, in CPU time (steady when other processes share the cores)."""
    start = time.process_time()
    for _ in range(calls):
        burn()
    return round((time.process_time() - start) / calls * 1e6, 1)


def profile(cfg: RedisConfig, directory: Path) -> None:
    """Untimed runs of replayd's per-event async no-op and rebuild over the count stream under pyinstrument
    (`pip install pyinstrument`)."""
    try:
        pyinstrument: Any = importlib.import_module("pyinstrument")
    except ImportError:
        print("--profile needs pyinstrument: pip install pyinstrument", file=sys.stderr)
        return
    directory.mkdir(parents=True, exist_ok=True)
    runs: dict[str, Callable[[], Sample]] = {
        "async_p1": lambda: run_async(partial(replayd_runs.read_data, cfg, COUNT, "async", 1)),
        "async_p16": lambda: run_async(partial(replayd_runs.read_data, cfg, COUNT, "async", 16)),
        "rebuild": lambda: run_async(partial(replayd_runs.rebuild, cfg, COUNT)),
    }
    for name, run in runs.items():
        profiler = pyinstrument.Profiler(interval=0.001, async_mode="disabled")
        profiler.start()
        sample = run()
        profiler.stop()
        text = profiler.output_text(unicode=True, color=False, show_all=False)
        path = directory / f"profile-{name}.txt"
        path.write_text(text)
        print(f"\nprofile of replayd {name} ({sample.rate:,.0f} events/s under the profiler) -> {path}")
        print("\n".join(text.splitlines()[:60]))


DOCS_START = "<!-- make bench writes the table below -->"
DOCS_END = "<!-- end of the table make bench writes -->"


def write_docs(page: Path, table: str) -> None:
    """Replace what lies between the markers of `page` with `table`: the docs keep one current table, and its
    history is the page's git history."""
    text = page.read_text()
    if DOCS_START not in text or DOCS_END not in text:
        print(f"{page} has no bench markers: table not written")
        return
    head, rest = text.split(DOCS_START, 1)
    page.write_text(f"{head}{DOCS_START}\n{table}\n{DOCS_END}{rest.split(DOCS_END, 1)[1]}")
    print(f"table written to {page}")
