"""The HTTP ingress: one FastAPI app (built by `create_app`) served by a Ray Serve deployment."""

from __future__ import annotations

import asyncio

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from serve.api.fal.routes import router as fal_router
from serve.api.services import Services
from serve.auth import KeyRing
from serve.config import ServeConfig
from serve.engine.server import HandleEngine
from serve.media.intake import ImageIntake


def create_app(services: Services) -> FastAPI:
    app = FastAPI(title="llava-serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.services = services

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        try:
            await asyncio.wait_for(services.engine.check_health(), services.config.ingress.readiness_timeout_s)
        except Exception as exc:  # any failure to answer means not ready
            return JSONResponse({"status": "not ready", "reason": type(exc).__name__}, status_code=503)
        return JSONResponse({"status": "ready"})

    app.include_router(fal_router)
    return app


class Ingress:
    """Applied as a Serve deployment by `serve.app`; `serve.ingress()` calls the builder below."""

    def __init__(self, cfg: ServeConfig, llm_handle):
        self._services = Services(
            config=cfg,
            keys=KeyRing.load(cfg.auth.keys_file, cfg.limits),
            engine=HandleEngine(llm_handle),
            media=ImageIntake(cfg.media),
        )

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self._services)
