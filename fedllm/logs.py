"""Logging for the server and the client: one line per event, as text for people or JSON for machines.

``--log_format json`` writes one JSON object per line with ``time`` (UTC, ISO 8601), ``level``,
``logger``, ``message``, ``event`` and ``pid``, plus any fields passed as ``extra=``. ``event`` is
the ``extra={"event": ...}`` name where the call gives one, else ``module.function`` of the call.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"

# Attributes every LogRecord has; anything else on a record came from ``extra=`` and is an event field.
_RECORD_ATTRS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, event, pid and the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "event": getattr(record, "event", None) or f"{record.module}.{record.funcName}",
            "pid": record.process,
        }
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRS and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def formatter(log_format: str) -> logging.Formatter:
    if log_format not in LOG_FORMATS:
        raise ValueError(f"--log_format must be one of {LOG_FORMATS}, got {log_format!r}")
    return JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)


def setup_logging(level: str | int = "INFO", log_format: str = "text") -> None:
    """Send every log record to stderr in ``log_format`` (replacing earlier root handlers)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(log_format))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    logging.captureWarnings(True)


def gunicorn_logconfig(level: str, log_format: str) -> dict[str, Any] | None:
    """gunicorn's ``logconfig_dict`` for ``log_format`` (None keeps gunicorn's own text format)."""
    if log_format != "json":
        return None
    handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": f"{__name__}.JsonFormatter"}},
        "handlers": {"console": handler, "error_console": dict(handler)},
        "root": {"level": level.upper(), "handlers": ["console"]},
        "loggers": {
            "gunicorn.error": {"level": level.upper(), "handlers": ["error_console"], "propagate": False,
                               "qualname": "gunicorn.error"},
            "gunicorn.access": {"level": level.upper(), "handlers": ["console"], "propagate": False,
                                "qualname": "gunicorn.access"},
        },
    }
