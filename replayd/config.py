"""Settings: a TOML file plus `REPLAYD_*` environment (environment wins), validated once, at start.

Every job of the daemon is a `JobSpec`; the one-shot CLI commands build a `JobSpec` from their flags, so one
engine runs both.
"""

from __future__ import annotations

import os
import re
import ssl
import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl, unquote, urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from replayd.errors import ConfigError
from replayd.events import Bound, Shard, parse_end, parse_shard, parse_start
from replayd.ops.logs import register_secrets
from replayd.pipeline.filters import parse_where

_toml_path: ContextVar[Path | None] = ContextVar("replayd_toml_path", default=None)


def _shard_text(value: str) -> str:
    parse_shard(value)
    return value


ShardText = Annotated[str, AfterValidator(_shard_text)]
"""`i/N`, checked when the settings load."""


MIN_LEASE_TTL_S = 0.3
"""The shortest `lease_ttl_s`: its owner renews the lease every third of it."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_SCHEMES = {"redis", "rediss", "unix", "redis+cluster", "rediss+cluster"}


class RedisConfig(_Section):
    """How to reach Redis: the URL (`redis://`, `rediss://` for TLS, `unix://`), credentials, TLS files."""

    url: SecretStr = SecretStr("redis://localhost:6379/0")
    """May carry the ACL user and password (`redis://user:pass@host:6379/0`); shown redacted everywhere.
    `redis+cluster://` and `rediss+cluster://` name one node of a Redis Cluster (as `cluster = true` does)."""
    cluster: bool = False
    """The URL names one node of a Redis Cluster: use the cluster client (job keys share one slot per job)."""
    username: str | None = None
    """The ACL user, when the URL names none."""
    password: SecretStr | None = None
    """The ACL user's password (or the `requirepass` one), when the URL carries none; `REPLAYD_REDIS__PASSWORD`."""
    password_file: Path | None = None
    """A file holding the password (a mounted secret), read once at load; a final newline is dropped."""
    tls_ca_file: Path | None = None
    """PEM CA bundle that signed the server's certificate (`rediss://` only; the system CAs when unset)."""
    tls_cert_file: Path | None = None
    """PEM client certificate, for a server started with `tls-auth-clients yes`."""
    tls_key_file: Path | None = None
    """The client certificate's private key (unencrypted PEM), when not inside `tls_cert_file`."""
    tls_verify_hostname: bool = True
    """Check that the server's certificate names the URL's host."""
    tls_allow_unverified: bool = False
    """Accept a server certificate that is not checked at all (`?ssl_cert_reqs=none` in the URL is refused
    otherwise): for tests only; every start warns about it."""
    socket_timeout_s: float = Field(10.0, gt=0)
    connect_timeout_s: float = Field(5.0, gt=0)
    block_ms: int = Field(2000, ge=0)
    max_connections: int = Field(64, ge=2)
    unavailable_timeout_s: float = Field(60.0, gt=0)
    """How long Redis may stay unreachable, or refuse writes for memory (retries with backoff and jitter), before
    replayd exits 69."""
    allow_allkeys_eviction: bool = False
    """Run although Redis's `maxmemory-policy` is `allkeys-*`, which may evict replayd's checkpoints (refused at
    start otherwise, exit 78): an evicted checkpoint then stops the job (exit 65) instead of a silent replay."""

    _file_password: SecretStr | None = PrivateAttr(None)

    @field_validator("url")
    @classmethod
    def _url_scheme(cls, value: SecretStr) -> SecretStr:
        scheme = value.get_secret_value().partition("://")[0].lower()
        if scheme not in _SCHEMES:
            # never echo the URL: it may carry a password
            raise ValueError(
                "must start with redis://, rediss:// (TLS), unix://, redis+cluster:// or rediss+cluster://"
            )
        return value

    @model_validator(mode="after")
    def _cluster_over_tcp(self) -> RedisConfig:
        if self.is_cluster and self.scheme == "unix":
            raise ValueError("a Redis Cluster is reached over TCP: use a redis:// or rediss:// url with cluster = true")
        return self

    @property
    def scheme(self) -> str:
        """The URL's scheme without `+cluster`: `redis`, `rediss` or `unix`."""
        return self.url.get_secret_value().partition("://")[0].lower().removesuffix("+cluster")

    @property
    def is_cluster(self) -> bool:
        """`cluster = true`, or a `redis+cluster://` / `rediss+cluster://` URL."""
        return self.cluster or self.url.get_secret_value().partition("://")[0].lower().endswith("+cluster")

    def node_url(self) -> str:
        """The URL as redis-py reads it: `+cluster` dropped from the scheme (it names one node of the cluster)."""
        url = self.url.get_secret_value()
        scheme, sep, rest = url.partition("://")
        return f"{scheme.lower().removesuffix('+cluster')}{sep}{rest}"

    @field_validator("password_file")
    @classmethod
    def _readable(cls, value: Path | None) -> Path | None:
        if value is not None:
            cls._check_file(value)
        return value

    @field_validator("tls_ca_file")
    @classmethod
    def _ca_file(cls, value: Path | None) -> Path | None:
        if value is not None:
            cls._check_file(value)
            try:
                ssl.create_default_context(cafile=str(value))
            except ssl.SSLError as exc:
                raise ValueError(f"{value} holds no PEM CA certificate ({exc.reason or exc})") from None
        return value

    @field_validator("tls_cert_file", "tls_key_file")
    @classmethod
    def _tls_file(cls, value: Path | None) -> Path | None:
        if value is not None:
            cls._check_file(value)
        return value

    @model_validator(mode="after")
    def _block_below_timeout(self) -> RedisConfig:
        # redis-py#2807: a blocking XREAD that outlives the socket timeout is read as a dead connection
        if self.block_ms >= self.socket_timeout_s * 1000:
            raise ValueError(
                f"block_ms ({self.block_ms}) must be below socket_timeout_s ({self.socket_timeout_s}) x 1000"
            )
        return self

    @model_validator(mode="after")
    def _credentials(self) -> RedisConfig:
        url = urlsplit(self.url.get_secret_value())
        if self.password is not None and self.password_file is not None:
            raise ValueError("set password or password_file, not both")
        if url.password and (self.password is not None or self.password_file is not None):
            raise ValueError("the url carries a password: do not set password or password_file as well")
        if url.username and self.username and unquote(url.username) != self.username:
            raise ValueError("the url names a user other than username: set the user in one place")
        if self.password_file is not None:
            try:
                text = self.password_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ValueError(f"password_file {self.password_file} cannot be read: {exc}") from None
            secret = text.removesuffix("\n").removesuffix("\r")
            if not secret:
                raise ValueError(f"password_file {self.password_file} is empty")
            self._file_password = SecretStr(secret)
        register_secrets(*self.secrets())
        return self

    @model_validator(mode="after")
    def _verification(self) -> RedisConfig:
        """Certificate checks are turned off by a setting that says so, never by a URL's query string."""
        query = {key.lower(): value.lower() for key, value in parse_qsl(urlsplit(self.url.get_secret_value()).query)}
        if (
            query.get("ssl_cert_reqs", "required") not in ("required", "cert_required")
            and not self.tls_allow_unverified
        ):
            raise ValueError(
                f"ssl_cert_reqs={query['ssl_cert_reqs']} in the url turns the server certificate check off: refused. "
                "Drop it (give tls_ca_file for a private CA), or, for tests only, set tls_allow_unverified = true "
                "(REPLAYD_REDIS__TLS_ALLOW_UNVERIFIED=true)"
            )
        if query.get("ssl_check_hostname", "true") in ("false", "0", "no", "off") and self.tls_verify_hostname:
            raise ValueError(
                "ssl_check_hostname in the url turns the host name check off: refused. Set tls_verify_hostname = "
                "false instead (REPLAYD_REDIS__TLS_VERIFY_HOSTNAME=false)"
            )
        return self

    def secrets(self) -> list[str]:
        """Every secret these settings hold (for log redaction): passwords in the URL (as written and decoded),
        in its query string, in `password` and in `password_file`."""
        url = urlsplit(self.url.get_secret_value())
        found = [value for key, value in parse_qsl(url.query) if "pass" in key.lower() or "data" in key.lower()]
        userinfo = url.netloc.rpartition("@")[0]
        if userinfo:
            raw = userinfo.partition(":")[2]
            found += [raw, unquote(raw)]
        found += [s.get_secret_value() for s in (self.password, self._file_password) if s is not None]
        return [secret for secret in found if secret]

    @model_validator(mode="after")
    def _tls(self) -> RedisConfig:
        options = [name for name in ("tls_ca_file", "tls_cert_file", "tls_key_file") if getattr(self, name)]
        if not self.tls_verify_hostname:
            options.append("tls_verify_hostname")
        if self.tls_allow_unverified:
            options.append("tls_allow_unverified")
        scheme = self.scheme
        if options and scheme != "rediss":
            verb = "needs" if len(options) == 1 else "need"
            raise ValueError(f"{', '.join(options)} {verb} a rediss:// url (TLS); the url is {scheme}://")
        if self.tls_key_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_key_file needs tls_cert_file (the client certificate)")
        if self.tls_cert_file is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            key = str(self.tls_key_file) if self.tls_key_file else None
            try:
                # an empty password: an encrypted key fails here instead of prompting on the terminal
                context.load_cert_chain(str(self.tls_cert_file), key, password="")
            except (ssl.SSLError, OSError) as exc:
                raise ValueError(
                    f"tls_cert_file {self.tls_cert_file}{f' / tls_key_file {key}' if key else ''}: not a PEM "
                    f"certificate and matching unencrypted private key ({getattr(exc, 'reason', None) or exc})"
                ) from None
        return self

    @staticmethod
    def _check_file(path: Path) -> None:
        if not path.is_file():
            raise ValueError(f"file {path} does not exist")
        if not os.access(path, os.R_OK):
            raise ValueError(f"file {path} is not readable")

    @property
    def username_and_password(self) -> tuple[str | None, SecretStr | None]:
        """The credentials the URL does not carry: `username`, and `password` or the content of `password_file`."""
        return self.username, self.password if self.password is not None else self._file_password


