"""Server-sent events: one `data:` line of JSON per event (what both fal clients parse)."""

from __future__ import annotations

import json
from typing import Any, AsyncGenerator, Awaitable, Callable

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


def event(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


class EventStream(StreamingResponse):
    """A `text/event-stream` response that, however it ends, closes its events (so a client that
    left stops the work behind them) and runs `cleanup` — also when the client is gone before the
    first event, where the events' own `finally` would never run."""

    def __init__(
        self,
        events: AsyncGenerator[bytes, None],
        headers: dict[str, str] | None = None,
        cleanup: Callable[[], Awaitable[None]] | None = None,
    ):
        headers = {"Cache-Control": "no-cache", **(headers or {})}
        super().__init__(events, media_type="text/event-stream", headers=headers)
        self._events, self._cleanup = events, cleanup

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self._events.aclose()
            finally:
                if self._cleanup is not None:
                    await self._cleanup()
