"""A TCP fault proxy for the tests: loopback only, its own asyncio loop in a background thread.

    with FaultProxy(("127.0.0.1", server.port)) as proxy:    # listens on 127.0.0.1:<free port>
        client = redis.Redis.from_url(proxy.url)
        proxy.delay(2000)                    # every chunk waits 2 s, both directions (a slow network)
        proxy.stall("upstream")              # hold the data of the connections open now (new ones are clean)
        proxy.blackhole()                    # read everything, forward nothing: half-open connections
        proxy.reset()                        # RST every open connection (SO_LINGER 0)
        proxy.slice(1)                       # fragment every write into 1-byte pieces
        proxy.limit_data(50_000)             # cut (RST) a connection after 50 kB more downstream
        proxy.retarget("127.0.0.1", other)   # new connections go to another upstream (VIP failover)
        proxy.clear()                        # remove every toxic; delayed data is forwarded at once

Toxics switch on and off at any time and apply to open connections as well as new ones. Every method is
synchronous and thread-safe, so async tests (any event loop) and sync code drive the proxy alike; the
calls only hand a change to the proxy's loop and wait for it to be applied (microseconds).

Semantics, chosen to be faithful to a real network:
- `delay` holds each chunk until `arrival + delay` (re-evaluated when the delay changes), so data is late but
  never lost nor reordered; a client that gives up and closes still has its earlier bytes delivered, as TCP
  delivers data queued before a FIN.
- `stall` is a delay without end on the connections open when it is set, until `clear()`: one connection stuck
  in TCP retransmission back-off while fresh connections work, so a late request can land after newer ones.
- `blackhole` swallows what it reads. A connection that lost data (or an EOF) to the blackhole is half-open
  for good: it forwards nothing ever again and never signals the client (no FIN, no RST) until the client
  closes it, because a byte stream with a hole would be a fault no network produces. Connections that were
  idle during the blackhole carry on after `clear()`, like TCP over a healed partition.
- `reset` aborts client and upstream sockets with SO_LINGER 0, so the client reads ECONNRESET;
  `reset(refuse=True)` also resets every new connection until `clear()`.
- `limit_data(n)` forwards at most n more bytes downstream on each connection (counted from when it is set,
  or from the connection's start), then resets it: a reply cut in the middle.

Bounded: at most `max_connections` links (more are reset on accept), 64 KiB reads, `queue_chunks` chunks
queued per direction; `stop()` closes every socket and joins the thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import random
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal, Self, TypeVar

__all__ = ["Direction", "FaultProxy", "ProxyStats"]

T = TypeVar("T")

Direction = Literal["upstream", "downstream", "both"]
"""upstream: client -> server; downstream: server -> client."""

UP: Literal["upstream"] = "upstream"
DOWN: Literal["downstream"] = "downstream"
_Chunk = tuple[float, bytes] | None
"""(arrival time, data), or None for end of stream."""


@dataclass
class ProxyStats:
    """Counters for tests to assert that a toxic did fire (read from any thread)."""

    accepted: int = 0
    refused: int = 0
    """Connections reset on accept: `reset(refuse=True)`, too many connections, or upstream unreachable."""
    active: int = 0
    bytes_up: int = 0
    """Bytes forwarded client -> server."""
    bytes_down: int = 0
    """Bytes forwarded server -> client."""
    discarded: int = 0
    """Bytes swallowed by the blackhole."""
    resets: int = 0
    """Connections reset by `reset()`."""
    cuts: int = 0
    """Connections cut by `limit_data`."""


@dataclass
class _Toxics:
    delay_s: dict[str, float] = field(default_factory=lambda: {UP: 0.0, DOWN: 0.0})
    slice_n: dict[str, tuple[int, int]] = field(default_factory=lambda: {UP: (0, 0), DOWN: (0, 0)})
    pause_s: float = 0.0
    blackhole: bool = False
    limit_down: int | None = None
    refuse: bool = False


def _directions(direction: Direction) -> tuple[str, ...]:
    if direction == "both":
        return (UP, DOWN)
    if direction in (UP, DOWN):
        return (direction,)
    raise ValueError(f"direction must be upstream, downstream or both, not {direction!r}")


def _require_loopback(host: str) -> None:
    address = ipaddress.ip_address(socket.gethostbyname(host))
    if not address.is_loopback:
        raise ValueError(f"the fault proxy only forwards to loopback, not {host} ({address})")


def _abort(writer: asyncio.StreamWriter, *, rst: bool) -> None:
    """Close at once; with `rst`, SO_LINGER 0 makes the close send RST instead of FIN."""
    if rst:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Link:
    """One proxied connection: client <-> upstream, a reader and a writer task per direction."""

    def __init__(
        self,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        budget: int | None,
    ) -> None:
        self.client_r, self.client_w = client
        self.up_r, self.up_w = upstream
        self.budget = budget
        """Bytes still allowed downstream (limit_data), or None."""
        self.halfopen = False
        self.stalled: set[str] = set()
        """Directions held until `clear()`."""
        self.closed = False
        self.tasks: set[asyncio.Task[None]] = set()

    def close(self, *, rst: bool, flush: bool = True) -> None:
        """Cancel the link's other tasks; close both sockets: RST, or FIN after what is buffered (`flush`)."""
        if self.closed:
            return
        self.closed = True
        current = asyncio.current_task()
        for task in self.tasks:
            if task is not current:
                task.cancel()
        for writer in (self.client_w, self.up_w):
            if rst or not flush:
                _abort(writer, rst=rst)
            else:
                writer.transport.close()


