"""Logging: JSON lines when stderr is not a terminal, readable lines on one; secrets never printed.

Every record carries the job it belongs to (a context variable the engine sets, inherited by its tasks).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from contextvars import ContextVar
from typing import Any

current_job: ContextVar[str] = ContextVar("replayd_job", default="")

_SECRET_IN_URL = re.compile(r"(?P<scheme>rediss?(?:\+\w+)?://)(?P<user>[^:@/\s]*):(?P<password>[^@\s]+)@")


def redact_text(text: str) -> str:
    """Hide passwords in Redis URLs anywhere in `text`."""
    return _SECRET_IN_URL.sub(r"\g<scheme>\g<user>:***@", text)


class _JobAndRedaction(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.job = current_job.get()
        if record.args:
            record.msg = record.getMessage()
            record.args = None
        record.msg = redact_text(str(record.msg))
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
            line["exc"] = redact_text(self.formatException(record.exc_info))
        return json.dumps(line, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`12:00:01 INFO  [job] message` for people at a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        job = getattr(record, "job", "")
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        text = f"{stamp} {record.levelname:<7} {f'[{job}] ' if job else ''}{record.getMessage()}"
        if record.exc_info:
            text += "\n" + redact_text(self.formatException(record.exc_info))
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
