"""What the routers share: config, keys, engine, image intake. One instance per ingress replica."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from fastapi import HTTPException, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from serve.auth import KeyRing
from serve.config import ServeConfig
from serve.engine.types import Engine
from serve.jobs.store import JobStore
from serve.media.intake import ImageIntake
from serve.webhooks import WebhookSender


@dataclass
class Services:
    config: ServeConfig
    keys: KeyRing
    engine: Engine
    media: ImageIntake
    store: JobStore
    webhooks: WebhookSender

    @classmethod
    def build(cls, cfg: ServeConfig, engine: Engine, store: JobStore) -> Services:
        """Everything but the engine and the store, from the config."""
        return cls(
            config=cfg,
            keys=KeyRing.load(cfg.auth.keys_file, cfg.limits),
            engine=engine,
            media=ImageIntake(cfg.media),
            store=store,
            webhooks=WebhookSender(cfg.media, cfg.webhooks),
        )

    async def aclose(self) -> None:
        await self.media.aclose()
        await self.webhooks.aclose()


# Dependencies are `async def` although they never await: FastAPI runs a plain `def` one on a worker
# thread, a thread hop per dependency per request (loadtest/README.md: status polls).
async def get_services(request: Request) -> Services:
    return request.app.state.services


class ApiError(Exception):
    """An error already in the wire shape of the API it came through."""

    def __init__(self, status_code: int, body: dict, headers: dict[str, str] | None = None):
        super().__init__(f"{status_code}: {body}")
        self.status_code = status_code
        self.body = body
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, status_code=self.status_code, headers=self.headers)


def shaped_errors(to_error: Callable[[Exception], ApiError]) -> type[APIRoute]:
    """A route class whose every failure answers in one API's error shape (`to_error` maps it)."""

    class ShapedRoute(APIRoute):
        def get_route_handler(self) -> Callable:
            handler = super().get_route_handler()

            async def route(request: Request) -> Response:
                try:
                    return await handler(request)
                except HTTPException:
                    raise  # FastAPI's own (none of ours raise it): its handlers answer
                except Exception as exc:
                    return to_error(exc).response()

            return route

    return ShapedRoute