class FaultProxy:
    """A TCP proxy from 127.0.0.1:<free port> to a loopback upstream, with switchable toxics."""

    def __init__(
        self,
        upstream: tuple[str, int],
        *,
        max_connections: int = 128,
        queue_chunks: int = 64,
        read_size: int = 65536,
        connect_timeout_s: float = 5.0,
    ) -> None:
        _require_loopback(upstream[0])
        self.upstream = upstream
        self.max_connections = max_connections
        self.queue_chunks = queue_chunks
        self.read_size = read_size
        self.connect_timeout_s = connect_timeout_s
        self.host = "127.0.0.1"
        self.port = 0
        self.stats = ProxyStats()
        self._toxics = _Toxics()
        self._links: set[_Link] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._changed: asyncio.Event | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """A redis:// URL to the proxy (database 0)."""
        return f"redis://{self.host}:{self.port}/0"

    def start(self) -> Self:
        if self._thread is not None:
            raise RuntimeError("the proxy is already running")
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=self._run_loop, args=(loop,), name="faultproxy", daemon=True)
        self._thread.start()
        try:
            self.port = asyncio.run_coroutine_threadsafe(self._serve(), loop).result(timeout=10)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Close the listener and every connection, stop the loop and join the thread. Idempotent."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            if thread.is_alive():
                asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=10)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            if not thread.is_alive():
                loop.close()
            self._loop = self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @staticmethod
    def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        loop.run_forever()

    async def _serve(self) -> int:
        self._changed = asyncio.Event()
        self._server = await asyncio.start_server(self._accept, self.host, 0, limit=self.read_size)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.close(rst=False, flush=False)
        self._links.clear()
        current = asyncio.current_task()
        others = [task for task in asyncio.all_tasks() if task is not current]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        for _ in range(3):  # let aborted transports run connection_lost and close their sockets
            await asyncio.sleep(0)

    # -- toxics (sync, thread-safe) --------------------------------------------------------------------------

    def _apply(self, change: Callable[[], T]) -> T:
        loop = self._loop
        if loop is None:
            raise RuntimeError("the proxy is not running")

        async def run() -> T:
            result = change()
            assert self._changed is not None
            self._changed.set()  # wake writers that hold delayed data
            self._changed = asyncio.Event()
            return result

        return asyncio.run_coroutine_threadsafe(run(), loop).result(timeout=10)

    def delay(self, ms: float, direction: Direction = "both") -> None:
        """Hold each chunk `ms` milliseconds in `direction` (latency; nothing lost or reordered)."""

        def change() -> None:
            for d in _directions(direction):
                self._toxics.delay_s[d] = ms / 1000

        self._apply(change)

    def stall(self, direction: Direction = "both") -> int:
        """Hold, until `clear()`, the data of the connections open now; new connections are not affected."""

        def change() -> int:
            for link in self._links:
                link.stalled.update(_directions(direction))
            return len(self._links)

        return self._apply(change)

    def blackhole(self) -> None:
        """Read from both sides, forward nothing: connections that lose data stay half-open for good."""

        def change() -> None:
            self._toxics.blackhole = True

        self._apply(change)

    def reset(self, *, refuse: bool = False) -> int:
        """RST every open connection now; with `refuse`, also every new one until `clear()`. Returns the count."""

        def change() -> int:
            links = list(self._links)
            for link in links:
                self._drop(link, rst=True)
            self.stats.resets += len(links)
            if refuse:
                self._toxics.refuse = True
            return len(links)

        return self._apply(change)

    def slice(self, n: int, *, direction: Direction = "both", variation: int = 0, pause_us: float = 0.0) -> None:
        """Write data in pieces of `n` ± `variation` bytes (like toxiproxy's slicer); with `pause_us`, sleep
        that long between pieces (costly: a loop turn per piece), else one socket send per piece."""
        if n < 1 or not 0 <= variation < n:
            raise ValueError("slice size must be at least 1, variation in [0, n)")

        def change() -> None:
            for d in _directions(direction):
                self._toxics.slice_n[d] = (n, variation)
            self._toxics.pause_s = pause_us / 1_000_000

        self._apply(change)

    def limit_data(self, n: int) -> None:
        """Forward at most `n` more bytes downstream per connection, then reset it (a reply cut mid-way)."""
        if n < 0:
            raise ValueError("limit must not be negative")

        def change() -> None:
            self._toxics.limit_down = n
            for link in self._links:
                link.budget = n

        self._apply(change)

    def retarget(self, host: str, port: int, *, reset_existing: bool = False) -> None:
        """Send new connections to (host, port); with `reset_existing`, RST the open ones too."""
        _require_loopback(host)

        def change() -> None:
            self.upstream = (host, port)
            if reset_existing:
                links = list(self._links)
                for link in links:
                    self._drop(link, rst=True)
                self.stats.resets += len(links)

        self._apply(change)

    def clear(self) -> None:
        """Remove every toxic (the upstream stays as retargeted). Delayed data is forwarded at once."""

        def change() -> None:
            self._toxics = _Toxics()
            for link in self._links:
                link.budget = None
                link.stalled.clear()

        self._apply(change)

    # -- the data path (on the proxy's loop) -----------------------------------------------------------------

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            await self._connect(client_r, client_w)
        except BaseException:  # cancelled by stop() while connecting upstream: leave no socket open
            _abort(client_w, rst=True)
            raise

    async def _connect(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.stats.accepted += 1
        if self._toxics.refuse or len(self._links) >= self.max_connections:
            self.stats.refused += 1
            _abort(client_w, rst=True)
            return
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                upstream = await asyncio.open_connection(*self.upstream, limit=self.read_size)
        except (OSError, TimeoutError):
            self.stats.refused += 1  # like a connection refused: the client sees a reset
            _abort(client_w, rst=True)
            return
        if self._toxics.refuse:  # reset(refuse=True) came while connecting
            self.stats.refused += 1
            _abort(client_w, rst=True)
            _abort(upstream[1], rst=True)
            return
        link = _Link((client_r, client_w), upstream, self._toxics.limit_down)
        self._links.add(link)
        self.stats.active = len(self._links)
        for direction, src, dst in ((UP, client_r, link.up_w), (DOWN, link.up_r, client_w)):
            queue: asyncio.Queue[_Chunk] = asyncio.Queue(self.queue_chunks)
            for job in (self._read(link, src, queue), self._write(link, direction, dst, queue)):
                task = asyncio.create_task(job)
                link.tasks.add(task)

    def _drop(self, link: _Link, *, rst: bool) -> None:
        link.close(rst=rst)
        self._links.discard(link)
        self.stats.active = len(self._links)

    async def _read(self, link: _Link, src: asyncio.StreamReader, queue: asyncio.Queue[_Chunk]) -> None:
        with contextlib.suppress(OSError):  # ConnectionResetError and friends end the stream like an EOF
            while data := await src.read(self.read_size):
                await queue.put((time.monotonic(), data))
        await queue.put(None)

    async def _write(
        self, link: _Link, direction: str, dst: asyncio.StreamWriter, queue: asyncio.Queue[_Chunk]
    ) -> None:
        try:
            while (item := await queue.get()) is not None:
                arrived, data = item
                await self._hold(link, arrived, direction)
                if self._toxics.blackhole or link.halfopen:
                    link.halfopen = True
                    self.stats.discarded += len(data)
                    continue
                if direction == DOWN and link.budget is not None and len(data) >= link.budget:
                    await self._send(dst, data[: link.budget], direction)
                    self.stats.cuts += 1
                    self._drop(link, rst=True)
                    return
                if direction == DOWN and link.budget is not None:
                    link.budget -= len(data)
                await self._send(dst, data, direction)
        except OSError:
            self._drop(link, rst=True)
            return
        # end of stream from the source
        if self._toxics.blackhole or link.halfopen:
            link.halfopen = True
            if direction == DOWN:
                return  # the upstream went away: a half-open client hears nothing; it closes when it gives up
        self._drop(link, rst=False)

    async def _hold(self, link: _Link, arrived: float, direction: str) -> None:
        while True:
            wait: float | None = arrived + self._toxics.delay_s[direction] - time.monotonic()
            if direction in link.stalled:
                wait = None
            elif wait is not None and wait <= 0:
                return
            changed = self._changed
            assert changed is not None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await changed.wait()

    async def _send(self, dst: asyncio.StreamWriter, data: bytes, direction: str) -> None:
        n, variation = self._toxics.slice_n[direction]
        if n and n < len(data):
            start = 0
            while start < len(data):
                end = start + n + (random.randint(-variation, variation) if variation else 0)
                dst.write(data[start:end])
                start = end
                if self._toxics.pause_s:
                    await asyncio.sleep(self._toxics.pause_s)
                await dst.drain()
        else:
            dst.write(data)
            await dst.drain()
        if direction == UP:
            self.stats.bytes_up += len(data)
        else:
            self.stats.bytes_down += len(data)
