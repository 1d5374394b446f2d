"""Redis clients for the data path: hiredis, a blocking pool, raw stream replies, retries with backoff."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator
from contextvars import ContextVar
from functools import cache
from typing import Any, ClassVar, Self, TypeVar

import anyio
import hiredis
import redis
from redis._parsers.hiredis import _AsyncHiredisParser
from redis._parsers.socket import SERVER_CLOSED_CONNECTION_ERROR
from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
    parse_url,
)
from redis.exceptions import (
    AuthenticationError,
    ClusterDownError,
    NoPermissionError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    ResponseError,
    SlotNotCoveredError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from replayd.config import RedisConfig
from replayd.errors import ConfigError, SourceError
from replayd.ops.logs import redact_text
from replayd.ops.metrics import Metrics
from replayd.version import __version__

logger = logging.getLogger(__name__)

T = TypeVar("T")

Client = Redis | RedisCluster
"""The data path's client: one server, or a Redis Cluster (`redis.cluster = true`)."""

RETRIABLE = (RedisConnectionError, RedisTimeoutError, OSError)
"""Errors after which the same idempotent read may simply be sent again. Prefer `is_retriable`: `except RETRIABLE`
also catches redis-py's AuthenticationError (a ConnectionError). `create_redis` clients raise AccessDenied instead."""


def is_retriable(exc: BaseException) -> bool:
    """A lost or failing connection: one of RETRIABLE, or uvloop's RuntimeError for a write on a transport the
    peer has reset ("unable to perform operation on <TCPTransport closed=True ...>; the handler is closed").

    Never a refusal the same attempt would meet again: rejected credentials (redis-py's AuthenticationError is a
    ConnectionError) or a TLS handshake failing on certificates (see `access_denied`)."""
    if access_denied(exc) is not None:
        return False
    if isinstance(exc, RedisClusterException):
        # the cluster client wraps "no node reachable" around the connection error; slots not served yet pass
        return isinstance(exc, SlotNotCoveredError) or (exc.__cause__ is not None and is_retriable(exc.__cause__))
    if isinstance(exc, ClusterDownError):  # a cluster reconfiguring (a failover): it comes back
        return True
    if role_changed(exc) or out_of_memory(exc):
        return True
    return isinstance(exc, RETRIABLE) or (isinstance(exc, RuntimeError) and "handler is closed" in str(exc))


def role_changed(exc: BaseException) -> bool:
    """The primary this connection reached was demoted to a replica by a failover that kept the connection open:
    a write refused READONLY (6.2 wraps it in a script's error), or a blocking read ended UNBLOCKED."""
    if isinstance(exc, ReadOnlyError):
        return True
    return isinstance(exc, ResponseError) and (str(exc).startswith("UNBLOCKED") or "-READONLY " in str(exc))


def out_of_memory(exc: BaseException) -> bool:
    """Redis refused a write for memory (`maxmemory` reached and nothing it may evict): an outage to wait out, as
    an unreachable Redis is. Redis 6.2 wraps the refusal of a script's write in the script's error."""
    return isinstance(exc, OutOfMemoryError) or (
        isinstance(exc, ResponseError) and "OOM command not allowed" in str(exc)
    )


def explain(exc: BaseException) -> str:
    """`exc` for a log line, with what to do when Redis is out of memory."""
    if out_of_memory(exc):
        return (
            f"{exc} -- Redis is at its maxmemory and refuses writes: free memory, raise maxmemory, or let it evict "
            "keys with a TTL (maxmemory-policy volatile-*); replayd retries, nothing of the refused write applied"
        )
    return str(exc)


class Memory:
    """What the data path last met: a write refused for memory, until a write goes through again. Readiness
    reports it (Redis answers PING all along)."""

    refused: ClassVar[BaseException | None] = None

    @classmethod
    def note(cls, exc: BaseException | None) -> None:
        if exc is None or out_of_memory(exc):
            if (exc is None) != (cls.refused is None):
                logger.log(logging.INFO if exc is None else logging.WARNING, "redis %s",
                           "accepts writes again" if exc is None else f"refuses writes: {explain(exc)}")  # fmt: skip
            cls.refused = exc


async def ping(client: Client) -> None:
    """PING, failing while the data path's writes are refused for memory (readiness: not ready)."""
    await client.ping()
    if Memory.refused is not None:
        raise Memory.refused


