"""Settings: a TOML file plus `REPLAYD_*` environment (environment wins), validated once, at start.

Every job of the daemon is a `JobSpec`; the one-shot CLI commands build a `JobSpec` from their flags, so one
engine runs both.
"""

from __future__ import annotations

import os
import re
import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from replayd.errors import ConfigError
from replayd.events import Bound, Shard, parse_end, parse_shard, parse_start
from replayd.filters import parse_where

_toml_path: ContextVar[Path | None] = ContextVar("replayd_toml_path", default=None)


def _shard_text(value: str) -> str:
    parse_shard(value)
    return value


ShardText = Annotated[str, AfterValidator(_shard_text)]
"""`i/N`, checked when the settings load."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RedisConfig(_Section):
    """How to reach Redis."""

    url: SecretStr = SecretStr("redis://localhost:6379/0")
    socket_timeout_s: float = Field(10.0, gt=0)
    connect_timeout_s: float = Field(5.0, gt=0)
    block_ms: int = Field(2000, ge=0)
    max_connections: int = Field(64, ge=2)
    unavailable_timeout_s: float = Field(60.0, gt=0)
    """How long Redis may stay unreachable (retries with backoff and jitter) before replayd exits 69."""

    @model_validator(mode="after")
    def _block_below_timeout(self) -> RedisConfig:
        # redis-py#2807: a blocking XREAD that outlives the socket timeout is read as a dead connection
        if self.block_ms >= self.socket_timeout_s * 1000:
            raise ValueError(
                f"block_ms ({self.block_ms}) must be below socket_timeout_s ({self.socket_timeout_s}) x 1000"
            )
        return self


class HttpConfig(_Section):
    """The /metrics, /healthz and /readyz listener of the daemon."""

    enabled: bool = True
    host: str = "0.0.0.0"  # noqa: S104 - a sidecar is scraped from outside its container
    port: int = Field(9464, ge=0, le=65535)


class FieldNames(_Section):
    """Names of the entry fields, for producers that do not use the article's schema."""

    event_id: str = "event_id"
    event_type: str = "event_type"
    data: str = "data"
    timestamp: str = "timestamp"
    metadata: str = "metadata"


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
    entity: str | None = Field(None, pattern=r"^[^:]+:.+$")
    where: list[str] = []
    filter: str | None = None
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
    fields: FieldNames = FieldNames()
    progress_interval_s: float = Field(1.0, gt=0)
    shard: ShardText | None = None
    """`i/N`: this process handles partitions p with p mod N == i (replicas, `--workers`)."""
    on_gap: Literal["fail", "warn", "skip"] = "fail"
    """A stream trimmed past, or gone back behind, the checkpoint: stop (exit 65), or log and go on."""
    on_poison: Literal["stop", "dead-letter", "skip"] | None = None
    """An event whose handler keeps failing, or an entry that cannot be decoded: `stop` (exit 65, the default of a
    job with an end), `dead-letter` (the default of a following job), or `skip` (log, count, go on)."""
    retries: int = Field(3, ge=0)
    """Attempts after the first for a failing handler, with exponential backoff and jitter."""
    retry_backoff_s: float = Field(0.1, ge=0)
    on_lease_held: Literal["wait", "exit"] = "wait"
    """Another instance holds this job's (shard's) lease: wait for it, or exit 75."""
    lease_ttl_s: float = Field(15.0, gt=0)
    """How long a lease outlives its owner (a SIGKILLed or paused instance) before another may take it."""
    allow_reset: bool = False
    """Start over when the checkpoint vanished while the job's progress remains (refused otherwise)."""

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
            tomllib.loads(file.read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config file {file} cannot be read: {exc}") from None
    token = _toml_path.set(file)
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(describe(exc, file)) from None
    finally:
        _toml_path.reset(token)


def describe(exc: ValidationError, file: Path | None) -> str:
    """One line per invalid setting, naming its path (`jobs.0.partitions`) and where settings came from."""
    origin = f"{file} or REPLAYD_* environment" if file else "REPLAYD_* environment or arguments"
    lines = [f"invalid configuration ({origin}):"]
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "(root)"
        message = re.sub(r"^Value error, ", "", error["msg"])
        lines.append(f"  {where}: {message}")
    return "\n".join(lines)
