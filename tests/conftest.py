"""Fixtures: a real redis-server per session (stopped by PID), clients flushed per test, anyio backends."""

from __future__ import annotations

import logging
import os
import subprocess
import traceback
from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.asyncio import Redis

from replayd.config import RedisConfig
from replayd.connection import create_redis
from replayd.embedded import find_redis_server
from replayd.errors import ConfigError
from tests.servers import RedisServer


@pytest.fixture(autouse=True)
def root_logger() -> Iterator[None]:
    """An in-process `run_cli` points the root logger at the test's captured stderr, which pytest closes after
    the test: put the logger back, or every later test's log lines end in "I/O operation on closed file"."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    """A failure pytest cannot format is reported with Python's own traceback instead of an INTERNALERROR that
    hides which test failed and why. pytest's formatter raises TypeError (`tb_lineno - 1`) on a traceback entry
    at an instruction that has no line number (`tb_lineno` is None there on Python 3.11+); CI met one once."""
    try:
        return (yield)
    except Exception as error:
        if call.excinfo is None or call.when == "collect":
            raise
        value = call.excinfo.value
        summary = "".join(traceback.format_exception_only(value)).strip()  # first: the line `-ra` shows
        text = "".join(traceback.format_exception(value))
        return pytest.TestReport(
            item.nodeid, item.location, dict.fromkeys(item.keywords, 1), "failed",
            f"{summary}\n\n{text}\n(pytest could not format this failure: {error!r})", call.when,
            duration=call.duration, start=call.start, stop=call.stop,
        )  # fmt: skip


def pytest_report_header() -> str:
    """Which redis-server the suite runs (REPLAYD_REDIS_SERVER, PATH, or the `embedded` extra's valkey-server)."""
    try:
        return f"redis-server: {find_redis_server()}"
    except ConfigError as exc:
        return f"redis-server: {exc}"


@pytest.fixture(
    params=[pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"), pytest.param(("asyncio", {}), id="asyncio")]
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    backend: tuple[str, dict[str, Any]] = request.param
    return backend


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    external = os.environ.get("REPLAYD_TEST_REDIS_URL")
    if external:
        pytest.skip("external Redis given; this suite starts its own servers")
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def redis_cfg(redis_url: str) -> RedisConfig:
    return RedisConfig(url=redis_url, block_ms=100, socket_timeout_s=5)


@pytest.fixture
def sync_redis(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis_server.client()
    client.flushall()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
async def raw_redis(redis_cfg: RedisConfig, sync_redis: redis.Redis) -> AsyncIterator[Redis]:
    """The data path's client (raw stream replies) on a flushed server."""
    client = create_redis(redis_cfg)
    assert isinstance(client, Redis)  # one server
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def fresh_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A server of the test's own, for tests that stop or restart Redis."""
    server = RedisServer(tmp_path / "redis", appendonly=True).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    """Subprocesses a test starts (append them): killed if still running when it ends."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
