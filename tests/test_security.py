"""Security: `rediss://` TLS with a CA and a client certificate, Redis ACL users, secrets kept out of every output.

Real redis-server processes on loopback (one with a TLS port that requires client certificates, one with an ACL
user and the default user disabled), a throwaway CA made with the `openssl` CLI. No fakes, no mocks.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import redis
from prometheus_client import generate_latest
from pydantic import SecretStr

from replayd.config import JobSpec, RedisConfig, load_settings
from replayd.connection import AccessDenied, create_redis, is_retriable, retrying
from replayd.errors import ConfigError
from replayd.jobs.engine import Engine
from replayd.jobs.rebuild import rebuild_in_place
from replayd.ops.logs import redact_text
from replayd.ops.metrics import Metrics
from replayd.pipeline.commit import job_key
from replayd.sample import load_history_sync
from tests.helpers import replayd
from tests.servers import RedisServer
from tests.tls import Certs, TlsRedisClusterServers, TlsRedisServer, make_certs, openssl

STREAM = "events:orders"
USER, SECRET = "replayer", "s3cret-Pa55"
WRONG = "wr0ng-Pa55"
EVENTS = 300


def timed(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run the CLI; return the process and how long it took."""
    started = time.monotonic()
    done = replayd(*args, env=env, timeout=20)
    return done, time.monotonic() - started


def replay_args(url: str, *extra: str) -> list[str]:
    return ["replay", "--redis-url", url, "--stream", STREAM, "--handler", "order_summary", *extra]


# --- servers --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    if openssl() is None:
        pytest.skip("the openssl CLI is not on PATH: cannot make the test CA and certificates")
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> Iterator[TlsRedisServer]:
    server = TlsRedisServer(tmp_path_factory.mktemp("redis-tls"), certs).start_or_skip()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def tls_cfg(tls_server: TlsRedisServer, certs: Certs) -> RedisConfig:
    return RedisConfig(
        url=tls_server.tls_url,
        tls_ca_file=certs.ca,
        tls_cert_file=certs.client_cert,
        tls_key_file=certs.client_key,
        block_ms=100,
        socket_timeout_s=5,
        unavailable_timeout_s=5,
    )


@pytest.fixture
def tls_history(tls_server: TlsRedisServer, certs: Certs) -> int:
    """EVENTS orders written through a TLS client with the client certificate."""
    with redis.Redis(
        host="127.0.0.1",
        port=tls_server.tls_port,
        ssl=True,
        ssl_ca_certs=str(certs.ca),
        ssl_certfile=str(certs.client_cert),
        ssl_keyfile=str(certs.client_key),
        socket_timeout=10,
    ) as client:
        client.flushall()
        return load_history_sync(client, STREAM, EVENTS)


