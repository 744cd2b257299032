"""Structured logs: one line per event, `event key=value ...` or one JSON object with --log-json."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

FIELDS = "genserve_fields"


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log `event` with `fields`; the formatter decides how they are written."""
    if logger.isEnabledFor(level):
        logger.log(level, event, extra={FIELDS: fields})


def _text_value(value: Any) -> str:
    text = str(value)
    if text == "" or any(ch.isspace() or ch in '"=' for ch in text):
        return json.dumps(text)
    return text


class TextFormatter(logging.Formatter):
    """2024-05-01T12:00:00.123Z INFO genserve.server event key=value ..."""

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, FIELDS, {})
        stamp = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        parts = [stamp, record.levelname, record.name, record.getMessage()]
        parts += [f"{k}={_text_value(v)}" for k, v in fields.items() if v is not None]
        line = " ".join(parts)
        if record.exc_info:
            line += " traceback=" + json.dumps(self.formatException(record.exc_info))
        return line


class JsonFormatter(logging.Formatter):
    """{"ts": ..., "level": ..., "logger": ..., "event": ..., **fields} on one line."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, value in getattr(record, FIELDS, {}).items():
            data[key] = value if isinstance(value, str | int | float | bool | type(None) | list | dict) else str(value)
        if record.exc_info:
            data["traceback"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


class _ContextFilter(logging.Filter):
    """Adds fixed fields (a worker's slot and pid) to every line."""

    def __init__(self, context: dict[str, Any]):
        super().__init__()
        self.context = context

    def filter(self, record: logging.LogRecord) -> bool:
        setattr(record, FIELDS, {**self.context, **getattr(record, FIELDS, {})})
        return True


def configure_logging(json_lines: bool = False, level: str = "info", context: dict[str, Any] | None = None) -> None:
    """Send genserve's logs (and grpc's warnings) to stderr, one line per event, with `context`'s
    fields on every line."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    if context:
        handler.addFilter(_ContextFilter(context))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("genserve").setLevel(level.upper())
