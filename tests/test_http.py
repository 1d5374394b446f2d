"""/metrics, /healthz, /livez and /readyz over real sockets: an engine's metrics, a blocked loop, Redis going away."""

from __future__ import annotations

import http.client
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import anyio
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from replayd.config import HttpConfig, JobSpec, RedisConfig, Settings
from replayd.embedded import free_port
from replayd.errors import ConfigError
from replayd.handlers import ObjectHandler
from replayd.jobs.daemon import Daemon, ping_redis
from replayd.jobs.engine import Engine
from replayd.ops.http import HttpServer, Readiness
from replayd.ops.metrics import STATES, Metrics
from replayd.sample import load_history_sync
from tests.helpers import STREAM, add, orders, spec, wait_until
from tests.plugins import Recorder
from tests.servers import RedisServer

pytestmark = pytest.mark.anyio


class Response(NamedTuple):
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def fetch(port: int, path: str, method: str = "GET") -> Response:
    """One request on a fresh connection (blocking: call it from a thread unless the loop is meant to block)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return Response(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        conn.close()


async def afetch(port: int, path: str, method: str = "GET") -> Response:
    return await anyio.to_thread.run_sync(fetch, port, path, method)


async def until_status(port: int, path: str, status: int, *, within: float = 10.0) -> Response:
    """Poll `path` until it answers `status`; fail after `within` seconds."""
    with anyio.fail_after(within):
        while True:
            response = await afetch(port, path)
            if response.status == status:
                return response
            await anyio.sleep(0.05)


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Samples:
    """Every sample of an exposition, parsed by prometheus_client's own parser: (name, labels) -> value."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(parsed: Samples, name: str, **labels: str) -> float | None:
    return parsed.get((name, frozenset(labels.items())))


async def until_sample(port: int, want: float, name: str, *, within: float = 10.0, **labels: str) -> Samples:
    """Scrape until the sample `name{labels}` has the value `want`; return that scrape."""
    with anyio.fail_after(within):
        while True:
            parsed = samples((await afetch(port, "/metrics")).body.decode())
            if value(parsed, name, **labels) == want:
                return parsed
            await anyio.sleep(0.05)


def ready() -> Readiness:
    return Readiness(config_ok=True, plugins_loaded=True, redis_ok=True)


# --- /metrics


async def test_metrics_after_an_engine_run(raw_redis: Redis, redis_cfg: RedisConfig, sync_redis: redis.Redis) -> None:
    """1. run a job to its end on a Metrics  2. serve it  3. the scrape has build info, reads, lag and state."""
    add(sync_redis, orders(25))
    metrics = Metrics()
    engine = Engine(
        spec(), raw_redis, redis_cfg=redis_cfg, handler=ObjectHandler(Recorder(), "recorder"), metrics=metrics
    )
    await engine.run()
    engine.view.head[STREAM] = engine.stats.position[STREAM]  # the head watcher's first look (5 s) did not come yet
    async with anyio.create_task_group() as tg:
        port = await tg.start(HttpServer(metrics, ready()).run)
        response = await afetch(port, "/metrics")
        head = await afetch(port, "/metrics", "HEAD")
        tg.cancel_scope.cancel()
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    parsed = samples(response.body.decode())
    build = [labels for (name, labels) in parsed if name == "replayd_build_info"]
    assert len(build) == 1
    assert {"version", "python", "redis_py", "hiredis"} == {key for key, _ in build[0]}
    assert value(parsed, "replayd_events_read_total", stream=STREAM) == 25
    assert value(parsed, "replayd_handler_events_total", stream=STREAM, replay="job", outcome="ok") == 25
    assert value(parsed, "replayd_lag_seconds", stream=STREAM, replay="job") == 0
    assert {state: value(parsed, "replayd_state", replay="job", state=state) for state in STATES} == {
        state: 1.0 if state == "stopped" else 0.0 for state in STATES
    }
    assert head.status == 200
    assert head.body == b""
    assert int(head.headers["content-length"]) > 0


# --- /healthz and /livez