class HttpConfig(_Section):
    """The /metrics, /healthz and /readyz listener of the daemon."""

    enabled: bool = True
    host: str = "0.0.0.0"  # noqa: S104 - the kubelet's probes and the scrape reach a sidecar on its pod IP
    port: int = Field(9464, ge=0, le=65535)


class FieldNames(_Section):
    """The entry fields that hold each part of an event, for producers that do not use the article's names
    (`[jobs.fields]`, `--field event_type=type`). Unset: the codec's own (the article's: `event_type`...)."""

    event_id: str | None = None
    event_type: str | None = None
    data: str | None = None
    timestamp: str | None = None
    metadata: str | None = None


BUILTIN_CODECS = ("article", "payload", "flat", "cloudevents")
"""The entry shapes replayd knows by name (`replayd.pipeline.codecs`); any other codec is `module:function`."""


def _codec_name(value: str) -> str:
    if value not in BUILTIN_CODECS and ":" not in value:
        raise ValueError(
            f"{value!r}: expected one of {', '.join(BUILTIN_CODECS)} or a plugin 'package.module:function'"
        )
    return value


def _entity_text(value: str | None) -> str | None:
    if value is not None and not re.fullmatch(r"[^:]+:.+", value):
        raise ValueError(f"{value!r}: expected TYPE:ID, e.g. order:o-1 or user:u7")
    return value


