"""Real redis-server processes for the tests: free port, temp dir, stopped by PID. No fakes, no mocks."""

from __future__ import annotations

import signal

import redis

from replayd.embedded import EmbeddedRedis, find_redis_server

__all__ = ["RedisServer", "find_redis_server"]


class RedisServer(EmbeddedRedis):
    """The embedded server with what tests need: a sync client, restarts on the same port, the version."""

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=10)

    def restart(self, sig: int = signal.SIGKILL) -> None:
        """Stop (SIGKILL by default: a crash) and start again on the same port and data directory."""
        self.stop(kill=sig == signal.SIGKILL)
        self.start()

    def version(self) -> tuple[int, ...]:
        with self.client() as client:
            text = str(client.info("server")["redis_version"])
        return tuple(int(part) for part in text.split("."))