async def test_healthz_and_livez_answer_ok() -> None:
    async with anyio.create_task_group() as tg:
        port = await tg.start(HttpServer(Metrics(), Readiness()).run)
        health, live, head = (
            await afetch(port, "/healthz"),
            await afetch(port, "/livez"),
            await afetch(port, "/healthz", "HEAD"),
        )
        tg.cancel_scope.cancel()
    for response in (health, live):
        assert response.status == 200
        assert response.headers["content-type"] == "application/json"
        assert response.headers["connection"] == "close"
        assert response.json()["status"] == "ok"
    assert (head.status, head.body) == (200, b"")


def block_the_loop(seconds: float) -> None:
    """What a handler that calls a blocking function from `async def` does to the event loop."""
    time.sleep(seconds)


async def test_healthz_fails_while_the_loop_is_blocked(caplog: pytest.LogCaptureFixture) -> None:
    """1. healthy  2. block the loop past stall_after_s: /healthz 503 with the reason, /metrics still served, the
    watchdog logs the blocking stack  3. the loop runs again: /healthz 200."""
    server = HttpServer(Metrics(), ready(), stall_after_s=1.0, heartbeat_s=0.1)
    caplog.set_level(logging.INFO, logger="replayd.ops.http")
    async with anyio.create_task_group() as tg:
        port = await tg.start(server.run)
        before = await afetch(port, "/healthz")
        block_the_loop(2.0)
        # still on the blocked loop: these synchronous requests are answered by the server's own threads
        during = fetch(port, "/healthz")
        live_during = fetch(port, "/livez")
        metrics_during = fetch(port, "/metrics")
        after = await until_status(port, "/healthz", 200, within=5)
        await wait_until(lambda: any("answers again" in r.getMessage() for r in caplog.records), within=5)
        tg.cancel_scope.cancel()
    assert before.status == 200
    assert during.status == 503
    assert live_during.status == 503
    doc = during.json()
    assert doc["status"] == "fail"
    assert doc["reasons"][0].startswith("event loop blocked: no heartbeat for ")
    assert doc["loop_heartbeat_age_s"] > 1.0
    assert metrics_during.status == 200
    assert b"replayd_build_info" in metrics_during.body
    assert after.json()["status"] == "ok"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "event loop blocked" in warnings[0]
    assert "block_the_loop" in warnings[0]  # the stack names the code that blocks the loop


# --- /readyz


async def test_readyz_names_what_is_missing() -> None:
    async with anyio.create_task_group() as tg:
        port = await tg.start(HttpServer(Metrics(), Readiness()).run)
        response = await afetch(port, "/readyz")
        tg.cancel_scope.cancel()
    assert response.status == 503
    assert response.json() == {
        "status": "fail",
        "reasons": ["configuration not validated", "plugins not loaded", "redis not reached yet"],
        "checks": {"config": False, "plugins": False, "redis": False},
    }


async def test_readyz_follows_redis(fresh_server: RedisServer) -> None:
    """1. not ready before the first PING  2. ready once Redis answers  3. Redis stopped: not ready, still live
    4. Redis back: ready again."""
    readiness = Readiness(config_ok=True, plugins_loaded=True)
    async with anyio.create_task_group() as tg:
        port = await tg.start(HttpServer(Metrics(), readiness).run)
        before = await afetch(port, "/readyz")
        cfg = RedisConfig(url=fresh_server.url)
        tg.start_soon(partial(ping_redis, readiness, cfg, interval_s=0.1, timeout_s=1.0))
        reached = await until_status(port, "/readyz", 200)
        await anyio.to_thread.run_sync(fresh_server.stop)
        down = await until_status(port, "/readyz", 503)
        live_while_down = await afetch(port, "/healthz")
        await anyio.to_thread.run_sync(fresh_server.start)
        back = await until_status(port, "/readyz", 200)
        tg.cancel_scope.cancel()
    assert before.json()["reasons"] == ["redis not reached yet"]
    assert reached.json() == {"status": "ok", "checks": {"config": True, "plugins": True, "redis": True}}
    assert down.json()["reasons"] == ["redis unreachable (connection)"]
    assert live_while_down.status == 200
    assert back.json()["status"] == "ok"


# --- the HTTP edges