class JobSpec(_Section):
    """One named replay: sources, bounds, filters, handler, partitioning."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,100}$")
    streams: list[str] = Field(min_length=1)
    handler: str
    start: str = "beginning"
    after: str | None = None
    resume: bool = True
    """Resume from the job's checkpoint when it has one; `start`/`after` then only place a new job."""
    end: str = "follow"
    types: list[str] = []
    entity: Annotated[str | None, AfterValidator(_entity_text)] = None
    """`TYPE:ID`: only this entity's events (see `filters.entity_predicate`)."""
    where: list[str] = []
    filter: str | None = None
    upcasters: str | None = None
    """`package.module:attr`: an `Upcasters` (or a dict of (event type, version) -> function) for this job, in
    place of the handler's own `upcasters`."""
    partition_by: str | None = None
    partitions: int = Field(16, ge=1, le=4096)
    concurrency: int = Field(16, ge=1)
    ordering: Literal["key", "none"] = "key"
    batch_size: int = Field(1000, ge=1, le=100_000)
    """The largest read and lane batch; adaptive batching moves between `min_batch_size` and it."""
    min_batch_size: int = Field(10, ge=1)
    batch_target_s: float = Field(1.0, gt=0)
    """A lane batch should take about this long: longer halves the batch size, much shorter doubles it."""
    max_in_flight: int = Field(20_000, ge=1)
    """Events read but not yet committed: the reader waits beyond it (for lanes, beyond 4 x batch_size too)."""
    max_batch_bytes: int = Field(16 << 20, ge=1)
    """Reads shrink so a reply stays near this many bytes, as Redis sends them (big entries, smaller batches)."""
    max_entry_bytes: int = Field(64 << 20, ge=1)
    """A bigger entry is poison (`on_poison`): refused, or dead-lettered without its payload."""
    codec: Annotated[str, AfterValidator(_codec_name)] = "article"
    """The entries' shape: `article` (the default), `payload`, `flat`, `cloudevents`, or `module:function`."""
    max_commit_commands: int = Field(10_000, ge=1)
    """Handler writes one commit carries at most: a lane batch with more is committed in pieces, cut between
    events, and one event that queues more is poison (`on_poison`). Keeps each commit script short for Redis."""
    max_commit_bytes: int = Field(64 << 20, ge=1)
    """Bytes of handler writes (their arguments) one commit carries at most; as `max_commit_commands`."""
    fields: FieldNames = FieldNames()
    check_shape: bool = True
    """Check each stream's first and last entries against `codec` and `fields` at start (exit 65 on a mismatch)."""
    progress_interval_s: float = Field(1.0, gt=0)
    shard: ShardText | None = None
    """`i/N`: this process handles partitions p with p mod N == i (replicas, `--workers`)."""
    on_gap: Literal["fail", "warn", "skip"] = "fail"
    """A stream trimmed past, or gone back behind, the checkpoint: stop (exit 65), or log and go on."""
    rate_limit: float | None = Field(None, gt=0)
    """Read at most this many entries per second (protects a production Redis)."""
    speed: float | None = Field(None, gt=0)
    """Play back at the events' original pace (their `timestamp`) times this factor; batches of 10 for smoothness."""
    on_poison: Literal["stop", "dead-letter", "skip"] | None = None
    """An event whose handler keeps failing, or an entry that cannot be decoded: `stop` (exit 65, the default of a
    job with an end), `dead-letter` (the default of a following job), or `skip` (log, count, go on)."""
    retries: int = Field(3, ge=0)
    """Attempts after the first for a failing handler, with exponential backoff and jitter."""
    retry_backoff_s: float = Field(0.1, ge=0)
    handler_timeout_s: float = Field(60.0, gt=0)
    """The longest a handler call (an event, or a batch for `handle_batch`) may take. An async call past it is
    cancelled and counts as a failure of its event (retried, then `on_poison`); a sync function in a worker thread
    cannot be cancelled: it is reported (log, metric, state `stalled`) and its lane waits for it."""
    breaker_failures: int = Field(20, ge=0)
    """The circuit breaker: after this many events in a row fail for good (no lane batch handling any event in
    between), the job stops (exit 65) or, following, waits `blocked` for `replayd resume`, instead of
    dead-lettering or skipping the stream. 0 turns it off."""
    on_lease_held: Literal["wait", "exit"] = "wait"
    """Another instance holds this job's (shard's) lease: wait for it, or exit 75."""
    lease_ttl_s: float = Field(15.0, gt=0)
    """How long a lease outlives its owner (a SIGKILLed or paused instance) before another may take it. The owner
    renews it every third of this; at least 0.3 s (a renewal every 0.1 s), so a renewal's round trip fits."""
    allow_reset: bool = False
    """Start over when the checkpoint vanished while the job's progress remains (refused otherwise)."""
    require_stream: bool = False
    """A stream key that does not exist at start stops the job (exit 65) instead of reading as empty."""
    retain_old_s: float = Field(60.0, ge=0)
    """After a rebuild flips the projection to its new version, readers still on the old one have this long
    before it is deleted."""

    @field_validator("lease_ttl_s")
    @classmethod
    def _lease_ttl(cls, value: float) -> float:
        if value < MIN_LEASE_TTL_S:
            raise ValueError(
                f"{value:g} s is shorter than {MIN_LEASE_TTL_S:g} s: the lease is renewed every third of it "
                f"({value / 3:.2g} s), too often for a renewal's round trip to Redis to arrive in time"
            )
        return value

    @field_validator("start")
    @classmethod
    def _start(cls, value: str) -> str:
        parse_start(value)
        return value

    @property
    def poison_policy(self) -> str:
        return self.on_poison or ("dead-letter" if self.end == "follow" else "stop")

    @property
    def shard_of(self) -> Shard:
        return parse_shard(self.shard) if self.shard else Shard()

    @model_validator(mode="after")
    def _checkpoint_means_resume(self) -> JobSpec:
        if self.start == "checkpoint" and not self.resume:
            raise ValueError("start = 'checkpoint' needs resume = true")
        return self

    @field_validator("where")
    @classmethod
    def _where(cls, value: list[str]) -> list[str]:
        for text in value:
            parse_where(text)
        return value

    @field_validator("after")
    @classmethod
    def _after(cls, value: str | None) -> str | None:
        if value is not None:
            parse_start(value, after=True)
        return value

    @field_validator("end")
    @classmethod
    def _end(cls, value: str) -> str:
        parse_end(value)
        return value

    @property
    def start_bound(self) -> Bound:
        return parse_start(self.after, after=True) if self.after else parse_start(self.start)

    @property
    def end_bound(self) -> Bound:
        return parse_end(self.end)