@pytest.fixture(scope="module")
def acl_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A plain redis-server whose only enabled user is `replayer`: the default user is switched off."""
    server = RedisServer(tmp_path_factory.mktemp("redis-acl")).start()
    try:
        with server.client() as client:
            client.execute_command("ACL", "SETUSER", USER, "on", f">{SECRET}", "~*", "&*", "+@all")
            client.execute_command("ACL", "SETUSER", "reader", "on", f">{SECRET}", "~*", "&*", "+@read", "+ping")
            client.execute_command("ACL", "SETUSER", "default", "off")
        yield server
    finally:
        server.stop()


def acl_url(server: RedisServer, user: str = USER, password: str = SECRET) -> str:
    return f"redis://{user}:{password}@127.0.0.1:{server.port}/0"


@pytest.fixture
def admin(acl_server: RedisServer) -> Iterator[redis.Redis]:
    """The ACL server as `replayer`, flushed, with EVENTS orders."""
    with redis.Redis(port=acl_server.port, username=USER, password=SECRET, socket_timeout=10) as client:
        client.flushall()
        load_history_sync(client, STREAM, EVENTS)
        yield client


# --- settings -------------------------------------------------------------------------------------------------


def test_missing_tls_files_are_config_errors_naming_the_setting(tmp_path: Path) -> None:
    tls = "rediss://127.0.0.1:6380/0"
    with pytest.raises(ConfigError, match=r"redis\.tls_ca_file: file .*nope\.pem does not exist"):
        load_settings(redis={"url": tls, "tls_ca_file": str(tmp_path / "nope.pem")})
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"redis\.tls_ca_file: .*junk\.pem holds no PEM CA certificate"):
        load_settings(redis={"url": tls, "tls_ca_file": str(tmp_path / "junk.pem")})
    with pytest.raises(ConfigError, match=r"redis\.tls_cert_file: file .* does not exist"):
        load_settings(redis={"url": tls, "tls_cert_file": str(tmp_path / "client.crt")})
    with pytest.raises(ConfigError, match=r"redis\.password_file: file .* does not exist"):
        load_settings(redis={"password_file": str(tmp_path / "pw")})


def test_tls_options_need_a_rediss_url_and_a_matching_key(certs: Certs) -> None:
    with pytest.raises(ConfigError, match=r"tls_ca_file needs a rediss:// url"):
        load_settings(redis={"url": "redis://127.0.0.1:6379/0", "tls_ca_file": str(certs.ca)})
    with pytest.raises(ConfigError, match=r"tls_key_file needs tls_cert_file"):
        load_settings(redis={"url": "rediss://127.0.0.1/0", "tls_key_file": str(certs.client_key)})
    with pytest.raises(ConfigError, match=r"tls_cert_file .*: not a PEM certificate and matching unencrypted"):
        load_settings(
            redis={
                "url": "rediss://127.0.0.1/0",
                "tls_cert_file": str(certs.client_cert),
                "tls_key_file": str(certs.server_key),
            }
        )


def test_credentials_come_from_one_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret_file = tmp_path / "redis-password"
    secret_file.write_text(SECRET + "\n")
    from_file = load_settings(redis={"username": USER, "password_file": str(secret_file)}).redis
    user, password = from_file.username_and_password
    assert user == USER
    assert password is not None
    assert password.get_secret_value() == SECRET  # the final newline of the mounted secret is dropped
    monkeypatch.setenv("REPLAYD_REDIS__PASSWORD", SECRET)
    from_env = load_settings().redis
    assert from_env.password is not None
    assert from_env.password.get_secret_value() == SECRET
    with pytest.raises(ConfigError, match="password or password_file, not both") as both:
        load_settings(redis={"password_file": str(secret_file)})
    with pytest.raises(ConfigError, match="the url carries a password") as twice:
        load_settings(redis={"url": f"redis://u:{WRONG}@h:1/0"})
    for error in (both, twice):
        assert SECRET not in str(error.value)
        assert WRONG not in str(error.value)


def test_settings_never_print_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REPLAYD_REDIS__URL", f"redis://{USER}:{SECRET}@127.0.0.1:1/0")
    settings = load_settings()
    for shown in (repr(settings), str(settings), repr(settings.redis), str(settings.redis)):
        assert SECRET not in shown
        assert "**********" in shown
    monkeypatch.delenv("REPLAYD_REDIS__URL")
    monkeypatch.setenv("REPLAYD_REDIS__PASSWORD", SECRET)
    assert SECRET not in repr(load_settings())
    assert SECRET not in json.dumps(load_settings().model_dump(mode="json"))
    # an invalid URL or setting is reported without echoing the secret
    monkeypatch.setenv("REPLAYD_REDIS__URL", f"http://{USER}:{WRONG}@127.0.0.1:1/0")
    with pytest.raises(ConfigError, match=r"redis\.url: must start with") as bad:
        load_settings()
    assert WRONG not in str(bad.value)
    assert SECRET not in str(bad.value)
    assert redact_text(f"rediss://{USER}:{SECRET}@h:1/0") == f"rediss://{USER}:***@h:1/0"


def test_auth_and_certificate_failures_are_not_retriable() -> None:
    assert not is_retriable(redis.AuthenticationError("WRONGPASS invalid username-password pair"))
    assert not is_retriable(AccessDenied("refused"))
    assert is_retriable(redis.ConnectionError("Connection reset by peer"))


# --- TLS ------------------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_replay_through_rediss_with_ca_and_client_certificate(tls_cfg: RedisConfig, tls_history: int) -> None:
    client = create_redis(tls_cfg)
    try:
        spec = JobSpec(name="tls", streams=[STREAM], handler="order_summary", end="now")
        stats = await Engine(spec, client, redis_cfg=tls_cfg).run()
        assert stats.status == "completed"
        assert stats.total == tls_history
        customers = [key async for key in client.scan_iter(match="projection:order_summary:customer:*")]
        assert customers
    finally:
        await client.aclose()


@pytest.mark.anyio
async def test_a_rebuild_on_a_tls_cluster(tmp_path: Path, certs: Certs, tls_server: TlsRedisServer) -> None:
    """1. three TLS primaries in one cluster (`tls-cluster yes`)  2. an order_summary rebuild through
    `rediss+cluster://` with the CA and a client certificate, the other nodes found from the first
    3. every event handled; the projection on the node of the job's slot. (`tls_server`: skipped as the other TLS
    tests are where redis-server is built without TLS.)"""
    cluster = TlsRedisClusterServers(tmp_path / "cluster", certs).start()
    try:
        with cluster.node_of(STREAM).client() as node:
            load_history_sync(node, STREAM, EVENTS)
        cfg = RedisConfig(url=cluster.url, tls_ca_file=certs.ca, tls_cert_file=certs.client_cert,
                          tls_key_file=certs.client_key, block_ms=100, socket_timeout_s=5)  # fmt: skip
        client = create_redis(cfg)
        try:
            spec = JobSpec(name="order_summary", streams=[STREAM], handler="order_summary", end="now")
            stats = await rebuild_in_place(Engine(spec, client, redis_cfg=cfg))
        finally:
            await client.aclose()
        assert (stats.status, stats.total, stats.failed) == ("completed", EVENTS, 0)
        with cluster.node_of(job_key("order_summary", "checkpoint")).client() as home:
            assert home.keys("projection:{order_summary}:customer:*")
    finally:
        cluster.stop()


@pytest.mark.anyio
async def test_a_rejected_client_certificate_is_access_denied_on_every_connection(tls_cfg: RedisConfig) -> None:
    """The server checks the client's certificate after the client's TLS 1.3 handshake is done, so its alert races
    the first command: before, most connections (on loopback) met a reset or a closed transport instead, retried
    as Redis being down (the CLI exited 69, not 78, in 1 run of 3). Now each of 30 fresh connections is refused
    as AccessDenied at its first attempt."""
    cfg = tls_cfg.model_copy(update={"tls_cert_file": None, "tls_key_file": None})
    for _ in range(30):
        client = create_redis(cfg)
        try:
            with pytest.raises(AccessDenied, match=r"rejected replayd's client certificate"):
                await client.ping()
        finally:
            await client.aclose()


@pytest.mark.anyio
async def test_untrusted_server_certificate_fails_at_once(tls_cfg: RedisConfig) -> None:
    cfg = tls_cfg.model_copy(update={"tls_ca_file": None})  # the system CAs do not know the test CA
    client = create_redis(cfg)
    started = time.monotonic()
    try:
        with pytest.raises(AccessDenied, match=r"set redis\.tls_ca_file"):
            await retrying(client.ping, what="ping", budget_s=30)
    finally:
        await client.aclose()
    assert time.monotonic() - started < 5  # refused, not retried for the 30 s budget


def test_cli_without_the_ca_exits_78_with_one_clear_line(
    tls_server: TlsRedisServer, certs: Certs, tls_history: int
) -> None:
    env = {
        "REPLAYD_REDIS__UNAVAILABLE_TIMEOUT_S": "2",
        "REPLAYD_REDIS__TLS_CERT_FILE": str(certs.client_cert),
        "REPLAYD_REDIS__TLS_KEY_FILE": str(certs.client_key),
    }
    done, took = timed(*replay_args(tls_server.tls_url), env=env)
    assert done.returncode == 78, done.stderr
    assert "certificate verify failed" in done.stderr or "does not accept" in done.stderr
    assert "redis.tls_ca_file" in done.stderr
    assert "Traceback" not in done.stderr
    assert took < 10


def test_cli_without_a_client_certificate_exits_78(tls_server: TlsRedisServer, certs: Certs, tls_history: int) -> None:
    env = {"REPLAYD_REDIS__UNAVAILABLE_TIMEOUT_S": "2", "REPLAYD_REDIS__TLS_CA_FILE": str(certs.ca)}
    done, took = timed(*replay_args(tls_server.tls_url), env=env)
    assert done.returncode == 78, done.stderr
    assert "redis.tls_cert_file" in done.stderr
    assert "Traceback" not in done.stderr
    assert took < 10


def test_cli_with_a_missing_ca_file_names_the_setting(tls_server: TlsRedisServer, tmp_path: Path) -> None:
    env = {"REPLAYD_REDIS__TLS_CA_FILE": str(tmp_path / "missing-ca.pem")}
    done, _ = timed(*replay_args(tls_server.tls_url), env=env)
    assert done.returncode == 78, done.stderr
    assert "redis.tls_ca_file: file" in done.stderr
    assert "missing-ca.pem does not exist" in done.stderr
    assert "Traceback" not in done.stderr


def test_cli_replays_over_tls(tls_server: TlsRedisServer, certs: Certs, tls_history: int) -> None:
    env = {
        "REPLAYD_REDIS__TLS_CA_FILE": str(certs.ca),
        "REPLAYD_REDIS__TLS_CERT_FILE": str(certs.client_cert),
        "REPLAYD_REDIS__TLS_KEY_FILE": str(certs.client_key),
    }
    done, _ = timed(*replay_args(tls_server.tls_url), env=env)
    assert done.returncode == 0, done.stderr
    assert f"replayed {EVENTS:,} events" in done.stdout + done.stderr  # the summary: stderr


# --- ACL ------------------------------------------------------------------------------------------------------


def test_acl_user_from_the_url_replays(acl_server: RedisServer, admin: redis.Redis) -> None:
    done, _ = timed(*replay_args(acl_url(acl_server)))
    assert done.returncode == 0, done.stderr
    assert f"replayed {EVENTS:,} events" in done.stdout + done.stderr  # the summary: stderr


def test_acl_user_from_env_and_password_file(acl_server: RedisServer, admin: redis.Redis, tmp_path: Path) -> None:
    secret_file = tmp_path / "password"
    secret_file.write_text(SECRET + "\n")
    secret_file.chmod(0o600)
    env = {"REPLAYD_REDIS__USERNAME": USER, "REPLAYD_REDIS__PASSWORD_FILE": str(secret_file)}
    url = f"redis://127.0.0.1:{acl_server.port}/0"
    done, _ = timed(*replay_args(url, "--job", "from-file"), env=env)
    assert done.returncode == 0, done.stderr
    env = {"REPLAYD_REDIS__USERNAME": USER, "REPLAYD_REDIS__PASSWORD": SECRET}
    status, _ = timed("status", "from-file", "--json", "--redis-url", url, env=env)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["from-file"]["progress"]["status"] == "completed"


def test_wrong_password_exits_78_at_once(acl_server: RedisServer, admin: redis.Redis) -> None:
    # a 30 s unavailable budget: a refused AUTH must not be retried through it
    env = {"REPLAYD_REDIS__UNAVAILABLE_TIMEOUT_S": "30"}
    done, took = timed(*replay_args(acl_url(acl_server, password=WRONG)), env=env)
    assert done.returncode == 78, done.stderr
    assert "refused the credentials" in done.stderr
    assert WRONG not in done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert took < 10
    no_user, took = timed(*replay_args(f"redis://127.0.0.1:{acl_server.port}/0"), env=env)  # default user: off
    assert no_user.returncode == 78, no_user.stderr
    assert "Traceback" not in no_user.stderr
    assert took < 10


def test_missing_acl_permission_exits_78(acl_server: RedisServer, admin: redis.Redis) -> None:
    env = {"REPLAYD_REDIS__UNAVAILABLE_TIMEOUT_S": "30"}
    done, took = timed(*replay_args(acl_url(acl_server, user="reader")), env=env)
    assert done.returncode == 78, done.stderr
    assert "Traceback" not in done.stderr
    assert SECRET not in done.stdout + done.stderr
    assert took < 10


# --- secrets never shown --------------------------------------------------------------------------------------


def everything_in(client: redis.Redis) -> str:
    """Every key and value of the database as one text, to search for a secret."""
    parts: list[str] = []
    for key in client.scan_iter(count=1000):
        raw_kind: Any = client.type(key)
        kind = raw_kind.decode() if isinstance(raw_kind, bytes) else str(raw_kind)
        value: Any
        if kind == "string":
            value = client.get(key)
        elif kind == "hash":
            value = client.hgetall(key)
        elif kind == "stream":
            value = client.xrange(key)
        elif kind == "zset":
            value = client.zrange(key, 0, -1, withscores=True)
        elif kind == "set":
            value = client.smembers(key)
        elif kind == "list":
            value = client.lrange(key, 0, -1)
        else:
            value = kind
        parts.append(f"{key!r} {value!r}")
    return "\n".join(parts)


def test_secrets_never_appear_in_logs_progress_or_status(
    acl_server: RedisServer, admin: redis.Redis, tmp_path: Path
) -> None:
    url = acl_url(acl_server)
    logging_flags = ("--log-level", "DEBUG", "--log-format", "json")
    done, _ = timed(*replay_args(url, "--job", "secret-job", *logging_flags))
    assert done.returncode == 0, done.stderr
    logged = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    assert logged  # it did log, as JSON lines
    config = tmp_path / "replayd.toml"
    config.write_text(
        '[http]\nenabled = false\n\n[[jobs]]\nname = "daemon-job"\nstreams = ["events:orders"]\n'
        'handler = "order_summary"\nend = "now"\n'
    )
    daemon, _ = timed("run", "--config", str(config), *logging_flags, env={"REPLAYD_REDIS__URL": url})
    assert daemon.returncode == 0, daemon.stderr
    assert f"{USER}:***@" in daemon.stderr  # the URL is logged, redacted
    status, _ = timed("status", "--json", "--redis-url", url)
    assert status.returncode == 0, status.stderr
    assert {"secret-job", "daemon-job"} <= set(json.loads(status.stdout))
    text_status, _ = timed("status", "--redis-url", url)
    assert text_status.returncode == 0, text_status.stderr
    unreachable, _ = timed(
        *replay_args(f"redis://{USER}:{SECRET}@127.0.0.1:1/0", *logging_flags),
        env={"REPLAYD_REDIS__UNAVAILABLE_TIMEOUT_S": "1"},
    )
    assert unreachable.returncode == 69, unreachable.stderr
    for shown in (done, daemon, status, text_status, unreachable):
        assert SECRET not in shown.stdout + shown.stderr
    assert SECRET not in everything_in(admin)  # progress hashes, checkpoints, leases, projections


@pytest.mark.anyio
async def test_secrets_never_appear_in_metrics(acl_server: RedisServer, admin: redis.Redis) -> None:
    cfg = RedisConfig(url=SecretStr(acl_url(acl_server)), block_ms=100, socket_timeout_s=5)
    client = create_redis(cfg)
    metrics = Metrics()
    try:
        spec = JobSpec(name="metered", streams=[STREAM], handler="order_summary", end="now")
        stats = await Engine(spec, client, redis_cfg=cfg, metrics=metrics).run()
    finally:
        await client.aclose()
    assert stats.total == EVENTS
    exposition = generate_latest(metrics.registry).decode()
    assert "replayd_" in exposition
    assert SECRET not in exposition


# --- every form of a password in a URL (FAULTS T42) --------------------------------------------------------------

TRICKY = "s3cr@t:p%zz!x"
"""A password with a raw `@`, a `:` and a `%` that is no escape: every part of it must stay hidden."""
PARTS = ("s3cr", "t:p%zz", "zz!x", "s3cr%40t")


@pytest.fixture(scope="module")
def tricky_server() -> Iterator[tuple[RedisServer, str]]:
    """A redis-server on TCP and a unix socket whose default user's password is TRICKY; yields it and the socket."""
    folder = Path(tempfile.mkdtemp(prefix="replayd-sock-"))  # short: a socket path has at most 107 bytes
    sock = folder / "redis.sock"
    server = RedisServer(folder, extra_args=["--unixsocket", str(sock), "--unixsocketperm", "700"]).start()
    try:
        with server.client() as client:
            client.config_set("requirepass", TRICKY)
        with redis.Redis(port=server.port, password=TRICKY, socket_timeout=10) as client:
            load_history_sync(client, STREAM, EVENTS)
        yield server, str(sock)
    finally:
        server.stop()


