"""Per-request telemetry: one JSON access-log line and the request metrics, for every API request.

The line carries the request id every other place uses for the same request — fal's
`x-fal-request-id`, an Eachlabs prediction id, the job id and the engine's request id — with the
key's name (never the key), the API, the operation, the status and the timings.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.telemetry.metrics import metrics

log = logging.getLogger("llava_serve.access")
UNTRACKED = ("/healthz", "/readyz", "/metrics")  # probes and scrapes: frequent, and not traffic


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


def configure_logging(level: str = "INFO") -> None:
    """JSON lines on stderr for the service's own loggers (`llava_serve.*`, `serve.*`); Ray keeps
    each replica's stderr in its worker log and forwards it to the driver."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    for name in ("llava_serve", "serve"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level)
        logger.propagate = False


def _api(scope: Scope) -> str:
    if "fal" in scope.get("state", {}):
        return "fal"
    return "eachlabs" if scope["path"].startswith("/v1/") else "other"


def _route(scope: Scope) -> str:
    """The operation: the route's endpoint name (run, status, create, ...), bounded by the router."""
    route = scope.get("route")
    if route is None:
        return "unmatched"
    name = getattr(route, "name", "unmatched")
    if name == "run_or_submit":  # one fal path, two operations (api-spec §1.2)
        return "submit" if scope["state"]["fal"].queue else "run"
    return name


class Telemetry:
    """Innermost middleware: it sees the rewritten fal path and the matched route."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNTRACKED:
            return await self.app(scope, receive, send)
        api, started, status = _api(scope), time.monotonic(), 500
        first_byte: float | None = None
        metrics().request_started(api)

        async def observe(message: Message) -> None:
            nonlocal status, first_byte
            if message["type"] == "http.response.start":
                status, first_byte = message["status"], time.monotonic()
            await send(message)

        try:
            await self.app(scope, receive, observe)
        except asyncio.CancelledError:
            if first_byte is None:
                status = 499  # the client left before an answer (nginx's code for it)
            raise
        finally:
            seconds = time.monotonic() - started
            route, state, params = _route(scope), scope.get("state", {}), scope.get("path_params", {})
            request_id = state.get("request_id") or params.get("prediction_id") or params.get("request_id")
            metrics().request_finished(api, route, status, seconds)
            log.info("request", extra={"fields": {
                "request_id": request_id, "key": state.get("key_name"), "api": api, "route": route,
                "method": scope["method"], "path": scope["path"], "status": status,
                "duration_ms": round(1000 * seconds, 1),
                "first_byte_ms": None if first_byte is None else round(1000 * (first_byte - started), 1),
            }})