EVICTING = ("allkeys-lru", "allkeys-lfu", "allkeys-random")


async def check_eviction_policy(client: Client, *, allow: bool) -> str:
    """Redis's `maxmemory-policy` (from INFO memory, which needs no CONFIG permission); ConfigError for a policy
    that may evict keys without a TTL (replayd's checkpoints), unless `allow` (redis.allow_allkeys_eviction)."""
    try:
        info: dict[str, Any] = await client.info("memory")
    except NoPermissionError:
        logger.warning("INFO memory refused (ACL): replayd cannot check that maxmemory-policy keeps its checkpoints")
        return ""
    if "maxmemory_policy" not in info:  # a cluster client: per node
        policies = {str(node.get("maxmemory_policy", "")) for node in info.values() if isinstance(node, dict)}
    else:
        policies = {str(info["maxmemory_policy"])}
    evicting = sorted(policies & set(EVICTING))
    if not evicting:
        return ",".join(sorted(policies))
    if allow:
        logger.warning("Redis runs maxmemory-policy %s: it may evict replayd's checkpoints (allowed by "
                       "redis.allow_allkeys_eviction); a checkpoint evicted stops the job", evicting[0])  # fmt: skip
        return evicting[0]
    raise ConfigError(
        f"Redis runs maxmemory-policy {evicting[0]}, which evicts keys without a TTL: replayd's checkpoints and "
        "progress would be dropped, and a restart would replay the whole stream onto the projection. Set "
        "maxmemory-policy to noeviction or volatile-lru (CONFIG SET maxmemory-policy noeviction, or in "
        "redis.conf), or keep replayd's keys on another Redis; redis.allow_allkeys_eviction = true runs anyway"
    )


class AccessDenied(ConfigError):
    """Raised when Redis refuses replayd's credentials or a TLS handshake fails on certificates: configuration to
    fix (exit 78), never retried."""


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < 8:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


_CLIENT_CERT_ALERTS = ("CERTIFICATE", "UNKNOWN_CA", "ACCESS_DENIED")
"""TLS alerts (in an SSLError's reason) by which a server rejects the client's certificate, or its absence."""


def access_denied(exc: BaseException, where: str = "Redis") -> AccessDenied | None:
    """The AccessDenied that `exc` (or an error it was raised from) amounts to, else None."""
    for error in _chain(exc):
        if isinstance(error, AccessDenied):
            return error
        if isinstance(error, AuthenticationError):
            return AccessDenied(
                f"{where} refused the credentials ({error}): check the user and password in redis.url, "
                "redis.username, redis.password (REPLAYD_REDIS__PASSWORD) or redis.password_file"
            )
        if isinstance(error, ssl.SSLCertVerificationError):
            reason = error.verify_message or error.reason or str(error)
            hint = "set redis.tls_ca_file to the CA that signed the server's certificate"
            if "mismatch" in str(reason).lower():
                hint = "connect by a name or address the certificate lists (or set redis.tls_verify_hostname = false)"
            return AccessDenied(f"TLS: {where} presented a certificate replayd does not accept ({reason}): {hint}")
        if type(error) is ssl.SSLError and any(alert in str(error.reason) for alert in _CLIENT_CERT_ALERTS):
            return AccessDenied(
                f"TLS: {where} rejected replayd's client certificate ({error.reason}): set redis.tls_cert_file and "
                "redis.tls_key_file to a certificate signed by a CA the server trusts (its tls-ca-cert-file)"
            )
    return None


def connects() -> int:
    """How many connections `create_redis` clients have made. It moves when one is made again after Redis went
    away, and the Redis answering then may be another (a promoted replica) or hold less (a torn AOF). (It also
    moves when a pool grows: a check it triggers then finds nothing.)"""
    return _FailFast.connects


READ_SIZE = 1 << 20
"""Bytes a connection takes from its socket buffer at once (redis-py reads 32 KiB): an XRANGE reply of 1000 entries
is about 230 KiB, so a reply takes fewer reads and parser feeds (a small gain: 2 % of the raw loop's instructions)."""

_received: ContextVar[list[int] | None] = ContextVar("replayd_received", default=None)


def count_received() -> list[int]:
    """A counter of the bytes the calling task's commands read from Redis from now on. A stream reader learns
    what its replies weigh from it, for nothing: summing the lengths of a reply's fields costs 0.3 µs an entry."""
    counter = [0]
    _received.set(counter)
    return counter


