"""replayd's side of the benchmark: the engine in-process, and the `replayd replay` CLI as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import anyio
import msgspec

from replayd.config import JobSpec, RedisConfig
from replayd.connection import Client, create_redis
from replayd.handlers import FunctionHandler, Handler, ObjectHandler
from replayd.jobs.engine import Engine
from replayd.jobs.rebuild import clear_namespace, rebuild_in_place
from tests.bench.core import PROJECTION, Sample, reset_job
from tests.bench.handlers import (
    PARTITION_BY,
    CountOrders,
    ReadData,
    ReadDataBatch,
    SleepPerEvent,
    count_orders,
    read_data_async,
    read_data_sync,
)

REPO = Path(__file__).resolve().parents[2]


FORMS = ("async", "sync", "projection", "batch")
"""The handler forms of the no-op that reads every `data`: a plain async function, a plain sync function, a sync
`Projection` method, a sync batch handler."""


def form_handler(form: str) -> Handler:
    if form == "async":
        return FunctionHandler(read_data_async, "bench_read_async")
    if form == "sync":
        return FunctionHandler(read_data_sync, "bench_read_sync")
    if form == "projection":
        return ReadData()
    return ObjectHandler(ReadDataBatch(), ReadDataBatch.name)


async def read_data(cfg: RedisConfig, stream: str, form: str, partitions: int) -> Sample:
    """The no-op that reads every event's `data`, written as `form`, through `Engine.run` with `partitions`
    partitions by customer."""
    spec = JobSpec(name=f"bench-read-{form}-p{partitions}", streams=[stream], handler="tests.bench.handlers:ReadData",
                   end="now", resume=False, partitions=partitions, partition_by=PARTITION_BY)  # fmt: skip
    client = create_redis(cfg)
    try:
        await reset_job(client, spec.name)
        engine = Engine(spec, client, redis_cfg=cfg, handler=form_handler(form))
        start = time.perf_counter()
        stats = await engine.run()
        seconds = time.perf_counter() - start
    finally:
        await client.aclose()
    if stats.processed != stats.total:
        raise AssertionError(f"{form}: {stats.processed} of {stats.total} events handled")
    return Sample(stats.total, seconds, {"processed": stats.processed})


async def rebuild(cfg: RedisConfig, stream: str) -> Sample:
    """`rebuild_in_place` of the built-in order_summary projection (transactional commits)."""
    spec = JobSpec(name=PROJECTION, streams=[stream], handler="order_summary", end="now", resume=False)
    client = create_redis(cfg)
    try:
        await reset_job(client, spec.name)
        engine = Engine(spec, client, redis_cfg=cfg)
        start = time.perf_counter()
        stats = await rebuild_in_place(engine)
        seconds = time.perf_counter() - start
        return Sample(stats.total, seconds, {"processed": stats.processed, "failed": stats.failed})
    finally:
        await client.aclose()


async def counted(cfg: RedisConfig, stream: str, form: str) -> Sample:
    """The per-customer count as a plain sync `function` or as a `projection`, 16 partitions by customer, into
    the same keys (cleared before each run)."""
    handler: Handler = FunctionHandler(count_orders, CountOrders.name) if form == "function" else CountOrders()
    spec = JobSpec(name=f"bench-count-{form}", streams=[stream], handler="tests.bench.handlers:CountOrders",
                   end="now", resume=False, partition_by=PARTITION_BY)  # fmt: skip
    client = create_redis(cfg)
    try:
        await reset_job(client, spec.name)
        await clear_namespace(client, f"projection:{CountOrders.name}:*")
        engine = Engine(spec, client, redis_cfg=cfg, handler=handler)
        start = time.perf_counter()
        stats = await engine.run()
        seconds = time.perf_counter() - start
        counted = await _counted(client, f"projection:{CountOrders.name}:*")
    finally:
        await client.aclose()
    if counted != stats.total or stats.processed != stats.total:
        raise AssertionError(f"{form}: {stats.processed} of {stats.total} events handled, {counted} counted")
    return Sample(stats.total, seconds, {"processed": stats.processed})


async def _counted(client: Client, pattern: str) -> int:
    """The sum of the counts in the hashes matching `pattern`."""
    keys = [key async for key in client.scan_iter(match=pattern, count=1000)]
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.hvals(key)
    return sum(int(value) for values in await pipe.execute() for value in values)


async def io_bound(cfg: RedisConfig, stream: str, partitions: int = 64) -> Sample:
    """`SleepPerEvent` at `partitions` lanes, all allowed to run at once; checks per-key order afterwards."""
    handler = SleepPerEvent()
    spec = JobSpec(
        name="bench-io",
        streams=[stream],
        handler="tests.bench.handlers:SleepPerEvent",
        end="now",
        resume=False,
        partitions=partitions,
        concurrency=partitions,
    )
    client = create_redis(cfg)
    try:
        await reset_job(client, spec.name)
        engine = Engine(spec, client, redis_cfg=cfg, handler=ObjectHandler(handler, handler.name))
        start = time.perf_counter()
        stats = await engine.run()
        seconds = time.perf_counter() - start
        keys = await _keys(client, stream)
    finally:
        await client.aclose()
    violations = handler.order_violations(keys)
    if violations or sorted(handler.handled) != sorted(keys):
        raise AssertionError(
            f"I/O-bound run: {violations} keys out of order; {len(handler.handled)} events handled, "
            f"{len(set(handler.handled))} distinct, of {len(keys)}"
        )
    return Sample(stats.total, seconds, {"keys": len(set(keys.values())), "order_kept": True})


async def _keys(client: Client, stream: str) -> dict[str, str]:
    """Entry ID -> partition key (`data`'s customer_id, as replayd reads it), for the whole stream."""
    entries = await client.execute_command("XRANGE", stream, "-", "+")
    keys: dict[str, str] = {}
    for raw_id, flat in entries:
        key = msgspec.json.decode(flat[flat.index(b"data") + 1]).get(PARTITION_BY, "default")
        keys[raw_id.decode()] = key if type(key) is str else str(key)
    return keys


# --- the CLI as a subprocess -------------------------------------------------------------------------------------


def _cli(url: str, stream: str, handler: str, job: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "replayd", "replay", "--redis-url", url, "--stream", stream, "--handler", handler,
        "--job", job, "--from", "beginning", "--to", "now", "--log-level", "WARNING", *extra,
    ]  # fmt: skip


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


_COMPILE = """
import compileall, os, sys, uvloop, replayd.cli, tests.bench.handlers
for name, module in list(sys.modules.items()):
    path = getattr(sys.modules[name.partition(".")[0]], "__file__", None) or ""
    if path.endswith("__init__.py"):  # the whole package: a run imports some of its modules later
        compileall.compile_dir(os.path.dirname(path), quiet=2)
    elif path.endswith(".py"):
        compileall.compile_file(path, quiet=2)
"""
"""Writes the bytecode of every package a CLI run imports, whatever PYTHONDONTWRITEBYTECODE says."""

_IMPORTS_HWM = """
import re, uvloop, replayd.cli, tests.bench.handlers
print(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read())[1])
"""
"""Imports what `replayd replay` runs on, then prints its own peak RSS (KiB)."""


def compile_cli() -> None:
    """Give the CLI runs the bytecode an installed package has (pip and the container image compile it; `uv sync`
    does not, and PYTHONDONTWRITEBYTECODE=1 keeps Python from caching it). Without it every run compiles its
    ~500 modules afresh: measured 61.3 vs 51.6 MB peak RSS and 0.79 vs 0.30 s CPU for a one-event replay, the
    compiler's, not replayd's."""
    subprocess.run([sys.executable, "-c", _COMPILE], cwd=REPO, env=_env(), check=True)


def cli_imports_rss() -> int:
    """Peak RSS (KiB) of a process that only imports what `replayd replay` runs on: the floor under every CLI run.
    It reads its own VmHWM: polled from outside, so short a process could end between two polls."""
    out = subprocess.run(
        [sys.executable, "-c", _IMPORTS_HWM], cwd=REPO, env=_env(), check=True, capture_output=True, text=True
    )
    return int(out.stdout)


def cli_has_workers() -> bool:
    """Whether `replayd replay --help` lists `--workers`."""
    out = subprocess.run(
        [sys.executable, "-m", "replayd", "replay", "--help"],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
        env=_env(),
    )
    return "--workers" in out.stdout


def run_cli(args: list[str]) -> tuple[float, int]:
    """Run the CLI; return its wall time (interpreter start-up included) and its own peak RSS in KiB.

    The peak is the child's VmHWM, polled from /proc while it runs: rusage's ru_maxrss would also count the
    pages the child shared with this (large) benchmark process between fork and exec.
    """
    start = time.perf_counter()
    proc = subprocess.Popen(args, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = [0]
    watcher = threading.Thread(target=_watch_hwm, args=(proc.pid, peak), daemon=True)
    watcher.start()
    _out, err = proc.communicate()
    seconds = time.perf_counter() - start
    watcher.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}: {err.decode(errors='replace')[-2000:]}")
    return seconds, peak[0]


def _watch_hwm(pid: int, peak: list[int]) -> None:
    """Keep the highest VmHWM (KiB) of `pid` (and its children, for --workers) until it exits."""
    status = Path(f"/proc/{pid}/status")
    while True:
        try:
            text = status.read_text()
        except (FileNotFoundError, ProcessLookupError):
            return
        for line in text.splitlines():
            if line.startswith("VmHWM:"):
                peak[0] = max(peak[0], int(line.split()[1]))
        if "State:\tZ" in text:
            return
        time.sleep(0.02)


async def _reset(cfg: RedisConfig, job: str) -> None:
    client = create_redis(cfg)
    try:
        await reset_job(client, job)
    finally:
        await client.aclose()


def cli_workers(cfg: RedisConfig, stream: str, events: int, workers: int) -> Sample:
    """`replayd replay --workers K` over the CPU-bound handler, timed from the outside (start-up included)."""
    job = f"bench-cpu-w{workers}"
    anyio.run(_reset, cfg, job)
    url = cfg.url.get_secret_value()
    seconds, rss = run_cli(_cli(url, stream, "tests.bench.handlers:Cpu", job, "--workers", str(workers)))
    return Sample(events, seconds, {"peak_rss_kib": rss})


def cli_rss(cfg: RedisConfig, stream: str, events: int) -> Sample:
    """`replayd replay` with the per-event async no-op; `extra["peak_rss_kib"]` is the process's peak RSS."""
    job = "bench-rss"
    anyio.run(_reset, cfg, job)
    seconds, rss = run_cli(_cli(cfg.url.get_secret_value(), stream, "tests.bench.handlers:read_data_async", job))
    return Sample(events, seconds, {"peak_rss_kib": rss})