async def test_unknown_path_is_404_and_query_strings_are_ignored() -> None:
    async with anyio.create_task_group() as tg:
        port = await tg.start(HttpServer(Metrics(), ready()).run)
        missing = await afetch(port, "/nope")
        missing_head = await afetch(port, "/nope", "HEAD")
        with_query = await afetch(port, "/readyz?verbose=1")
        post = await afetch(port, "/metrics", "POST")
        tg.cancel_scope.cancel()
    assert missing.status == 404
    assert missing.json()["paths"] == ["/healthz", "/livez", "/metrics", "/readyz"]
    assert (missing_head.status, missing_head.body) == (404, b"")
    assert with_query.status == 200
    assert post.status == 501


def raw_exchange(port: int, data: bytes, *, timeout: float = 5.0) -> bytes:
    """Send raw bytes, return everything the server sends until it closes (a reset counts as the end)."""
    chunks = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (ConnectionResetError, BrokenPipeError):
            pass
    return b"".join(chunks)


async def test_malformed_requests_get_400_and_close() -> None:
    async with anyio.create_task_group() as tg:
        port = await tg.start(HttpServer(Metrics(), ready()).run)
        garbage = await anyio.to_thread.run_sync(raw_exchange, port, b"NONSENSE\r\n\r\n")
        bad_version = await anyio.to_thread.run_sync(raw_exchange, port, b"GET /metrics HTTX/1.1\r\n\r\n")
        long_line = await anyio.to_thread.run_sync(raw_exchange, port, b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n")
        still = await afetch(port, "/healthz")
        tg.cancel_scope.cancel()
    assert garbage.startswith(b"HTTP/1.1 400 ")
    assert bad_version.startswith(b"HTTP/1.1 400 ")
    assert long_line.startswith(b"HTTP/1.1 414 ")
    assert still.status == 200


async def test_slow_clients_are_dropped_and_connections_capped() -> None:
    """1. two idle connections fill a cap of 2  2. a third is closed at once  3. the idle ones time out
    4. requests are served again."""
    server = HttpServer(Metrics(), ready(), request_timeout_s=0.5, max_connections=2)
    async with anyio.create_task_group() as tg:
        port = await tg.start(server.run)
        idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2)]
        try:
            await anyio.sleep(0.1)  # both accepted, each holding a slot
            refused = await anyio.to_thread.run_sync(raw_exchange, port, b"GET /healthz HTTP/1.1\r\n\r\n")
            started = time.monotonic()
            closed = [await anyio.to_thread.run_sync(sock.recv, 1) for sock in idle]
            waited = time.monotonic() - started
        finally:
            for sock in idle:
                sock.close()
        after = await until_status(port, "/healthz", 200, within=5)
        tg.cancel_scope.cancel()
    assert refused == b""
    assert closed == [b"", b""]
    assert waited < 2.0
    assert after.status == 200


def trickle(port: int, stop: threading.Event, every_s: float = 2.0) -> tuple[int, float]:
    """A slow client: one byte of a request every `every_s` until the server closes the connection or `stop` is
    set. Returns (bytes sent, seconds the connection stayed open)."""
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"y" * 1000
    started = time.monotonic()
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.settimeout(every_s)
        for byte in request:
            if stop.is_set():
                break
            try:
                sock.sendall(bytes([byte]))
                sent += 1
                if sock.recv(1) == b"":  # the server closed it
                    break
            except TimeoutError:
                continue  # nothing from the server: send the next byte
            except OSError:
                break
    return sent, time.monotonic() - started


async def test_64_slow_clients_do_not_starve_the_health_probe() -> None:
    """FAULTS T43. 1. 64 clients each send a request one byte every 2 s (a per-read time-out never fires)
    2. /healthz is probed every 0.25 s meanwhile: every probe is answered 200 within 2 s
    3. each slow client is dropped at the request deadline (default 5 s), not kept while it trickles."""
    server = HttpServer(Metrics(), ready())  # the defaults the daemon uses
    stop = threading.Event()
    async with anyio.create_task_group() as tg:
        port = await tg.start(server.run)
        slow: list[tuple[int, float]] = []

        async def slow_client() -> None:
            slow.append(await anyio.to_thread.run_sync(trickle, port, stop, limiter=clients))

        clients = anyio.CapacityLimiter(64)
        async with anyio.create_task_group() as slow_ones:
            for _ in range(64):
                slow_ones.start_soon(slow_client)
            await anyio.sleep(1.0)  # all 64 connected and trickling
            probes = []
            for _ in range(16):
                began = time.monotonic()
                try:
                    response = await anyio.to_thread.run_sync(partial(probe, port))
                except OSError as exc:
                    response = Response(0, {}, repr(exc).encode())
                probes.append((response.status, time.monotonic() - began))
                await anyio.sleep(0.25)
            stop.set()
        tg.cancel_scope.cancel()
    assert [status for status, _ in probes] == [200] * 16, probes
    assert max(took for _, took in probes) < 2.0, probes
    assert len(slow) == 64
    assert max(held for _, held in slow) < 5.0 + 2.0 + 1.0, slow  # the deadline, one trickle step, slack