class _CountingParser(_AsyncHiredisParser):
    """redis-py's asyncio hiredis parser, adding what it reads to the reading task's `count_received` counter."""

    async def read_from_socket(self) -> bool:
        # redis-py's own body, and the count: it does not expose the length of what it read
        stream, reader = self._stream, self._reader
        assert stream is not None and reader is not None  # it reads only while connected
        buffer = await stream.read(self._read_size)
        if not buffer or not isinstance(buffer, bytes):
            raise RedisConnectionError(SERVER_CLOSED_CONNECTION_ERROR) from None
        reader.feed(buffer)
        counter = _received.get()
        if counter is not None:
            counter[0] += len(buffer)
        return True


class _FailFast(AbstractConnection):
    """Turns refused credentials or a certificate failure while connecting into AccessDenied: redis-py raises them
    as ConnectionErrors, which every retry loop (`retrying`, the commit's, redis-py's) would retry for its budget.

    Also counts connections for `connects()`: redis-py retries a failed command on a new connection itself,
    so a caller cannot tell from the reply that Redis went away meanwhile."""

    connects: ClassVar[int] = 0

    async def connect_check_health(self, *args: Any, **kwargs: Any) -> None:
        if self.is_connected:  # the pool asks before every command: nothing to do, nothing to count
            return
        try:
            await super().connect_check_health(*args, **kwargs)
        except RedisConnectionError as exc:
            where = f"Redis at {self._host_error()}"
            denied = access_denied(exc, where) or await self._refusal_hidden_by(exc, where)
            if denied is None:
                raise
            raise denied from exc
        _FailFast.connects += 1

    async def _refusal_hidden_by(self, exc: RedisConnectionError, where: str) -> AccessDenied | None:
        """The refusal a connection error may hide: none over plain TCP."""
        return None

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)
        except ResponseError as exc:
            if role_changed(exc):  # drop it, so that the retry reaches whatever the address serves now
                await self.disconnect(nowait=True)
            raise


class _TcpConnection(_FailFast, Connection):
    pass


_NEVER_CAME_UP = (ConnectionRefusedError, TimeoutError, RedisTimeoutError, socket.gaierror)

PROBE_S = 1.0
"""How long a TLS connection that met a reset waits for a rejecting server's alert (it comes within a round trip)."""


class _TlsConnection(_FailFast, SSLConnection):
    async def _refusal_hidden_by(self, exc: RedisConnectionError, where: str) -> AccessDenied | None:
        """With TLS 1.3 the client's handshake ends before the server checks its certificate; a server that rejects
        it then sends an alert and closes. The first command, written meanwhile, can lose that alert: the peer's
        close arrives as a reset (asyncio), or the transport is found closed before the write (uvloop), and the
        refusal looks like Redis going away (in most such connections on loopback). So a connection that came up
        and was then closed is checked on a handshake of its own that writes nothing and reads: a rejecting
        server's alert arrives intact; one that accepts sends nothing (the close was something else)."""
        if any(isinstance(error, _NEVER_CAME_UP) for error in _chain(exc)):
            return None
        try:
            with anyio.fail_after(min(self.socket_connect_timeout or PROBE_S, PROBE_S)):
                reader, writer = await asyncio.open_connection(**self._connection_arguments())
                try:
                    await reader.read(1)
                finally:
                    writer.close()
        except ssl.SSLError as error:
            return access_denied(error, where)
        except (OSError, TimeoutError):
            pass
        return None


class _UnixConnection(_FailFast, UnixDomainSocketConnection):
    pass


_FAIL_FAST: dict[type[AbstractConnection], type[AbstractConnection]] = {
    Connection: _TcpConnection,
    SSLConnection: _TlsConnection,
    UnixDomainSocketConnection: _UnixConnection,
}


def connection_options(cfg: RedisConfig) -> dict[str, Any]:
    """redis-py keyword arguments for what the URL does not say: credentials and, for `rediss://`, TLS.

    For another client of the same Redis: `Redis.from_url(cfg.url.get_secret_value(), **connection_options(cfg))`.
    """
    options: dict[str, Any] = {}
    username, password = cfg.username_and_password
    if username is not None:
        options["username"] = username
    if password is not None:
        options["password"] = password.get_secret_value()
    if cfg.scheme == "rediss":
        options["ssl_cert_reqs"] = "none" if cfg.tls_allow_unverified else "required"
        options["ssl_check_hostname"] = cfg.tls_verify_hostname and not cfg.tls_allow_unverified
        for option, path in (
            ("ssl_ca_certs", cfg.tls_ca_file),
            ("ssl_certfile", cfg.tls_cert_file),
            ("ssl_keyfile", cfg.tls_key_file),
        ):
            if path is not None:
                options[option] = str(path)
    return options


