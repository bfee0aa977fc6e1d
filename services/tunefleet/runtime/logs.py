"""Structured logging: every record carries the RPC method and request id of the call it was
logged in, as plain text or as JSON lines."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from datetime import UTC, datetime

from tunefleet.runtime.settings import LoggingSettings

# Set by the request-context interceptor for the duration of one RPC.
rpc_method: contextvars.ContextVar[str] = contextvars.ContextVar("rpc_method", default="")
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


class _RpcContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        method, rid = rpc_method.get(), request_id.get()
        record.rpc_method, record.request_id = method, rid
        record.rpc = f" [{method} {rid}]" if rid else ""
        return True


class JsonLinesFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, rpc_method, request_id, and the
    traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("rpc_method", "request_id"):
            value = getattr(record, key, "")
            if value:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(rpc)s %(message)s"


def configure_logging(settings: LoggingSettings) -> None:
    """Route the root logger to stderr in the configured format. Called once by `main`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RpcContextFilter())
    handler.setFormatter(
        JsonLinesFormatter() if settings.json_lines else logging.Formatter(TEXT_FORMAT)
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.level)
    # Alembic narrates every migration step at INFO.
    logging.getLogger("alembic").setLevel(max(logging.WARNING, root.level))
