"""Logging: JSON lines when stderr is not a terminal, readable lines on one; secrets never printed, and no line
longer than `MAX_LINE` (an entry's payload is shown cut, with its size).

Every record carries the job it belongs to (a context variable the engine sets, inherited by its tasks).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from contextvars import ContextVar
from itertools import groupby
from operator import itemgetter
from typing import Any
from urllib.parse import quote

current_job: ContextVar[str] = ContextVar("replayd_job", default="")

_URL = re.compile(r"(?i)\b(?P<scheme>(?:rediss?|unix)(?:\+cluster)?://)(?P<rest>[^\s'\"<>]*)")
_QUERY_PAIR = re.compile(r"(?P<sep>[?&;])(?P<key>[^=&;#]*)=(?P<value>[^&;#]*)")
_PLAIN_QUERY = frozenset({
    "db", "ssl_cert_reqs", "ssl_check_hostname", "socket_timeout", "socket_connect_timeout", "socket_keepalive",
    "retry_on_timeout", "max_connections", "health_check_interval", "protocol", "decode_responses",
})  # fmt: skip
"""Query parameters whose values are never secret; every other value (password, ssl_password, ssl_ca_data,
ssl_keyfile... and whatever a later redis-py adds) is hidden."""
_secrets: set[str] = set()

MAX_LINE = 8192
"""The longest log message, in characters: past it, the message is cut and its length stated."""


def redact_text(text: str) -> str:
    """Hide credentials in Redis URLs anywhere in `text` (every form: `user:pass@`, `:pass@`, a password holding
    `@`, `:` or %-escapes, `unix://`, `?password=` and other query parameters that may carry key material), and
    every secret `register_secrets` was told about, however it is written."""
    text = _URL.sub(_redact_url, text)
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, "***")
    return text


def _redact_url(match: re.Match[str]) -> str:
    """The URL with its credentials and secret query values as `***`. Where a raw `@` or `?` makes it ambiguous
    (a password holding `?`, a query value holding `@`), what either reading calls secret is hidden."""
    rest = match["rest"]
    hidden = [False] * len(rest)
    at = rest.rfind("@")  # the last one: a raw `@` in a password is not the end of the credentials
    if at >= 0:
        user, colon, _ = rest[:at].partition(":")  # the user stays (no secret); without `:`, all may be one
        start = len(user) + 1 if colon and "@" not in user else 0
        hidden[start:at] = [True] * (at - start)
    for pair in _QUERY_PAIR.finditer(rest):
        if pair["key"].lower() not in _PLAIN_QUERY:
            hidden[pair.start("value") : pair.end("value")] = [True] * len(pair["value"])
    shown = "".join(
        "***" if secret else "".join(char for _, char in run)
        for secret, run in groupby(zip(hidden, rest, strict=True), key=itemgetter(0))
    )
    return match["scheme"] + shown


def register_secrets(*secrets: str | None) -> None:
    """Hide these values (and their %-encoded forms) wherever redaction runs: a belt over the URL patterns'
    braces, for a password that reaches a message some other way (a library's error, a value with spaces)."""
    for secret in secrets:
        if secret and len(secret) >= 3:  # shorter ones would hide ordinary text; the URL patterns still apply
            _secrets.update({secret, quote(secret, safe=""), quote(secret)})


def bounded(text: str, limit: int = MAX_LINE) -> str:
    """`text`, cut to `limit` characters with its length stated when longer."""
    return text if len(text) <= limit else f"{text[:limit]}... (cut: {len(text)} chars in all)"


class _JobAndRedaction(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.job = current_job.get()
        if record.args:
            record.msg = record.getMessage()
            record.args = None
        record.msg = bounded(redact_text(str(record.msg)))
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, job, msg (+ exc)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        job = getattr(record, "job", "")
        if job:
            line["job"] = job
        if record.exc_info:
            line["exc"] = bounded(redact_text(self.formatException(record.exc_info)), 4 * MAX_LINE)
        return json.dumps(line, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`12:00:01 INFO  [job] message` for people at a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        job = getattr(record, "job", "")
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        text = f"{stamp} {record.levelname:<7} {f'[{job}] ' if job else ''}{record.getMessage()}"
        if record.exc_info:
            text += "\n" + bounded(redact_text(self.formatException(record.exc_info)), 4 * MAX_LINE)
        return text


def setup_logging(level: str = "INFO", fmt: str = "auto") -> None:
    """Configure the root logger once: to stderr; data goes to stdout, never logs."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    handler.addFilter(_JobAndRedaction())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("redis").setLevel(max(logging.WARNING, root.level))