def create_redis(cfg: RedisConfig, *, raw_streams: bool = True) -> Client:
    """A client on a blocking pool (waits for a free connection instead of failing under load), or, for
    `cluster = true` and `redis+cluster://` URLs, a Redis Cluster client (`ClusterClient`).

    `redis://`, `rediss://` (TLS, with the `tls_*` settings) and `unix://` URLs; credentials from the URL or the
    settings. Refused credentials and certificate failures raise AccessDenied at once, never retried.

    With `raw_streams`, XRANGE/XREVRANGE/XREAD replies stay the lists hiredis builds: redis-py's per-entry
    callbacks would cost more than the decoding itself.
    """
    client: Client = ClusterClient(cfg) if cfg.is_cluster else Redis.from_pool(_pool(cfg))  # owns its pool
    if raw_streams:
        for command in ("XRANGE", "XREVRANGE", "XREAD"):
            client.response_callbacks.pop(command, None)
    return client


def _url_options(cfg: RedisConfig) -> dict[str, Any]:
    """What the URL says (and credentials and TLS options it does not), with fail-fast connection classes."""
    try:
        from_url: dict[str, Any] = dict(parse_url(cfg.node_url()))
    except ValueError as exc:  # never echo the URL: it may carry a password
        raise ConfigError(f"redis.url cannot be used: {redact_text(str(exc))}") from None
    # as redis-py's from_url: what the URL (and its query string) says wins over keyword arguments
    kwargs: dict[str, Any] = {**connection_options(cfg), **from_url}
    kind = kwargs.get("connection_class", Connection)
    kwargs["connection_class"] = _FAIL_FAST.get(kind, kind)
    kwargs["parser_class"] = _CountingParser
    kwargs.setdefault("socket_read_size", READ_SIZE)
    return {**kwargs, **_identity()}


@cache
def _identity() -> dict[str, Any]:
    """How replayd's connections name themselves (CLIENT SETINFO, shown by CLIENT LIST on Redis 7.2+):
    `redis-py(replayd_v<version>)`. Given, it also spares each new connection redis-py's look-up of its own
    version in the installed packages' metadata (half a millisecond)."""
    try:
        from redis.driver_info import DriverInfo
    except ImportError:  # redis-py < 7.2 takes the two names
        return {"lib_name": f"redis-py(replayd_v{__version__})", "lib_version": redis.__version__}
    return {"driver_info": DriverInfo(lib_version=redis.__version__).add_upstream_driver("replayd", __version__)}


def _pool(cfg: RedisConfig) -> BlockingConnectionPool:
    return BlockingConnectionPool(
        max_connections=cfg.max_connections,
        timeout=cfg.socket_timeout_s,
        socket_timeout=cfg.socket_timeout_s,
        socket_connect_timeout=cfg.connect_timeout_s,
        health_check_interval=30,
        # RESP2 on purpose: the raw stream replies the data path parses have one shape on Redis 6.2 and 7,
        # whatever protocol a redis-py release negotiates by default
        protocol=2,
        **_url_options(cfg),
    )


class ClusterClient(RedisCluster):
    """redis-py's asyncio cluster client, built from replayd's settings: commands are routed by key slot.

    Its per-node pools do not block when full (redis-py raises MaxConnectionsError, a ConnectionError that
    `retrying` backs off from); `max_connections` is per node.
    """

    def __init__(self, cfg: RedisConfig) -> None:
        kwargs = _url_options(cfg)
        if kwargs.pop("db", 0):
            raise ConfigError("redis.url names a database other than 0: a Redis Cluster has only database 0")
        connection_class, parser_class = kwargs.pop("connection_class"), kwargs.pop("parser_class")
        if issubclass(connection_class, SSLConnection):
            kwargs["ssl"] = True
        options: dict[str, Any] = {
            "max_connections": cfg.max_connections,
            "socket_timeout": cfg.socket_timeout_s,
            "socket_connect_timeout": cfg.connect_timeout_s,
            "health_check_interval": 30,
            "protocol": 2,  # as for one server: one shape of raw stream replies
        }
        super().__init__(**{**options, **kwargs})
        # RedisCluster takes neither class; its nodes copy these options (refused credentials fail fast)
        self.connection_kwargs["connection_class"] = connection_class
        self.connection_kwargs["parser_class"] = parser_class
        for node in self.nodes_manager.startup_nodes.values():
            node.connection_class = connection_class
            node.connection_kwargs["parser_class"] = parser_class
        self.cfg = cfg

    def reads_client(self) -> ClusterClient:
        """Another client of the same cluster with redis-py's usual reply parsing (for handlers' reads)."""
        return ClusterClient(self.cfg)


