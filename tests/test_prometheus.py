"""The real Prometheus tools against a running `replayd run`: promtool lints a live scrape, a Prometheus server
scrapes the daemon and answers queries about it. Skipped only when the binaries are absent (CI installs them)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from replayd.embedded import free_port
from replayd.sample import load_history_sync
from tests.test_http import Samples, fetch, samples, value

STREAM = "events:orders"
HISTORY = 300


def poll(condition: Callable[[], bool], *, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within}s")
        time.sleep(0.1)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM by PID, SIGKILL if it does not exit in time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


class RunningDaemon:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.proc = proc
        self.port = port
        self.log = log

    def scrape(self) -> Samples:
        assert self.proc.poll() is None, f"replayd exited {self.proc.returncode}:\n{self.log.read_text()}"
        try:
            return samples(fetch(self.port, "/metrics").body.decode())
        except OSError:
            return {}


@pytest.fixture
def daemon(tmp_path: Path, redis_url: str, sync_redis: redis.Redis) -> Iterator[RunningDaemon]:
    """`replayd run` following a stream with some history, /metrics on a free loopback port, caught up."""
    load_history_sync(sync_redis, STREAM, HISTORY)
    port = free_port()
    config = tmp_path / "replayd.toml"
    config.write_text(
        f'[redis]\nurl = "{redis_url}"\nblock_ms = 100\n\n'
        f'[http]\nhost = "127.0.0.1"\nport = {port}\n\n'
        f'[[jobs]]\nname = "orders"\nstreams = ["{STREAM}"]\nhandler = "order_summary"\nend = "follow"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("REPLAYD_")}
    log = tmp_path / "replayd.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "replayd", "run", "--config", str(config), "--log-format", "json"],
            stdout=subprocess.DEVNULL, stderr=out, env=env,
        )  # fmt: skip
    running = RunningDaemon(proc, port, log)
    try:
        poll(
            lambda: value(running.scrape(), "replayd_state", replay="orders", state="live") == 1,
            within=15,
            what="replayd live with /metrics served",
        )
        yield running
    finally:
        stop(proc)
    assert proc.returncode == 0, log.read_text()  # SIGTERM: drained and stopped, the listener with it
    assert f"on http://127.0.0.1:{port}" in log.read_text()


def test_promtool_check_metrics_on_a_live_scrape(daemon: RunningDaemon) -> None:
    """1. a caught-up daemon  2. scrape /metrics  3. `promtool check metrics` exits 0 and says nothing."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not on PATH (Debian package `prometheus`)")
    body = fetch(daemon.port, "/metrics").body
    assert b"replayd_events_read_total" in body
    checked = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, timeout=20, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.decode().strip() == ""
    assert checked.stderr.decode().strip() == ""


def query(port: int, promql: str) -> list[dict[str, Any]]:
    """An instant query through Prometheus's HTTP API; the result vector."""
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as response:
        doc = json.loads(response.read())
    assert doc["status"] == "success", doc
    result: list[dict[str, Any]] = doc["data"]["result"]
    return result


def query_or_nothing(port: int, promql: str) -> list[dict[str, Any]]:
    try:
        return query(port, promql)
    except OSError:  # not listening yet
        return []


def test_prometheus_scrapes_the_daemon(tmp_path: Path, daemon: RunningDaemon) -> None:
    """1. a Prometheus server scraping the daemon every second  2. a scrape lands  3. replayd_* series answer
    queries with the daemon's values  4. Prometheus stopped by PID."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus not on PATH (Debian package `prometheus`)")
    web = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        "scrape_configs:\n"
        f"  - job_name: replayd\n    static_configs:\n      - targets: ['127.0.0.1:{daemon.port}']\n"
    )
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{web}", "--log.level=warn"],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        poll(
            lambda: bool(query_or_nothing(web, 'up{job="replayd"} == 1')) or proc.poll() is not None,
            within=25,
            what="a successful scrape of replayd",
        )
        assert proc.poll() is None, log.read_text()
        build = query(web, "replayd_build_info")
        read = query(web, f'replayd_events_read_total{{stream="{STREAM}"}}')
        state = query(web, 'replayd_state{replay="orders", state="live"}')
    finally:
        stop(proc)
    assert len(build) == 1
    assert build[0]["metric"]["job"] == "replayd"
    assert build[0]["metric"]["instance"] == f"127.0.0.1:{daemon.port}"
    assert {"version", "python", "redis_py", "hiredis"} <= build[0]["metric"].keys()
    assert build[0]["value"][1] == "1"
    assert [float(sample["value"][1]) for sample in read] == [HISTORY]
    assert [sample["value"][1] for sample in state] == ["1"]