def probe(port: int) -> Response:
    """A kubelet-like probe: one GET with a 2 s time-out."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/healthz")
        response = conn.getresponse()
        return Response(response.status, {}, response.read())
    finally:
        conn.close()


async def test_a_port_in_use_is_a_config_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ExceptionGroup) as raised:
            async with anyio.create_task_group() as tg:
                await tg.start(HttpServer(Metrics(), ready(), port=port).run)
    assert raised.group_contains(ConfigError, match=f"cannot listen on 127.0.0.1:{port}: Address already in use")


# --- wired into the daemon and the CLI

ORDERS = "events:orders"


async def test_daemon_serves_while_it_runs(redis_url: str, sync_redis: redis.Redis) -> None:
    """1. a following daemon with [http] port 0  2. ready, its metrics show the job live  3. stopped: port closed."""
    load_history_sync(sync_redis, ORDERS, 200)
    settings = Settings(
        redis=RedisConfig(url=redis_url, block_ms=100),
        http=HttpConfig(host="127.0.0.1", port=0),
        jobs=[JobSpec(name="orders", streams=[ORDERS], handler="order_summary", end="follow")],
    )
    daemon = Daemon(settings, handle_signals=False)
    assert (daemon.readiness.config_ok, daemon.readiness.plugins_loaded) == (True, True)
    async with anyio.create_task_group() as tg:
        tg.start_soon(daemon.run)
        await wait_until(lambda: daemon.http_port is not None)
        assert daemon.http_port is not None
        port: int = daemon.http_port
        ready_response = await until_status(port, "/readyz", 200)
        parsed = await until_sample(port, 1, "replayd_state", replay="orders", state="live")
        daemon.stop()
    assert ready_response.json()["status"] == "ok"
    assert value(parsed, "replayd_events_read_total", stream=ORDERS) == 200
    with pytest.raises(ConnectionRefusedError):
        await afetch(port, "/healthz")


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def poll(condition: Callable[[], bool], *, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met in {within}s")
        time.sleep(0.1)


def scrape_or_nothing(port: int) -> Samples:
    try:
        return samples(fetch(port, "/metrics").body.decode())
    except OSError:
        return {}


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_replay_metrics_port(
    tmp_path: Path,
    redis_url: str,
    sync_redis: redis.Redis,
    children: list[subprocess.Popen[bytes]],
    signum: signal.Signals,
) -> None:
    """1. `replayd replay --to follow --metrics-port P`  2. /metrics counts the history, /readyz 200  3. SIGINT or
    SIGTERM: it drains (as the daemon does) and exits 128 + the signal's number."""
    load_history_sync(sync_redis, ORDERS, 150)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("REPLAYD_")}
    log = tmp_path / "replay.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "replayd", "replay", "--redis-url", redis_url, "--stream", ORDERS,
             "--handler", "order_summary", "--to", "follow", "--metrics-port", str(port), "--log-format", "json"],
            stdout=subprocess.DEVNULL, stderr=out, env=env,
        )  # fmt: skip
    children.append(proc)

    def counted() -> bool:
        assert proc.poll() is None, log.read_text()
        return value(scrape_or_nothing(port), "replayd_events_read_total", stream=ORDERS) == 150

    poll(counted)
    poll(lambda: fetch(port, "/readyz").status == 200)
    proc.send_signal(signum)
    try:
        code = proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running 10 s after {signum.name}:\n{log.read_text()[-3000:]}") from None
    text = log.read_text()
    assert code == 128 + signum, text[-3000:]
    assert f"on http://127.0.0.1:{port}" in text
    assert f"{signum.name}: draining" in text
    assert "replayed 150 events" in text