class OwnConnection:
    """The connection a loop of data-path commands (a stream's reads, the commits) sends on, beside the client's
    pool: taking a connection from redis-py's pool and giving it back costs about as much client time as the
    command itself. For one server, a connection of its own, made on first use and again after a failure (a
    failed or cancelled command closes it, as the pool's users do: its state is unknown); for a cluster, the
    cluster client (which keeps a connection per node and follows redirections). Closed on leaving `async with`."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._pool = client.connection_pool if isinstance(client, Redis) else None
        self._conn: AbstractConnection | None = None

    async def call(self, *argv: Any) -> Any:
        """Send a command; its reply as hiredis parses it (no response callback)."""
        if self._pool is None:
            return await self._client.execute_command(*argv)
        packed = hiredis.pack_command(argv)  # a value no command takes raises here: the connection is fine
        conn = self._connection()
        try:
            await conn.send_packed_command(packed, check_health=False)
            return await conn.read_response()
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await conn.disconnect()
            if isinstance(exc, RuntimeError) and is_retriable(exc):  # uvloop's word for a reset transport
                raise RedisConnectionError(str(exc)) from exc
            raise

    async def warm(self) -> None:
        """Connect now, ahead of the first command (a failure is left to that command and its retries)."""
        if self._pool is not None:
            with contextlib.suppress(Exception):
                await self._connection().connect()  # type: ignore[no-untyped-call]

    def _connection(self) -> AbstractConnection:
        if self._conn is None:
            assert self._pool is not None
            self._conn = self._pool.make_connection()  # type: ignore[no-untyped-call]
        return self._conn

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._conn is not None:
            with anyio.CancelScope(shield=True):
                await self._conn.disconnect()


def reads_client(client: Client) -> Client:
    """A client with redis-py's usual reply parsing beside the data path's raw one: on the same pool for one
    server; for a cluster, a client of its own that the caller closes (`close_reads_client`)."""
    if isinstance(client, ClusterClient):
        return client.reads_client()
    if isinstance(client, RedisCluster):
        return client
    return Redis(connection_pool=client.connection_pool)


async def close_reads_client(reads: Client, client: Client) -> None:
    """Close what `reads_client(client)` opened (a view on `client`'s pool needs nothing)."""
    if isinstance(reads, RedisCluster) and reads is not client:
        await reads.aclose()


async def retrying(
    call: Callable[[], Awaitable[T]], *, what: str, budget_s: float, metrics: Metrics | None = None
) -> T:
    """Run an idempotent Redis call, retrying connection errors with exponential backoff and full jitter."""
    deadline = time.monotonic() + budget_s
    delay = 0.05
    failed = refused = False
    while True:
        started = time.monotonic()
        try:
            result = await call()
        except Exception as exc:
            if not is_retriable(exc):
                raise
            if metrics:
                metrics.redis_error(what.lower(), exc)
            refused = out_of_memory(exc)
            Memory.note(exc)
            if time.monotonic() + delay > deadline:
                raise SourceError(f"Redis unavailable for {budget_s:.0f}s during {what}: {explain(exc)}") from exc
            logger.warning("redis %s failed (%s), retrying", what, explain(exc))
            failed = failed or not refused
            await anyio.sleep(random.uniform(0, delay))
            delay = min(delay * 2, 5.0)
            continue
        if metrics:
            metrics.command_duration.labels(what.lower()).observe(time.monotonic() - started)
            if failed:
                metrics.reconnects.inc()
        if refused:
            Memory.note(None)
        return result


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def text_hash(raw: dict[Any, Any]) -> dict[str, str]:
    """An HGETALL reply as text, whatever the client's decode_responses."""
    return {text(k): text(v) for k, v in raw.items()}
