"""The request context: one per HTTP request, created by the outermost middleware.

Routes name their API (a router-level dependency) and their operation (a route-level dependency)
explicitly; telemetry and the ids on responses read the context, never a path prefix or a function's
name: renaming a route must not change metric labels (docs/architecture.md, "Where each concern lives").
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable, Coroutine

from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.telemetry import access
from serve.telemetry.access import RequestContext
from serve.telemetry.metrics import metrics

UNTRACKED = ("/healthz", "/readyz", "/metrics")  # probes and scrapes: frequent, and not traffic


def context(request: Request) -> RequestContext:
    return request.scope["state"]["ctx"]


def api_name(api: str) -> Callable[[Request], Coroutine[Any, Any, None]]:
    """Router dependency: every route of the router belongs to `api`."""

    async def name_api(request: Request) -> None:
        ctx = context(request)
        ctx.api, ctx.counted = api, True
        metrics().request_started(api)

    return name_api


def operation(name: str) -> Callable[[Request], Coroutine[Any, Any, None]]:
    """Route dependency: the operation's label in metrics and access lines."""

    async def name_operation(request: Request) -> None:
        context(request).operation = name

    return name_operation


class RequestContextMiddleware:
    """Outermost: creates the context, and records the request (access line, metrics) when it ends."""

    def __init__(self, app: ASGIApp, log_polls: bool = True):
        self.app, self.log_polls = app, log_polls

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNTRACKED:
            return await self.app(scope, receive, send)
        ctx = RequestContext()
        scope.setdefault("state", {})["ctx"] = ctx
        status, first_byte, complete, left = 500, None, False, False

        async def observe(message: Message) -> None:
            nonlocal status, first_byte, complete
            if message["type"] == "http.response.start":
                status, first_byte = message["status"], time.monotonic()
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                complete = True
            await send(message)

        async def listen() -> Message:
            nonlocal left
            message = await receive()
            if message["type"] == "http.disconnect":
                left = True
            return message

        try:
            await self.app(scope, listen, observe)
        except asyncio.CancelledError:
            left = True
            raise
        finally:
            if left and not complete:
                # The client left before the whole answer (nginx's code for it): before any byte, or in the middle
                # of a stream; recorded so, not as the status the answer began with (docs/operations.md).
                status = 499
            access.record(ctx, scope["method"], scope["path"], status, first_byte, self.log_polls)
