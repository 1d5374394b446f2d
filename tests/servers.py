"""Real redis-server processes for the tests: free port, temp dir, stopped by PID. No fakes, no mocks."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis

from replayd.embedded import EmbeddedRedis, find_redis_server

__all__ = ["CLUSTER_ARGS", "RedisClusterServers", "RedisServer", "cluster_port", "find_redis_server"]


class RedisServer(EmbeddedRedis):
    """The embedded server with what tests need: a sync client, restarts on the same port, the version."""

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=10)

    def restart(self, sig: int = signal.SIGKILL) -> None:
        """Stop (SIGKILL by default: a crash) and start again on the same port and data directory.

        The crash comes between two of the server's system calls (it is stopped first, and killed once stopped: a
        write in progress finishes): a SIGKILL inside its write of the AOF can tear a transaction there, and Redis
        6.2-7.x restarted from that file, and then once more, applies the torn transaction's first commands again
        with the next one (a server bug, valkey-io/valkey#4342; docs/guarantees.md). Torn AOF tails are T9's
        own tests."""
        if sig == signal.SIGKILL and self.proc is not None:
            self.proc.send_signal(signal.SIGSTOP)
            os.waitpid(self.proc.pid, os.WUNTRACED)  # SIGSTOP is only queued: a SIGKILL sent now could still tear
        self.stop(kill=sig == signal.SIGKILL)
        self.start()

    def version(self) -> tuple[int, ...]:
        with self.client() as client:
            text = str(client.info("server")["redis_version"])
        return tuple(int(part) for part in text.split("."))


CLUSTER_SLOTS = 16384
CLUSTER_ARGS = ["--cluster-enabled", "yes", "--cluster-node-timeout", "5000"]


class RedisClusterServers:
    """Three redis-server primaries with `cluster-enabled yes`, joined into one cluster covering every slot.

    With redis-cli (next to the server binary, else on PATH) the cluster is made by `redis-cli --cluster create`;
    without one, or with REPLAYD_TEST_CLUSTER_CREATE=python, by CLUSTER ADDSLOTS + CLUSTER MEET from Python.
    """

    def __init__(self, directory: Path, *, size: int = 3) -> None:
        self.servers = [self._node(directory / f"node{i}") for i in range(size)]
        for server in self.servers:
            server.port = cluster_port()
        self.created_by = ""

    def _node(self, directory: Path) -> RedisServer:
        return RedisServer(directory, extra_args=CLUSTER_ARGS)

    @property
    def url(self) -> str:
        """A `redis+cluster://` URL naming the first node (the client discovers the others)."""
        return f"redis+cluster://127.0.0.1:{self.servers[0].port}"

    def start(self) -> RedisClusterServers:
        try:
            for server in self.servers:
                server.start()
            cli = _redis_cli(self.servers[0].binary)
            if cli:
                self._create_with_cli(cli)
            else:
                self._create_from_python()
            self._wait_ok()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for server in self.servers:
            server.stop()

    def _create_with_cli(self, cli: str) -> None:
        nodes = [f"127.0.0.1:{server.port}" for server in self.servers]
        subprocess.run(
            [cli, "--cluster", "create", *nodes, "--cluster-yes"], capture_output=True, check=True, timeout=30
        )
        self.created_by = "redis-cli"

    def _create_from_python(self) -> None:
        # ADDSLOTS with every slot listed: ADDSLOTSRANGE is Redis 7 only
        bounds = [CLUSTER_SLOTS * i // len(self.servers) for i in range(len(self.servers) + 1)]
        for server, low, high in zip(self.servers, bounds, bounds[1:], strict=False):
            with server.client() as client:
                client.execute_command("CLUSTER ADDSLOTS", *range(low, high))
        with self.servers[0].client() as first:
            for server in self.servers[1:]:
                first.execute_command("CLUSTER MEET", "127.0.0.1", server.port)
        self.created_by = "python"

    def _wait_ok(self, within_s: float = 20.0) -> None:
        """Every node sees the whole cluster with all slots served."""
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            if all(self._node_ok(server) for server in self.servers):
                return
            time.sleep(0.05)
        raise RuntimeError(f"the cluster on ports {[s.port for s in self.servers]} did not reach cluster_state:ok")

    def _node_ok(self, server: RedisServer) -> bool:
        with server.client() as client:
            info: dict[str, str] = client.execute_command("CLUSTER INFO")  # parsed by redis-py
        return info.get("cluster_state") == "ok" and info.get("cluster_known_nodes") == str(len(self.servers))

    def node_of(self, key: str) -> RedisServer:
        """The server that serves `key`'s slot."""
        with self.servers[0].client() as client:
            slot = int(client.execute_command("CLUSTER KEYSLOT", key))
            ranges = client.execute_command("CLUSTER SLOTS")
        for low, high, primary, *_ in ranges:
            if low <= slot <= high:
                return next(server for server in self.servers if server.port == int(primary[1]))
        raise LookupError(f"no node serves slot {slot}")

    def flush(self) -> None:
        for server in self.servers:
            with server.client() as client:
                client.flushall()


def _redis_cli(server_binary: str) -> str | None:
    if os.environ.get("REPLAYD_TEST_CLUSTER_CREATE") == "python":
        return None
    beside = Path(server_binary).with_name("redis-cli")
    return str(beside) if beside.exists() else shutil.which("redis-cli")


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too, both below the kernel's range of ephemeral
    ports: a port picked from that range (as `free_port` does) can be taken by any connection made before the
    node binds it, such as the readiness pings of the nodes started first."""
    ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    while True:
        port = random.randrange(1024, ephemeral_low - 10000)
        if _bindable(port) and _bindable(port + 10000):
            return port


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
