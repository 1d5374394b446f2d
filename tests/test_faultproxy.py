"""The fault proxy itself, against a real redis-server: each toxic does what test_faults.py relies on."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
import redis

from tests.faultproxy import FaultProxy
from tests.servers import RedisServer


@pytest.fixture
def proxy(redis_server: RedisServer) -> Iterator[FaultProxy]:
    with FaultProxy(("127.0.0.1", redis_server.port)) as running:
        yield running


def client(proxy: FaultProxy, timeout: float = 2.0) -> redis.Redis:
    return redis.Redis.from_url(proxy.url, socket_timeout=timeout, socket_connect_timeout=timeout)


def raw(proxy: FaultProxy, timeout: float = 2.0) -> socket.socket:
    sock = socket.create_connection((proxy.host, proxy.port), timeout=timeout)
    sock.sendall(b"PING\r\n")
    assert sock.recv(100) == b"+PONG\r\n"
    return sock


def test_forwards_and_stop_closes_everything(proxy: FaultProxy) -> None:
    with client(proxy) as r:
        assert r.set("fp:k", "v")
        assert r.get("fp:k") == b"v"
    sock = raw(proxy)
    assert proxy.stats.active >= 1
    assert proxy.stats.bytes_up > 0
    assert proxy.stats.bytes_down > 0
    proxy.stop()
    with sock:
        assert sock.recv(100) == b""  # FIN, not a hang
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((proxy.host, proxy.port), timeout=1).close()
    proxy.stop()  # idempotent


def test_delay_is_latency_and_clear_flushes(proxy: FaultProxy) -> None:
    with client(proxy) as r:
        r.ping()
        proxy.delay(150, "downstream")
        started = time.monotonic()
        assert r.ping()
        assert 0.15 <= time.monotonic() - started < 1.0
    proxy.delay(5000)
    sock = socket.create_connection((proxy.host, proxy.port), timeout=3)
    with sock:
        sock.sendall(b"PING\r\n")
        time.sleep(0.2)
        proxy.clear()
        started = time.monotonic()
        assert sock.recv(100) == b"+PONG\r\n"
        assert time.monotonic() - started < 0.5


def test_stall_holds_open_connections_only(proxy: FaultProxy) -> None:
    old = raw(proxy, timeout=0.3)
    assert proxy.stall("upstream") >= 1
    with old:
        old.sendall(b"PING\r\n")
        with pytest.raises(TimeoutError):
            old.recv(100)
        with client(proxy) as r:  # a new connection is not stalled
            assert r.ping()
        proxy.clear()
        old.settimeout(2)
        assert old.recv(100) == b"+PONG\r\n"  # held, not lost


def test_blackhole_leaves_connections_half_open(proxy: FaultProxy) -> None:
    sock = raw(proxy, timeout=0.3)
    idle = raw(proxy)
    proxy.blackhole()
    with sock:
        sock.sendall(b"PING\r\n")
        with pytest.raises(TimeoutError):
            sock.recv(100)  # no reply, no FIN, no RST
        proxy.clear()
        sock.sendall(b"PING\r\n")
        with pytest.raises(TimeoutError):
            sock.recv(100)  # it lost data: half-open for good
    assert proxy.stats.discarded > 0
    with idle:  # idle during the blackhole: carries on, like TCP over a healed partition
        idle.sendall(b"PING\r\n")
        assert idle.recv(100) == b"+PONG\r\n"
    with client(proxy) as r:
        assert r.ping()


def test_reset_sends_rst_and_refuse_resets_new_connections(proxy: FaultProxy) -> None:
    sock = raw(proxy)
    assert proxy.reset() >= 1
    with sock, pytest.raises(ConnectionResetError):
        sock.recv(100)
    proxy.reset(refuse=True)
    with client(proxy, timeout=1) as r, pytest.raises(redis.ConnectionError):
        r.ping()
    assert proxy.stats.refused >= 1
    proxy.clear()
    with client(proxy) as r:
        assert r.ping()


def test_slice_fragments_without_changing_the_bytes(proxy: FaultProxy) -> None:
    value = bytes(range(256)) * 40
    with client(proxy) as r:
        proxy.slice(1)
        r.set("fp:big", value)
        assert r.get("fp:big") == value
        proxy.slice(50, variation=49, pause_us=10)
        assert r.get("fp:big") == value


def test_limit_data_cuts_a_reply_after_n_bytes(proxy: FaultProxy) -> None:
    with client(proxy) as r:
        r.set("fp:big", b"x" * 100_000)
    sock = raw(proxy)
    proxy.limit_data(1000)
    received = b""
    with sock, pytest.raises(ConnectionResetError):
        sock.sendall(b"GET fp:big\r\n")
        while chunk := sock.recv(65536):
            received += chunk
    assert len(received) == 1000
    assert proxy.stats.cuts == 1
    proxy.clear()
    with client(proxy) as r:
        assert len(r.get("fp:big") or b"") == 100_000


def test_retarget_moves_new_connections(
    proxy: FaultProxy, redis_server: RedisServer, fresh_server: RedisServer
) -> None:
    old = raw(proxy)
    proxy.retarget("127.0.0.1", fresh_server.port)
    with client(proxy) as r:
        assert r.config_get("port")["port"] == str(fresh_server.port)
    with old:  # open connections stay where they were
        old.sendall(b"CONFIG GET port\r\n")
        assert str(redis_server.port).encode() in old.recv(100)
    proxy.retarget("127.0.0.1", redis_server.port, reset_existing=True)
    with client(proxy) as r:
        assert r.config_get("port")["port"] == str(redis_server.port)


def test_only_loopback_upstreams() -> None:
    with pytest.raises(ValueError, match="loopback"):
        FaultProxy(("192.0.2.1", 6379))