class Settings(BaseSettings):
    """The root of replayd's settings."""

    model_config = SettingsConfigDict(env_prefix="REPLAYD_", env_nested_delimiter="__", extra="forbid")

    redis: RedisConfig = RedisConfig()
    http: HttpConfig = HttpConfig()
    jobs: list[JobSpec] = []
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["auto", "json", "text"] = "auto"
    shutdown_timeout_s: float = Field(20.0, gt=0)
    shard: ShardText | None = None
    """`i/N` for every job that sets none (also REPLAYD_SHARD): replica i of N."""
    config: str | None = None
    """The config file's path (also `REPLAYD_CONFIG`); read by `load_settings`, kept for display."""

    @field_validator("jobs")
    @classmethod
    def _unique_names(cls, jobs: list[JobSpec]) -> list[JobSpec]:
        names = [job.name for job in jobs]
        if len(names) != len(set(names)):
            raise ValueError(f"job names must be unique, got {names}")
        return jobs

    @model_validator(mode="after")
    def _shard_jobs(self) -> Settings:
        if self.shard:
            self.jobs = [job if job.shard else job.model_copy(update={"shard": self.shard}) for job in self.jobs]
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = _toml_path.get()
        sources: tuple[PydanticBaseSettingsSource, ...] = (init_settings, env_settings)
        if path is not None:
            # the path is resolved at run time: model_config's toml_file is fixed when the class is defined
            sources += (TomlConfigSettingsSource(settings_cls, toml_file=path),)
        return sources


