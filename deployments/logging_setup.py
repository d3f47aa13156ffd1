"""Request ids on every log line, and our package loggers wired into each Serve replica's log file.

Ray Serve configures only the `ray.serve` logger inside a replica; records of `deployments.*`, `router.*`
and `fusion.*` would otherwise fall to Python's last-resort handler (WARNING and up, stderr only).
`configure_logging()` forwards them, at INFO, to the handlers Serve set up, so they land in the replica's
log file (`<session>/logs/serve/replica_<app>_<deployment>_<id>.log`) in Serve's format: text, or JSON
lines when the deployments run with `logging_config: {encoding: JSON}` (set CONSILIUM_LOG_FORMAT=json
when the app is built, or put that `logging_config` in the Serve config file).
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import re
import uuid
from typing import Any

PACKAGES = ("deployments", "router", "fusion")
LOG_FORMAT_ENV = "CONSILIUM_LOG_FORMAT"  # "text" (default) or "json"
LOG_LEVEL_ENV = "CONSILIUM_LOG_LEVEL"  # INFO unless set

# What we accept from a client's X-Request-Id: short and safe to print in a log line or a header.
REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("consilium_request_id", default=None)


def new_request_id() -> str:
    return uuid.uuid4().hex


def valid_request_id(value: str) -> bool:
    return bool(REQUEST_ID_PATTERN.match(value))


def current_request_id() -> str | None:
    return request_id_var.get()


def set_request_id(value: str | None) -> contextvars.Token:
    """Bind the id to this task (and the tasks it spawns); returns the token to reset it."""
    return request_id_var.set(value)


class RequestIdFilter(logging.Filter):
    """Stamps `record.request_id` from our contextvar (Serve's own context filter may refine it later)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", None):
            record.request_id = request_id_var.get() or "-"
        return True


class JsonLinesFormatter(logging.Formatter):
    """One JSON object per line, for processes where Serve's formatter is not there (CLI, pipeline)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


class _ToServeHandlers(logging.Handler):
    """Hands each record to the handlers Serve attached to `ray.serve` (read at emit time: Serve may
    reconfigure them when a deployment's logging_config changes)."""

    def emit(self, record: logging.LogRecord) -> None:
        for h in logging.getLogger("ray.serve").handlers:
            if record.levelno >= h.level:
                h.handle(record)


def json_requested() -> bool:
    return os.environ.get(LOG_FORMAT_ENV, "text").strip().lower() == "json"


def serve_logging_options() -> dict[str, Any]:
    """Deployment options for the chosen log format: {} for text (Serve's default)."""
    return {"logging_config": {"encoding": "JSON"}} if json_requested() else {}


def configure_logging(level: str | int | None = None) -> None:
    """Send our packages' logs (INFO by default) wherever this process's Serve logs go; idempotent.

    Outside a Serve replica (no `ray.serve` handlers), log to stderr: text with the request id, or JSON
    lines when CONSILIUM_LOG_FORMAT=json.
    """
    level = level or os.environ.get(LOG_LEVEL_ENV, "INFO")
    if logging.getLogger("ray.serve").handlers:
        handler: logging.Handler = _ToServeHandlers()
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(
            JsonLinesFormatter()
            if json_requested()
            else logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
        )
    handler.addFilter(RequestIdFilter())
    handler.set_name("consilium")
    for name in PACKAGES:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.handlers = [h for h in logger.handlers if h.get_name() != "consilium"] + [handler]
        logger.propagate = False