def password_urls(port: int, sock: str) -> dict[str, str]:
    escaped = quote(TRICKY, safe="")
    return {
        "user:pass@ (raw @ : %)": f"redis://default:{TRICKY}@127.0.0.1:{port}/0",
        ":pass@ (%-escaped)": f"redis://:{escaped}@127.0.0.1:{port}/0",
        "?password=": f"redis://127.0.0.1:{port}/0?password={escaped}",
        "unix://:pass@": f"unix://:{escaped}@{sock}",
        "unix:// ?password=": f"unix://{sock}?password={escaped}",
    }


def test_no_form_of_a_password_in_a_url_is_ever_printed(tricky_server: tuple[RedisServer, str], tmp_path: Path) -> None:
    """1. each URL form replays (so replayd did use the password) and runs as a daemon job, at DEBUG, in JSON and
    in text  2. status, text and JSON  3. an unreachable server's error  4. no part of the password in any output."""
    server, sock = tricky_server
    config = tmp_path / "replayd.toml"
    config.write_text(
        '[http]\nenabled = false\n\n[[jobs]]\nname = "daemon-job"\nstreams = ["events:orders"]\n'
        'handler = "order_summary"\nend = "now"\n'
    )
    shown: list[subprocess.CompletedProcess[str]] = []
    for form, url in password_urls(server.port, sock).items():
        log_format = "json" if "unix" not in form else "text"
        flags = ("--log-level", "DEBUG", "--log-format", log_format)
        done, _ = timed(*replay_args(url, "--job", f"job-{len(shown)}", *flags))
        assert done.returncode == 0, (form, done.stderr)
        daemon, _ = timed("run", "--config", str(config), *flags, env={"REPLAYD_REDIS__URL": url})
        assert daemon.returncode == 0, (form, daemon.stderr)
        assert "***" in daemon.stderr  # the start line shows the URL, redacted
        shown += [done, daemon]
    url = password_urls(server.port, sock)["user:pass@ (raw @ : %)"]
    shown += [timed("status", "--redis-url", url, *extra)[0] for extra in ((), ("--json",))]
    shown.append(timed("plan", "--redis-url", url, "--stream", STREAM, "--handler", "order_summary", "--log-level",
                       "DEBUG")[0])  # fmt: skip
    assert all(done.returncode == 0 for done in shown[-3:]), [done.stderr for done in shown[-3:]]
    unreachable, _ = timed(
        *replay_args(url.replace(str(server.port), "1"), "--log-level", "DEBUG"),
        env={"REPLAYD_REDIS__UNAVAILABLE_TIMEOUT_S": "1"},
    )
    assert unreachable.returncode == 69, unreachable.stderr
    for done in [*shown, unreachable]:
        for part in PARTS:
            assert part not in done.stdout + done.stderr, (done.args, part)