def load_settings(path: str | None = None, **overrides: Any) -> Settings:
    """Load the TOML file (`path`, else `REPLAYD_CONFIG`) and the environment; raise ConfigError naming the field."""
    raw = path or os.environ.get("REPLAYD_CONFIG")
    file = Path(raw) if raw else None
    if file is not None:
        # pydantic-settings silently skips a missing file: an explicitly named one must exist
        if not file.is_file():
            raise ConfigError(f"config file {file} does not exist")
        try:
            with file.open("rb") as toml:  # as the settings source reads it: no newline translation (a lone \r)
                tomllib.load(toml)
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config file {file} cannot be read: {exc}") from None
    token = _toml_path.set(file)
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(describe(exc, file)) from None
    except SettingsError as exc:  # e.g. REPLAYD_JOBS that is not JSON; the message names the source, not the value
        raise ConfigError(f"invalid configuration: {exc}") from None
    finally:
        _toml_path.reset(token)


def describe(exc: ValidationError, file: Path | None) -> str:
    """One line per invalid setting, naming its path (`jobs.0.partitions`) and where settings came from."""
    origin = f"{file} or REPLAYD_* environment" if file else "REPLAYD_* environment or arguments"
    lines = [f"invalid configuration ({origin}):"]
    for error in exc.errors():
        setting = ".".join(str(part) for part in error["loc"]) or "(root)"
        message = re.sub(r"^Value error, ", "", error["msg"])
        variables = _variables(error["loc"])
        if variables and error["type"] == "list_type":  # REPLAYD_JOBS__0__X: one item of a list cannot be set
            message += f": set {setting} whole, as JSON in REPLAYD_{setting.replace('.', '__').upper()}"
        source = f" (from {', '.join(variables)})" if variables else ""
        lines.append(f"  {setting}: {message}{source}")
    return "\n".join(lines)


def _variables(loc: tuple[int | str, ...]) -> list[str]:
    """The REPLAYD_* environment variables that set (part of) the setting at `loc`."""
    path = [str(part).lower() for part in loc]
    found = []
    for name in os.environ:
        if not name.upper().startswith("REPLAYD_"):
            continue
        parts = name[len("REPLAYD_") :].lower().split("__")
        shared = min(len(parts), len(path))
        if shared and parts[:shared] == path[:shared]:
            found.append(name)
    return sorted(found)
