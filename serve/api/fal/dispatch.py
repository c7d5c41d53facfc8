"""Which fal operation a request is for (docs/api.md §1.2), decided before routing.

One origin stands in for `fal.run`, `queue.fal.run` and the JS client's proxy mode, which share
paths: submit and run are both `POST /fal-ai/llavav15-13b`. This middleware rewrites a request to
its fal path, records in `request.state.fal` whether it came for the queue (and how: the URLs a
submit returns depend on it), and puts `x-fal-request-id` (the request context's id) on every fal
response, errors included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.telemetry.access import RequestContext

PROXY_PATH = "/api/fal/proxy"
QUEUE_PREFIX = "/queue/"
TARGET_HEADER = "x-fal-target-url"
REQUEST_ID_HEADER = "x-fal-request-id"
FAL_PATH = "/fal-ai/"

# What @fal-ai/server-proxy forwards (its config.js); anything else it refuses, and so do we.
_PROXY_HOSTS = ("fal.run", "queue.fal.run")
_PROXY_REST = {
    ("rest.fal.ai", "/storage/upload/initiate", "storage_type=fal-cdn-v3"),
    ("rest.fal.ai", "/storage/upload/complete-multipart", "storage_type=fal-cdn-v3"),
}


@dataclass(frozen=True)
class FalRouting:
    queue: bool  # a POST to the app enqueues instead of running
    via: Literal["proxy", "prefix", "host", "direct"]  # proxy: x-fal-target-url; prefix: /queue/; host: queue.*


def _proxy_target(url: str | None) -> tuple[str, str, str] | None:
    """(host, path, query) of an allowed proxy target, else None."""
    if not url:
        return None
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
    except ValueError:
        return None
    if parts.scheme != "https":
        return None
    if host in _PROXY_HOSTS or (host, parts.path, parts.query) in _PROXY_REST:
        return host, parts.path or "/", parts.query
    return None


class FalDispatch:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        target, path = headers.get(TARGET_HEADER), scope["path"]
        if target is not None or path == PROXY_PATH:
            found = _proxy_target(target)
            if found is None:
                return await PlainTextResponse("Invalid request", status_code=400)(scope, receive, send)
            host, path, query = found
            routing = FalRouting(queue=host.startswith("queue."), via="proxy")
            scope = {**scope, "path": path, "raw_path": path.encode(), "query_string": query.encode()}
        elif path.startswith(QUEUE_PREFIX):
            path = path[len(QUEUE_PREFIX) - 1:]
            routing = FalRouting(queue=True, via="prefix")
            scope = {**scope, "path": path, "raw_path": path.encode()}
        elif headers.get("host", "").lower().startswith("queue."):
            routing = FalRouting(queue=True, via="host")
        elif path.startswith(FAL_PATH):
            routing = FalRouting(queue=False, via="direct")
        else:
            return await self.app(scope, receive, send)  # not fal's (Eachlabs, health)

        state = scope.setdefault("state", {})
        state["fal"] = routing
        # The context's id: a route about an existing request (status, result...) makes it that request's.
        ctx = state.get("ctx") or state.setdefault("ctx", RequestContext())  # probes' paths get none outside
        ctx.path = scope["path"]  # as routed: the access line shows fal's path, not /queue/... or the proxy's

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).setdefault(REQUEST_ID_HEADER, ctx.request_id)
            await send(message)

        await self.app(scope, receive, send_with_id)