@pytest.mark.parametrize(
    "text",
    [
        f"redis://default:{TRICKY}@h:1/0",
        f"redis://:{quote(TRICKY, safe='')}@h:1/0",
        f"rediss://h:1/0?db=0&password={quote(TRICKY, safe='')}",
        f"unix://:{TRICKY}@/tmp/redis.sock?db=0",
        f"unix:///tmp/redis.sock?db=0&password={TRICKY}",
        f"rediss://h:1/0?ssl_password={TRICKY}&ssl_ca_data=MIIs3cr",
    ],
)
def test_redaction_hides_every_form(text: str) -> None:
    redacted = redact_text(f"connecting to '{text}' now")
    assert not any(part in redacted for part in PARTS), redacted
    assert "***" in redacted and redacted.endswith("' now")


def test_turning_certificate_checks_off_is_refused_unless_a_setting_says_so() -> None:
    """`?ssl_cert_reqs=none` in a URL: 78 naming the setting; with the setting, a warning at every start."""
    url = "rediss://127.0.0.1:1/0?ssl_cert_reqs=none"
    refused, _ = timed(*replay_args(url))
    assert refused.returncode == 78, refused.stderr
    assert "tls_allow_unverified" in refused.stderr
    hostname, _ = timed(*replay_args("rediss://127.0.0.1:1/0?ssl_check_hostname=false"))
    assert hostname.returncode == 78
    assert "tls_verify_hostname" in hostname.stderr
    allowed, _ = timed(
        *replay_args(url, "--log-format", "text"),
        env={"REPLAYD_REDIS__TLS_ALLOW_UNVERIFIED": "true", "REPLAYD_REDIS__UNAVAILABLE_TIMEOUT_S": "1"},
    )
    assert allowed.returncode == 69, allowed.stderr  # it tried to connect (nothing listens on port 1)
    assert "certificate is not checked" in allowed.stderr
