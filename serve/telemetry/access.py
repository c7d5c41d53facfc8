"""Per-request telemetry: one access-log line (JSON; text on the development console) and the
request metrics, for every API request.

The line carries the request id every other place uses for the same request — fal's
`x-fal-request-id`, an Eachlabs prediction id, the job id and the engine's request id — with the
key's name (never the key), the API, the operation, the status and the timings.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from serve.telemetry.metrics import metrics

log = logging.getLogger("llava_serve.access")


@dataclass
class RequestContext:
    """One per HTTP request, made by the outermost middleware (serve/api/context.py); routes fill it in."""

    request_id: str = field(default_factory=lambda: str(uuid.uuid4()))  # a route may set the job's id
    api: str = "other"  # fal | eachlabs; "other" until a router names it
    operation: str = "unmatched"  # run, submit, status, create, ...: set by the route
    key_name: str | None = None  # the caller's key *name*, once authenticated
    path: str | None = None  # the path routed, when a dispatcher rewrote the client's (fal's /queue/, proxy)
    started: float = field(default_factory=time.monotonic)
    counted: bool = False  # counted in the in-flight gauge of `api`


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the record's `fields`."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname, "logger": record.name, "message": record.getMessage(),
        }
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    """One short line a person reads (`telemetry.log_format: text`, the development console): an access
    line is `12:03:04 200 POST /fal-ai/llavav15-13b fal run key=local-dev 412 ms`, any other line
    `12:03:04 WARNING serve.jobs.runner: message k=v ...`, followed by its traceback if it has one."""

    def format(self, record: logging.LogRecord) -> str:
        when = time.strftime("%H:%M:%S", time.localtime(record.created))
        fields = dict(getattr(record, "fields", {}))
        if record.name == log.name and "status" in fields:
            # The path as the client sent it, decoded: a %0a in it must not start a forged line of its own.
            path = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(fields["path"]))
            line = (f"{when} {fields['status']} {fields['method']} {path} {fields['api']} "
                    f"{fields['route']} key={fields['key'] or '-'} {fields['duration_ms']:.0f} ms")
        else:
            extra = "".join(f" {k}={v}" for k, v in fields.items())
            line = f"{when} {record.levelname} {record.name}: {record.getMessage()}{extra}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


FORMATTERS: dict[str, type[logging.Formatter]] = {"json": JsonFormatter, "text": TextFormatter}


def configure_logging(level: str = "INFO", log_format: str = "json") -> None:
    """JSON lines (or, with log_format "text", short human lines) on stderr for the service's own
    loggers (`llava_serve.*`, `serve.*`); Ray keeps each replica's stderr in its worker log and
    forwards it to the driver."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(FORMATTERS[log_format]())
    for name in ("llava_serve", "serve"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level)
        logger.propagate = False


# What clients repeat while they wait for a job: counted in the metrics, logged only when asked or failed.
POLLS = frozenset({"status", "get"})


def record(ctx: RequestContext, method: str, path: str, status: int, first_byte: float | None,
           log_polls: bool = True) -> None:
    """The request's access line and metrics, from its context (serve/api/context.py)."""
    seconds = time.monotonic() - ctx.started
    metrics().request_finished(ctx.api, ctx.operation, status, seconds, in_flight=ctx.counted)
    if ctx.operation in POLLS and status < 400 and not log_polls:
        return
    log.info("request", extra={"fields": {
        "request_id": ctx.request_id, "key": ctx.key_name, "api": ctx.api, "route": ctx.operation,
        "method": method, "path": ctx.path or path, "status": status, "duration_ms": round(1000 * seconds, 1),
        "first_byte_ms": None if first_byte is None else round(1000 * (first_byte - ctx.started), 1),
    }})
